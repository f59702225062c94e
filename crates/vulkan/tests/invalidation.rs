//! CPU changes while a range is mirrored into the GPU page table: munmap, madvise and mremap
//! behind svmirror's back (learnt through userfaultfd), munmap and mprotect through the SVM
//! API. Each clears the entries (or takes write permission), frees the imports, and the next
//! dispatch faults and sees current data.

mod common;

use common::*;
use svmirror_core::{Event, Range};
use svmirror_mm::Protection;
use svmirror_testsupport::{MONITOR_WAIT, eventually, serial};
use svmirror_vulkan::{Dispatch, Kernel, VulkanError};

fn saxpy(x: u64, y: u64, n: u32, a: f32) -> Dispatch {
    Dispatch::new(Kernel::Stream, n, &[x, y, u64::from(a.to_bits())]).unwrap()
}

/// Two mirrored buffers of `pages` pages, filled (x[i] = i, y[i] = 1) and mapped by a dispatch
/// (after which y[i] = i + 1).
fn mapped(rig: &Rig, pages: u64) -> (Range, Range, u32) {
    let x = anon(&rig.mm, pages);
    let y = anon(&rig.mm, pages);
    let n = (pages * PAGE / 4) as usize;
    write_f32s(x.start(), (0..n).map(|i| i as f32));
    write_f32s(y.start(), (0..n).map(|_| 1.0));
    // SAFETY: both ranges hold `n` floats, touched only by raw pointers.
    unsafe {
        rig.mirror()
            .dispatch(&saxpy(x.start(), y.start(), n as u32, 1.0))
    }
    .unwrap();
    assert!(rig.mirror().entry(x.start()).is_some());
    assert!(rig.mirror().entry(y.start()) == Some(true));
    (x, y, n as u32)
}

fn invalidations(rig: &Rig, e: Event) -> u64 {
    rig.mirror().counters().invalidations[e.index()]
}

#[test]
fn munmap_through_the_svm_api_clears_entries_and_frees_imports() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let (x, y, n) = mapped(&rig, 4);
    let before = m.resources();
    // SAFETY: nothing refers into `y`.
    unsafe { rig.mm.munmap(y) }.unwrap();
    assert_eq!(m.entry(y.start()), None, "coherent when munmap returns");
    assert!(m.resources().imports < before.imports);
    assert!(invalidations(&rig, Event::Unmap) >= 1);
    // New memory (perhaps at the same address): the next dispatch faults and sees it.
    let y2 = anon(&rig.mm, 4);
    write_f32s(y2.start(), (0..n as usize).map(|_| 10.0));
    // SAFETY: both ranges hold `n` floats.
    let stats = unsafe { m.dispatch(&saxpy(x.start(), y2.start(), n, 1.0)) }.unwrap();
    assert!(stats.passes >= 2, "{stats:?}");
    assert_eq!(read_f32(y2.start(), 9), 19.0);
    unmap(&rig.mm, &[x, y2]);
    assert_eq!(m.resources().imports, 0);
    assert_eq!(m.resources().mapped_pages, 0);
    assert_eq!(m.resources().leaves, 0, "Unmap frees page-table leaves");
    rig.finish();
}

#[test]
fn munmap_behind_our_back_is_learnt_through_userfaultfd() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let (x, y, n) = mapped(&rig, 4);
    let unmaps = invalidations(&rig, Event::Unmap);
    // SAFETY: plain munmap of memory nothing refers into, without the SVM API.
    let rc = unsafe { libc::munmap(y.start() as *mut libc::c_void, y.len() as usize) };
    assert_eq!(rc, 0);
    // The counter moves at the end of the callback, after the entries went.
    eventually("the UNMAP event", MONITOR_WAIT, || {
        m.entry(y.start()).is_none() && invalidations(&rig, Event::Unmap) > unmaps
    });
    assert!(m.entry(x.start()).is_some(), "x is untouched");
    let y2 = anon(&rig.mm, 4);
    write_f32s(y2.start(), (0..n as usize).map(|_| 5.0));
    // SAFETY: both ranges hold `n` floats.
    unsafe { m.dispatch(&saxpy(x.start(), y2.start(), n, 1.0)) }.unwrap();
    assert_eq!(read_f32(y2.start(), 100), 105.0);
    unmap(&rig.mm, &[x, y2]);
    rig.finish();
}

