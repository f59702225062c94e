//! ProcessMm against the real kernel: every userfaultfd event kind gives exactly one invalidation
//! with the right range and reason, the SVM API is coherent before it returns, migration round
//! trips keep the data, and a failing monitor fails closed.

use std::sync::Arc;
use std::time::Duration;

use svmirror_core::testing::TestMirror;
use svmirror_core::{Error, Event, FaultRequest, Owner, PageSource, Range, entry, range_fault};
use svmirror_mm::{Advice, DevicePages, MmError, ProcessMm, Protection};
use svmirror_testsupport::serial;

#[path = "support/fixture.rs"]
mod fixture;
use fixture::*;

#[path = "support/vram.rs"]
mod vram;
use vram::FakeVram;

#[test]
fn features_are_negotiated_and_named() {
    let _s = serial();
    let mm = ProcessMm::new().unwrap();
    let f = mm.features();
    for needed in ["EVENT_UNMAP", "EVENT_REMOVE", "EVENT_REMAP"] {
        assert!(f.uffd_feature_names.contains(&needed), "{f:?}");
    }
    // EVENT_FORK is offered but deliberately not taken (see `uffd_feature::WANTED`).
    assert!(!f.uffd_feature_names.contains(&"EVENT_FORK"), "{f:?}");
    assert_eq!(f.uffd_offered & f.uffd_features, f.uffd_features);
}

#[test]
fn munmap_gives_one_unmap_invalidation() {
    let _s = serial();
    let f = fixture(4);
    let part = page(f.buf, 1, 2);
    assert_eq!(sys_munmap(part.start(), part.len()), 0);
    assert_eq!(invalidations(&f.mirror, 1), vec![(part, Event::Unmap)]);
    assert_eq!(
        f.mirror.table.lock().entries.len(),
        2,
        "only the unmapped pages are gone"
    );
    assert_eq!(f.mm.stats().unmap_events, 1);
}

#[test]
fn last_read_falls_inside_the_munmap_whose_event_it_read() {
    let _s = serial();
    let f = fixture(2);
    let t0 = std::time::Instant::now();
    assert_eq!(sys_munmap(f.buf.start(), f.buf.len()), 0);
    let t1 = std::time::Instant::now();
    // munmap returns only once the monitor has read its UNMAP event; the time of the read is
    // recorded for certain once the event is handled.
    f.mm.settle(f.buf).unwrap();
    let read = f.mm.last_read().expect("the UNMAP was read");
    assert!(t0 <= read && read <= t1, "{t0:?} <= {read:?} <= {t1:?}");
}

#[test]
fn an_api_madvise_counts_its_wait_for_the_handler_and_an_api_munmap_waits_for_none() {
    let _s = serial();
    let f = fixture(2);
    assert_eq!(f.mm.stats().expect_wait, Duration::ZERO);
    // SAFETY: nothing refers into the fixture's buffer.
    unsafe { f.mm.madvise(page(f.buf, 0, 1), Advice::DontNeed) }.unwrap();
    let waited = f.mm.stats().expect_wait;
    assert!(waited > Duration::ZERO, "{:?}", f.mm.stats());
    // Unregistered first: no UNMAP event, nothing to wait for.
    // SAFETY: as above.
    unsafe { f.mm.munmap(f.buf) }.unwrap();
    let s = f.mm.stats();
    assert_eq!((s.expect_wait, s.unmap_events), (waited, 0), "{s:?}");
}

#[test]
fn madvise_dontneed_free_remove_give_one_clear_each() {
    let _s = serial();
    let f = fixture(4);
    assert_eq!(sys_madvise(f.buf.start(), PAGE, libc::MADV_DONTNEED), 0);
    assert_eq!(sys_madvise(f.buf.start() + PAGE, PAGE, libc::MADV_FREE), 0);
    let got = invalidations(&f.mirror, 2);
    assert_eq!(
        got,
        vec![
            (page(f.buf, 0, 1), Event::Clear),
            (page(f.buf, 1, 1), Event::Clear)
        ]
    );

    // MADV_REMOVE needs shared memory.
    let mm = &f.mm;
    // SAFETY: a fresh shared anonymous mapping.
    let shm = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(shm, libc::MAP_FAILED);
    let shm = Range::with_len(shm as u64, 2 * PAGE).unwrap();
    let m2 = Arc::new(TestMirror::new(Owner(2)));
    let s2 = mm.notifier().insert(shm, m2.clone()).unwrap();
    m2.fault(&s2, mm, shm, true).unwrap();
    // SAFETY: as above.
    assert_eq!(sys_madvise(shm.start(), PAGE, libc::MADV_REMOVE), 0);
    assert_eq!(invalidations(&m2, 1), vec![(page(shm, 0, 1), Event::Clear)]);
}

