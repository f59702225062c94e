//! A Vulkan compute shader on the process's ordinary memory: reads and writes by CPU pointer,
//! fault and replay (with more misses than the fault buffer holds), prefetch, pointer chasing,
//! BFS, and migration to device memory and back. Every test runs under the validation layer
//! and ends with zero validation errors and nothing left imported or allocated.

mod common;

use common::*;
use svmirror_core::{Event, FaultSize};
use svmirror_testsupport::{MONITOR_WAIT, eventually, serial};
use svmirror_vulkan::{
    BfsNode, ChaseNode, Dispatch, DispatchStats, Kernel, MirrorConfig, StagedChase, StagedStream,
    VulkanError, VulkanMirror,
};

fn saxpy(x: u64, y: u64, n: u32, a: f32) -> Dispatch {
    Dispatch::new(Kernel::Stream, n, &[x, y, u64::from(a.to_bits())]).unwrap()
}

#[test]
fn shader_reads_and_writes_process_memory_in_place() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    // Ordinary heap memory: two Vecs, handed to the shader by pointer.
    let n = 50_000usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut y: Vec<f32> = (0..n).map(|i| 1000.0 - i as f32).collect();
    let d = saxpy(x.as_ptr() as u64, y.as_mut_ptr() as u64, n as u32, 2.0);
    // SAFETY: `x` and `y` hold `n` floats; no reference to them is used during the dispatch.
    let stats = unsafe { m.dispatch(&d) }.unwrap();
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, 2.0 * i as f32 + 1000.0 - i as f32, "y[{i}]");
    }
    assert!(stats.passes >= 2, "the first pass faults: {stats:?}");
    assert!(stats.pages_resolved >= 1 && stats.replayed_items > 0);
    let c = m.counters();
    assert!(c.total_faults() >= 1 && c.bytes_mapped > 0, "{c:?}");
    assert!(m.entry(y.as_ptr() as u64).is_some_and(|w| w));
    assert!(m.resources().imports >= 1);

    // Mapped now: the same dispatch runs in one pass and the CPU sees the second update.
    // SAFETY: as above.
    let again = unsafe { m.dispatch(&d) }.unwrap();
    assert_eq!(again.passes, 1, "{again:?}");
    assert_eq!((again.fault_batches, again.faults_per_batch()), (0, 0.0));
    assert_eq!(y[7], 2.0 * 7.0 + 2.0 * 7.0 + 1000.0 - 7.0);
    rig.finish();
}

#[test]
fn more_misses_than_the_fault_buffer_holds_are_replayed_to_completion() {
    let _s = serial();
    let rig = Rig::with(MirrorConfig {
        chunk_sizes: vec![PAGE],
        fault_capacity: 4,
        ..MirrorConfig::default()
    });
    let m = rig.mirror();
    let pages = 32u64;
    let x = anon(&rig.mm, pages);
    let y = anon(&rig.mm, pages);
    let n = (pages * PAGE / 4) as usize;
    write_f32s(x.start(), (0..n).map(|i| i as f32));
    write_f32s(y.start(), (0..n).map(|_| 1.0));
    // SAFETY: both ranges hold `n` floats, touched only by raw pointers.
    let stats = unsafe { m.dispatch(&saxpy(x.start(), y.start(), n as u32, 3.0)) }.unwrap();
    for i in (0..n).step_by(97) {
        assert_eq!(read_f32(y.start(), i), 3.0 * i as f32 + 1.0, "y[{i}]");
    }
    assert!(stats.overflowed_passes >= 1, "{stats:?}");
    assert!(stats.passes > 2 * pages as u32 / 4, "{stats:?}");
    assert_eq!(stats.pages_resolved, 2 * pages, "{stats:?}");
    // Every pass but the last faulted, and each was one batch of at most the buffer's 4.
    assert_eq!(stats.fault_batches, stats.passes - 1, "{stats:?}");
    assert!(
        stats.faults_per_batch() > 1.0 && stats.faults_per_batch() <= 4.0,
        "{stats:?}"
    );
    let c = m.counters();
    assert_eq!(c.faults[FaultSize::Page4K as usize], 2 * pages, "{c:?}");
    assert_eq!(m.resources().imports, 2 * pages);
    unmap(&rig.mm, &[x, y]);
    assert_eq!(m.resources().imports, 0);
    rig.finish();
}

