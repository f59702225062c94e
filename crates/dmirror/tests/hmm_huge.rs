//! The kernel's hmm selftests on huge pages (tools/testing/selftests/mm/hmm-tests.c:
//! `compound`, `anon_write_hugetlbfs`, `migrate_anon_huge_*`, `migrate_partial_unmap_fault`,
//! `migrate_remap_fault`), ported to the dmirror device, one test per scenario, named after it.
//!
//! The hugetlb tests reserve 2 MiB pages as root and give the pool back afterwards; where that
//! is impossible they fail (the kernel's tests skip). The THP tests need THP enabled
//! (`always` or `madvise`).
//!
//! Deviation throughout: device memory here holds 4 KiB pages, so a THP migrates as 512 small
//! device pages: a snapshot of it reports no PMD bit, and FAIL_ALLOC's huge-page allocation
//! failure always falls back to 4 KiB pages (as the kernel's does).

mod hmm_common;

use hmm_common::*;
use svmirror_core::Range;
use svmirror_dmirror::{FLAG_FAIL_ALLOC, prot};
use svmirror_mm::{Advice, Protection};
use svmirror_testsupport::hugetlb::{HugetlbPool, map_2m};
use svmirror_testsupport::serial;

/// `hmm.compound`: a hugetlb page snapshots as WRITE|PMD on every page, READ|PMD after it is
/// made read-only.
///
/// Deviation: the mprotect is made through the SVM API.
#[test]
fn hmm_compound() {
    let _s = serial();
    let _pool = HugetlbPool::reserve(1).expect("a 2 MiB hugetlb page (run as root)");
    let env = Env::new();
    let dev = env.open();
    let buf = map_2m(TWO_MEG).expect("MAP_HUGETLB mmap");
    let npages = buf.pages();
    fill_ints(buf);

    let mut snap = vec![0u8; npages as usize];
    let cmd = dev.snapshot(buf.start(), npages, &mut snap).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert!(
        snap.iter().all(|&p| p == prot::WRITE | prot::PMD),
        "{snap:x?}"
    );

    env.mm.mprotect(buf, Protection::READ).unwrap();
    let cmd = dev.snapshot(buf.start(), npages, &mut snap).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert!(
        snap.iter().all(|&p| p == prot::READ | prot::PMD),
        "{snap:x?}"
    );

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// `hmm.anon_write_hugetlbfs`: the device writes a hugetlb page in one fault pass.
#[test]
fn hmm_anon_write_hugetlbfs() {
    let _s = serial();
    let _pool = HugetlbPool::reserve(1).expect("a 2 MiB hugetlb page (run as root)");
    let env = Env::new();
    let dev = env.open();
    let buf = map_2m(TWO_MEG).expect("MAP_HUGETLB mmap");
    let npages = buf.pages();
    let mut m = mirror_buf(npages);
    for i in 0..ints(buf) {
        set_mirror_int(&mut m, i, i as u32);
    }

    let cmd = dev.write(buf.start(), npages, &m).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert_eq!(cmd.faults, 1);
    check_ints(buf, "device wrote", |i| i as u32);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// A THP-advised, 2 MiB-aligned buffer: (whole mapping, the aligned 2 MiB).
fn thp_buffer(env: &Env, prot: Protection) -> (Range, Range) {
    env.aligned_buffer(TWO_MEG, prot, Advice::HugePage)
}

/// `hmm.migrate_anon_huge_empty`: an untouched THP area migrates; the device reads zeros.
#[test]
fn hmm_migrate_anon_huge_empty() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let (whole, buf) = thp_buffer(&env, Protection::READ);
    let npages = buf.pages();
    let mut m = vec![0xffu8; (npages * PAGE) as usize];

    let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.cpages, npages);
    check_mirror(&m, ints(buf), "device read", |_| 0);

    drop(dev);
    env.unmap(whole);
    env.check_unpinned();
}

/// `hmm.migrate_anon_huge_zero`: the huge zero page migrates; the device and then the CPU
/// read zeros.
#[test]
fn hmm_migrate_anon_huge_zero() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let (whole, buf) = thp_buffer(&env, Protection::READ);
    let npages = buf.pages();
    let mut m = vec![0xffu8; (npages * PAGE) as usize];
    assert_eq!(read_int(buf, 0), 0, "a read maps the huge zero page");

    let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.cpages, npages);
    check_mirror(&m, ints(buf), "device read", |_| 0);
    check_ints(buf, "faulted back", |_| 0);
    assert_eq!(dev.device_pages(), 0);

    drop(dev);
    env.unmap(whole);
    env.check_unpinned();
}

