//! The kernel's hmm selftests of exclusive (atomic) device access and of FLAGS
//! (tools/testing/selftests/mm/hmm-tests.c: `exclusive`, `exclusive_mprotect`, `exclusive_cow`),
//! ported to the dmirror device, one test per scenario, named after it; plus the behaviour
//! those scenarios rely on, checked directly.

mod hmm_common;

use std::sync::Arc;

use hmm_common::*;
use svmirror_core::testing::TestMirror;
use svmirror_core::{Event, Owner, PAGE_SIZE, Range};
use svmirror_dmirror::{DmirrorError, ExclusiveRefusal, FLAG_FAIL_ALLOC};
use svmirror_mm::Protection;
use svmirror_testsupport::serial;

/// `hmm.exclusive`: the device takes exclusive access and reads the data; the CPU's accesses
/// revoke it and see the data, and CHECK_EXCLUSIVE then finds no exclusive page left.
///
/// Deviation: the kernel test's CHECK_EXCLUSIVE passes the buffer with the page count of the
/// EXCLUSIVE (recent kernels) or none (older ones, which checks nothing); here it checks the
/// whole buffer.
#[test]
fn hmm_exclusive() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    fill_ints(buf);

    let mut m = mirror_buf(NPAGES);
    let cmd = dev.exclusive(buf.start(), NPAGES, &mut m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    check_mirror(&m, ints(buf), "device read", |i| i as u32);
    // The device holds every page exclusively until the CPU touches it.
    let err = dev.check_exclusive(buf.start(), NPAGES).unwrap_err();
    assert!(matches!(err, DmirrorError::StillExclusive { addr } if addr == buf.start()));
    assert_eq!(err.errno(), libc::EPERM);

    // Fault pages back to system memory and check them.
    for i in 0..ints(buf) {
        let v = read_int(buf, i);
        assert_eq!(v, i as u32, "int {i}");
        write_int(buf, i, v + 1);
    }
    check_ints(buf, "after increment", |i| i as u32 + 1);
    assert_eq!(dev.exclusive_pages(), 0);
    dev.check_exclusive(buf.start(), NPAGES).unwrap();

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.exclusive_mprotect`: after the buffer is made read-only, a device write fails with
/// EPERM although the device had exclusive access.
///
/// Deviation: userspace cannot see mprotect, so it is made through the SVM API.
#[test]
fn hmm_exclusive_mprotect() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    fill_ints(buf);

    let mut m = mirror_buf(NPAGES);
    let cmd = dev.exclusive(buf.start(), NPAGES, &mut m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    check_mirror(&m, ints(buf), "device read", |i| i as u32);

    env.mm.mprotect(buf, Protection::READ).unwrap();
    // The protection change dropped the device's exclusive entries.
    dev.check_exclusive(buf.start(), NPAGES).unwrap();
    let err = dev.write(buf.start(), NPAGES, &m).unwrap_err();
    assert_eq!(err.errno(), libc::EPERM, "{err}");
    // Nothing was written, and the data survived.
    check_ints(buf, "after the refused write", |i| i as u32);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.exclusive_cow`: after the device took exclusive access, parent and child each fault
/// the pages back and see the data; their writes stay their own.
///
/// Deviation: svmirror does not see fork (no FORK event), and the kernel gives the child the
/// parent's pages at fork, restoring device-exclusive entries first. Userspace cannot do that
/// inside fork, so the test readies the address space through the SVM API
/// (`ProcessMm::prepare_fork`, which revokes the exclusive access) right before it forks.
#[test]
fn hmm_exclusive_cow() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    fill_ints(buf);

    let mut m = mirror_buf(NPAGES);
    let cmd = dev.exclusive(buf.start(), NPAGES, &mut m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);

    assert_eq!(env.mm.prepare_fork().unwrap(), NPAGES);
    dev.check_exclusive(buf.start(), NPAGES).unwrap();
    let increment = move || {
        for i in 0..ints(buf) {
            let v = read_int(buf, i);
            assert_eq!(v, i as u32, "int {i}");
            write_int(buf, i, v + 1);
        }
        check_ints(buf, "after increment", |i| i as u32 + 1);
    };
    let pid = fork(increment);
    increment();
    wait_ok(pid);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// The invalidations another subscriber sees around exclusive access: one `Exclusive`
/// invalidation (with the device's owner) when the device takes the pages, one per page when
/// the CPU revokes it; and a device READ after revocation faults again.
#[test]
fn exclusive_access_is_announced_and_revoked_by_a_cpu_read() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let npages = 4;
    let buf = env.buffer(npages, Protection::READ_WRITE);
    fill_ints(buf);
    let watcher = Arc::new(TestMirror::new(Owner(1)));
    let sub = env.mm.notifier().insert(buf, watcher.clone()).unwrap();

    let mut m = mirror_buf(npages);
    dev.exclusive(buf.start(), npages, &mut m).unwrap();
    let exclusive = |w: &TestMirror| {
        w.table
            .lock()
            .invalidations
            .iter()
            .filter(|(_, e)| matches!(e, Event::Exclusive { .. }))
            .copied()
            .collect::<Vec<_>>()
    };
    let grant = exclusive(&watcher);
    assert_eq!(grant.len(), 1, "{grant:?}");
    assert_eq!(grant[0].0, buf);
    // A CPU read (not only a write) revokes the page it touches, and only that one.
    assert_eq!(read_int(buf, 0), 0);
    let after = exclusive(&watcher);
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[1].0, Range::with_len(buf.start(), PAGE_SIZE).unwrap());
    assert_eq!(after[1].1, grant[0].1, "the same owner revokes");
    assert_eq!(dev.exclusive_pages() as u64, npages - 1);
    let err = dev.check_exclusive(buf.start(), npages).unwrap_err();
    assert!(matches!(err, DmirrorError::StillExclusive { addr } if addr == buf.start() + PAGE));

    // The device reads the revoked page through a fault, the others from its exclusive copy.
    let faults_before = dev.mirror().stats().faults;
    let cmd = dev.read(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.faults, 1);
    assert!(dev.mirror().stats().faults > faults_before);
    check_mirror(&m, ints(buf), "device read", |i| i as u32);

    sub.remove().unwrap();
    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// The device writes into pages it holds exclusively; the CPU sees the data once it revokes.
