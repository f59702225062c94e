//! What one page request maps and pins: the demand part (the pages the device's access asked
//! for), widened only where that is known to be safe (the CPU's huge page around the fault) or
//! where the caller opted in (`Prefetch::Window`). What it registers for events is the whole VMA
//! around the fault, never part of one: a registration splits a VMA at its ends, and a split
//! VMA makes the program's own `mremap` of its mapping fail with EFAULT.

mod common;

use std::sync::Arc;

use common::{PAGE, mm_mirror};
use svmirror_core::{CpuPte, PageSource};
use svmirror_iommu::{DmaCommand, IommuMirror, LeafSize, MirrorConfig, Prefetch};
use svmirror_mm::testing::AnonMap;
use svmirror_mm::{ProcessMm, ProcessPageSource};

const TWO_MEG: u64 = 2 << 20;

fn read(m: &IommuMirror, src: u64, len: u64) -> (Vec<u8>, u32) {
    let c = m
        .submit(DmaCommand::Read { src, len })
        .unwrap()
        .wait()
        .unwrap();
    (c.data, c.page_requests)
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
/// mapping pins and maps that page and nothing else, so that a munmap of a page beside it,
/// which the device never touched, leaves the device's page alone. The VMA is registered whole
/// (events only) and is not split.
///
/// Seen failing on the old code (the 2 MiB fault window clamped to the VMA): 2 MiB pinned
/// instead of 4 KiB ("pinned only the page read: left 2097152, right 4096"). Seen failing with
/// demand registration (only the page read registered): the VMA was split around the page
/// ("the VMA is registered whole, not split").
#[test]
fn a_fault_pins_and_maps_only_the_page_the_device_read() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    // Several MiB in one VMA, populated, on 4 KiB pages; fixed and far from everything the
    // kernel places, so the hole this test punches is never taken by another thread's mapping
    // (which `b`'s drop would then unmap).
    let b = AnonMap::at(0x2d00_0000_0000, 4 << 20).unwrap();
    b.advise(libc::MADV_NOHUGEPAGE).unwrap();
    b.fill_with(|i| (i / PAGE as usize) as u8);
    let page = b.addr() + TWO_MEG + 5 * PAGE;
    let neighbour = page + 2 * PAGE;
    let vma = vma_at(page);
    let registered = mm.stats().registrations;

    let (data, requests) = read(&m, page + 8, 16);
    assert_eq!(data, vec![((page - b.addr()) / PAGE) as u8; 16]);
    assert_eq!(requests, 1);
    assert_eq!(m.pins().stats().bytes, PAGE, "pinned only the page read");
    assert_eq!(m.counters().bytes_mapped, PAGE, "mapped only the page read");
    assert!(m.mmu().translate(page - PAGE).is_none());
    assert!(m.mmu().translate(page + PAGE).is_none());
    assert_eq!(mm.stats().registrations, registered + 1);
    assert_eq!(vma_at(page), vma, "the VMA is registered whole, not split");

    // A plain munmap of an untouched neighbour, behind the SVM API's back: an event (the VMA
    // is registered), but the device's page is not in its range.
    // SAFETY: a page of our own mapping that nothing refers to and no device mapped.
    let rc = unsafe { libc::munmap(neighbour as *mut libc::c_void, PAGE as usize) };
    assert_eq!(rc, 0);
    // Barrier: every event the monitor read (the neighbour's included) handled.
    mm.sync_events();
    assert!(
        m.mmu().translate(page).is_some(),
        "the device kept its page"
    );
    assert_eq!(m.counters().bytes_mapped, PAGE);
    assert_eq!(m.violations().1, 0);
    drop(m);
    drop(b);
}