/// `hmm.migrate_anon_huge_free`: a migrated THP is freed with MADV_FREE; its device pages go.
#[test]
fn hmm_migrate_anon_huge_free() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let (whole, buf) = thp_buffer(&env, Protection::READ_WRITE);
    let npages = buf.pages();
    fill_ints(buf);
    let mut m = vec![0xffu8; (npages * PAGE) as usize];

    let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.cpages, npages);
    check_mirror(&m, ints(buf), "device read", |i| i as u32);

    // SAFETY: the buffer's contents are not needed any more.
    unsafe { env.mm.madvise(buf, Advice::Free) }.unwrap();
    assert_eq!(dev.device_pages(), 0, "freed pages leave the device");

    drop(dev);
    env.unmap(whole);
    env.check_unpinned();
}

/// `hmm.migrate_anon_huge_fault`: a collapsed THP migrates; the snapshot shows it in this
/// device's memory, the CPU page table has nothing there, and the CPU faults it back.
///
/// Deviations: no PMD bit in the snapshot (see the module documentation), and pagemap shows
/// the pages as not present rather than as swap entries (the device-private entries the
/// kernel installs have no userspace counterpart).
#[test]
fn hmm_migrate_anon_huge_fault() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let (whole, buf) = env.aligned_buffer(TWO_MEG, Protection::READ_WRITE, Advice::HugePage);
    let npages = buf.pages();
    fill_ints(buf);
    // SAFETY: MADV_COLLAPSE keeps the contents.
    let rc = unsafe {
        libc::madvise(
            buf.start() as *mut libc::c_void,
            buf.len() as usize,
            libc::MADV_COLLAPSE,
        )
    };
    assert_eq!(rc, 0, "MADV_COLLAPSE: {}", std::io::Error::last_os_error());
    let mut snap = vec![0u8; npages as usize];
    dev.snapshot(buf.start(), npages, &mut snap).unwrap();
    assert!(
        snap.iter().all(|&p| p == prot::WRITE | prot::PMD),
        "{snap:x?}"
    );

    let mut m = vec![0xffu8; (npages * PAGE) as usize];
    let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
    assert_eq!(cmd.cpages, npages);
    check_mirror(&m, ints(buf), "device read", |i| i as u32);
    let cmd = dev.snapshot(buf.start(), npages, &mut snap).unwrap();
    assert_eq!(cmd.cpages, npages);
    assert!(
        snap.iter()
            .all(|&p| p == prot::DEV_PRIVATE_LOCAL | prot::WRITE),
        "{snap:x?}"
    );
    let mut present = vec![0u8; npages as usize];
    // SAFETY: `present` has one byte per page of the mapped range.
    let rc = unsafe {
        libc::mincore(
            buf.start() as *mut libc::c_void,
            buf.len() as usize,
            present.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    assert!(present.iter().all(|&b| b & 1 == 0), "no CPU page left");

    check_ints(buf, "faulted back", |i| i as u32);
    assert_eq!(dev.device_pages(), 0);

    drop(dev);
    env.unmap(whole);
    env.check_unpinned();
}

/// `hmm.migrate_partial_unmap_fault`: migrate 2 MiB (THP or not), munmap half of it at three
/// offsets (a plain munmap, seen through the UNMAP event), fault the rest back.
#[test]
fn hmm_migrate_partial_unmap_fault() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let size = TWO_MEG;
    for thp in [false, true] {
        for offset in [0, size / 4, size / 2] {
            let advice = if thp {
                Advice::HugePage
            } else {
                Advice::NoHugePage
            };
            let (whole, buf) = env.aligned_buffer(size, Protection::READ_WRITE, advice);
            let npages = buf.pages();
            fill_ints(buf);
            let mut m = vec![0xffu8; (npages * PAGE) as usize];
            let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
            assert_eq!(cmd.cpages, npages);
            check_mirror(&m, ints(buf), "device read", |i| i as u32);

            let hole = Range::with_len(buf.start() + offset, size / 2).unwrap();
            raw_munmap(hole);
            for i in 0..ints(buf) {
                if !hole.contains(buf.start() + i * 4) {
                    assert_eq!(
                        read_int(buf, i),
                        i as u32,
                        "thp {thp} offset {offset}: int {i}"
                    );
                }
            }
            assert_eq!(dev.device_pages(), 0, "unmapped device pages are freed");
            for part in [
                Range::new(whole.start(), hole.start()),
                Range::new(hole.end(), whole.end()),
            ]
            .into_iter()
            .flatten()
            {
                env.unmap(part);
            }
        }
    }
    drop(dev);
    env.check_unpinned();
}

