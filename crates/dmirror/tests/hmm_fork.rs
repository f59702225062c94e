//! The kernel's hmm selftests that fork (tools/testing/selftests/mm/hmm-tests.c:
//! `anon_write_child`, `anon_write_child_shared`, `hmm_cow_in_device`), ported to the dmirror
//! device, one test per scenario, named after it. `exclusive_cow` is in `hmm_exclusive.rs`.
//!
//! The children fork from a test process that has threads; see [`hmm_common::fork`] for what a
//! child may do. A child that needs a device opens its own address space and dmirror, as the
//! kernel tests' children open their own mirror of their own mm.
//!
//! svmirror does not see fork (no FORK event). Where pages live on a device at the fork, the
//! kernel lets the child share them; userspace cannot, so the tests bring them back first
//! through the SVM API (`ProcessMm::prepare_fork`) and say so.

mod hmm_common;

use std::sync::Arc;

use hmm_common::*;
use svmirror_core::Range;
use svmirror_dmirror::{Dmirror, prot};
use svmirror_mm::{Advice, ProcessMm, Protection};
use svmirror_testsupport::serial;

/// The child's side of `anon_write_child*`: it sees the parent's data, then its own device
/// writes `-i` into the buffer in one fault pass.
fn child_writes(buf: Range, m: &[u8], check_written: bool) {
    check_ints(buf, "child sees the parent's data", |i| i as u32);
    let mm = Arc::new(ProcessMm::new().expect("the child's own userfaultfd"));
    // SAFETY: the buffer is touched by the CPU through raw pointers only.
    let dev = unsafe { Dmirror::open(mm) }.expect("the child's own device");
    let npages = buf.pages();
    let cmd = dev.write(buf.start(), npages, m).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert_eq!(cmd.faults, 1);
    if check_written {
        check_ints(buf, "child sees its device's writes", |i| {
            (i as u32).wrapping_neg()
        });
    }
    // The child's device and address space are left to `_exit`.
    std::mem::forget(dev);
}

/// `hmm.anon_write_child`: a child's device writes its copy of a private buffer; the parent's
/// stays as it was. Four variants as in the kernel test: with and without THP, and with the
/// buffer migrated to the parent's device before the fork.
///
/// Deviation (migrated variants): the pages are brought back through `prepare_fork` before the
/// fork (see the module documentation).
#[test]
fn hmm_anon_write_child() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    for migrate in [false, true] {
        for thp in [false, true] {
            let size = if thp { TWO_MEG } else { NPAGES * PAGE };
            let advice = if thp {
                Advice::HugePage
            } else {
                Advice::NoHugePage
            };
            let (whole, buf) = env.aligned_buffer(size, Protection::READ_WRITE, advice);
            let npages = buf.pages();
            fill_ints(buf);
            let mut m = mirror_buf(npages);
            for i in 0..ints(buf) {
                set_mirror_int(&mut m, i, (i as u32).wrapping_neg());
            }
            if migrate {
                let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
                assert_eq!(cmd.cpages, npages);
                check_mirror(&m, ints(buf), "device read", |i| i as u32);
                for i in 0..ints(buf) {
                    set_mirror_int(&mut m, i, (i as u32).wrapping_neg());
                }
                assert_eq!(env.mm.prepare_fork().unwrap(), npages);
            }

            let child_m = m.clone();
            let pid = fork(move || child_writes(buf, &child_m, !migrate));
            wait_ok(pid);
            check_ints(buf, "parent's buffer unchanged", |i| i as u32);
            env.unmap(whole);
        }
    }
    drop(dev);
    env.check_unpinned();
}

/// `hmm.anon_write_child_shared`: a child's device writes a shared buffer; the parent sees the
/// writes.
#[test]
fn hmm_anon_write_child_shared() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = shared_buffer(NPAGES);
    fill_ints(buf);
    let mut m = mirror_buf(NPAGES);
    for i in 0..ints(buf) {
        set_mirror_int(&mut m, i, (i as u32).wrapping_neg());
    }

    let pid = fork(move || child_writes(buf, &m, true));
    wait_ok(pid);
    check_ints(buf, "parent sees the child's device writes", |i| {
        (i as u32).wrapping_neg()
    });

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.hmm_cow_in_device`: pages migrated to the device, then a fork; the parent's writes
/// bring them back and give it its own copies: the snapshot shows them writable in RAM.
///
/// Deviation: the pages come back through `prepare_fork` before the fork (see the module
/// documentation) rather than at the parent's first write.
#[test]
fn hmm_hmm_cow_in_device() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let npages = 4;
    let buf = env.buffer(npages, Protection::READ_WRITE);
    fill_ints(buf);
    let mut m = mirror_buf(npages);
    let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.cpages, npages);

    assert_eq!(env.mm.prepare_fork().unwrap(), npages);
    // The child waits for SIGKILL from the parent (pause is async-signal-safe).
    let pid = fork(|| {
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        }
    });
    // The parent writes the copy-on-write pages and gets its own copies.
    fill_ints(buf);
    // SAFETY: `pid` is our child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = wait(pid);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);

    let mut snap = vec![0u8; npages as usize];
    let cmd = dev.snapshot(buf.start(), npages, &mut snap).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert!(snap.iter().all(|&p| p == prot::WRITE), "{snap:x?}");

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}