/// A program's own libc `mremap` of a mapping a device faulted in: growing it in place,
/// moving it, and MREMAP_DONTUNMAP all work as without svmirror, and the device then reads
/// what the CPU has at each address.
///
/// Seen failing with demand registration (only the faulted page registered, which split the
/// VMA): every one of these mremap calls failed with EFAULT (mm/mremap.c refuses an old range
/// that spans two VMAs), which the coherence torture test counted as 522 CPU failures.
#[test]
fn a_programs_mremap_of_a_device_faulted_mapping_still_works() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    // Room to grow in place: reserve 4 MiB, give 2 MiB back. Fixed and far, as above.
    let b = AnonMap::at(0x2e00_0000_0000, 4 << 20).unwrap();
    b.advise(libc::MADV_NOHUGEPAGE).unwrap();
    let base = b.addr();
    // SAFETY: the upper half of our own reservation, which nothing refers to.
    let rc = unsafe { libc::munmap((base + TWO_MEG) as *mut libc::c_void, TWO_MEG as usize) };
    assert_eq!(rc, 0);
    // SAFETY: the lower half is ours and mapped read-write.
    unsafe { std::ptr::write_bytes(base as *mut u8, 7, TWO_MEG as usize) };
    let (data, _) = read(&m, base + 9 * PAGE, 8);
    assert_eq!(data, vec![7; 8]);

    let remap = |old: u64, old_len: u64, new_len: u64, flags: libc::c_int, to: u64| {
        // SAFETY: mremap of our own mapping; the callers own every range involved.
        let r = unsafe {
            libc::mremap(
                old as *mut libc::c_void,
                old_len as usize,
                new_len as usize,
                flags,
                to as *mut libc::c_void,
            )
        };
        assert_ne!(
            r,
            libc::MAP_FAILED,
            "mremap: {}",
            std::io::Error::last_os_error()
        );
        r as u64
    };
    // Grow in place (no MREMAP_MAYMOVE).
    assert_eq!(remap(base, TWO_MEG, 2 * TWO_MEG, 0, 0), base);
    // SAFETY: the grown tail is ours now.
    unsafe { std::ptr::write_bytes((base + TWO_MEG) as *mut u8, 8, PAGE as usize) };
    assert_eq!(read(&m, base + TWO_MEG, 8).0, vec![8; 8]);
    assert_eq!(read(&m, base + 9 * PAGE, 8).0, vec![7; 8]);

    // Move all of it elsewhere, then DONTUNMAP it back out of the way.
    let dest = AnonMap::at(0x2e10_0000_0000, 4 << 20).unwrap();
    let to = dest.addr();
    let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    assert_eq!(remap(base, 2 * TWO_MEG, 2 * TWO_MEG, flags, to), to);
    std::mem::forget(dest); // its range is the moved mapping now, unmapped below
    assert_eq!(read(&m, to + 9 * PAGE, 8).0, vec![7; 8]);
    // The old range is gone: the device must not read it.
    assert!(
        m.submit(DmaCommand::Read {
            src: base + 9 * PAGE,
            len: 8
        })
        .unwrap()
        .wait()
        .is_err()
    );
    // A fresh mapping at the old address: the device reads its bytes.
    // SAFETY: MAP_FIXED over the old range, which nothing maps now.
    let again = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            TWO_MEG as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(again as u64, base);
    // SAFETY: just mapped.
    unsafe { std::ptr::write_bytes(base as *mut u8, 3, PAGE as usize) };
    assert_eq!(read(&m, base, 8).0, vec![3; 8]);

    // MREMAP_DONTUNMAP: the pages move, the old range stays mapped and reads zero.
    let dest2 = AnonMap::at(0x2e20_0000_0000, TWO_MEG as usize).unwrap();
    let to2 = dest2.addr();
    let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP;
    assert_eq!(remap(to, TWO_MEG, TWO_MEG, flags, to2), to2);
    std::mem::forget(dest2);
    assert_eq!(read(&m, to2 + 9 * PAGE, 8).0, vec![7; 8]);
    assert_eq!(
        read(&m, to + 9 * PAGE, 8).0,
        vec![0; 8],
        "the old range lost its pages"
    );
    assert_eq!(m.violations().1, 0);
    drop(m);
    for (at, len) in [(base, TWO_MEG), (to, 2 * TWO_MEG), (to2, TWO_MEG)] {
        // SAFETY: our own mappings, which nothing refers to any more.
        unsafe { libc::munmap(at as *mut libc::c_void, len as usize) };
    }
    drop(b);
}

