//! The kernel's hmm selftests (tools/testing/selftests/mm/hmm-tests.c), ported to the dmirror
//! device of this crate: one test per selftest scenario, named after it.
//!
//! Deviations from the kernel tests are said where they happen. The main one: this backend pins
//! for writing, so a device READ of a read-only mapping is not possible; scenarios that need it
//! read a read-write mapping instead, or are left out.
//!
//! The rest of the ported scenarios are in sibling files: exclusive access and FLAGS in
//! `hmm_exclusive.rs`, the fork scenarios in `hmm_fork.rs`, hugetlb and THP in `hmm_huge.rs`;
//! helpers in `hmm_common/`.

mod hmm_common;

use hmm_common::*;
use svmirror_core::Range;
use svmirror_dmirror::prot;
use svmirror_mm::{Advice, Protection};
use svmirror_testsupport::{MONITOR_WAIT, eventually, serial};

/// `hmm.open_close`: the device opens and closes, several at once, leaving nothing pinned.
#[test]
fn hmm_open_close() {
    let _s = serial();
    let env = Env::new();
    let d0 = env.open();
    let d1 = env.open();
    assert_eq!(d0.device_pages(), 0);
    assert_eq!(d0.mirror().stats().faults, 0);
    assert_eq!(d1.mirror().pins().live(), 0);
    drop((d0, d1));
    env.check_unpinned();
}