#[test]
fn mremap_moving_gives_an_unmap_of_the_old_range_only() {
    let _s = serial();
    let f = fixture(4);
    // A destination we own, so the move is forced (MREMAP_FIXED replaces it).
    let dst = f.mm.mmap_anonymous(4 * PAGE, Protection::NONE).unwrap();
    // SAFETY: nothing refers into either range; the destination is ours to replace.
    let p = unsafe {
        libc::mremap(
            f.buf.start() as *mut _,
            f.buf.len() as usize,
            f.buf.len() as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.start() as *mut libc::c_void,
        )
    };
    assert_eq!(p as u64, dst.start());
    let got = invalidations(&f.mirror, 1);
    assert_eq!(got[0], (f.buf, Event::Unmap), "an Unmap of the old range");
    assert!(f.mirror.table.lock().entries.is_empty());
    assert_eq!(f.mm.stats().remap_events, 1);
    // The kernel follows the REMAP with an UNMAP of the old range (no MREMAP_DONTUNMAP here);
    // the monitor expects nothing of it, so it may invalidate the old range once more, and
    // only that.
    let got = f.mirror.table.lock().invalidations.clone();
    assert!(
        got.len() <= 2 && got.iter().all(|g| *g == (f.buf, Event::Unmap)),
        "{got:?}"
    );
}

#[test]
fn mremap_growing_in_place_invalidates_nothing() {
    let _s = serial();
    // Far below every other mapping, with nothing after it: growth in place must succeed
    // (a test that skipped when it could not grow would prove nothing).
    // (`fixture_far` checks that the room is there.)
    let f = fixture_far(2, 0x1400_0000_0000);
    // SAFETY: growing our own buffer without moving; the new tail is fresh memory.
    let p = unsafe {
        libc::mremap(
            f.buf.start() as *mut _,
            f.buf.len() as usize,
            2 * f.buf.len() as usize,
            0,
        )
    };
    assert_eq!(p as u64, f.buf.start(), "grew in place");
    std::thread::sleep(Duration::from_millis(20));
    let got = f.mirror.table.lock().invalidations.clone();
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(f.mirror.table.lock().entries.len(), 2);
    assert_eq!(sys_munmap(f.buf.start(), 2 * f.buf.len()), 0);
}

#[test]
fn svm_api_invalidates_once_before_the_change() {
    let _s = serial();
    let f = fixture(8);
    // mprotect: no event exists; the API gives the only invalidation.
    f.mm.mprotect(page(f.buf, 0, 2), Protection::READ).unwrap();
    // munmap through the API: unregistered first, so no UNMAP event comes (and none is
    // waited for); the API's invalidation is the only one.
    // SAFETY: nothing refers into the buffer.
    unsafe { f.mm.munmap(page(f.buf, 2, 2)).unwrap() };
    // madvise DONTNEED through the API: the REMOVE event likewise.
    // SAFETY: as above.
    unsafe { f.mm.madvise(page(f.buf, 4, 1), Advice::DontNeed).unwrap() };
    // Each is coherent before the call returns: no waiting here.
    let got = f.mirror.table.lock().invalidations.clone();
    assert_eq!(
        got,
        vec![
            (page(f.buf, 0, 2), Event::ProtectionVma),
            (page(f.buf, 2, 2), Event::Unmap),
            (page(f.buf, 4, 1), Event::Clear),
        ]
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        f.mirror.table.lock().invalidations.len(),
        3,
        "no duplicate from the events"
    );
    // The REMOVE is recognised; the munmap sent no event (before it was unregistered first:
    // one UNMAP, covered, 2 here).
    assert_eq!(
        (
            f.mm.stats().events_covered_by_api,
            f.mm.stats().unmap_events
        ),
        (1, 0)
    );
    // A write fault on the read-only part is now refused, as the kernel's EPERM.
    let e = f
        .mirror
        .fault(&f.sub, &f.mm, page(f.buf, 0, 1), true)
        .unwrap_err();
    assert!(matches!(e, Error::WriteToReadOnly { .. }), "{e}");
}

