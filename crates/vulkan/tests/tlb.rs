//! Translation on the device: what `shaders/svm.glsl` and the kernels built on it must get right
//! about pages. A work item whose data straddles two pages that the device sees at unrelated
//! addresses; a replay that dispatches only the groups holding faulted items, with the others
//! run exactly once; data remapped between dispatches; and a page-table leaf freed while work
//! in flight may still read it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use svmirror_core::{Event, NotifierRange, Range};
use svmirror_mm::{Advice, Protection};
use svmirror_testsupport::{serial, volatile};
use svmirror_vulkan::{ChaseNode, Dispatch, Kernel, MirrorConfig};

fn saxpy(x: u64, y: u64, n: u32, a: f32) -> Dispatch {
    Dispatch::new(Kernel::Stream, n, &[x, y, u64::from(a.to_bits())]).unwrap()
}

/// One import per page: neighbouring pages land at unrelated device addresses.
fn per_page() -> MirrorConfig {
    MirrorConfig {
        chunk_sizes: vec![PAGE],
        ..MirrorConfig::default()
    }
}

/// A stream item covers 256 bytes of each array; starting the arrays off 256-byte boundaries
/// (and differently) puts page boundaries inside items, where the item must switch from its
/// first page's translation to its last page's. Using the first page's translation for the
/// whole item reads and writes the wrong import (seen failing: with `yt1` replaced by `yt0` in
/// stream.comp, y[933] was 2890.0, expected 1866.0).
#[test]
fn items_straddling_pages_at_unrelated_device_addresses_get_both_right() {
    let _s = serial();
    let rig = Rig::with(per_page());
    let m = rig.mirror();
    let pages = 8;
    let xr = anon(&rig.mm, pages);
    let yr = anon(&rig.mm, pages);
    let (x, y) = (xr.start() + 4 * 37, yr.start() + 4 * 91);
    let n = ((pages * PAGE - 4 * 91) / 4) as usize;
    write_f32s(x, (0..n).map(|i| i as f32));
    write_f32s(y, (0..n).map(|i| i as f32));
    // SAFETY: both ranges hold `n` floats from `x` and `y`, touched only by raw pointers.
    let stats = unsafe { m.dispatch(&saxpy(x, y, n as u32, 1.0)) }.unwrap();
    assert!(stats.pages_resolved >= 2 * pages - 1, "{stats:?}");
    for i in 0..n {
        assert_eq!(read_f32(y, i), 2.0 * i as f32, "y[{i}]");
    }
    unmap(&rig.mm, &[xr, yr]);
    rig.finish();
}

/// With every page mapped but one of `y` in the middle, only the items on that page fault; the
/// replay dispatches just their groups. saxpy is not idempotent, so an item run twice, or a
/// faulted item left out of the replay, leaves a wrong `y` (seen failing: with the replay's
/// group count one short in `replay_groups`, the faulted items never ran and y[9216] kept
/// 1.0, expected 18433.0).
#[test]
fn a_replay_runs_exactly_the_faulted_items_once() {
    let _s = serial();
    let rig = Rig::with(per_page());
    let m = rig.mirror();
    let pages = 16;
    let (xr, yr) = (anon(&rig.mm, pages), anon(&rig.mm, pages));
    let n = (pages * PAGE / 4) as usize;
    write_f32s(xr.start(), (0..n).map(|i| i as f32));
    write_f32s(yr.start(), (0..n).map(|_| 1.0));
    let hole = 9;
    m.prefetch(xr.start(), xr.len(), false).unwrap();
    m.prefetch(yr.start(), hole * PAGE, true).unwrap();
    m.prefetch(
        yr.start() + (hole + 1) * PAGE,
        (pages - hole - 1) * PAGE,
        true,
    )
    .unwrap();
    // SAFETY: both ranges hold `n` floats, touched only by raw pointers.
    let stats = unsafe { m.dispatch(&saxpy(xr.start(), yr.start(), n as u32, 2.0)) }.unwrap();
    assert_eq!(stats.passes, 2, "{stats:?}");
    // A page is 1024 floats: 16 items of 64.
    assert_eq!(stats.replayed_items, 16, "{stats:?}");
    for i in 0..n {
        assert_eq!(read_f32(yr.start(), i), 2.0 * i as f32 + 1.0, "y[{i}]");
    }
    unmap(&rig.mm, &[xr, yr]);
    rig.finish();
}