/// `hmm.migrate_remap_fault`: a 2 MiB buffer (THP or not) is moved with mremap (MREMAP_FIXED,
/// with and without MREMAP_DONTUNMAP, to three offsets), before or after it migrates; the CPU
/// then faults the data back at the new address.
#[test]
fn hmm_migrate_remap_fault() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    let size = TWO_MEG;
    for before in [false, true] {
        for dont_unmap in [false, true] {
            for thp in [false, true] {
                for offset in [0, size / 4, size / 2] {
                    let what = format!(
                        "before {before} dont_unmap {dont_unmap} thp {thp} offset {offset}"
                    );
                    // Allocated before the hole is punched: the allocator could map it there.
                    let mut m = vec![0xffu8; size as usize];
                    let whole = env
                        .mm
                        .mmap_anonymous(8 * size, Protection::READ_WRITE)
                        .unwrap();
                    let map = Range::with_len(whole.start().next_multiple_of(size), size).unwrap();
                    let advice = if thp {
                        Advice::HugePage
                    } else {
                        Advice::NoHugePage
                    };
                    // SAFETY: advice only.
                    unsafe { env.mm.madvise(map, advice) }.unwrap();
                    let hole = Range::with_len(map.end(), 2 * size).unwrap();
                    raw_munmap(hole);
                    fill_ints(map);
                    let npages = map.pages();
                    let target = map.end() + offset;
                    let remap = || {
                        let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
                        if dont_unmap {
                            flags |= libc::MREMAP_DONTUNMAP;
                        }
                        // SAFETY: moves test memory that nothing in Rust refers to.
                        let p = unsafe {
                            libc::mremap(
                                map.start() as *mut libc::c_void,
                                size as usize,
                                size as usize,
                                flags,
                                target as *mut libc::c_void,
                            )
                        };
                        assert_eq!(
                            p as u64,
                            target,
                            "{what}: mremap: {}",
                            std::io::Error::last_os_error()
                        );
                        Range::with_len(target, size).unwrap()
                    };
                    let mut buf = map;
                    if before {
                        buf = remap();
                    }
                    let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
                    assert_eq!(cmd.cpages, npages, "{what}");
                    check_mirror(&m, ints(buf), &what, |i| i as u32);
                    if !before {
                        buf = remap();
                    }
                    check_ints(buf, &what, |i| i as u32);
                    // What the test mapped, not the rest of the hole: other allocations may
                    // have landed there.
                    raw_munmap(buf);
                    raw_munmap(Range::new(whole.start(), hole.start()).unwrap());
                    raw_munmap(Range::new(hole.end(), whole.end()).unwrap());
                    assert_eq!(dev.device_pages(), 0, "{what}");
                }
            }
        }
    }
    drop(dev);
    env.check_unpinned();
}

/// `hmm.migrate_anon_huge_err`: FAIL_ALLOC on a THP migration falls back to 4 KiB pages and
/// succeeds; the CPU faults a single page back. Then FAIL_ALLOC on the way back to RAM.
#[test]
fn hmm_migrate_anon_huge_err() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    for round in 0..2 {
        let (whole, buf) = thp_buffer(&env, Protection::READ_WRITE);
        let npages = buf.pages();
        fill_ints(buf);
        let mut m = vec![0xffu8; (npages * PAGE) as usize];
        if round == 0 {
            dev.flags(FLAG_FAIL_ALLOC).unwrap();
        }
        let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
        assert_eq!(cmd.cpages, npages);
        check_mirror(&m, ints(buf), "device read", |i| i as u32);
        if round == 1 {
            dev.flags(FLAG_FAIL_ALLOC).unwrap();
            let cmd = dev.migrate_to_sys(buf.start(), npages).unwrap();
            assert_eq!(cmd.cpages, npages);
        }
        assert_eq!(read_int(buf, 2048), 2048);
        env.unmap(whole);
    }
    drop(dev);
    env.check_unpinned();
}

/// `hmm.migrate_anon_huge_zero_err`: FAIL_ALLOC on the migration of an untouched THP area,
/// then of the huge zero page: both fall back and succeed; the data is zeros.
#[test]
fn hmm_migrate_anon_huge_zero_err() {
    let _s = serial();
    let env = Env::new();
    let dev = env.open();
    for touch in [false, true] {
        let (whole, buf) = thp_buffer(&env, Protection::READ);
        let npages = buf.pages();
        if touch {
            assert_eq!(read_int(buf, 0), 0);
        }
        let mut m = vec![0xffu8; (npages * PAGE) as usize];
        dev.flags(FLAG_FAIL_ALLOC).unwrap();
        let cmd = dev.migrate_to_dev(buf.start(), npages, &mut m).unwrap();
        assert_eq!(cmd.cpages, npages);
        check_mirror(&m, ints(buf), "device read", |_| 0);
        if touch {
            check_ints(buf, "faulted back", |_| 0);
        } else {
            assert_eq!(read_int(buf, 2048), 0);
        }
        env.unmap(whole);
    }
    drop(dev);
    env.check_unpinned();
}