#[test]
fn prefetch_maps_ahead_so_the_dispatch_does_not_fault() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let x = anon(&rig.mm, 8);
    let y = anon(&rig.mm, 8);
    let n = (8 * PAGE / 4) as usize;
    write_f32s(x.start(), (0..n).map(|i| i as f32));
    write_f32s(y.start(), (0..n).map(|_| 0.5));
    m.prefetch(x.start(), x.len(), false).unwrap();
    m.prefetch(y.start(), y.len(), true).unwrap();
    assert!(m.entry(x.start()).is_some() && m.entry(y.end() - PAGE) == Some(true));
    let faults = m.counters().total_faults();
    // SAFETY: both ranges hold `n` floats, touched only by raw pointers.
    let stats = unsafe { m.dispatch(&saxpy(x.start(), y.start(), n as u32, -1.0)) }.unwrap();
    assert_eq!(stats.passes, 1, "{stats:?}");
    assert_eq!(stats.misses, 0);
    assert_eq!(m.counters().total_faults(), faults);
    assert_eq!(read_f32(y.start(), 100), -100.0 + 0.5);
    unmap(&rig.mm, &[x, y]);
    rig.finish();
}

/// A small deterministic generator (xorshift), so the tests need no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn pointer_chasing_follows_rust_pointers_and_matches_the_staging_copy() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let (count, lists, steps) = (4096usize, 64usize, 200u64);
    let mut nodes = vec![ChaseNode::default(); count];
    let base = nodes.as_ptr() as u64;
    let mut rng = Rng(0x1234_5678);
    for (i, n) in nodes.iter_mut().enumerate() {
        n.next = base + 16 * (rng.next() % count as u64);
        n.value = i as u32;
    }
    nodes[17].next = 0; // one list ends early
    let heads: Vec<u64> = (0..lists)
        .map(|_| base + 16 * (rng.next() % count as u64))
        .collect();
    let expect: Vec<u32> = heads
        .iter()
        .map(|&h| {
            let (mut p, mut sum, mut s) = (h, 0u32, 0);
            while p != 0 && s < steps {
                let n = nodes[((p - base) / 16) as usize];
                sum = sum.wrapping_add(n.value);
                p = n.next;
                s += 1;
            }
            sum
        })
        .collect();
    let mut out = vec![0u32; lists];
    let d = Dispatch::new(
        Kernel::Chase,
        lists as u32,
        &[heads.as_ptr() as u64, out.as_mut_ptr() as u64, steps],
    )
    .unwrap();
    // SAFETY: every pointer the kernel follows points into `nodes`; `out` holds `lists` u32s.
    let stats = unsafe { m.dispatch(&d) }.unwrap();
    assert_eq!(out, expect);
    assert!(stats.passes >= 2);

    let staged = StagedChase::new(rig.gpu(), count as u32, lists as u32).unwrap();
    let mut out2 = vec![0u32; lists];
    staged.run(m, &nodes, &heads, steps, &mut out2).unwrap();
    assert_eq!(out2, expect);
    drop(staged);
    rig.finish();
}