/// A page of `x` replaced between dispatches (discarded, so it reads as zeros, and rewritten):
/// the second dispatch must translate to the new page, not reuse anything of the first. On
/// lavapipe an import's device address is its host address, so a stale entry would still
/// read the new frame; the entry itself is checked too (seen failing: with the entry clear
/// removed from `State::take_chunks`, the entry was still `Some(true)` after the madvise).
#[test]
fn a_page_replaced_between_dispatches_is_read_anew() {
    let _s = serial();
    let rig = Rig::with(per_page());
    let m = rig.mirror();
    let pages = 4;
    let (xr, yr) = (anon(&rig.mm, pages), anon(&rig.mm, pages));
    let n = (pages * PAGE / 4) as usize;
    write_f32s(xr.start(), (0..n).map(|_| 1.0));
    write_f32s(yr.start(), (0..n).map(|_| 0.0));
    // SAFETY: both ranges hold `n` floats, touched only by raw pointers.
    unsafe { m.dispatch(&saxpy(xr.start(), yr.start(), n as u32, 1.0)) }.unwrap();
    let page = Range::with_len(xr.start() + 2 * PAGE, PAGE).unwrap();
    // SAFETY: nothing refers into `x`; its contents are rewritten below.
    unsafe { rig.mm.madvise(page, Advice::DontNeed) }.unwrap();
    assert_eq!(m.entry(page.start()), None);
    write_f32s(page.start(), (0..1024).map(|_| 5.0));
    // SAFETY: as above.
    unsafe { m.dispatch(&saxpy(xr.start(), yr.start(), n as u32, 1.0)) }.unwrap();
    for i in 0..n {
        let want = if i / 1024 == 2 { 6.0 } else { 2.0 };
        assert_eq!(read_f32(yr.start(), i), want, "y[{i}]");
    }
    unmap(&rig.mm, &[xr, yr]);
    rig.finish();
}

