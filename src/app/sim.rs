//! The simulated IOMMU as the app's device: one [`IommuMirror`] over the whole user address
//! space, its page source the [`ProcessMm`], so every SVM API call and every userfaultfd event
//! reaches it. Kernels are [`DeviceKernel`]s: Rust closures whose every load and store is a DMA
//! command through the IOMMU. The IOTLB checking mode is on: a device access through a
//! translation that should have been flushed fails the run.

mod bench;
mod invalidate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use svmirror_core::{Mirror, PAGE_SIZE, Range};
use svmirror_iommu::{
    DeviceKernel, DmaCommand, IommuError, IommuMirror, KernelCtx, KernelError, KernelStats,
    MirrorConfig,
};
use svmirror_mm::ProcessMm;

use super::report::Figure;
use super::{
    AppError, Backend, BackendKind, DeviceWork, Node, Progress, Result, SlotRef, SlotResult,
    error_chain,
};

/// Elements of one saxpy block (1 MiB of f32): two loads and one store per block.
const SAXPY_BLOCK: usize = 1 << 18;

/// The lowest address mirrored (page 0 is never mapped).
const USER_START: u64 = PAGE_SIZE;
/// The end of the user address space on x86-64 and arm64 with 4-level tables.
const USER_END: u64 = 1 << 47;

/// The simulated-IOMMU backend. See the [module documentation](self).
pub struct SimBackend {
    mirror: IommuMirror,
}

impl std::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend")
            .field("mirror", &self.mirror)
            .finish()
    }
}

fn work(s: &KernelStats) -> DeviceWork {
    DeviceWork {
        elapsed: s.elapsed,
        commands: s.loads + s.stores,
        bytes_read: s.bytes_loaded,
        bytes_written: s.bytes_stored,
        page_requests: s.page_requests,
    }
}

fn unavailable(e: &IommuError) -> AppError {
    AppError::BackendUnavailable {
        backend: BackendKind::Sim,
        missing: format!("the simulated IOMMU cannot start ({})", error_chain(e)),
        fix: "it pins memory through io_uring: set sysctl kernel.io_uring_disabled=0 and give it locked memory (run as root, or ulimit -l unlimited); see svmirror info".into(),
    }
}

impl SimBackend {
    /// Opens the simulated IOMMU over all of `mm`'s user address space.
    pub fn open(mm: Arc<ProcessMm>) -> Result<SimBackend> {
        // Unprivileged pins count against RLIMIT_MEMLOCK: take what the hard limit allows.
        let _ = svmirror_mm::raise_memlock_limit(u64::MAX);
        let range = Range::new(USER_START, USER_END).expect("user space is a range");
        // SAFETY: the apps touch memory the device writes through raw pointers only, and only
        // when no device call on it is running (the `Backend` methods' contracts).
        // The mirror keeps the address space alive.
        let mirror = unsafe { IommuMirror::new(mm, range, MirrorConfig::checked()) }
            .map_err(|e| unavailable(&e))?;
        Ok(SimBackend { mirror })
    }

    /// The mirror underneath: for device kernels ([`DeviceKernel::new`]), DMA commands
    /// ([`IommuMirror::submit`]) and the counters.
    pub fn mirror(&self) -> &IommuMirror {
        &self.mirror
    }

    fn kernel_err(app: &'static str) -> impl FnOnce(KernelError) -> AppError {
        move |e| AppError::device(app, BackendKind::Sim, "device kernel failed", e)
    }

    /// Fails when the IOTLB checking mode saw a stale translation used.
    fn check_violations(&self, app: &'static str) -> Result<()> {
        let (v, n) = self.mirror.violations();
        if n == 0 {
            return Ok(());
        }
        Err(AppError::Mismatch {
            app,
            count: n,
            first: format!("the device used a stale translation: {:?}", v.first()),
        })
    }
}

