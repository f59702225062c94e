//! What one page request maps, registers for events and pins: the demand part (the pages the
//! device's access asked for), widened only where that is known to be safe (the CPU's huge
//! page around the fault) or where the caller opted in (`Prefetch::Window`).

mod common;

use std::sync::Arc;

use common::PAGE;
use svmirror_core::{CpuPte, PageSource, Range};
use svmirror_iommu::testing::AnonMap;
use svmirror_iommu::{DmaCommand, IommuMirror, LeafSize, MirrorConfig, Prefetch};
use svmirror_mm::{ProcessMm, ProcessPageSource};

const TWO_MEG: u64 = 2 << 20;

/// A mirror over the whole user address space whose page source is `mm`: faults register what
/// they map with `mm`'s userfaultfd, as the dmirror device and the app's backend do.
fn mm_mirror(mm: &Arc<ProcessMm>, config: MirrorConfig) -> IommuMirror {
    let range = Range::new(PAGE, 1 << 47).unwrap();
    // SAFETY: the tests touch device-written memory only through `AnonMap`'s raw pointers.
    unsafe { IommuMirror::with_page_source(mm.notifier(), range, config, Box::new(mm.clone())) }
        .unwrap()
}

fn read(m: &IommuMirror, src: u64, len: u64) -> (Vec<u8>, u32) {
    let c = m
        .submit(DmaCommand::Read { src, len })
        .unwrap()
        .wait()
        .unwrap();
    (c.data, c.page_requests)
}

/// `advice` over all of `b` (MADV_HUGEPAGE / MADV_NOHUGEPAGE).
fn advise(b: &AnonMap, advice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: advice on our own mapping; no byte or mapping changes.
    let rc = unsafe { libc::madvise(b.addr() as *mut libc::c_void, b.len(), advice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `/proc/self/maps` line (start, end) of the mapping containing `addr`.
fn vma_at(addr: u64) -> (u64, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        })
        .find(|&(lo, hi)| lo <= addr && addr < hi)
        .expect("addr is mapped")
}

/// Defect 6 of the "exact under concurrency" issue: a device read of one page of a large
/// mapping registers, pins and maps that page and nothing else, so that a munmap of a page
/// beside it, which the device never touched, raises no userfaultfd event and does not reach
/// the device.
///
/// Seen failing on the old code (the 2 MiB fault window clamped to the VMA): 2 MiB pinned
/// instead of 4 KiB ("pinned only the page read: left 2097152, right 4096"), the whole window
/// registered, and the neighbour's munmap waited for the monitor and invalidated the device.
#[test]
fn a_fault_registers_and_pins_only_the_page_the_device_read() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    // Several MiB in one VMA, populated, on 4 KiB pages.
    let b = AnonMap::aligned(4 << 20, TWO_MEG as usize).unwrap();
    advise(&b, libc::MADV_NOHUGEPAGE).unwrap();
    b.fill_with(|i| (i / PAGE as usize) as u8);
    let page = b.addr() + TWO_MEG + 5 * PAGE;
    let neighbour = page + 2 * PAGE;
    let registered = mm.stats().registrations;

    let (data, requests) = read(&m, page + 8, 16);
    assert_eq!(data, vec![((page - b.addr()) / PAGE) as u8; 16]);
    assert_eq!(requests, 1);
    assert_eq!(m.pins().stats().bytes, PAGE, "pinned only the page read");
    assert_eq!(m.counters().bytes_mapped, PAGE, "mapped only the page read");
    assert!(m.mmu().translate(page - PAGE).is_none());
    assert!(m.mmu().translate(page + PAGE).is_none());
    assert_eq!(mm.stats().registrations, registered + 1);
    assert_eq!(
        vma_at(page),
        (page, page + PAGE),
        "registered only the page read (registration splits the VMA around it)"
    );

    // A plain munmap of an untouched neighbour, behind the SVM API's back.
    let before = (mm.stats().unmap_events, m.stats().invalidations);
    // SAFETY: a page of our own mapping that nothing refers to and no device mapped.
    let rc = unsafe { libc::munmap(neighbour as *mut libc::c_void, PAGE as usize) };
    assert_eq!(rc, 0);
    // Barrier: an SVM API munmap returns only once the monitor has handled every event it read
    // before, the neighbour's included if there was one. It invalidates the device once itself.
    let barrier = mm
        .mmap_anonymous(PAGE, svmirror_mm::Protection::READ_WRITE)
        .unwrap();
    // SAFETY: a fresh mapping nothing refers to.
    unsafe { mm.munmap(barrier) }.unwrap();
    assert_eq!(
        (mm.stats().unmap_events, m.stats().invalidations),
        (before.0, before.1 + 1),
        "no UNMAP event for the neighbour, no invalidation of the device but the barrier's"
    );
    assert!(
        m.mmu().translate(page).is_some(),
        "the device kept its page"
    );
    assert_eq!(m.violations().1, 0);
    drop(m);
    drop(b);
}

/// A read of several pages is one page request for all of them (the request says how much the
/// access wants), and maps nothing past them.
#[test]
fn a_read_of_several_pages_maps_them_in_one_request_and_nothing_more() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    let b = AnonMap::aligned(TWO_MEG as usize, TWO_MEG as usize).unwrap();
    advise(&b, libc::MADV_NOHUGEPAGE).unwrap();
    b.fill(3);
    let start = b.addr() + 3 * PAGE;
    let (data, requests) = read(&m, start + 1, 5 * PAGE - 1);
    assert_eq!(data, vec![3; 5 * PAGE as usize - 1]);
    assert_eq!(requests, 1);
    assert_eq!(m.pins().stats().bytes, 5 * PAGE);
    assert!(m.mmu().translate(start - PAGE).is_none());
    assert!(m.mmu().translate(start + 5 * PAGE).is_none());
    assert_eq!(vma_at(start), (start, start + 5 * PAGE), "registered");
    drop(m);
}