/// A page-table leaf whose entries an earlier invalidation cleared without freeing it (here the
/// entry of a page living in device memory, cleared by mprotect PROT_NONE) is freed by a later
/// Unmap invalidation that clears no entry. A shader in flight may have read the directory slot
/// naming the leaf just before, and then reads its entries: if a fault gave the leaf to another
/// 2 MiB block meanwhile, the shader gets that block's pages. So freeing a leaf waits for the
/// work in flight, as clearing entries does.
///
/// Forced here: a long pointer-chasing dispatch is in flight when the Unmap invalidation (sent
/// straight to the notifier, as munmap sends it) frees the leaf; when the invalidation returns,
/// every item must have finished. Seen failing before the fix (`teardown` drained only when it
/// had cleared entries): the invalidation returned at once with 4096 of 4096 results unwritten.
/// A real munmap hid it: svmirror-mm then discards the device page, which drains, but only
/// after the update lock was let go with the leaf already free.
#[test]
fn freeing_a_page_table_leaf_waits_for_work_in_flight() {
    let _s = serial();
    let rig = Rig::with(per_page());
    let m = rig.mirror();
    // A block of its own: a 2 MiB-aligned page inside a 4 MiB mapping that nothing else uses.
    let spare = anon(&rig.mm, 1024);
    let block = (spare.start() + (2 << 20) - 1) & !((2 << 20) - 1);
    let lone = Range::with_len(block, PAGE).unwrap();
    // SAFETY: `lone` is mapped and reached only by raw pointers.
    unsafe { volatile::write(lone.start(), 7u64) };
    // In device memory, then inaccessible: the entry goes, the device page and its leaf stay.
    assert_eq!(m.migrate_to_device(lone.start(), PAGE).unwrap(), 1);
    rig.mm.mprotect(lone, Protection::NONE).unwrap();
    assert_eq!(m.entry(lone.start()), None);
    assert_eq!(m.resources().device_pages, 1);

    // A cycle of 16 nodes, and 4096 lists that each walk it for many steps.
    let items = 4096u64;
    let nodes = anon(&rig.mm, 1);
    let heads = anon(&rig.mm, items * 8 / PAGE);
    let out = anon(&rig.mm, items * 4 / PAGE);
    for k in 0..16u64 {
        let node = ChaseNode {
            next: nodes.start() + 16 * ((k + 1) % 16),
            value: 1,
            pad: 0,
        };
        // SAFETY: `nodes` is a mapped page of 16 nodes, touched only by raw pointers.
        unsafe { volatile::write(nodes.start() + 16 * k, node) };
    }
    for i in 0..items {
        // SAFETY: `heads` holds `items` pointers, touched only by raw pointers.
        unsafe { volatile::write(heads.start() + 8 * i, nodes.start() + 16 * (i % 16)) };
        // SAFETY: `out` holds `items` u32s, touched only by raw pointers.
        unsafe { volatile::write(out.start() + 4 * i, u32::MAX) };
    }
    for (r, w) in [(nodes, false), (heads, false), (out, true)] {
        m.prefetch(r.start(), r.len(), w).unwrap();
    }
    let unwritten = || {
        (0..items)
            // SAFETY: `out` holds `items` u32s; the device writes them, we only read.
            .filter(|i| unsafe { volatile::read::<u32>(out.start() + 4 * i) } == u32::MAX)
            .count()
    };
    let leaves = m.resources().leaves;
    // Long enough on lavapipe at the first try; a faster device gets longer walks.
    let mut steps = 20_000u64;
    loop {
        for i in 0..items {
            // SAFETY: `out` holds `items` u32s; no dispatch is running.
            unsafe { volatile::write(out.start() + 4 * i, u32::MAX) };
        }
        let d = Dispatch::new(
            Kernel::Chase,
            items as u32,
            &[heads.start(), out.start(), steps],
        )
        .unwrap();
        let done = AtomicBool::new(false);
        let tested = std::thread::scope(|s| {
            let t = s.spawn(|| {
                // SAFETY: the kernel reads `heads` and the nodes and writes `out`, all mapped
                // and reached only by raw pointers.
                let r = unsafe { m.dispatch(&d) };
                done.store(true, Ordering::SeqCst);
                r
            });
            while m.resources().in_flight == 0 && !done.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            if done.load(Ordering::SeqCst) || unwritten() == 0 {
                // Over before the invalidation could start: nothing tested yet.
                t.join().unwrap().unwrap();
                return false;
            }
            rig.mm
                .notifier()
                .invalidate_range_start(NotifierRange::new(lone, Event::Unmap))
                .unwrap()
                .end();
            let after = unwritten();
            assert_eq!(
                after, 0,
                "the Unmap invalidation freed a page-table leaf and returned while the dispatch \
                 was still running ({after} of {items} results unwritten)"
            );
            let stats = t.join().unwrap().unwrap();
            assert_eq!(stats.passes, 1, "{stats:?}");
            true
        });
        if tested {
            break;
        }
        assert!(steps < 20_000_000, "no dispatch ran long enough to test");
        steps *= 10;
    }
    assert_eq!(m.resources().leaves, leaves - 1, "the empty leaf was freed");
    unmap(&rig.mm, &[spare]);
    for i in 0..items {
        // SAFETY: as above; the dispatch is over.
        let sum = unsafe { volatile::read::<u32>(out.start() + 4 * i) };
        assert_eq!(sum, steps as u32, "out[{i}]");
    }
    unmap(&rig.mm, &[nodes, heads, out]);
    rig.finish();
}