/// mprotect to PROT_NONE must take all access away, not downgrade to read-only: the API sends
/// `Clear` for it (and `ProtectionVma` while the range stays readable), and the next device
/// fault, read or write, is refused.
#[test]
fn mprotect_to_none_clears_and_later_faults_are_refused() {
    let _s = serial();
    let f = fixture(4);
    f.mirror.fault(&f.sub, &f.mm, f.buf, false).unwrap();
    f.mm.mprotect(page(f.buf, 0, 1), Protection::READ).unwrap();
    f.mm.mprotect(page(f.buf, 1, 1), Protection::NONE).unwrap();
    let got = f.mirror.table.lock().invalidations.clone();
    assert_eq!(
        got,
        vec![
            (page(f.buf, 0, 1), Event::ProtectionVma),
            (page(f.buf, 1, 1), Event::Clear),
        ]
    );
    for write in [false, true] {
        let e = f
            .mirror
            .fault(&f.sub, &f.mm, page(f.buf, 1, 1), write)
            .unwrap_err();
        assert!(matches!(e, Error::BadAddress { .. }), "write {write}: {e}");
    }
    f.mm.mprotect(page(f.buf, 1, 1), Protection::READ_WRITE)
        .unwrap();
}

#[test]
fn svm_api_refuses_a_double_unmap_and_bad_ranges() {
    let _s = serial();
    let f = fixture_far(2, 0x1000_0000_0000);
    let first = page(f.buf, 0, 1);
    // SAFETY: nothing refers into the buffer.
    unsafe { f.mm.munmap(first).unwrap() };
    // SAFETY: as above.
    let e = unsafe { f.mm.munmap(first) }.unwrap_err();
    assert!(
        matches!(e, MmError::NotMapped { addr } if addr == first.start()),
        "{e}"
    );
    let e = f.mm.mprotect(first, Protection::READ).unwrap_err();
    assert!(matches!(e, MmError::NotMapped { .. }), "{e}");
    let e = f.mm.register(page(f.buf, 1, 1)).unwrap_err();
    assert!(matches!(e, MmError::AlreadyRegistered { .. }), "{e}");
}

#[test]
fn fork_keeps_the_parents_mirror_exact() {
    let _s = serial();
    let f = fixture(2);
    write_byte(f.buf.start(), 7);
    let before = f.mirror.table.lock().entries.clone();
    let mut fds = [0; 2];
    // SAFETY: a pipe for the child to wait on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only calls async-signal-safe functions (read, _exit).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: an async-signal-safe read into a local byte.
        unsafe { libc::read(fds[0], (&mut b as *mut u8).cast(), 1) };
        // SAFETY: _exit is async-signal-safe and ends the child.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0);
    // The parent's device entries still name the pages the parent has: the device's pages are
    // pinned by the backend in real use; here the mirror holds entries, and the CPU page of the
    // parent must be the same one.
    let mut entries = vec![0u64; 2];
    let seq = f.sub.read_begin().unwrap();
    range_fault(
        &f.sub,
        seq,
        &f.mm,
        &mut FaultRequest::snapshot(f.buf, &mut entries),
    )
    .unwrap();
    assert!(entry::is_valid(entries[0]));
    assert_eq!(
        f.mirror.table.lock().invalidations,
        vec![],
        "fork invalidates nothing in the parent"
    );
    assert_eq!(before.len(), 2);
    let mut st = 0;
    // SAFETY: releasing the child with one byte on the pipe, then reaping it and closing the
    // pipe's two fds, all ours.
    unsafe {
        libc::write(fds[1], [0u8].as_ptr().cast(), 1);
    }
    // SAFETY: as above.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    // SAFETY: as above.
    unsafe { libc::close(fds[0]) };
    // SAFETY: as above.
    unsafe { libc::close(fds[1]) };
    assert_eq!(read_byte(f.buf.start()), 7);
}