#[test]
fn madvise_dontneed_behind_our_back_drops_the_whole_chunk_and_the_gpu_sees_zeros() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    // 128 KiB: holds at least one whole 64 KiB-aligned chunk.
    let (x, y, n) = mapped(&rig, 32);
    let chunk = Range::with_len((y.start() + 0xffff) & !0xffff, 0x10000).unwrap();
    let imports = m.resources().imports;
    let clears = invalidations(&rig, Event::Clear);
    // One page in the middle of the chunk: the partial invalidation drops all of it.
    let page = Range::with_len(chunk.start() + 4 * PAGE, PAGE).unwrap();
    let (addr, len) = (page.start() as *mut libc::c_void, page.len() as usize);
    // SAFETY: drops a page nothing refers into; it reads as zeros afterwards.
    let rc = unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    // Other REMOVE events (the allocator returning freed heap memory) may come first: wait
    // for this one's effect.
    eventually("the REMOVE event", MONITOR_WAIT, || {
        m.entry(chunk.start()).is_none()
            && m.entry(chunk.end() - PAGE).is_none()
            && invalidations(&rig, Event::Clear) > clears
    });
    assert_eq!(m.resources().imports, imports - 1, "one import freed");
    assert!(m.entry(x.start()).is_some(), "x is untouched");
    // SAFETY: both ranges hold `n` floats.
    let stats = unsafe { m.dispatch(&saxpy(x.start(), y.start(), n, 1.0)) }.unwrap();
    assert!(stats.passes >= 2);
    let i = ((page.start() - y.start()) / 4) as usize;
    assert_eq!(read_f32(y.start(), i), i as f32, "zero page + x[i]");
    assert_eq!(read_f32(y.start(), i - 1), 2.0 * (i - 1) as f32 + 1.0);
    unmap(&rig.mm, &[x, y]);
    rig.finish();
}