/// A read of several pages is one page request for all of them (the request says how much the
/// access wants), and maps nothing past them.
#[test]
fn a_read_of_several_pages_maps_them_in_one_request_and_nothing_more() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    let b = AnonMap::aligned(TWO_MEG as usize, TWO_MEG as usize).unwrap();
    b.advise(libc::MADV_NOHUGEPAGE).unwrap();
    b.fill(3);
    let start = b.addr() + 3 * PAGE;
    let (data, requests) = read(&m, start + 1, 5 * PAGE - 1);
    assert_eq!(data, vec![3; 5 * PAGE as usize - 1]);
    assert_eq!(requests, 1);
    assert_eq!(m.pins().stats().bytes, 5 * PAGE);
    assert!(m.mmu().translate(start - PAGE).is_none());
    assert!(m.mmu().translate(start + 5 * PAGE).is_none());
    assert_eq!(
        vma_at(start),
        (b.addr(), b.addr() + TWO_MEG),
        "registered whole"
    );
    drop(m);
}

/// Defect 9 of the "exact under concurrency" issue, on purpose: a small buffer placed across a
/// 2 MiB boundary is resolved as one fault (and one pin) per fault window it touches (two with
/// the default 2 MiB window, one with a 4 MiB window), whatever the prefetch policy; the
/// device asks for it in one page request (its page request group, issue 13). Tests that
/// count faults place their buffers inside one window (`AnonMap::aligned`).
#[test]
fn a_buffer_across_a_window_boundary_takes_one_request_per_window() {
    for (window, prefetch, want) in [
        (TWO_MEG, Prefetch::Demand, 2u32),
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
        region.advise(libc::MADV_NOHUGEPAGE).unwrap();
        region.fill(9);
        let buf = region.addr() + TWO_MEG - 2 * PAGE;
        let (data, requests) = read(&m, buf, 4 * PAGE);
        assert_eq!(data, vec![9; 4 * PAGE as usize]);
        assert_eq!(
            (requests, m.stats().faults, m.pins().live()),
            (1, u64::from(want), u64::from(want)),
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
/// one 2 MiB leaf on the first fault, registers the VMA whole (so the CPU keeps its huge
/// mapping), and pins it once. Needs THP (`always` or `madvise`).
#[test]
fn a_fault_in_a_thp_maps_the_whole_huge_page_as_one_2m_leaf() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    // The THP is in the middle of a larger VMA: the extension stops at the huge page.
    let b = AnonMap::aligned(3 * TWO_MEG as usize, TWO_MEG as usize).unwrap();
    b.advise(libc::MADV_HUGEPAGE).expect("THP enabled");
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
        (b.addr(), b.addr() + 3 * TWO_MEG),
        "registered whole"
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
    b.advise(libc::MADV_HUGEPAGE).expect("THP enabled");
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
    b.advise(libc::MADV_NOHUGEPAGE).unwrap();
    b.fill(2);
    let (_, requests) = read(&m, b.addr() + 7 * PAGE, 8);
    assert_eq!(requests, 1);
    assert_eq!(m.pins().stats().bytes, 1 << 20);
    assert_eq!(vma_at(b.addr()), (b.addr(), b.addr() + (1 << 20)));
    let (_, requests) = read(&m, b.addr() + (1 << 20) - 8, 8);
    assert_eq!(requests, 0, "prefetched");
    drop(m);
}

/// Issue 13, batched fault service: a gather whose parts touch 48 pages scattered over three
/// fault windows (in no order, 16 per window, not contiguous) raises one page request group
/// before it starts, and the mirror resolves its runs with one fault each: per window, the
/// pages it needs in one run where they are contiguous. Seen failing before the page request
/// group: 48 page requests and 48 faults, one per part.
#[test]
fn a_gather_raises_one_page_request_group_resolved_run_by_run() {
    let notifier = svmirror_core::Notifier::new();
    let m = common::mirror_with(&notifier, MirrorConfig::checked());
    let region = AnonMap::aligned(6 << 20, 2 << 20).unwrap();
    region.advise(libc::MADV_NOHUGEPAGE).unwrap();
    region.fill_with(|i| (i / PAGE as usize) as u8);
    // Pages 0..16 of each window, each read 8 bytes at an odd offset, last window first.
    let parts: Vec<(u64, u64)> = (0..3u64)
        .rev()
        .flat_map(|w| (0..16u64).map(move |p| (w * TWO_MEG + p * PAGE + 8 * p + 1, 8)))
        .map(|(off, len)| (region.addr() + off, len))
        .collect();
    let c = m
        .submit(DmaCommand::Gather {
            parts: parts.clone(),
        })
        .unwrap()
        .wait()
        .unwrap();
    for (i, chunk) in c.data.chunks(8).enumerate() {
        let (addr, _) = parts[i];
        let page = ((addr - region.addr()) / PAGE) as u8;
        assert!(chunk.iter().all(|&b| b == page), "part {i}");
    }
    let dma = m.dma().stats();
    assert_eq!(
        (
            c.page_requests,
            dma.page_request_batches,
            dma.page_requests_batched
        ),
        (3, 1, 3),
        "one group of three runs (one per window)"
    );
    let s = m.stats();
    assert_eq!((s.faults, s.fault_batches, s.batched_runs), (3, 1, 3));
    assert_eq!(
        m.pins().stats().bytes,
        48 * PAGE,
        "only the pages the parts touch"
    );
}

/// Issue 13, a device sweeping first-touch memory: a fill over eight fault windows is one run
/// of its page request group, which is at least `AHEAD_MIN_WINDOWS` windows long: the mirror
/// resolves the first window at once and faults the other seven in ahead of the device (a
/// thread of its own), and the device resolves each of them as it reaches it, finding the
/// pages there. Every byte is written, each window is faulted once, and only the fill's pages
/// are pinned. Seen failing with the fault-in ahead disabled (`faulted_ahead` 0, and the group
/// resolving all eight runs before the fill started: `batched_runs` 8).
#[test]
fn a_sweep_over_many_windows_is_faulted_in_ahead_of_the_device() {
    let _s = svmirror_testsupport::serial();
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    let len = 8 * TWO_MEG;
    let region = AnonMap::aligned(len as usize + TWO_MEG as usize, 2 << 20).unwrap();
    region.advise(libc::MADV_NOHUGEPAGE).unwrap();
    // From a page into the first window to the end of the eighth.
    let (dst, n) = (region.addr() + PAGE, len - PAGE);
    m.submit(DmaCommand::Fill {
        dst,
        len: n,
        value: 0x5a,
    })
    .unwrap()
    .wait()
    .unwrap();
    let bytes = region.read(0, (len + PAGE) as usize);
    assert!(
        bytes[..PAGE as usize].iter().all(|&b| b == 0),
        "before the fill"
    );
    assert!(
        bytes[PAGE as usize..len as usize]
            .iter()
            .all(|&b| b == 0x5a),
        "the fill"
    );
    assert!(
        bytes[len as usize..].iter().all(|&b| b == 0),
        "after the fill"
    );
    let s = m.stats();
    assert_eq!(
        (s.fault_batches, s.batched_runs, s.faulted_ahead),
        (1, 1, 7 * TWO_MEG),
        "one group: the first window resolved, seven faulted in ahead"
    );
    assert_eq!(s.faults, 8, "each window faulted once");
    assert_eq!(m.pins().stats().bytes, n, "only the fill's pages");
    drop(m);
}