impl Backend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    fn device(&self) -> String {
        "simulated IOMMU: 4-level IO page table, IOTLB in checking mode, DMA engine with page requests, io_uring pins; IOVA = process address".into()
    }

    unsafe fn bfs(&self, root: *const Node, progress: Progress<'_>) -> Result<(u64, DeviceWork)> {
        const LEVEL: u64 = std::mem::offset_of!(Node, level) as u64;
        const DEGREE: u64 = std::mem::offset_of!(Node, degree) as u64;
        const EDGES: u64 = std::mem::offset_of!(Node, edges) as u64;
        const _: () = assert!(EDGES == DEGREE + 8, "degree and edges load as one block");
        let started = Instant::now();
        let mut pipe = Pipeline::new(&self.mirror);
        let root = root as u64;
        // The device's own memory: the levels it has assigned, and the frontier.
        let mut level: HashMap<u64, u64> = HashMap::new();
        level.insert(root, 0);
        pipe.store(root + LEVEL, 0)?;
        let mut frontier = vec![root];
        let mut depth = 0;
        let mut done = 0u64;
        while !frontier.is_empty() {
            // Frontier-parallel: one gather of the level's node headers, one of their
            // adjacency lists, one scatter of the new levels (each cut at PARTS_PER_COMMAND
            // parts), instead of a command per pointer.
            let headers = pipe.loads(frontier.iter().map(|&n| (n + DEGREE, 16)))?;
            let lists = pipe.loads(headers.iter().map(|h| {
                let degree = u64::from_ne_bytes(h[..8].try_into().expect("8 bytes"));
                let edges = u64::from_ne_bytes(h[8..16].try_into().expect("8 bytes"));
                (edges, degree * 8)
            }))?;
            depth += 1;
            let mut next = Vec::new();
            for list in &lists {
                for e in list.chunks_exact(8) {
                    let to = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                    if let std::collections::hash_map::Entry::Vacant(v) = level.entry(to) {
                        v.insert(depth);
                        next.push(to);
                    }
                }
            }
            pipe.stores(next.iter().map(|&n| (n + LEVEL, depth)))?;
            done += frontier.len() as u64;
            progress(done, level.len() as u64);
            frontier = next;
        }
        self.check_violations("bfs")?;
        let mut w = pipe.work;
        w.elapsed = started.elapsed();
        Ok((level.len() as u64, w))
    }

    unsafe fn saxpy(
        &self,
        a: f32,
        x: *const f32,
        y: *mut f32,
        n: usize,
        progress: Progress<'_>,
    ) -> Result<DeviceWork> {
        let (x, y) = (x as u64, y as u64);
        // Software pipelined: the next block's loads and this block's store are in flight
        // while the kernel computes, so the device thread moves one block while this thread
        // computes another. y is updated in the bytes the device loaded, which are then the
        // store's data: no copy on this side.
        let load = |k: &mut KernelCtx<'_>, i: usize| {
            let len = (SAXPY_BLOCK.min(n - i) * 4) as u64;
            let off = (i * 4) as u64;
            Ok::<_, KernelError>((k.start_load(x + off, len)?, k.start_load(y + off, len)?))
        };
        let run = DeviceKernel::new(&self.mirror)
            .run(|k| {
                if n == 0 {
                    return Ok(());
                }
                let mut next = Some(load(k, 0)?);
                let mut store = None;
                let mut i = 0;
                while let Some((px, py)) = next.take() {
                    let len = SAXPY_BLOCK.min(n - i);
                    let xs = k.finish(px)?;
                    let mut ys = k.finish(py)?;
                    if i + len < n {
                        next = Some(load(k, i + len)?);
                    }
                    crate::app::saxpy::saxpy_bytes(a, &mut ys, &xs);
                    if let Some(s) = store.take() {
                        k.finish(s)?;
                    }
                    store = Some(k.start_store(y + (i * 4) as u64, ys)?);
                    i += len;
                    progress(i as u64, n as u64);
                }
                if let Some(s) = store {
                    k.finish(s)?;
                }
                Ok(())
            })
            .map_err(Self::kernel_err("saxpy"))?;
        self.check_violations("saxpy")?;
        Ok(work(&run.stats))
    }

    unsafe fn sum_slots(
        &self,
        table: *const SlotRef,
        n: usize,
    ) -> Result<(Vec<SlotResult>, DeviceWork)> {
        let table = table as u64;
        let run = DeviceKernel::new(&self.mirror)
            .run(|k| {
                let mut out = Vec::with_capacity(n);
                let mut entry = [0u8; 16];
                let mut data = Vec::new();
                for i in 0..n as u64 {
                    k.load_bytes(table + i * 16, &mut entry)?;
                    let addr = u64::from_ne_bytes(entry[..8].try_into().expect("8 bytes"));
                    let words = u64::from_ne_bytes(entry[8..].try_into().expect("8 bytes"));
                    data.resize((words.max(1) - 1) as usize * 8, 0);
                    let r = k.load_bytes(addr, &mut data).and_then(|()| {
                        let sum = data.chunks_exact(8).fold(0u64, |s, w| {
                            s.wrapping_add(u64::from_ne_bytes(w.try_into().expect("8 bytes")))
                        });
                        k.store_u64(addr + (words - 1) * 8, sum).map(|()| sum)
                    });
                    out.push(match r {
                        Ok(sum) => SlotResult::Stored(sum),
                        Err(KernelError::Fault { iova, .. }) => SlotResult::Refused { addr: iova },
                        Err(e) => return Err(e),
                    });
                }
                Ok(out)
            })
            .map_err(Self::kernel_err("churn"))?;
        self.check_violations("churn")?;
        Ok((run.value, work(&run.stats)))
    }

    fn mirrors(&self) -> Vec<&dyn Mirror> {
        vec![&self.mirror]
    }

    fn micro_benchmarks(&self, quick: bool) -> Result<Vec<Figure>> {
        bench::micro_benchmarks(quick)
    }
}