#[test]
fn mremap_behind_our_back_unmaps_the_old_range_and_the_gpu_follows_the_data() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let (x, y, n) = mapped(&rig, 4);
    let unmaps = invalidations(&rig, Event::Unmap);
    // Move y somewhere else (plain mremap, no SVM API).
    // SAFETY: nothing refers into `y`; the kernel picks the new place.
    let p = unsafe {
        libc::mremap(
            y.start() as *mut libc::c_void,
            y.len() as usize,
            2 * y.len() as usize,
            libc::MREMAP_MAYMOVE,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let new = Range::with_len(p as u64, 2 * y.len()).unwrap();
    assert_ne!(
        new.start(),
        y.start(),
        "grown twofold with MAYMOVE, it moved"
    );
    eventually("the REMAP/UNMAP events", MONITOR_WAIT, || {
        m.entry(y.start()).is_none() && invalidations(&rig, Event::Unmap) > unmaps
    });
    // The data moved with the mapping: y[i] = i + 1; the GPU sees it at the new address.
    // SAFETY: both ranges hold `n` floats.
    unsafe { m.dispatch(&saxpy(x.start(), new.start(), n, 1.0)) }.unwrap();
    assert_eq!(read_f32(new.start(), 50), 101.0);
    unmap(&rig.mm, &[x, new]);
    rig.finish();
}

#[test]
fn mprotect_through_the_svm_api_marks_entries_read_only() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let (x, y, n) = mapped(&rig, 4);
    let imports = m.resources().imports;
    rig.mm.mprotect(y, Protection::READ).unwrap();
    assert_eq!(m.entry(y.start()), Some(false), "kept, read-only");
    assert_eq!(m.resources().imports, imports, "imports stay");
    // A kernel that writes y now fails with a typed error and changes nothing.
    let before = read_f32(y.start(), 0);
    // SAFETY: both ranges hold `n` floats.
    let err = unsafe { m.dispatch(&saxpy(x.start(), y.start(), n, 1.0)) }.unwrap_err();
    assert!(
        matches!(
            err,
            VulkanError::Fault {
                write: true,
                source: svmirror_core::Error::WriteToReadOnly { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(read_f32(y.start(), 0), before);
    // Reading y is still fine (y as the x of another saxpy).
    let z = anon(&rig.mm, 4);
    // SAFETY: all ranges hold `n` floats.
    unsafe { m.dispatch(&saxpy(y.start(), z.start(), n, 1.0)) }.unwrap();
    assert_eq!(read_f32(z.start(), 4), 5.0);
    // Writable again: the write fault upgrades the entry.
    rig.mm.mprotect(y, Protection::READ_WRITE).unwrap();
    // SAFETY: both ranges hold `n` floats.
    unsafe { m.dispatch(&saxpy(x.start(), y.start(), n, 1.0)) }.unwrap();
    assert_eq!(m.entry(y.start()), Some(true));
    assert_eq!(read_f32(y.start(), 4), 4.0 + 5.0);
    unmap(&rig.mm, &[x, y, z]);
    rig.finish();
}

#[test]
fn an_invalidation_waits_for_work_in_flight_before_the_memory_goes() {
    let _s = serial();
    let rig = Rig::new();
    // Long list walks over nodes in memory the test unmaps while the kernel runs. lavapipe
    // reads host memory without pinning it: had the unmap not waited for the dispatch's fence,
    // the kernel would read unmapped memory and the process would die. The window is one walk
    // step per item, so the scenario runs several times.
    for _ in 0..6 {
        unmap_while_in_flight(&rig);
    }
    rig.finish();
}

fn unmap_while_in_flight(rig: &Rig) {
    let m = rig.mirror();
    let count = 1u64 << 14;
    let nodes = anon(&rig.mm, count * 16 / PAGE);
    for i in 0..count {
        let p = (nodes.start() + 16 * i) as *mut u64;
        let next = nodes.start() + 16 * ((i * 7919 + 1) % count);
        // SAFETY: in bounds of `nodes`, touched by raw pointers only.
        unsafe { p.write_volatile(next) };
        // SAFETY: as above; the value field follows the pointer.
        unsafe { (p.wrapping_add(1) as *mut u32).write_volatile(1) };
    }
    let lists = 256usize;
    let heads: Vec<u64> = (0..lists as u64).map(|i| nodes.start() + 16 * i).collect();
    let mut out = vec![0u32; lists];
    let steps = 40_000u64;
    let d = Dispatch::new(
        Kernel::Chase,
        lists as u32,
        &[heads.as_ptr() as u64, out.as_mut_ptr() as u64, steps],
    )
    .unwrap();
    m.prefetch(nodes.start(), nodes.len(), false).unwrap();
    m.prefetch(heads.as_ptr() as u64, 8 * lists as u64, false)
        .unwrap();
    m.prefetch(out.as_ptr() as u64, 4 * lists as u64, true)
        .unwrap();
    let result = std::thread::scope(|s| {
        let t = s.spawn(|| {
            // SAFETY: the walks stay in `nodes`; `out` is not referenced until the join.
            unsafe { m.dispatch(&d) }
        });
        eventually(
            "the dispatch to be in flight",
            std::time::Duration::from_secs(5),
            || m.resources().in_flight > 0 || t.is_finished(),
        );
        unmap(&rig.mm, &[nodes]);
        assert_eq!(m.entry(nodes.start()), None);
        t.join().unwrap()
    });
    match result {
        // The walks finished before the entries went: every sum is complete.
        Ok(_) => assert!(out.iter().all(|&v| v == steps as u32), "{:?}", &out[..4]),
        // Entries went mid-walk: the replay finds the memory gone and fails closed.
        Err(VulkanError::Fault { .. }) => {}
        Err(e) => panic!("unexpected {e:?}"),
    }
    assert_eq!(m.resources().in_flight, 0);
}

#[test]
fn a_fault_racing_an_unmap_never_leaves_a_stale_entry() {
    let _s = serial();
    let rig = Rig::with(svmirror_vulkan::MirrorConfig {
        chunk_sizes: vec![PAGE],
        ..svmirror_vulkan::MirrorConfig::default()
    });
    let m = rig.mirror();
    // A thread faults pages in while the buffer is unmapped through the SVM API: whatever the
    // interleaving, once munmap has returned no entry and no import of the buffer may remain
    // (an entry installed from a snapshot the unmap overtook would be exactly that).
    for round in 0..40 {
        let buf = anon(&rig.mm, 16);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                // Bounded, in case another thread's mmap reuses the hole at once.
                for at in 0..100_000u64 {
                    let page = buf.start() + (at % 16) * PAGE;
                    if m.prefetch(page, PAGE, true).is_err() {
                        break;
                    }
                }
            });
            std::thread::sleep(std::time::Duration::from_micros(200 * (round % 5)));
            unmap(&rig.mm, &[buf]);
            t.join().unwrap();
        });
        for i in 0..16 {
            assert_eq!(
                m.entry(buf.start() + i * PAGE),
                None,
                "round {round} page {i}"
            );
        }
        assert_eq!(m.resources().imports, 0, "round {round}");
    }
    rig.finish();
}

#[test]
fn evictions_racing_dispatches_never_lose_or_repeat_an_update() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    // Each dispatch adds x = 1 to every y exactly once, while another thread keeps tearing the
    // page table down: items that miss stop before writing and are replayed; items that ran
    // are not. After k dispatches every y is exactly k.
    let n = 1 << 16;
    let x = vec![1.0f32; n];
    let mut y = vec![0.0f32; n];
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rounds = 12;
    let mut refaulted = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                m.evict_all();
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        });
        for round in 0..rounds {
            let stats = m.saxpy(1.0, &x, &mut y).unwrap();
            if round > 0 && stats.passes > 1 {
                refaulted += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, rounds as f32, "y[{i}]");
    }
    assert!(
        refaulted > 0,
        "evictions made later dispatches fault and replay"
    );
    rig.finish();
}