/// `hmm.anon_read`: the device reads anonymous memory, the first page never touched (pte_none)
/// and the second the zero page, in exactly one fault pass.
///
/// Deviation: the kernel test makes the buffer read-only before the device reads it; this
/// backend cannot pin read-only memory, so the buffer stays read-write.
#[test]
fn hmm_anon_read() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    for i in 2 * INTS_PER_PAGE..ints(buf) {
        write_int(buf, i, i as u32);
    }
    // Populate the CPU page table with the zero page.
    assert_eq!(read_int(buf, INTS_PER_PAGE), 0);
    let mut snap = vec![0u8; 2];
    dev.snapshot(buf.start(), 2, &mut snap).unwrap();
    assert_eq!(snap, [prot::NONE, prot::ZERO | prot::READ]);

    let mut m = mirror_buf(NPAGES);
    let cmd = dev.read(buf.start(), NPAGES, &mut m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    assert_eq!(cmd.faults, 1);
    for i in 0..ints(buf) {
        let want = if i < 2 * INTS_PER_PAGE { 0 } else { i as u32 };
        assert_eq!(mirror_int(&m, i), want, "int {i}");
        assert_eq!(read_int(buf, i), want, "CPU view of int {i}");
    }

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.anon_read_prot`: a device read of PROT_NONE memory fails with EFAULT and leaves the
/// host buffer untouched.
#[test]
fn hmm_anon_read_prot() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    for i in 0..ints(buf) {
        write_int(buf, i, i as u32);
    }
    let mut m = mirror_buf(NPAGES);
    for i in 0..ints(buf) {
        set_mirror_int(&mut m, i, (i as u32).wrapping_neg());
    }
    env.mm.mprotect(buf, Protection::NONE).unwrap();

    let err = dev.read(buf.start(), NPAGES, &mut m).unwrap_err();
    assert_eq!(err.errno(), libc::EFAULT, "{err}");

    env.mm.mprotect(buf, Protection::READ).unwrap();
    for i in 0..ints(buf) {
        assert_eq!(read_int(buf, i), i as u32);
        assert_eq!(mirror_int(&m, i), (i as u32).wrapping_neg(), "int {i}");
    }

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.anon_write`: the device writes anonymous memory in one fault pass; the CPU sees it.
#[test]
fn hmm_anon_write() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    let mut m = mirror_buf(NPAGES);
    for i in 0..ints(buf) {
        set_mirror_int(&mut m, i, i as u32);
    }

    let cmd = dev.write(buf.start(), NPAGES, &m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    assert_eq!(cmd.faults, 1);
    for i in 0..ints(buf) {
        assert_eq!(read_int(buf, i), i as u32, "int {i}");
    }

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.anon_write_prot`: a device write to read-only memory fails with EPERM and changes
/// nothing; after mprotect RW it succeeds in one fault pass.
///
/// Deviation: the kernel test first has the device read the read-only zero page; this backend
/// cannot pin read-only memory, so that step is left out.
#[test]
fn hmm_anon_write_prot() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ);
    let mut m = mirror_buf(NPAGES);
    for i in 0..ints(buf) {
        set_mirror_int(&mut m, i, i as u32);
    }

    let err = dev.write(buf.start(), NPAGES, &m).unwrap_err();
    assert_eq!(err.errno(), libc::EPERM, "{err}");
    for i in 0..ints(buf) {
        assert_eq!(read_int(buf, i), 0, "int {i}");
    }

    // Userspace cannot see a plain mprotect (no userfaultfd event reports it), so the change of
    // protection goes through the SVM API, which invalidates the device first.
    env.mm.mprotect(buf, Protection::READ_WRITE).unwrap();
    let cmd = dev.write(buf.start(), NPAGES, &m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    assert_eq!(cmd.faults, 1);
    for i in 0..ints(buf) {
        assert_eq!(read_int(buf, i), i as u32, "int {i}");
    }

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.anon_read_multiple`: repeated device reads of fresh buffers, one fault pass each.
#[test]
fn hmm_anon_read_multiple() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    for c in 0..NTIMES {
        let buf = env.buffer(NPAGES, Protection::READ_WRITE);
        for i in 0..ints(buf) {
            write_int(buf, i, i as u32 + c);
        }
        let mut m = mirror_buf(NPAGES);
        let cmd = dev.read(buf.start(), NPAGES, &mut m).unwrap();
        assert_eq!(cmd.cpages, NPAGES);
        assert_eq!(cmd.faults, 1, "round {c}");
        for i in 0..ints(buf) {
            assert_eq!(mirror_int(&m, i), i as u32 + c, "round {c}, int {i}");
        }
        env.unmap(buf);
        // The unmap tore the device's mappings down and released their pins.
        assert_eq!(dev.mirror().pins().live(), 0, "round {c}");
    }

    drop(dev);
    env.check_unpinned();
}

/// `hmm.migrate`: anonymous memory migrates to the device, which reports the data; the
/// snapshot shows it in this device's memory; the CPU reads it back.
#[test]
fn hmm_migrate() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    for i in 0..ints(buf) {
        write_int(buf, i, i as u32);
    }

    let mut m = mirror_buf(NPAGES);
    let cmd = dev.migrate_to_dev(buf.start(), NPAGES, &mut m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    for i in 0..ints(buf) {
        assert_eq!(mirror_int(&m, i), i as u32, "device copy of int {i}");
    }
    assert_eq!(dev.device_pages() as u64, NPAGES);
    let mut snap = vec![0u8; NPAGES as usize];
    dev.snapshot(buf.start(), NPAGES, &mut snap).unwrap();
    assert!(
        snap.iter()
            .all(|&p| p == prot::DEV_PRIVATE_LOCAL | prot::WRITE),
        "{snap:x?}"
    );

    // The CPU faults every page back.
    for i in 0..ints(buf) {
        assert_eq!(read_int(buf, i), i as u32, "int {i}");
    }
    assert_eq!(dev.device_pages(), 0);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.migrate_fault`: migrate, let the CPU fault half back, migrate again, then migrate back
/// to system memory; the data survives every step.
#[test]
fn hmm_migrate_fault() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    for i in 0..ints(buf) {
        write_int(buf, i, i as u32);
    }

    let mut m = mirror_buf(NPAGES);
    let cmd = dev.migrate_to_dev(buf.start(), NPAGES, &mut m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    for i in 0..ints(buf) {
        assert_eq!(mirror_int(&m, i), i as u32, "int {i}");
    }

    // Fault half the pages back to system memory and check them.
    for i in 0..ints(buf) / 2 {
        assert_eq!(read_int(buf, i), i as u32, "int {i}");
    }
    assert_eq!(dev.device_pages() as u64, NPAGES / 2);

    // Migrate to the device again: every page moves (the device's own come through RAM).
    let mut m = mirror_buf(NPAGES);
    let cmd = dev.migrate_to_dev(buf.start(), NPAGES, &mut m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    for i in 0..ints(buf) {
        assert_eq!(mirror_int(&m, i), i as u32, "int {i}");
    }

    let cmd = dev.migrate_to_sys(buf.start(), NPAGES).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    assert_eq!(dev.device_pages(), 0);
    for i in 0..ints(buf) {
        assert_eq!(read_int(buf, i), i as u32, "int {i}");
    }

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.migrate_shared`: shared anonymous memory cannot migrate (ENOENT).
#[test]
fn hmm_migrate_shared() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let len = NPAGES * PAGE;
    // SAFETY: a new mapping, replacing nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let buf = Range::with_len(p as u64, len).unwrap();

    let mut m = mirror_buf(NPAGES);
    let err = dev.migrate_to_dev(buf.start(), NPAGES, &mut m).unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    assert_eq!(dev.device_pages(), 0);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm2.snapshot`: one device snapshots a mixed range without faulting: PROT_NONE, a hole,
/// the read-only zero page, a read-only page, a writable page, a page in its own memory and a
/// page in another device's memory.
#[test]
fn hmm2_snapshot() {
    let _s = serial();
    let env = Env::new();
    let dev0 = env.open();
    let dev1 = env.open();
    let npages = 7;
    // Far below everything else, so nothing lands in the hole punched below.
    let hint: u64 = 0x3a5e_0000_0000;
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped.
    let p = unsafe {
        libc::mmap(
            hint as *mut _,
            (npages * PAGE) as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(
        p as u64, hint,
        "address {hint:#x} is free in a test process"
    );
    let buf = Range::with_len(hint, npages * PAGE).unwrap();
    let page = |i: u64, n: u64| Range::with_len(hint + i * PAGE, n * PAGE).unwrap();
    // SAFETY: advice only.
    unsafe { env.mm.madvise(buf, Advice::NoHugePage) }.unwrap();

    // Punch a hole after the first page.
    env.unmap(page(1, 1));
    // Page 2: the read-only zero page.
    env.mm.mprotect(page(2, 1), Protection::READ).unwrap();
    assert_eq!(read_int(page(2, 1), 0), 0);
    // Page 3: read-only.
    env.mm.mprotect(page(3, 1), Protection::READ_WRITE).unwrap();
    write_int(page(3, 1), 0, 3);
    env.mm.mprotect(page(3, 1), Protection::READ).unwrap();
    // Pages 4-6: read-write.
    env.mm.mprotect(page(4, 3), Protection::READ_WRITE).unwrap();
    write_int(page(4, 1), 0, 3);
    // Page 5 migrates to device 0, page 6 to device 1.
    let mut m = mirror_buf(1);
    assert_eq!(
        dev0.migrate_to_dev(page(5, 1).start(), 1, &mut m)
            .unwrap()
            .cpages,
        1
    );
    assert_eq!(
        dev1.migrate_to_dev(page(6, 1).start(), 1, &mut m)
            .unwrap()
            .cpages,
        1
    );

    let mut snap = vec![0u8; npages as usize];
    let cmd = dev0.snapshot(buf.start(), npages, &mut snap).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert_eq!(
        snap,
        [
            prot::ERROR,
            prot::ERROR,
            prot::ZERO | prot::READ,
            prot::READ,
            prot::WRITE,
            prot::DEV_PRIVATE_LOCAL | prot::WRITE,
            prot::NONE,
        ]
    );
    // And the other way round from device 1.
    dev1.snapshot(buf.start(), npages, &mut snap).unwrap();
    assert_eq!(snap[5], prot::NONE);
    assert_eq!(snap[6], prot::DEV_PRIVATE_LOCAL | prot::WRITE);
    // The snapshot faulted nothing back.
    assert_eq!((dev0.device_pages(), dev1.device_pages()), (1, 1));

    drop((dev0, dev1));
    // Closing the devices brought their pages home.
    assert_eq!(read_int(page(5, 1), 0), 0);
    assert_eq!(read_int(page(6, 1), 0), 0);
    env.unmap(page(0, 1));
    env.unmap(page(2, 5));
    env.check_unpinned();
}

/// A private anonymous read-write mapping of `npages` at `hint`, far below everything else the
/// process maps, so no other allocation lands in a hole a test punches into it.
fn far_buffer(env: &Env, hint: u64, npages: u64) -> Range {
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped.
    let p = unsafe {
        libc::mmap(
            hint as *mut _,
            (npages * PAGE) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(
        p as u64, hint,
        "address {hint:#x} is free in a test process"
    );
    let r = Range::with_len(hint, npages * PAGE).unwrap();
    // SAFETY: advice only.
    unsafe { env.mm.madvise(r, Advice::NoHugePage) }.unwrap();
    r
}

/// A pseudo-random number below `n` (the kernel tests' `hmm_random() % n`).
fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n
}

/// `hmm.anon_teardown`: a device read races a thread that unmaps the second half of the buffer
/// with a plain munmap (seen through the userfaultfd UNMAP event); when the read succeeds, it
/// made one fault pass and read the right data.
#[test]
fn hmm_anon_teardown() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let mut succeeded = 0;
    for c in 0..NTIMES {
        let buf = far_buffer(&env, 0x3b10_0000_0000, NPAGES);
        for i in 0..ints(buf) {
            write_int(buf, i, i as u32 + c);
        }
        let half = Range::new(buf.start() + buf.len() / 2, buf.end()).unwrap();
        let unmapper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_micros(random_below(32_000)));
            // SAFETY: test memory, touched only through raw pointers, by nothing after this.
            let rc = unsafe { libc::munmap(half.start() as *mut _, half.len() as usize) };
            assert_eq!(rc, 0);
        });
        let mut m = mirror_buf(NPAGES);
        match dev.read(buf.start(), NPAGES, &mut m) {
            Ok(cmd) => {
                succeeded += 1;
                assert_eq!(cmd.cpages, NPAGES);
                assert_eq!(cmd.faults, 1, "round {c}");
                for i in 0..ints(buf) {
                    assert_eq!(mirror_int(&m, i), i as u32 + c, "round {c}, int {i}");
                }
            }
            // The read lost the race: the pages went (EFAULT), or they kept going while the
            // fault loop retried (EBUSY, `NoProgress`: the kernel's `hmm_range_fault` returns
            // -EBUSY the same way). hmm-tests.c's anon_teardown checks only a read that won.
            Err(e) => assert!(
                [libc::EFAULT, libc::EBUSY].contains(&e.errno()),
                "round {c}: {e}"
            ),
        }
        unmapper.join().unwrap();
        env.unmap(Range::new(buf.start(), half.start()).unwrap());
        // The UNMAP event reaches the device: nothing of the buffer stays mapped or pinned.
        eventually("device mappings torn down", MONITOR_WAIT, || {
            dev.mirror().pins().live() == 0 && dev.mirror().mmu().translate(half.start()).is_none()
        });
    }
    eprintln!("hmm_anon_teardown: {succeeded} of {NTIMES} reads won the race");

    drop(dev);
    env.check_unpinned();
}

/// `hmm2.double_map`: two devices read the same memory, one fault pass each; after the pages
/// migrate to device 1, device 0 reads them in one fault pass; a plain munmap of one page then
/// reaches both devices through the userfaultfd UNMAP event.
///
/// Deviation: the kernel test makes the buffer read-only first; this backend cannot pin
/// read-only memory, so it stays read-write.
#[test]
fn hmm2_double_map() {
    let _s = serial();
    let env = Env::new();
    let dev0 = env.open();
    let dev1 = env.open();
    let npages = 6;
    let buf = far_buffer(&env, 0x3b20_0000_0000, npages);
    for i in 0..ints(buf) {
        write_int(buf, i, i as u32);
    }
    for dev in [&dev0, &dev1] {
        let mut m = mirror_buf(npages);
        let cmd = dev.read(buf.start(), npages, &mut m).unwrap();
        assert_eq!(cmd.cpages, npages);
        assert_eq!(cmd.faults, 1);
        for i in 0..ints(buf) {
            assert_eq!(mirror_int(&m, i), i as u32, "int {i}");
        }
    }

    // Migrate the pages to device 1 and read them from device 0: its fault pass brings them
    // back from device 1's memory.
    let mut m = mirror_buf(npages);
    let cmd = dev1.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert_eq!(dev1.device_pages() as u64, npages);
    let mut m = mirror_buf(npages);
    let cmd = dev0.read(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert_eq!(cmd.faults, 1);
    for i in 0..ints(buf) {
        assert_eq!(mirror_int(&m, i), i as u32, "int {i}");
    }
    assert_eq!(dev1.device_pages(), 0);

    // (From an earlier version of the kernel test.) Punch a hole after the first page with a
    // plain munmap.
    let hole = buf.start() + PAGE;
    // SAFETY: test memory, touched only through raw pointers.
    assert_eq!(unsafe { libc::munmap(hole as *mut _, PAGE as usize) }, 0);
    eventually("both devices lose the page", MONITOR_WAIT, || {
        dev0.mirror().mmu().translate(hole).is_none()
            && dev1.mirror().mmu().translate(hole).is_none()
    });
    assert!(dev0.mirror().mmu().translate(buf.start()).is_some());
    let mut m = mirror_buf(npages);
    let err = dev0.read(buf.start(), npages, &mut m).unwrap_err();
    assert_eq!(err.errno(), libc::EFAULT, "{err}");

    drop((dev0, dev1));
    env.unmap(Range::with_len(buf.start(), PAGE).unwrap());
    env.unmap(Range::new(hole + PAGE, buf.end()).unwrap());
    env.check_unpinned();
}

/// `hmm.anon_write_huge`: the device writes a 2 MiB-aligned buffer advised for transparent
/// huge pages, in one fault pass; the CPU sees the data.
#[test]
fn hmm_anon_write_huge() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let two_meg = 2 << 20;
    let whole = env
        .mm
        .mmap_anonymous(2 * two_meg, Protection::READ_WRITE)
        .unwrap();
    let map = Range::with_len(whole.start().next_multiple_of(two_meg), two_meg).unwrap();
    // SAFETY: advice only.
    unsafe { env.mm.madvise(map, Advice::HugePage) }.unwrap();
    let npages = map.pages();
    let mut m = mirror_buf(npages);
    for i in 0..ints(map) {
        set_mirror_int(&mut m, i, i as u32);
    }

    let cmd = dev.write(map.start(), npages, &m).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert_eq!(cmd.faults, 1);
    for i in 0..ints(map) {
        assert_eq!(read_int(map, i), i as u32, "int {i}");
    }

    drop(dev);
    env.unmap(whole);
    env.check_unpinned();
}

/// `hmm.migrate_multiple`: repeated migrations of fresh buffers, each checked on the device
/// and faulted back by the CPU.
#[test]
fn hmm_migrate_multiple() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    for c in 0..NTIMES {
        let buf = env.buffer(NPAGES, Protection::READ_WRITE);
        for i in 0..ints(buf) {
            write_int(buf, i, i as u32 + c);
        }
        let mut m = mirror_buf(NPAGES);
        let cmd = dev.migrate_to_dev(buf.start(), NPAGES, &mut m).unwrap();
        assert_eq!(cmd.cpages, NPAGES, "round {c}");
        for i in 0..ints(buf) {
            assert_eq!(mirror_int(&m, i), i as u32 + c, "round {c}, int {i}");
        }
        for i in 0..ints(buf) {
            assert_eq!(read_int(buf, i), i as u32 + c, "round {c}, int {i}");
        }
        assert_eq!(dev.device_pages(), 0, "round {c}");
        env.unmap(buf);
    }

    drop(dev);
    env.check_unpinned();
}

/// `hmm.migrate_release`: migrate, then evict the device memory (RELEASE); the CPU finds the
/// data in RAM.
#[test]
fn hmm_migrate_release() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let buf = env.buffer(NPAGES, Protection::READ_WRITE);
    for i in 0..ints(buf) {
        write_int(buf, i, i as u32);
    }
    let mut m = mirror_buf(NPAGES);
    let cmd = dev.migrate_to_dev(buf.start(), NPAGES, &mut m).unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    for i in 0..ints(buf) {
        assert_eq!(mirror_int(&m, i), i as u32, "int {i}");
    }

    let cmd = dev.release().unwrap();
    assert_eq!(cmd.cpages, NPAGES);
    assert_eq!(dev.device_pages(), 0);
    let mut snap = vec![0u8; NPAGES as usize];
    dev.snapshot(buf.start(), NPAGES, &mut snap).unwrap();
    assert!(snap.iter().all(|&p| p == prot::WRITE), "{snap:x?}");
    for i in 0..ints(buf) / 2 {
        assert_eq!(read_int(buf, i), i as u32, "int {i}");
    }

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm2.migrate_mixed`: migrating PROT_NONE memory or a range with a hole is EINVAL; a range
/// of read-only zero, read-only and read-write pages migrates; a page in another device's
/// memory does not (ENOENT). The CPU then finds every page's data.
#[test]
fn hmm2_migrate_mixed() {
    let _s = serial();
    let env = Env::new();
    let dev0 = env.open();
    let dev1 = env.open();
    let npages = 6;
    let hint: u64 = 0x3b30_0000_0000;
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped.
    let p = unsafe {
        libc::mmap(
            hint as *mut _,
            (npages * PAGE) as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(
        p as u64, hint,
        "address {hint:#x} is free in a test process"
    );
    let page = |i: u64, n: u64| Range::with_len(hint + i * PAGE, n * PAGE).unwrap();
    let mut m = mirror_buf(npages);

    // Migrating a protected area is an error.
    let err = dev1.migrate_to_dev(hint, npages, &mut m).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");

    // So is a range the mappings do not cover.
    env.unmap(page(1, 1));
    let err = dev1.migrate_to_dev(hint, 3, &mut m).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");

    // Page 2: the read-only zero page.
    env.mm.mprotect(page(2, 1), Protection::READ).unwrap();
    assert_eq!(read_int(page(2, 1), 0), 0);
    // Page 3: read-only.
    env.mm.mprotect(page(3, 1), Protection::READ_WRITE).unwrap();
    write_int(page(3, 1), 0, 3);
    env.mm.mprotect(page(3, 1), Protection::READ).unwrap();
    // Pages 4-5: read-write.
    env.mm.mprotect(page(4, 2), Protection::READ_WRITE).unwrap();
    write_int(page(4, 1), 0, 3);
    write_int(page(5, 1), 0, 3);

    // Pages 2-5 migrate to device 1.
    let cmd = dev1.migrate_to_dev(page(2, 1).start(), 4, &mut m).unwrap();
    assert_eq!(cmd.cpages, 4);
    assert_eq!(mirror_int(&m, 0), 0);
    for pg in 1..4 {
        assert_eq!(mirror_int(&m, pg * INTS_PER_PAGE), 3, "page {}", pg + 2);
    }
    assert_eq!(dev1.device_pages(), 4);

    // Page 5 does not migrate to device 0: it lives on device 1.
    let err = dev0
        .migrate_to_dev(page(5, 1).start(), 1, &mut m)
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    assert_eq!((dev0.device_pages(), dev1.device_pages()), (0, 4));

    // The CPU faults every page back with its data.
    assert_eq!(read_int(page(2, 1), 0), 0);
    for i in 3..6 {
        assert_eq!(read_int(page(i, 1), 0), 3, "page {i}");
    }
    assert_eq!(dev1.device_pages(), 0);

    drop((dev0, dev1));
    env.unmap(page(0, 1));
    env.unmap(page(2, 4));
    env.check_unpinned();
}