#[test]
fn thp_partial_unmap_invalidates_the_whole_huge_page() {
    let _s = serial();
    let mm = ProcessMm::new().unwrap();
    const HUGE: u64 = 2 << 20;
    // A 2 MiB-aligned window inside a 4 MiB reservation.
    let resv = mm.mmap_anonymous(2 * HUGE, Protection::READ_WRITE).unwrap();
    let win = Range::with_len(resv.start().next_multiple_of(HUGE), HUGE).unwrap();
    sys_madvise(win.start(), HUGE, libc::MADV_HUGEPAGE);
    let mirror = Arc::new(TestMirror::new(Owner(3)));
    let sub = mm.notifier().insert(win, mirror.clone()).unwrap();
    mirror.fault(&sub, &mm, win, true).unwrap();
    let huge = mirror
        .table
        .lock()
        .entries
        .values()
        .any(|&e| entry::order(e) == 9);
    let part = page(win, 10, 1);
    // SAFETY: nothing refers into the window.
    assert_eq!(sys_munmap(part.start(), PAGE), 0);
    let got = invalidations(&mirror, 1);
    if huge {
        assert_eq!(
            got,
            vec![(win, Event::Unmap)],
            "whole huge page invalidated"
        );
    } else {
        // THP is off (or the kernel had no huge page to give): only the page itself.
        assert_eq!(got, vec![(part, Event::Unmap)]);
    }
}

#[test]
fn migration_out_and_back_through_a_cpu_touch_keeps_the_data() {
    let _s = serial();
    let f = fixture(4);
    for i in 0..4 {
        write_byte(f.buf.start() + i * PAGE + 5, 0x40 + i as u8);
    }
    let vram = Arc::new(FakeVram::default());
    let moved = f.mm.migrate_to_device(f.buf, vram.clone()).unwrap();
    assert_eq!(moved, 4);
    assert_eq!(vram.len(), 4);
    assert!(
        f.mirror.table.lock().entries.is_empty(),
        "other devices lost the range"
    );
    assert!(
        matches!(f.mirror.table.lock().invalidations.last(), Some((r, Event::Migrate { .. })) if *r == f.buf)
    );
    // The owner sees its own pages without faulting them back.
    let mut entries = vec![0u64; 4];
    let seq = f.sub.read_begin().unwrap();
    let mut req = FaultRequest::fault_all(f.buf, &mut entries, false).with_owner(vram.owner());
    range_fault(&f.sub, seq, &f.mm, &mut req).unwrap();
    assert!(
        entries.iter().all(|&e| e & entry::DEVICE_PRIVATE != 0),
        "{entries:x?}"
    );
    // A CPU touch brings a page back with its data.
    assert_eq!(read_byte(f.buf.start() + 2 * PAGE + 5), 0x42);
    assert!(
        !vram.holds(f.buf.start() + 2 * PAGE),
        "the touched page left the device"
    );
    assert!(vram.holds(f.buf.start() + 3 * PAGE));
    assert_eq!(vram.len(), 3);
    // The rest come back explicitly.
    assert_eq!(f.mm.migrate_to_ram(f.buf).unwrap(), 3);
    for i in 0..4 {
        assert_eq!(read_byte(f.buf.start() + i * PAGE + 5), 0x40 + i as u8);
    }
    // The CPU touch came through the monitor; migrate_to_ram brought the rest back directly.
    assert_eq!(f.mm.stats().missing_faults, 1);
}

#[test]
fn migration_of_shared_memory_is_refused() {
    let _s = serial();
    let mm = ProcessMm::new().unwrap();
    // SAFETY: a fresh shared anonymous mapping.
    let shm = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    let r = Range::with_len(shm as u64, PAGE).unwrap();
    let e = mm
        .migrate_to_device(r, Arc::new(FakeVram::default()))
        .unwrap_err();
    assert!(matches!(e, MmError::CannotMigrate { .. }), "{e}");
}

#[test]
fn write_tracking_reports_written_pages_as_soft_dirty() {
    let _s = serial();
    let f = fixture(8);
    if !f.mm.features().write_tracking() {
        panic!("this kernel lacks WP_ASYNC; write tracking cannot be tested");
    }
    f.mm.track_writes(f.buf).unwrap();
    write_byte(f.buf.start() + 3 * PAGE, 1);
    write_byte(f.buf.start() + 4 * PAGE, 1);
    let w = f.mm.collect_writes(f.buf).unwrap();
    assert_eq!(w, vec![page(f.buf, 3, 2)]);
    assert!(
        f.mirror
            .table
            .lock()
            .invalidations
            .contains(&(page(f.buf, 3, 2), Event::SoftDirty))
    );
    assert!(
        f.mm.collect_writes(f.buf).unwrap().is_empty(),
        "re-protected"
    );
}