/// Device commands queued in batches, each batch waited for in order: what a device does
/// with a command queue, without a round trip per access.
struct Pipeline<'m> {
    mirror: &'m IommuMirror,
    work: DeviceWork,
}

/// Commands in flight at most.
const PIPELINE_DEPTH: usize = 512;
/// Blocks one gather or scatter of a [`Pipeline`] carries at most.
const PARTS_PER_COMMAND: usize = 4096;

impl<'m> Pipeline<'m> {
    fn new(mirror: &'m IommuMirror) -> Self {
        Pipeline {
            mirror,
            work: DeviceWork::default(),
        }
    }

    fn err(e: IommuError) -> AppError {
        AppError::device("bfs", BackendKind::Sim, "device command failed", e)
    }

    /// Runs `cmds`, at most [`PIPELINE_DEPTH`] in flight, and returns their completions in
    /// order.
    fn run(
        &mut self,
        cmds: impl Iterator<Item = DmaCommand>,
    ) -> Result<Vec<svmirror_iommu::Completion>> {
        let mut out = Vec::new();
        let mut fences = std::collections::VecDeque::new();
        for cmd in cmds {
            if fences.len() == PIPELINE_DEPTH {
                let f: svmirror_iommu::Fence = fences.pop_front().expect("full");
                out.push(f.wait().map_err(Self::err)?);
            }
            fences.push_back(self.mirror.submit(cmd).map_err(Self::err)?);
            self.work.commands += 1;
        }
        for f in fences {
            out.push(f.wait().map_err(Self::err)?);
        }
        for c in &out {
            self.work.page_requests += u64::from(c.page_requests);
            self.work.bytes_read += c.data.len() as u64;
        }
        Ok(out)
    }

    /// Loads `(addr, len)` blocks: a gather per [`PARTS_PER_COMMAND`] blocks, so a level of
    /// the search costs a handful of device commands, not one per pointer.
    fn loads(&mut self, blocks: impl Iterator<Item = (u64, u64)>) -> Result<Vec<Vec<u8>>> {
        let blocks: Vec<(u64, u64)> = blocks.collect();
        let parts: Vec<(u64, u64)> = blocks.iter().copied().filter(|b| b.1 > 0).collect();
        let done = self.run(
            parts
                .chunks(PARTS_PER_COMMAND)
                .map(|c| DmaCommand::Gather { parts: c.to_vec() }),
        )?;
        let data: Vec<u8> = done.into_iter().flat_map(|c| c.data).collect();
        let mut at = 0usize;
        Ok(blocks
            .iter()
            .map(|&(_, len)| {
                let b = data[at..at + len as usize].to_vec();
                at += len as usize;
                b
            })
            .collect())
    }

    /// Stores `(addr, value)` u64s: a scatter per [`PARTS_PER_COMMAND`] of them.
    fn stores(&mut self, words: impl Iterator<Item = (u64, u64)>) -> Result<()> {
        let words: Vec<(u64, u64)> = words.collect();
        let n = words.len() as u64 * 8;
        self.run(
            words
                .chunks(PARTS_PER_COMMAND)
                .map(|c| DmaCommand::Scatter {
                    parts: c.iter().map(|&(dst, _)| (dst, 8)).collect(),
                    data: c.iter().flat_map(|&(_, v)| v.to_ne_bytes()).collect(),
                }),
        )?;
        self.work.bytes_written += n;
        Ok(())
    }

    /// Stores one u64.
    fn store(&mut self, addr: u64, v: u64) -> Result<()> {
        self.stores(std::iter::once((addr, v)))
    }
}