#[test]
fn bfs_levels_over_a_graph_of_rust_pointers_match_the_cpu() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let count = 2000usize;
    let mut rng = Rng(99);
    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); count];
    for i in 1..count {
        let j = (rng.next() % i as u64) as usize;
        adj[i].push(j);
        adj[j].push(i);
    }
    for _ in 0..count {
        let (a, b) = (
            (rng.next() % count as u64) as usize,
            (rng.next() % count as u64) as usize,
        );
        adj[a].push(b);
        adj[b].push(a);
    }
    let mut nodes: Vec<Box<BfsNode>> = (0..count).map(|_| Box::default()).collect();
    let addrs: Vec<u64> = nodes
        .iter()
        .map(|b| &**b as *const BfsNode as u64)
        .collect();
    let edges: Vec<Vec<u64>> = adj
        .iter()
        .map(|l| l.iter().map(|&j| addrs[j]).collect())
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.edges = edges[i].as_ptr() as u64;
        n.degree = edges[i].len() as u32;
        n.level = if i == 0 { 0 } else { -1 };
    }
    let mut changed = Box::new(0u32);
    let changed_ptr = &mut *changed as *mut u32 as u64;
    let mut cur = 0u64;
    loop {
        // SAFETY: `changed` is a live u32 that no reference is used on meanwhile.
        unsafe { (changed_ptr as *mut u32).write_volatile(0) };
        let d = Dispatch::new(
            Kernel::BfsStep,
            count as u32,
            &[addrs.as_ptr() as u64, cur, changed_ptr],
        )
        .unwrap();
        // SAFETY: every pointer the kernel follows points at a live node or edge list.
        unsafe { m.dispatch(&d) }.unwrap();
        // SAFETY: as above.
        if unsafe { (changed_ptr as *const u32).read_volatile() } == 0 {
            break;
        }
        cur += 1;
        assert!(cur < count as u64, "BFS does not terminate");
    }
    // CPU BFS.
    let mut level = vec![-1i32; count];
    level[0] = 0;
    let mut frontier = vec![0usize];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for &u in &frontier {
            for &v in &adj[u] {
                if level[v] < 0 {
                    level[v] = level[u] + 1;
                    next.push(v);
                }
            }
        }
        frontier = next;
    }
    for i in 0..count {
        // SAFETY: the kernel is done; reading through the raw address.
        let got = unsafe { (addrs[i] as *const BfsNode).read_volatile() }.level;
        assert_eq!(got, level[i], "node {i}");
    }
    drop(changed);
    rig.finish();
}

#[test]
fn migration_to_device_memory_and_a_cpu_touch_brings_pages_home() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let pages = 8u64;
    let x = anon(&rig.mm, pages);
    let y = anon(&rig.mm, pages);
    let n = (pages * PAGE / 4) as usize;
    write_f32s(x.start(), (0..n).map(|i| i as f32));
    write_f32s(y.start(), (0..n).map(|_| 1.0));
    // SAFETY: both ranges hold `n` floats, touched only by raw pointers.
    unsafe { m.dispatch(&saxpy(x.start(), y.start(), n as u32, 1.0)) }.unwrap();
    let moved = m.migrate_to_device(y.start(), y.len()).unwrap();
    assert_eq!(moved, pages);
    assert_eq!(m.resources().device_pages, pages);
    let migrate = Event::Migrate { owner: m.owner() }.index();
    assert!(
        m.counters().skipped[migrate] >= 1,
        "the mirror skips its own Migrate"
    );
    assert_eq!(m.counters().invalidations[migrate], 0);
    assert_eq!(m.device_runs(), vec![y]);
    assert_eq!(
        m.entry(y.start()),
        Some(true),
        "device pages are mapped at migration"
    );
    // x may have shared a chunk with y (neighbouring mappings merge), which the migration
    // dropped: map it again, so that the dispatch below shows y needs no fault.
    m.prefetch(x.start(), x.len(), false).unwrap();
    // The GPU works on the device-local copy.
    // SAFETY: as above.
    let stats = unsafe { m.dispatch(&saxpy(x.start(), y.start(), n as u32, 1.0)) }.unwrap();
    assert_eq!(
        stats.passes, 1,
        "device pages are mapped at migration: {stats:?}"
    );
    // A CPU touch of one page brings that page home, with the GPU's result.
    assert_eq!(read_f32(y.start(), 5), 2.0 * 5.0 + 1.0);
    eventually("the touched page to come home", MONITOR_WAIT, || {
        m.resources().device_pages == pages - 1
    });
    assert_eq!(m.entry(y.start()), None, "the page left device memory");
    // The rest comes back explicitly, with the results.
    assert_eq!(m.migrate_to_ram(y.start(), y.len()).unwrap(), pages - 1);
    assert_eq!(m.resources().device_pages, 0);
    for i in (0..n).step_by(131) {
        assert_eq!(read_f32(y.start(), i), 2.0 * i as f32 + 1.0, "y[{i}]");
    }
    // And the GPU maps the CPU pages again.
    // SAFETY: as above.
    unsafe { m.dispatch(&saxpy(x.start(), y.start(), n as u32, 1.0)) }.unwrap();
    assert_eq!(read_f32(y.start(), 3), 3.0 * 3.0 + 1.0);
    unmap(&rig.mm, &[x, y]);
    rig.finish();
}