#[test]
fn a_failing_monitor_fails_closed() {
    let _s = serial();
    let f = fixture(2);
    f.mm.inject_monitor_failure();
    assert!(f.mm.is_failed());
    assert_eq!(
        f.mirror.table.lock().invalidations,
        vec![(Range::FULL, Event::Release)]
    );
    assert!(f.mirror.table.lock().entries.is_empty());
    assert!(matches!(f.sub.read_begin(), Err(Error::Released)));
    assert!(matches!(
        f.mm.area(f.buf.start(), f.buf.end()),
        Err(Error::Released)
    ));
    // Events are still read, so the CPU never blocks on one.
    assert_eq!(sys_munmap(f.buf.start(), f.buf.len()), 0);
}

#[test]
fn a_faulter_racing_munmap_and_remap_never_keeps_a_stale_entry() {
    let _s = serial();
    let f = fixture_far(16, 0x1100_0000_0000);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fixture = Arc::new(f);
    let faulter = {
        let f = fixture.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ok = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match f.mirror.fault(&f.sub, &f.mm, f.buf, true) {
                    Ok(_) => ok += 1,
                    Err(Error::BadAddress { .. }) => {} // caught between munmap and mmap
                    Err(e) => panic!("{e}: {:?}", std::error::Error::source(&e)),
                }
            }
            ok
        })
    };
    let f = &fixture;
    for round in 0..200u64 {
        let victim = page(f.buf, round % 16, 1);
        // The faulter only faults (no Rust references): unmap, and map a fresh page there.
        assert_eq!(sys_munmap(victim.start(), PAGE), 0);
        let p = sys_mmap(
            victim.start(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED_NOREPLACE,
        );
        assert_eq!(p, victim.start());
    }
    // Let the monitor finish the last events, then stop the faulter.
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = faulter.join().unwrap();
    assert!(rounds > 0);
    // Quiesced: every device entry must name the page the CPU has now.
    let mut entries = vec![0u64; 16];
    let seq = f.sub.read_begin().unwrap();
    range_fault(
        &f.sub,
        seq,
        &f.mm,
        &mut FaultRequest::snapshot(f.buf, &mut entries),
    )
    .unwrap();
    for (addr, e) in f.mirror.table.lock().entries.iter() {
        let i = ((addr - f.buf.start()) / PAGE) as usize;
        assert!(
            entry::is_valid(entries[i]),
            "device maps {addr:#x}, the CPU has nothing there"
        );
        if entry::pfn(entries[i]) != 0 {
            assert_eq!(
                entry::pfn(*e),
                entry::pfn(entries[i]),
                "stale entry at {addr:#x}"
            );
        }
    }
}

#[test]
fn a_burst_of_events_loses_none() {
    let _s = serial();
    let f = Arc::new(fixture_far(64, 0x1200_0000_0000));
    // Four threads unmap sixteen single pages each, all at once.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    let p = page(f.buf, t * 16 + i, 1);
                    assert_eq!(sys_munmap(p.start(), PAGE), 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut got = invalidations(&f.mirror, 64);
    assert_eq!(
        got.len(),
        64,
        "one invalidation per munmap, none lost, none doubled"
    );
    got.sort_by_key(|(r, _)| r.start());
    for (i, (r, e)) in got.iter().enumerate() {
        assert_eq!((*r, *e), (page(f.buf, i as u64, 1), Event::Unmap));
    }
    assert!(f.mirror.table.lock().entries.is_empty());
    assert_eq!(f.mm.stats().unmap_events, 64);
}

#[test]
fn migration_across_two_mappings_keeps_the_data() {
    let _s = serial();
    let f = fixture(4);
    for i in 0..4 {
        write_byte(f.buf.start() + i * PAGE + 9, 0x70 + i as u8);
    }
    // Two VMAs: madvise then sends one REMOVE per VMA for the migration's single call.
    f.mm.mprotect(page(f.buf, 0, 2), Protection::READ).unwrap();
    let vram = Arc::new(FakeVram::default());
    assert_eq!(f.mm.migrate_to_device(f.buf, vram.clone()).unwrap(), 4);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vram.len(), 4, "no device copy discarded");
    for i in 0..4 {
        assert_eq!(read_byte(f.buf.start() + i * PAGE + 9), 0x70 + i as u8);
    }
    // Migrating again, half of it already back on the CPU, moves every page.
    assert_eq!(f.mm.migrate_to_device(f.buf, vram.clone()).unwrap(), 4);
    assert_eq!(read_byte(f.buf.start() + 3 * PAGE + 9), 0x73);
    assert_eq!(f.mm.migrate_to_device(f.buf, vram.clone()).unwrap(), 4);
    assert_eq!(f.mm.migrate_to_ram(f.buf).unwrap(), 4);
    for i in 0..4 {
        assert_eq!(read_byte(f.buf.start() + i * PAGE + 9), 0x70 + i as u8);
    }
}