#[test]
fn device_writes_to_exclusive_pages_reach_the_cpu() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let npages = 8;
    let buf = env.buffer(npages, Protection::READ_WRITE);
    fill_ints(buf);
    let mut m = mirror_buf(npages);
    dev.exclusive(buf.start(), npages, &mut m).unwrap();
    for i in 0..ints(buf) {
        set_mirror_int(&mut m, i, !(i as u32));
    }
    let cmd = dev.write(buf.start(), npages, &m).unwrap();
    assert_eq!(cmd.faults, 0, "exclusive pages need no fault");
    assert_eq!(dev.exclusive_pages() as u64, npages);
    check_ints(buf, "CPU view", |i| !(i as u32));
    dev.check_exclusive(buf.start(), npages).unwrap();

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// Shared, read-only and missing memory cannot be made exclusive, each with its errno.
#[test]
fn exclusive_refuses_what_the_kernel_refuses() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let mut m = mirror_buf(4);

    let refused = |r: Result<_, DmirrorError>| match r {
        Err(e @ DmirrorError::NotExclusive { reason, .. }) => (reason, e.errno()),
        other => panic!("expected NotExclusive, got {other:?}"),
    };
    let shared = shared_buffer(4);
    let e = dev.exclusive(shared.start(), 4, &mut m);
    assert_eq!(refused(e), (ExclusiveRefusal::Shared, libc::EOPNOTSUPP));
    env.unmap(shared);
    let ro = env.buffer(4, Protection::READ);
    let e = dev.exclusive(ro.start(), 4, &mut m);
    assert_eq!(refused(e), (ExclusiveRefusal::ReadOnly, libc::EFAULT));
    env.unmap(ro);
    let gone = env.buffer(4, Protection::READ_WRITE);
    env.unmap(gone);
    let e = dev.exclusive(gone.start(), 4, &mut m);
    assert_eq!(refused(e), (ExclusiveRefusal::NotMapped, libc::EFAULT));
    assert_eq!(dev.exclusive_pages(), 0);

    drop(dev);
    env.check_unpinned();
}

/// FLAGS(FAIL_ALLOC) makes the next 4 KiB device-page allocation fail: the migration fails
/// with ENOMEM and moves nothing; the flag is spent, so the next migration succeeds.
#[test]
fn fail_alloc_fails_one_small_page_migration() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let npages = 16;
    let buf = env.buffer(npages, Protection::READ_WRITE);
    fill_ints(buf);
    let mut m = mirror_buf(npages);

    dev.flags(FLAG_FAIL_ALLOC).unwrap();
    let err = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap_err();
    assert!(matches!(err, DmirrorError::OutOfMemory { .. }), "{err}");
    assert_eq!(err.errno(), libc::ENOMEM);
    assert_eq!(dev.device_pages(), 0);
    check_ints(buf, "after the failed migration", |i| i as u32);

    let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert_eq!(dev.flags(1 << 5).unwrap_err().errno(), libc::EINVAL);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}
