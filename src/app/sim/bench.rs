//! The simulated IOMMU's micro-benchmarks (`svmirror bench --micro`): fault → replay latency
//! against the same read already mapped, and the DMA copy rate against memcpy. Each builds a
//! mirror of its own over a buffer of its own, on a notifier of its own.

use std::time::{Duration, Instant};

use svmirror_core::{Event, Notifier, NotifierRange, PAGE_SIZE, Range};
use svmirror_iommu::{DmaCommand, FaultTimes, IommuError, IommuMirror, MirrorConfig};
use svmirror_mm::ProcessPageSource;
use svmirror_mm::testing::AnonMap;

use crate::app::report::Figure;
use crate::app::{AppError, BackendKind, Result, median, percentile};

/// The figures, each with its baseline from the same run.
pub(super) fn micro_benchmarks(quick: bool) -> Result<Vec<Figure>> {
    let iters = if quick { 40 } else { 400 };
    let mut figs = Vec::new();
    for (name, len, huge, target) in [
        ("fault → replay, 4 KiB", PAGE_SIZE as usize, false, 10e-6),
        ("fault → replay, 2 MiB", 2 << 20, true, 50e-6),
    ] {
        let f = fault_replay(len, huge, iters)?;
        let t = if target < 2e-5 { "≤ 10 µs" } else { "≤ 50 µs" };
        let steps = f.steps;
        let resolve = steps.total.as_secs_f64();
        let fig = Figure::latency(
            "sim",
            name,
            f.fault,
            "the same read, already mapped",
            f.warm,
        )
        .with_target(t, f.fault <= target)
        .with_p99(f.fault_p99)
        .with_part(
            "request (settle, miss)",
            (f.fault_mean - resolve - f.warm_mean).max(0.0),
        )
        .with_part("lookup", steps.lookup.as_secs_f64())
        .with_part("range_fault", steps.range_fault.as_secs_f64())
        .with_part("pin", steps.pin.as_secs_f64())
        .with_part("map", steps.map.as_secs_f64())
        .with_part("replay (the mapped read)", f.warm_mean);
        figs.push(fig);
    }
    let len = if quick { 4 << 20 } else { 16 << 20 };
    let (dma, memcpy) = dma_copy(len, if quick { 5 } else { 30 })?;
    let name = format!("DMA copy, {} MiB, warm IOTLB", len >> 20);
    figs.push(
        Figure::rate("sim", &name, dma, "B/s", "memcpy", memcpy)
            .with_target("≥ 0.5× memcpy", dma >= 0.5 * memcpy),
    );
    Ok(figs)
}

fn bench_err(what: &'static str) -> impl FnOnce(IommuError) -> AppError {
    move |e| AppError::device("bench", BackendKind::Sim, what, e)
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> AppError {
    move |e| AppError::device("bench", BackendKind::Sim, what, e)
}

/// A mirror of its own over `buf`, on a notifier of its own, reading this process's page table
/// raw (no userfaultfd monitor in the way).
fn bench_mirror(notifier: &Notifier, buf: &AnonMap) -> Result<IommuMirror> {
    let range = Range::with_len(buf.addr(), buf.len() as u64)
        .map_err(|e| AppError::device("bench", BackendKind::Sim, "range", e))?;
    let source = ProcessPageSource::new()
        .map_err(|e| AppError::device("bench", BackendKind::Sim, "page source", e))?;
    // SAFETY: the benchmark touches `buf` through raw pointers only (AnonMap's methods).
    unsafe {
        IommuMirror::with_page_source(notifier, range, MirrorConfig::default(), Box::new(source))
    }
    .map_err(bench_err("mirror"))
}

/// What [`fault_replay`] measured, in seconds.
struct FaultReplay {
    /// Median and 99th percentile of a read that faults, and the mean.
    fault: f64,
    fault_p99: f64,
    fault_mean: f64,
    /// Median and mean of the same read with the translation in place.
    warm: f64,
    warm_mean: f64,
    /// The mirror's fault steps, per fault.
    steps: FaultTimes,
}

fn mean(v: &[Duration]) -> f64 {
    v.iter().sum::<Duration>().as_secs_f64() / v.len().max(1) as f64
}

/// Device read latency when every read faults (the mapping is dropped before each), and when
/// the translation is in place, with the driver's steps of the faults.
fn fault_replay(len: usize, huge: bool, iters: usize) -> Result<FaultReplay> {
    let notifier = Notifier::new();
    let buf = AnonMap::aligned(len, 2 << 20).map_err(io_err("mmap"))?;
    // Failure (no THP) only makes the 2 MiB case use 4 KiB pages.
    let _ = buf.advise(if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    });
    buf.fill(0x5a);
    let m = bench_mirror(&notifier, &buf)?;
    let range = m.range();
    let src = buf.addr() + len as u64 / 2;
    let read = || -> Result<(Duration, u32)> {
        let t = Instant::now();
        let done = m
            .submit(DmaCommand::Read { src, len: 8 })
            .and_then(|f| f.wait())
            .map_err(bench_err("read"))?;
        Ok((t.elapsed(), done.page_requests))
    };
    read()?;
    let mut faults = Vec::with_capacity(iters);
    let mut warm = Vec::with_capacity(iters);
    let before = m.stats();
    for _ in 0..iters {
        notifier
            .invalidate_range_start(NotifierRange::new(range, Event::Clear))
            .map_err(|e| AppError::device("bench", BackendKind::Sim, "invalidate", e))?
            .end();
        let (t, requests) = read()?;
        if requests == 1 {
            faults.push(t);
        }
        warm.push(read()?.0);
    }
    let after = m.stats();
    let n = after.faults - before.faults;
    let sum = |f: fn(&FaultTimes) -> Duration| f(&after.fault_times) - f(&before.fault_times);
    let steps = FaultTimes {
        total: sum(|t| t.total),
        lookup: sum(|t| t.lookup),
        range_fault: sum(|t| t.range_fault),
        pin: sum(|t| t.pin),
        map: sum(|t| t.map),
    }
    .per(n);
    let (fault_mean, warm_mean) = (mean(&faults), mean(&warm));
    Ok(FaultReplay {
        fault: median(faults.clone()),
        fault_p99: percentile(faults, 99),
        fault_mean,
        warm: median(warm),
        warm_mean,
        steps,
    })
}

/// Device copy rate between two pre-faulted halves of one buffer, and memcpy's, in bytes per
/// second.
fn dma_copy(len: usize, iters: usize) -> Result<(f64, f64)> {
    let notifier = Notifier::new();
    let buf = AnonMap::aligned(2 * len, 2 << 20).map_err(io_err("mmap"))?;
    let _ = buf.advise(libc::MADV_HUGEPAGE);
    buf.fill(0x11);
    let m = bench_mirror(&notifier, &buf)?;
    let (src, dst) = (buf.addr(), buf.addr() + len as u64);
    m.fault(buf.addr(), 2 * len as u64, true)
        .map_err(bench_err("fault"))?;
    let copy = || {
        m.submit(DmaCommand::Copy {
            src,
            dst,
            len: len as u64,
        })
        .and_then(|f| f.wait())
        .map_err(bench_err("copy"))
    };
    copy()?;
    let mut dma = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        copy()?;
        dma.push(t.elapsed());
    }
    let mut cpu = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        // SAFETY: the two halves of one mapping, `len` bytes each, not overlapping; no device
        // command runs.
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst as usize as *mut u8, len);
        }
        cpu.push(t.elapsed());
    }
    std::hint::black_box(buf.read(len, 8));
    Ok((len as f64 / median(dma), len as f64 / median(cpu)))
}
