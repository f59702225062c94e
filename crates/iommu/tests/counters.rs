//! The shared counters of an [`IommuMirror`] (`IommuMirror::counters`): faults by size with
//! their latency, retries, invalidations by reason (acted on or skipped), bytes mapped and torn
//! down.

mod common;

use std::sync::Arc;

use common::{PAGE, mirror_with, mm_mirror, raw_source};
use svmirror_core::{Event, FaultSize, Notifier, NotifierRange, Range, counters::EVENT_NAMES};
use svmirror_iommu::testing::{RaceAfterSnapshot, clear_through};
use svmirror_iommu::{DmaCommand, IommuMirror, MirrorConfig, Prefetch};
use svmirror_mm::testing::AnonMap;
use svmirror_mm::{ProcessMm, Protection};

fn read(m: &IommuMirror, src: u64, len: u64) -> Vec<u8> {
    m.submit(DmaCommand::Read { src, len })
        .unwrap()
        .wait()
        .unwrap()
        .data
}

/// Maps `pages` read-write pages through the SVM API between two PROT_NONE guard pages, so the
/// kernel cannot merge them with a neighbouring mapping (other tests map memory concurrently).
/// Returns the whole reservation and the read-write middle.
fn isolated(mm: &ProcessMm, pages: u64) -> (Range, Range) {
    let all = mm
        .mmap_anonymous((pages + 2) * PAGE, Protection::READ_WRITE)
        .unwrap();
    let head = Range::with_len(all.start(), PAGE).unwrap();
    let tail = Range::with_len(all.end() - PAGE, PAGE).unwrap();
    mm.mprotect(head, Protection::NONE).unwrap();
    mm.mprotect(tail, Protection::NONE).unwrap();
    (all, Range::new(head.end(), tail.start()).unwrap())
}

#[test]
fn a_4k_fault_counts_one_4k_fault_with_its_latency_and_bytes() {
    let notifier = Notifier::new();
    let config = MirrorConfig {
        fault_window: PAGE,
        ..MirrorConfig::checked()
    };
    let m = mirror_with(&notifier, config);
    let b = AnonMap::new(4 * PAGE as usize).unwrap();
    b.fill(7);
    assert_eq!(m.counters().total_faults(), 0);

    assert_eq!(read(&m, b.addr() + 8, 8), vec![7; 8]);
    let c = m.counters();
    assert_eq!(c.faults[FaultSize::Page4K as usize], 1, "{c:?}");
    assert_eq!(c.total_faults(), 1);
    assert_eq!(c.fault_bytes, PAGE);
    assert_eq!(c.bytes_mapped, PAGE);
    assert_eq!(c.retries, 0);
    assert_eq!(c.fault_latency.count(), 1);
    assert!(c.fault_latency.median().is_some());

    // A hit faults nothing more.
    read(&m, b.addr() + 16, 8);
    assert_eq!(m.counters().total_faults(), 1);
}

#[test]
fn a_2m_window_fault_counts_in_the_2m_class() {
    let notifier = Notifier::new();
    let config = MirrorConfig {
        prefetch: Prefetch::Window,
        ..MirrorConfig::checked()
    };
    let m = mirror_with(&notifier, config);
    let len = 2usize << 20;
    let b = AnonMap::aligned(len, len).unwrap();
    b.fill(1);
    read(&m, b.addr() + PAGE, 8);
    let c = m.counters();
    assert_eq!(c.faults[FaultSize::UpTo2M as usize], 1, "{c:?}");
    assert_eq!(c.fault_bytes, len as u64);
    assert_eq!(c.bytes_mapped, len as u64);
}

#[test]
fn munmap_through_the_svm_api_counts_an_unmap_invalidation() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    let (all, range) = isolated(&mm, 4);
    m.fault(range.start(), range.len(), true).unwrap();
    let before = m.counters();
    assert_eq!(before.bytes_mapped, range.len());

    // SAFETY: nothing in Rust refers into the fresh mapping.
    unsafe { mm.munmap(range) }.unwrap();
    let d = m.counters().since(&before);
    assert_eq!(d.invalidations[Event::Unmap.index()], 1, "{d:?}");
    assert_eq!(d.total_invalidations(), 1);
    assert_eq!(d.invalidated_bytes, range.len());
    assert_eq!(d.bytes_unmapped, range.len());
    assert_eq!(EVENT_NAMES[Event::Unmap.index()], "unmap");
    for guard in [
        Range::with_len(all.start(), PAGE).unwrap(),
        Range::with_len(range.end(), PAGE).unwrap(),
    ] {
        // SAFETY: the guard pages are never referenced.
        unsafe { mm.munmap(guard) }.unwrap();
    }
}

#[test]
fn mprotect_through_the_svm_api_counts_a_protection_invalidation_and_keeps_the_mapping() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    let (all, range) = isolated(&mm, 2);
    m.fault(range.start(), range.len(), true).unwrap();
    let before = m.counters();
    mm.mprotect(range, Protection::READ).unwrap();
    let d = m.counters().since(&before);
    assert_eq!(d.invalidations[Event::ProtectionVma.index()], 1, "{d:?}");
    assert_eq!(d.bytes_unmapped, 0, "a downgrade tears nothing down");
    // SAFETY: nothing in Rust refers into the mapping.
    unsafe { mm.munmap(all) }.unwrap();
}