/// Events are read while the monitor is busy handling an earlier one: a thread whose munmap
/// raised an event returns even though a driver's invalidation for an earlier event is still
/// waiting for a lock. Whoever holds that lock may need that munmap to return first (the
/// coherence torture test found it with glibc: a trim's MADV_DONTNEED under an arena lock
/// raised a REMOVE, the monitor waited for a mirror lock, and the lock's holder waited for the
/// arena lock), so reading must never wait for handling.
///
/// Seen failing on the old code (one monitor thread that read and handled): the second munmap
/// never returned ("the second munmap returned while the first event's handler waited").
#[test]
fn events_are_read_while_a_handler_waits_for_a_lock() {
    let _s = serial();
    let f = fixture_far(4, 0x5a00_0000_0000);
    // The first munmap: its event's handler blocks in the gated subscriber.
    let held = hold_handler(&f.mm, page(f.buf, 0, 1));
    // The second: its thread waits in `userfaultfd_event_wait_completion` until the event is
    // read, while the handler still waits.
    let (done_tx, done) = std::sync::mpsc::channel();
    let second = page(f.buf, 2, 1);
    let t = std::thread::spawn(move || {
        let rc = sys_munmap(second.start(), PAGE);
        let _ = done_tx.send(rc);
    });
    let returned = done.recv_timeout(Duration::from_secs(10));
    held.release();
    assert_eq!(
        returned,
        Ok(0),
        "the second munmap returned while the first event's handler waited"
    );
    t.join().unwrap();
    // Both are handled once the gate opens.
    let inv = invalidations(&f.mirror, 2);
    assert!(inv.contains(&(page(f.buf, 0, 1), Event::Unmap)), "{inv:?}");
    assert!(inv.contains(&(page(f.buf, 2, 1), Event::Unmap)), "{inv:?}");
}

/// A mapping that changes between a fault's lookup and its registration (a munmap racing the
/// fault) is looked up again by `area`, not reported to the caller as a failure: every backend
/// walks the mappings around a fault, neighbours included. Forced with the registration hook:
/// the mapping loses its second page just before it is registered; `area` then reports the
/// one page left, registered.
///
/// Seen failing before `area` looked again: `Err(Busy { range: .. })`, which the Vulkan
/// backend turned into a failed dispatch (the app's churn on Vulkan hit it by chance, 2 runs
/// in 8 under load) and the simulated IOMMU into a refused device access.
#[test]
fn area_looks_again_when_the_mapping_changes_before_its_registration() {
    let _s = serial();
    let mm = ProcessMm::new().unwrap();
    let two = mm.mmap_anonymous(2 * PAGE, Protection::READ_WRITE).unwrap();
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls = cut.clone();
    mm.set_register_hook(Some(Box::new(move |r: Range| {
        if r.start() == two.start() && calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0
        {
            assert_eq!(sys_munmap(two.start() + PAGE, PAGE), 0);
        }
    })));
    let area = svmirror_core::PageSource::area(&mm, two.start(), two.end());
    mm.set_register_hook(None);
    let area = area.expect("looked again");
    assert_eq!(area.end, two.start() + PAGE, "the page left");
    assert_eq!(
        cut.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "two lookups"
    );
    assert_eq!(mm.stats().registration_races, 1);
    assert_eq!(sys_munmap(two.start(), PAGE), 0);
}