/// Defect 9 of the "exact under concurrency" issue, on purpose: a small buffer placed across a
/// 2 MiB boundary takes one page request per fault window it touches (two with the default
/// 2 MiB window, one with a 4 MiB window), whatever the prefetch policy. Tests that count
/// page requests place their buffers inside one window (`AnonMap::aligned`).
#[test]
fn a_buffer_across_a_window_boundary_takes_one_request_per_window() {
    for (window, prefetch, want) in [
        (TWO_MEG, Prefetch::Demand, 2),
        (TWO_MEG, Prefetch::Window, 2),
        (2 * TWO_MEG, Prefetch::Demand, 1),
    ] {
        let notifier = svmirror_core::Notifier::new();
        let config = MirrorConfig {
            fault_window: window,
            prefetch,
            ..MirrorConfig::checked()
        };
        let m = common::mirror_with(&notifier, config);
        let region = AnonMap::aligned(4 << 20, 4 << 20).unwrap();
        advise(&region, libc::MADV_NOHUGEPAGE).unwrap();
        region.fill(9);
        let buf = region.addr() + TWO_MEG - 2 * PAGE;
        let (data, requests) = read(&m, buf, 4 * PAGE);
        assert_eq!(data, vec![9; 4 * PAGE as usize]);
        assert_eq!(
            (requests, m.stats().faults, m.pins().live()),
            (want, u64::from(want), u64::from(want)),
            "{window:#x} {prefetch:?}"
        );
        drop(m);
    }
}

/// Whether the CPU maps `addr` with a huge page.
fn cpu_order(addr: u64) -> u8 {
    let source = ProcessPageSource::new().unwrap();
    let mut pte = [CpuPte::None];
    source.snapshot(addr, &mut pte).unwrap();
    match pte[0] {
        CpuPte::Present { order, .. } => order,
        _ => 0,
    }
}

/// The huge-page extension: a device fault of one page of a THP maps the whole huge page as
/// one 2 MiB leaf on the first fault, registers exactly the huge page (so the CPU keeps its
/// huge mapping), and pins it once. Needs THP (`always` or `madvise`).
#[test]
fn a_fault_in_a_thp_maps_the_whole_huge_page_as_one_2m_leaf() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    // The THP is in the middle of a larger VMA: the extension stops at the huge page.
    let b = AnonMap::aligned(3 * TWO_MEG as usize, TWO_MEG as usize).unwrap();
    advise(&b, libc::MADV_HUGEPAGE).expect("THP enabled");
    b.fill(5);
    let huge = b.addr() + TWO_MEG;
    assert_eq!(cpu_order(huge), 9, "the CPU maps a THP (is THP enabled?)");

    let (data, requests) = read(&m, huge + 12345, 8);
    assert_eq!(data, vec![5; 8]);
    assert_eq!(requests, 1);
    let t = m.mmu().translate(huge).unwrap();
    assert_eq!((t.iova, t.size), (huge, LeafSize::Size2M));
    assert_eq!(m.pins().stats().bytes, TWO_MEG);
    assert!(m.mmu().translate(huge - PAGE).is_none());
    assert!(m.mmu().translate(huge + TWO_MEG).is_none());
    assert_eq!(
        vma_at(huge),
        (huge, huge + TWO_MEG),
        "registered the huge page"
    );
    assert_eq!(
        cpu_order(huge + 3 * PAGE),
        9,
        "the CPU kept its huge mapping"
    );
    drop(m);
}

/// An untouched THP area: the fault brings in the huge page, and it is mapped whole.
#[test]
fn a_write_to_an_untouched_thp_area_maps_one_2m_leaf() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    let b = AnonMap::aligned(TWO_MEG as usize, TWO_MEG as usize).unwrap();
    advise(&b, libc::MADV_HUGEPAGE).expect("THP enabled");
    m.submit(DmaCommand::Fill {
        dst: b.addr() + 3 * PAGE,
        len: 8,
        value: 1,
    })
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(b.read(3 * PAGE as usize, 9), [1, 1, 1, 1, 1, 1, 1, 1, 0]);
    assert_eq!(cpu_order(b.addr()), 9, "a THP was allocated");
    assert_eq!(m.mmu().translate(b.addr()).unwrap().size, LeafSize::Size2M);
    drop(m);
}

/// `Prefetch::Window`, the caller's opt-in: the first fault maps the whole window, clamped to
/// the VMA, and later accesses in it need no page request.
#[test]
fn window_prefetch_maps_the_window_clamped_to_the_vma() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let config = MirrorConfig {
        prefetch: Prefetch::Window,
        ..MirrorConfig::checked()
    };
    let m = mm_mirror(&mm, config);
    // 1 MiB of its own: the VMA ends inside the window.
    let b = AnonMap::aligned(1 << 20, TWO_MEG as usize).unwrap();
    advise(&b, libc::MADV_NOHUGEPAGE).unwrap();
    b.fill(2);
    let (_, requests) = read(&m, b.addr() + 7 * PAGE, 8);
    assert_eq!(requests, 1);
    assert_eq!(m.pins().stats().bytes, 1 << 20);
    assert_eq!(vma_at(b.addr()), (b.addr(), b.addr() + (1 << 20)));
    let (_, requests) = read(&m, b.addr() + (1 << 20) - 8, 8);
    assert_eq!(requests, 0, "prefetched");
    drop(m);
}