#[test]
fn own_migration_is_counted_as_skipped() {
    let notifier = Notifier::new();
    let m = mirror_with(&notifier, MirrorConfig::checked());
    let b = AnonMap::new(2 * PAGE as usize).unwrap();
    b.fill(3);
    m.fault(b.addr(), 2 * PAGE, false).unwrap();
    let range = Range::with_len(b.addr(), 2 * PAGE).unwrap();
    let before = m.counters();

    let own = Event::Migrate { owner: m.owner() };
    notifier
        .invalidate_range_start(NotifierRange::new(range, own))
        .unwrap()
        .end();
    let d = m.counters().since(&before);
    assert_eq!(d.skipped[own.index()], 1, "{d:?}");
    assert_eq!(d.total_invalidations(), 0);
    assert_eq!(d.bytes_unmapped, 0);
    assert!(m.mmu().translate(b.addr()).is_some(), "still mapped");

    let soft = Event::SoftDirty;
    notifier
        .invalidate_range_start(NotifierRange::new(range, soft))
        .unwrap()
        .end();
    assert_eq!(m.counters().since(&before).skipped[soft.index()], 1);

    // Anyone else's Clear is acted on.
    notifier
        .invalidate_range_start(NotifierRange::new(range, Event::Clear))
        .unwrap()
        .end();
    let d = m.counters().since(&before);
    assert_eq!(d.invalidations[Event::Clear.index()], 1);
    assert_eq!(d.bytes_unmapped, 2 * PAGE);
}

#[test]
fn a_fault_raced_by_an_invalidation_counts_one_retry_and_one_fault() {
    let notifier = Notifier::new();
    // Inside one 2 MiB fault window: one fault wherever the kernel maps it.
    let b = AnonMap::aligned(2 * PAGE as usize, 2 << 20).unwrap();
    b.fill(4);
    let range = Range::with_len(b.addr(), b.len() as u64).unwrap();
    let source = RaceAfterSnapshot::new(raw_source(), clear_through(&notifier, range));
    // SAFETY: test memory is touched only through raw pointers.
    let m = unsafe {
        IommuMirror::with_page_source(&notifier, range, MirrorConfig::checked(), Box::new(source))
    }
    .unwrap();
    assert_eq!(read(&m, b.addr(), 2 * PAGE), vec![4; 2 * PAGE as usize]);
    let c = m.counters();
    assert_eq!(c.retries, 1, "{c:?}");
    assert_eq!(c.total_faults(), 1);
    assert_eq!(c.faults[FaultSize::UpTo64K as usize], 1);
    assert_eq!(c.bytes_mapped, 2 * PAGE);
}

#[test]
fn dropping_the_mirror_counts_everything_torn_down() {
    let notifier = Notifier::new();
    let m = mirror_with(&notifier, MirrorConfig::checked());
    let b = AnonMap::new(3 * PAGE as usize).unwrap();
    m.fault(b.addr(), 3 * PAGE, true).unwrap();
    let c = m.counters();
    assert_eq!(c.bytes_mapped, 3 * PAGE);
    assert_eq!(c.bytes_unmapped, 0);
    // The mirror's own teardown is not visible after drop; a Release through the notifier is.
    notifier.release().unwrap();
    let d = m.counters();
    assert_eq!(d.invalidations[Event::Release.index()], 1, "{d:?}");
    assert_eq!(d.bytes_unmapped, 3 * PAGE);
}

#[test]
fn a_fault_whose_mapping_shrinks_under_it_retries_and_maps_what_is_left() {
    let notifier = Notifier::new();
    // Inside one 2 MiB fault window: one fault wherever the kernel maps it.
    let b = AnonMap::aligned(4 * PAGE as usize, 2 << 20).unwrap();
    b.fill(9);
    let range = Range::with_len(b.addr(), b.len() as u64).unwrap();
    // The mirror is this buffer only: the caller may opt in to prefetching all of it.
    let window = MirrorConfig {
        prefetch: Prefetch::Window,
        ..MirrorConfig::checked()
    };
    // The last page goes behind the notifier's back (a plain munmap whose event is still on
    // its way) right after the first snapshot.
    let victim = b.addr() + 3 * PAGE;
    let source = RaceAfterSnapshot::new(raw_source(), move || {
        // SAFETY: the test's own page, never referenced; the device has not mapped it.
        let rc = unsafe { libc::munmap(victim as *mut libc::c_void, PAGE as usize) };
        assert_eq!(rc, 0);
    });
    // SAFETY: test memory is touched only through raw pointers.
    let m = unsafe { IommuMirror::with_page_source(&notifier, range, window, Box::new(source)) }
        .unwrap();
    // The fault's run is the whole 4-page mapping (the window prefetch, clamped to the
    // mirrored range); its last page goes before the pin.
    assert_eq!(read(&m, b.addr(), 8), vec![9; 8]);
    let c = m.counters();
    assert!(c.retries >= 1, "{c:?}");
    assert_eq!(c.total_faults(), 1);
    assert_eq!(
        c.bytes_mapped,
        3 * PAGE,
        "the pages still mapped, not the hole"
    );
    assert!(m.mmu().translate(b.addr() + 3 * PAGE).is_none());
}

#[test]
fn an_invalidation_times_its_teardown_drain_and_release() {
    let notifier = Notifier::new();
    let m = mirror_with(&notifier, MirrorConfig::checked());
    let b = AnonMap::new(4 * PAGE as usize).unwrap();
    b.fill(3);
    assert_eq!(read(&m, b.addr(), 8), vec![3; 8]);
    let before = m.stats();
    let r = Range::with_len(b.addr(), b.len() as u64).unwrap();
    notifier
        .invalidate_range_start(NotifierRange::new(r, Event::Unmap))
        .unwrap()
        .end();
    let after = m.stats();
    assert_eq!(after.invalidations, before.invalidations + 1);
    assert!(after.pins_released > before.pins_released, "{after:?}");
    assert!(
        after.unmap_flush_time > before.unmap_flush_time,
        "{after:?}"
    );
    assert!(after.drain_time > before.drain_time, "{after:?}");
    assert!(after.release_time > before.release_time, "{after:?}");
}
