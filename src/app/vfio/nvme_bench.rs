//! The NVMe micro-benchmarks (`svmirror bench --backend vfio --micro` when an NVMe
//! controller is bound to vfio-pci): what a storage engineer asks of a driver that reads
//! straight into ordinary memory.
//!
//! Sequential and random reads of 4 KiB and 128 KiB, each into its own slot of a fresh
//! anonymous mapping (**first touch**: svmirror faults the destination in and maps it on
//! demand), then again into the same slots (**steady state**: already mapped). The baseline is
//! what SPDK-style drivers do: one DMA buffer mapped once up front (a pool of one
//! transfer, warmed before timing), every read into it, then a memcpy into the destination
//! (fresh memory for the first-touch baseline too, so both pay the CPU's page faults). The
//! fault → mapped cost is the median of the faults the first-touch run took, from the
//! mirrors' latency histogram (power-of-two buckets).

use std::time::{Duration, Instant};

use svmirror_mm::Protection;
use svmirror_nvme::{Nvme, NvmeError};

use super::nvme::NvmeBackend;
use crate::app::report::Figure;
use crate::app::{AppError, Backend, BackendKind, Result, Rng};

/// One read size's runs: `(bytes per read, reads per run)`, quick and full.
const SIZES: [(u64, usize, usize); 2] = [(4 << 10, 128, 1024), (128 << 10, 24, 64)];

fn err(what: &'static str) -> impl FnOnce(NvmeError) -> AppError {
    move |e| AppError::device("bench", BackendKind::Vfio, what, e)
}

/// What one timed run took.
struct Run {
    elapsed: Duration,
    faults: u64,
    /// The median fault → mapped latency of the faults taken (the mirrors' histogram).
    fault_median: Option<Duration>,
}

impl NvmeBackend {
    /// Reads `lbas` (each `size` bytes) into consecutive slots from `dst`, straight into the
    /// slots (`pool` `None`) or into `pool` and then memcpy into the slots.
    ///
    /// # Safety
    ///
    /// `[dst, dst + lbas.len() * size)` is the caller's own mapping, with no Rust reference
    /// into it, and nothing else touches it during the call.
    unsafe fn timed(
        &self,
        nvme: &mut Nvme,
        lbas: &[u64],
        size: u64,
        dst: u64,
        pool: Option<&mut [u8]>,
    ) -> Result<Run> {
        let before = self.counters();
        let started = Instant::now();
        match pool {
            None => {
                for (i, &lba) in lbas.iter().enumerate() {
                    let to = dst + i as u64 * size;
                    // SAFETY: slot `i` of the caller's mapping (the caller's contract).
                    unsafe { nvme.read_raw(lba, to as *mut u8, size as usize) }
                        .map_err(err("read"))?;
                }
            }
            Some(pool) => {
                for (i, &lba) in lbas.iter().enumerate() {
                    nvme.read(lba, pool).map_err(err("read into the pool"))?;
                    let to = dst + i as u64 * size;
                    // SAFETY: slot `i` of the caller's mapping (the caller's contract), and
                    // the pool, distinct from it; a raw copy, no reference into the mapping.
                    unsafe {
                        std::ptr::copy_nonoverlapping(pool.as_ptr(), to as *mut u8, size as usize)
                    };
                }
            }
        }
        let elapsed = started.elapsed();
        let d = self.counters().since(&before);
        Ok(Run {
            elapsed,
            faults: d.total_faults(),
            fault_median: d.fault_latency.median(),
        })
    }
}

pub(super) fn bench(b: &NvmeBackend, quick: bool) -> Result<Vec<Figure>> {
    let mut nvme = b.lock_nvme();
    let ns = nvme.namespace().map_err(err("namespace"))?;
    let mut figs = Vec::new();
    let mut rng = Rng::new(14);
    for (size, quick_n, full_n) in SIZES {
        let n = if quick { quick_n } else { full_n };
        if size % ns.lba_size != 0 {
            continue;
        }
        let per = size / ns.lba_size;
        let slots = ns.blocks / per;
        if slots == 0 {
            continue;
        }
        for random in [false, true] {
            let lbas: Vec<u64> = (0..n as u64)
                .map(|i| {
                    let slot = if random { rng.below(slots) } else { i % slots };
                    slot * per
                })
                .collect();
            let len = size * n as u64;
            let mm = &b.mm;
            let map = |what| {
                mm.mmap_anonymous(len, Protection::READ_WRITE)
                    .map_err(|e| AppError::device("bench", BackendKind::Vfio, what, e))
            };
            let svm_dst = map("mmap")?;
            let base_dst = map("mmap")?;
            let mut pool = vec![0u8; size as usize];
            let result = (|| -> Result<Vec<Run>> {
                nvme.read(0, &mut pool).map_err(err("warming the pool"))?;
                let mut runs = Vec::with_capacity(4);
                for (dst, use_pool) in [
                    (svm_dst.start(), false),
                    (svm_dst.start(), false),
                    (base_dst.start(), true),
                    (base_dst.start(), true),
                ] {
                    let pool = use_pool.then_some(&mut pool[..]);
                    // SAFETY: `svm_dst` and `base_dst` are this benchmark's fresh mappings of
                    // `len` bytes, with no reference into them; only these calls touch them.
                    runs.push(unsafe { b.timed(&mut nvme, &lbas, size, dst, pool) }?);
                }
                Ok(runs)
            })();
            for r in [svm_dst, base_dst] {
                // SAFETY: the benchmark's own mapping; no command runs and nothing refers
                // into it.
                unsafe { mm.munmap(r) }
                    .map_err(|e| AppError::device("bench", BackendKind::Vfio, "munmap", e))?;
            }
            let runs = result?;
            let (first, steady, base_first, base_steady) = (&runs[0], &runs[1], &runs[2], &runs[3]);
            let pattern = if random { "random" } else { "sequential" };
            let kib = size >> 10;
            let rate = |r: &Run| len as f64 / r.elapsed.as_secs_f64().max(1e-12);
            let iops = |r: &Run| n as f64 / r.elapsed.as_secs_f64().max(1e-12);
            let fault_cost = first.fault_median.map(|d| d.as_secs_f64());
            let mut fig = Figure::rate(
                "vfio",
                &format!("NVMe {pattern} {kib} KiB reads, first touch"),
                rate(first),
                "B/s",
                "DMA pool mapped once + memcpy",
                rate(base_first),
            )
            .with_count("IOPS", iops(first))
            .with_count("pool IOPS", iops(base_first))
            .with_count("faults", first.faults as f64);
            if let Some(c) = fault_cost {
                fig = fig.with_count("fault → mapped median µs", c * 1e6);
            }
            figs.push(fig);
            figs.push(
                Figure::rate(
                    "vfio",
                    &format!("NVMe {pattern} {kib} KiB reads, steady state"),
                    rate(steady),
                    "B/s",
                    "DMA pool mapped once + memcpy",
                    rate(base_steady),
                )
                .with_count("IOPS", iops(steady))
                .with_count("pool IOPS", iops(base_steady)),
            );
        }
    }
    Ok(figs)
}
