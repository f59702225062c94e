//! The VFIO backend's micro-benchmarks (`svmirror bench --backend vfio --micro`), run against
//! the real edu device in the guest of `cargo xtask vfio-vm`.

use std::time::Instant;

use svmirror_core::{Event, NotifierRange, PAGE_SIZE, Range};
use svmirror_edu::EduError;
use svmirror_vfio::VfioError;

use super::{Device, MAX_TRANSFER, MIRROR_ALIGN, VfioBackend};
use crate::app::report::Figure;
use crate::app::{AppError, BackendKind, Result, median};

/// Fault-to-mapped latency of one 2 MiB chunk (populated memory) against the same fault when
/// it is already mapped, and the device's copy rate (4095 bytes, two transfers through its
/// buffer) against memcpy of the same bytes.
pub(super) fn bench(b: &VfioBackend, dev: &Device, buf: Range, quick: bool) -> Result<Vec<Figure>> {
    let err = |what: &'static str| {
        move |e: VfioError| AppError::device("bench", BackendKind::Vfio, what, e)
    };
    let dev_err = |what: &'static str| {
        move |e: EduError| AppError::device("bench", BackendKind::Vfio, what, e)
    };
    let chunk = Range::with_len(buf.start().next_multiple_of(MIRROR_ALIGN), MIRROR_ALIGN)
        .map_err(|e| AppError::device("bench", BackendKind::Vfio, "range", e))?;
    // SAFETY: the benchmark's own fresh mapping, `chunk` inside it; no device uses it yet and
    // no Rust reference covers it.
    unsafe {
        std::ptr::write_bytes(
            chunk.start() as usize as *mut u8,
            0x5a,
            chunk.len() as usize,
        )
    };
    let mut e = b.engine(dev);
    let (m, _) = e
        .locate(chunk.start(), chunk.len())
        .map_err(dev_err("locate"))?;
    m.fault(chunk.start(), chunk.len(), true)
        .map_err(err("fault"))?;
    let iters = if quick { 8 } else { 40 };
    let mut cold = Vec::with_capacity(iters);
    let mut warm = Vec::with_capacity(iters);
    for _ in 0..iters {
        b.mm.notifier()
            .invalidate_range_start(NotifierRange::new(chunk, Event::Clear))
            .map_err(|e| AppError::device("bench", BackendKind::Vfio, "invalidate", e))?
            .end();
        let t = Instant::now();
        m.fault(chunk.start(), chunk.len(), true)
            .map_err(err("fault"))?;
        cold.push(t.elapsed());
        let t = Instant::now();
        m.fault(chunk.start(), chunk.len(), true)
            .map_err(err("fault"))?;
        warm.push(t.elapsed());
    }
    let mut figs = vec![Figure::latency(
        "vfio",
        "fault → mapped, one 2 MiB chunk",
        median(cold),
        "the same fault, already mapped",
        median(warm),
    )];

    let (src, dst) = (chunk.start(), chunk.start() + PAGE_SIZE);
    let copies = if quick { 3 } else { 10 };
    let mut dma = Vec::with_capacity(copies);
    for _ in 0..copies {
        let t = Instant::now();
        e.dma_in(src, MAX_TRANSFER, 0).map_err(dev_err("DMA"))?;
        e.dma_out(0, dst, MAX_TRANSFER).map_err(dev_err("DMA"))?;
        dma.push(t.elapsed());
    }
    let reps = 1000;
    let t = Instant::now();
    for _ in 0..reps {
        // SAFETY: two distinct pages of the benchmark's mapping, 4095 bytes each; no transfer
        // runs.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src as usize as *const u8,
                dst as usize as *mut u8,
                MAX_TRANSFER as usize,
            );
        }
        std::hint::black_box(dst);
    }
    let memcpy = t.elapsed().as_secs_f64() / f64::from(reps);
    let bytes = MAX_TRANSFER as f64;
    figs.push(Figure::rate(
        "vfio",
        "DMA copy, 4095 B through edu's buffer",
        bytes / median(dma).max(1e-12),
        "B/s",
        "memcpy",
        bytes / memcpy.max(1e-12),
    ));
    Ok(figs)
}