/// Issue 16.1 on Vulkan: a page migrates as writable as its PTE was. Of 8 pages, the last 4
/// read-only (SVM API mprotect) when they migrate: the device maps the first 4 writable and
/// the last 4 read-only. An API mprotect to read-write later does not make them writable (as
/// the kernel never upgrades a device-private entry); a GPU write to one brings it home, where
/// the write lands.
///
/// Seen failing before the fix: "a writable page migrates writable" (`left: Some(false)`):
/// one read-only mapping in the range made every migrated page read-only (safe, but a write
/// to any of them then faulted).
#[test]
fn migrated_pages_keep_their_protection_on_the_gpu() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let pages = 8u64;
    let x = anon(&rig.mm, pages);
    let y = anon(&rig.mm, pages);
    let n = (pages * PAGE / 4) as usize;
    write_f32s(x.start(), (0..n).map(|i| i as f32));
    write_f32s(y.start(), (0..n).map(|_| 1.0));
    let half = pages / 2 * PAGE;
    let ro = svmirror_core::Range::with_len(y.start() + half, half).unwrap();
    rig.mm.mprotect(ro, svmirror_mm::Protection::READ).unwrap();
    assert_eq!(m.migrate_to_device(y.start(), y.len()).unwrap(), pages);
    assert_eq!(
        m.entry(y.start()),
        Some(true),
        "a writable page migrates writable"
    );
    assert_eq!(
        m.entry(ro.start()),
        Some(false),
        "a read-only page migrates read-only"
    );
    rig.mm
        .mprotect(ro, svmirror_mm::Protection::READ_WRITE)
        .unwrap();
    m.prefetch(y.start(), y.len(), false).unwrap();
    assert_eq!(
        m.entry(ro.start()),
        Some(false),
        "read-write again, the device page stays read-only"
    );
    let before = rig.mm.stats().migrated_back_device;
    // SAFETY: both ranges hold `n` floats, touched only by raw pointers.
    unsafe { m.dispatch(&saxpy(x.start(), y.start(), n as u32, 2.0)) }.unwrap();
    assert!(
        rig.mm.stats().migrated_back_device - before >= pages / 2,
        "the GPU's writes brought the read-only device pages home"
    );
    for i in (0..n).step_by(97) {
        assert_eq!(read_f32(y.start(), i), 2.0 * i as f32 + 1.0, "y[{i}]");
    }
    unmap(&rig.mm, &[x, y]);
    rig.finish();
}

#[test]
fn the_staging_copy_stream_baseline_computes_the_same() {
    let _s = serial();
    let rig = Rig::new();
    let n = 10_000usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut y = vec![1.0f32; n];
    let s = StagedStream::new(rig.gpu(), n as u32).unwrap();
    s.run(rig.mirror(), &x, &mut y, 4.0).unwrap();
    assert!(
        y.iter()
            .enumerate()
            .all(|(i, v)| *v == 4.0 * i as f32 + 1.0)
    );
    drop(s);
    rig.finish();
}

