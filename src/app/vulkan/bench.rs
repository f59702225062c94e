//! The Vulkan backend's micro-benchmarks (`svmirror bench --backend vulkan --micro`): saxpy
//! through the mirror (faulting, prefetched, mapped) against the staging copy of the same
//! work, in the same run.

use std::time::Instant;

use svmirror_vulkan::{StagedStream, VulkanMirror};

use super::device_err;
use crate::app::report::Figure;
use crate::app::{Result, median};

/// The figures, each with its baseline from the same run.
pub(super) fn micro_benchmarks(m: &VulkanMirror, quick: bool) -> Result<Vec<Figure>> {
    let iters = if quick { 5 } else { 30 };
    let (n, mib) = (1usize << 20, 4);
    let t = stream_times(m, n, iters)?;
    let name = |what: &str| format!("saxpy 2 x {mib} MiB, SVM {what}");
    let staging = "staging copy (upload, kernel, download)";
    // Issue 13's targets: zero-copy beats the copy once mapped, and comes near it faulting.
    let figs = vec![
        Figure::latency("vulkan", &name("faulting"), t.faulting, staging, t.staging)
            .with_target("≥ 0.7×", t.staging >= 0.7 * t.faulting)
            .with_count("faults per batch", t.faults_per_batch),
        Figure::latency(
            "vulkan",
            &name("prefetched"),
            t.prefetched,
            staging,
            t.staging,
        ),
        Figure::latency("vulkan", &name("mapped"), t.mapped, staging, t.staging)
            .with_target("≥ 1.0×", t.staging >= t.mapped),
        Figure::latency(
            "vulkan",
            &name("faulting"),
            t.faulting,
            "SVM prefetched",
            t.prefetched,
        ),
    ];
    Ok(figs)
}

/// Median seconds of one saxpy over `n` elements in each way.
struct StreamTimes {
    /// Pages resolved per fault batch (a pass's misses), faulting.
    faults_per_batch: f64,
    faulting: f64,
    prefetched: f64,
    mapped: f64,
    staging: f64,
}

fn stream_times(m: &VulkanMirror, n: usize, iters: usize) -> Result<StreamTimes> {
    let err = |what| device_err("bench", what);
    let x = vec![1.0f32; n];
    let mut y = vec![2.0f32; n];
    let bytes = (n * 4) as u64;
    let (mut faulting, mut prefetched, mut mapped, mut staging) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut faults, mut batches) = (0u64, 0u64);
    let staged = StagedStream::new(m.gpu(), n as u32).map_err(err("staging buffers"))?;
    m.saxpy(0.5, &x, &mut y).map_err(err("warm-up"))?;
    for _ in 0..iters {
        m.evict_all();
        let t = Instant::now();
        let s = m.saxpy(0.5, &x, &mut y).map_err(err("saxpy"))?;
        faulting.push(t.elapsed());
        faults += s.pages_resolved;
        batches += u64::from(s.fault_batches);

        m.evict_all();
        let t = Instant::now();
        m.prefetch(x.as_ptr() as u64, bytes, false)
            .map_err(err("prefetch"))?;
        m.prefetch(y.as_mut_ptr() as u64, bytes, true)
            .map_err(err("prefetch"))?;
        m.saxpy(0.5, &x, &mut y).map_err(err("saxpy"))?;
        prefetched.push(t.elapsed());

        let t = Instant::now();
        m.saxpy(0.5, &x, &mut y).map_err(err("saxpy"))?;
        mapped.push(t.elapsed());

        let t = Instant::now();
        staged
            .run(m, &x, &mut y, 0.5)
            .map_err(err("staging copy"))?;
        staging.push(t.elapsed());
    }
    std::hint::black_box(&y);
    Ok(StreamTimes {
        faults_per_batch: faults as f64 / batches.max(1) as f64,
        faulting: median(faulting),
        prefetched: median(prefetched),
        mapped: median(mapped),
        staging: median(staging),
    })
}