#[test]
fn saxpy_on_borrowed_slices_needs_no_unsafe() {
    let _s = serial();
    let rig = Rig::new();
    let x: Vec<f32> = (0..3000).map(|i| i as f32).collect();
    let mut y = vec![0.25f32; 3000];
    let stats = rig.mirror().saxpy(-2.0, &x, &mut y).unwrap();
    assert!(stats.passes >= 1);
    assert!(
        y.iter()
            .enumerate()
            .all(|(i, v)| *v == -2.0 * i as f32 + 0.25)
    );
    // Only the shorter length is touched.
    let mut short = vec![1.0f32; 10];
    rig.mirror().saxpy(1.0, &x, &mut short).unwrap();
    assert_eq!(short[9], 10.0);
    rig.finish();
}

#[test]
fn a_migrated_range_made_read_only_refuses_device_writes() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let y = anon(&rig.mm, 4);
    let z = anon(&rig.mm, 4);
    let n = (4 * PAGE / 4) as usize;
    write_f32s(y.start(), (0..n).map(|i| i as f32));
    assert_eq!(m.migrate_to_device(y.start(), y.len()).unwrap(), 4);
    assert_eq!(m.entry(y.start()), Some(true));
    rig.mm.mprotect(y, svmirror_mm::Protection::READ).unwrap();
    assert_eq!(
        m.entry(y.start()),
        Some(false),
        "device pages downgraded too"
    );
    // Writing y is refused, typed; reading it (from device memory) still works.
    let err = m
        .saxpy(1.0, &[1.0; 16], unsafe_slice(y.start(), 16))
        .unwrap_err();
    assert!(
        matches!(
            err,
            svmirror_vulkan::VulkanError::Fault {
                write: true,
                source: svmirror_core::Error::WriteToReadOnly { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let d = Dispatch::new(
        Kernel::Stream,
        n as u32,
        &[y.start(), z.start(), u64::from(1.0f32.to_bits())],
    )
    .unwrap();
    // SAFETY: both ranges hold `n` floats, touched only by raw pointers.
    unsafe { m.dispatch(&d) }.unwrap();
    assert_eq!(read_f32(z.start(), 77), 77.0);
    assert_eq!(m.resources().device_pages, 4, "y stayed in device memory");
    assert_eq!(m.migrate_to_ram(y.start(), y.len()).unwrap(), 4);
    assert_eq!(read_f32(y.start(), 99), 99.0);
    unmap(&rig.mm, &[y, z]);
    rig.finish();
}

/// `len` floats at `addr` as a slice, for an API that takes one. The tests hand the slice
/// straight to the device and never read it through Rust.
fn unsafe_slice(addr: u64, len: usize) -> &'static mut [f32] {
    // SAFETY: the callers pass mapped, aligned memory holding `len` floats that no other
    // reference covers while the slice is in use.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut f32, len) }
}

/// A saxpy laid out in a 2 MiB block of its own (inside a 4 MiB mapping), for the tests that
/// change the block's mappings under a fault: x is 16 pages from 4 pages in, y 16 pages from
/// 64 pages in, both written.
struct BlockSaxpy {
    mapping: svmirror_core::Range,
    block: u64,
    x: u64,
    y: u64,
    n: usize,
}

impl BlockSaxpy {
    fn new(rig: &Rig) -> BlockSaxpy {
        const BLOCK: u64 = 2 << 20;
        let mapping = rig
            .mm
            .mmap_anonymous(2 * BLOCK, svmirror_mm::Protection::READ_WRITE)
            .unwrap();
        let block = mapping.start().next_multiple_of(BLOCK);
        let (x, y) = (block + 4 * PAGE, block + 64 * PAGE);
        let n = (16 * PAGE / 4) as usize;
        write_f32s(x, (0..n).map(|i| i as f32));
        write_f32s(y, (0..n).map(|_| 1.0));
        BlockSaxpy {
            mapping,
            block,
            x,
            y,
            n,
        }
    }

    /// Whether page `p` holds x or y.
    fn holds_data(&self, p: u64) -> bool {
        (self.x..self.x + 16 * PAGE).contains(&p) || (self.y..self.y + 16 * PAGE).contains(&p)
    }

    fn dispatch(&self, m: &VulkanMirror) -> Result<DispatchStats, VulkanError> {
        // SAFETY: `x` and `y` hold `n` floats each in our block, touched by raw pointers only.
        unsafe { m.dispatch(&saxpy(self.x, self.y, self.n as u32, 2.0)) }
    }

    /// Checks y, and unmaps the mapping with libc: the tests leave holes in it, which the SVM
    /// API refuses to unmap.
    fn check_and_unmap(self, stats: &DispatchStats) {
        self.check(stats);
        self.unmap();
    }

    /// Checks y after one saxpy (y = 2x + 1).
    fn check(&self, stats: &DispatchStats) {
        for i in (0..self.n).step_by(113) {
            assert_eq!(read_f32(self.y, i), 2.0 * i as f32 + 1.0, "y[{i}]");
        }
        assert!(stats.pages_resolved >= 1, "{stats:?}");
    }

    /// Unmaps the mapping with libc.
    fn unmap(self) {
        // SAFETY: our own mapping, touched by raw pointers only.
        let rc = unsafe {
            libc::munmap(
                self.mapping.start() as *mut libc::c_void,
                self.mapping.len() as usize,
            )
        };
        assert_eq!(rc, 0);
    }
}

/// A plain munmap of a page the GPU has mapped returns once its UNMAP is read, before the
/// monitor invalidates (its handler is held here by a gated subscriber, busy with an earlier
/// event): the page table still translates the page. A dispatch submitted after the munmap
/// returned must not run on it: it waits until the UNMAP is handled, then faults on the page.
/// The simulated IOMMU's `settle.rs` test, on Vulkan.
///
/// Seen failing with the settles off: on lavapipe, which imports host memory by pointer, the
/// test process died of SIGSEGV (the dispatch ran at once through the unmapped page's
/// import); a GPU that pins would have written the old frame.
#[test]
fn a_dispatch_after_a_plain_munmap_returned_never_uses_the_old_translation() {
    use std::time::Duration;
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let t = BlockSaxpy::new(&rig);
    // Mapped once; the victim is y's last page, in an import apart from x's.
    t.check(&t.dispatch(m).unwrap());
    let victim = t.y + 15 * PAGE;
    assert_eq!(m.entry(victim), Some(true), "y is mapped writable");
    let (gated, gate, entered) = svmirror_testsupport::GatedSub::new();
    // The first page of the next 2 MiB block: no import of this block holds it.
    let first = svmirror_core::Range::with_len(t.block + (2 << 20), PAGE).unwrap();
    let _gated_sub = rig.mm.notifier().insert(first, gated).unwrap();
    let held = gate.lock().unwrap();
    // SAFETY: pages of our own mapping, touched by raw pointers only; the first holds no data.
    let unmap = |a: u64| unsafe { libc::munmap(a as *mut libc::c_void, PAGE as usize) };
    assert_eq!(unmap(first.start()), 0);
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the first UNMAP reached the gated subscriber");
    // Its UNMAP is read (so this returns) and queued behind the first.
    assert_eq!(unmap(victim), 0);
    assert!(
        m.entry(victim).is_some(),
        "the handler has not reached the victim's UNMAP yet"
    );
    let tr = &t;
    let (early, result) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let _ = tx.send(tr.dispatch(m).map(drop));
        });
        // The dispatch must wait for the victim's UNMAP to be handled, which the gate holds.
        let early = rx.recv_timeout(Duration::from_secs(2)).ok();
        drop(held);
        match early {
            Some(r) => (true, Some(r)),
            None => (false, rx.recv_timeout(Duration::from_secs(10)).ok()),
        }
    });
    assert!(
        !early,
        "a dispatch submitted after the munmap returned did not wait: {result:?}"
    );
    assert!(
        matches!(result, Some(Err(_))),
        "the dispatch wrote an unmapped page: {result:?}"
    );
    assert_eq!(m.entry(victim), None);
    t.unmap();
    rig.finish();
}

/// A fault imports a chunk around its page, cut to the page's mapping as it was looked up.
/// When another thread unmaps a page of that chunk beside the faulting one before the chunk is
/// faulted in, the chunk fails (the core finds a page gone) where the faulting page would not:
/// the fault looks again and the dispatch completes. Forced with the mirror's fault hook: the
/// first page of the chunk that holds no data is unmapped just before the chunk is faulted in.
///
/// Seen failing with the look-again turned off: the dispatch failed with a `Fault` whose source
/// is `BadAddress` at the unmapped page, not the faulting one. The app's churn on VFIO/NVMe hit
/// the same race in the VFIO backend by chance (a read-write slot refused, about one run in
/// 20).
#[test]
fn a_page_beside_the_fault_unmapped_under_it_is_looked_at_again() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let t = std::sync::Arc::new(BlockSaxpy::new(&rig));
    let gone = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (at, layout) = (gone.clone(), t.clone());
    m.set_fault_hook(Some(Box::new(move |chunk: svmirror_core::Range| {
        if at.load(std::sync::atomic::Ordering::SeqCst) != 0 {
            return;
        }
        let Some(p) = (chunk.start()..chunk.end())
            .step_by(PAGE as usize)
            .find(|&p| !layout.holds_data(p))
        else {
            return;
        };
        at.store(p, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: a page of our own mapping that holds none of the dispatch's data.
        let rc = unsafe { libc::munmap(p as *mut libc::c_void, PAGE as usize) };
        assert_eq!(rc, 0);
    })));
    let r = t.dispatch(m);
    m.set_fault_hook(None);
    assert_ne!(
        gone.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the hook unmapped a page beside the fault"
    );
    let t = std::sync::Arc::into_inner(t).expect("the hook is gone");
    t.check_and_unmap(&r.unwrap());
    rig.finish();
}

/// A fault looks at every mapping in its 2 MiB block and registers each with the userfaultfd.
/// When one of them changes between that lookup and its registration (another thread unmapping
/// or mapping memory next to the buffer), the registration says so (`Error::Busy`) and
/// `ProcessMm`'s `area` looks again: the dispatch completes. Forced with the registration
/// hook: the neighbour below the buffer shrinks just before it is registered.
///
/// Seen failing before `area` looked again, every run: the dispatch failed with "device fault at ..
/// cannot be resolved: range .. was invalidated during the walk"; the app's churn on Vulkan
/// hit the same race by chance (`tests/app_vulkan.rs`, 2 runs in 8 under load).
#[test]
fn a_neighbour_changing_under_the_fault_is_looked_at_again() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    // The block: a two-page neighbour, a PROT_NONE page that keeps it a VMA of its own, and
    // the buffers after it.
    let t = BlockSaxpy::new(&rig);
    let neighbour = t.block;
    // SAFETY: a page of our own fresh mapping, touched by no one.
    let rc = unsafe {
        libc::mprotect(
            (neighbour + 2 * PAGE) as *mut libc::c_void,
            PAGE as usize,
            0,
        )
    };
    assert_eq!(rc, 0);
    let shrunk = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = shrunk.clone();
    rig.mm
        .set_register_hook(Some(Box::new(move |r: svmirror_core::Range| {
            if r.start() == neighbour && !flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
                // SAFETY: the neighbour's second page, touched by no one.
                let rc =
                    unsafe { libc::munmap((neighbour + PAGE) as *mut libc::c_void, PAGE as usize) };
                assert_eq!(rc, 0);
            }
        })));
    let r = t.dispatch(m);
    rig.mm.set_register_hook(None);
    assert!(
        shrunk.load(std::sync::atomic::Ordering::SeqCst),
        "the hook shrank the neighbour"
    );
    t.check_and_unmap(&r.unwrap());
    rig.finish();
}
