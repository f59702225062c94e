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
        let t = if target < 2e-5 {
            "≤ 10 µs"
        } else {
            "≤ 50 µs"
        };
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
    let c = dma_copy(len, if quick { 5 } else { 30 })?;
    let name = format!("DMA copy, {} MiB, warm IOTLB", len >> 20);
    figs.push(
        Figure::rate(
            "sim",
            &name,
            c.dma,
            "B/s",
            "two-copy limit (io_uring fixed write + read pair)",
            c.limit,
        )
        .with_target("≥ 0.9× two-copy limit", c.dma >= 0.9 * c.limit),
    );
    figs.push(Figure::rate("sim", &name, c.dma, "B/s", "memcpy", c.memcpy));
    figs.push(first_touch_sweep(
        if quick { 16 << 20 } else { 64 << 20 },
        if quick { 2 } else { 6 },
    )?);
    figs.extend(super::invalidate::figures(quick)?);
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

/// What [`dma_copy`] measured, in bytes per second.
struct CopyRates {
    dma: f64,
    limit: f64,
    memcpy: f64,
}

/// Device copy rate between two pre-faulted halves of one buffer, the rate of the two kernel
/// copies it is made of (a raw ring, no device), and memcpy's.
fn dma_copy(len: usize, iters: usize) -> Result<CopyRates> {
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
    let limit = TwoCopy::new(src, dst, len).map_err(io_err("two-copy ring"))?;
    limit.copy().map_err(io_err("two-copy"))?;
    let (mut dma, mut raw, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        copy()?;
        dma.push(t.elapsed());
        let t = Instant::now();
        limit.copy().map_err(io_err("two-copy"))?;
        raw.push(t.elapsed());
        let t = Instant::now();
        // SAFETY: the two halves of one mapping, `len` bytes each, not overlapping; no device
        // command or ring transfer runs.
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst as usize as *mut u8, len);
        }
        cpu.push(t.elapsed());
    }
    std::hint::black_box(buf.read(len, 8));
    drop(limit);
    drop(m);
    let rate = |v| len as f64 / median(v);
    Ok(CopyRates {
        dma: rate(dma),
        limit: rate(raw),
        memcpy: rate(cpu),
    })
}

/// The baseline of a device copy: what the pinned path is made of and nothing else. One ring
/// with the source and the destination registered as two fixed buffers, and one pipe; per
/// pipe-full, `IORING_OP_WRITE_FIXED` into the pipe linked to `IORING_OP_READ_FIXED` out of it
/// (two kernel copies, issued inline), with no translation, device thread or pin table.
struct TwoCopy {
    ring: std::cell::RefCell<io_uring::IoUring>,
    pipe: [std::os::fd::OwnedFd; 2],
    cap: usize,
    src: u64,
    dst: u64,
    len: usize,
}

impl TwoCopy {
    fn new(src: u64, dst: u64, len: usize) -> std::io::Result<TwoCopy> {
        use std::os::fd::FromRawFd;
        let ring = io_uring::IoUring::new(4)?;
        let iov = |a: u64| libc::iovec {
            iov_base: a as usize as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: both buffers are mapped for the benchmark's whole run and outlive the ring
        // (dropped first by the caller); the kernel pins them.
        unsafe { ring.submitter().register_buffers(&[iov(src), iov(dst)]) }?;
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is two ints for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `pipe2` just made this descriptor; nothing else owns it.
        let read_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above, the pipe's other end.
        let write_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
        let pipe = [read_end, write_end];
        // SAFETY: plain fcntl on a descriptor we own (the pin pool asks for the same size).
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 1 << 20) };
        // SAFETY: as above.
        let cap = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
        if cap <= 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TwoCopy {
            ring: std::cell::RefCell::new(ring),
            pipe,
            cap: cap as usize,
            src,
            dst,
            len,
        })
    }

    fn copy(&self) -> std::io::Result<()> {
        use io_uring::{opcode, squeue, types};
        use std::os::fd::AsRawFd;
        let mut ring = self.ring.borrow_mut();
        let (rd, wr) = (
            types::Fd(self.pipe[0].as_raw_fd()),
            types::Fd(self.pipe[1].as_raw_fd()),
        );
        let mut done = 0;
        while done < self.len {
            let n = (self.len - done).min(self.cap);
            // Fixed-buffer I/O names addresses inside the registered buffers.
            let from = (self.src + done as u64) as usize as *const u8;
            let to = (self.dst + done as u64) as usize as *mut u8;
            let out = opcode::WriteFixed::new(wr, from, n as u32, 0)
                .offset(0)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(0);
            let back = opcode::ReadFixed::new(rd, to, n as u32, 1)
                .offset(0)
                .build()
                .user_data(1);
            // SAFETY: both entries name the registered buffers (pinned, mapped for the run) and
            // the pipe we own; we wait for both completions before returning.
            unsafe { ring.submission().push_multiple(&[out, back]) }
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EBUSY))?;
            ring.submit_and_wait(2)?;
            for cqe in ring.completion() {
                if cqe.result() < 0 {
                    return Err(std::io::Error::from_raw_os_error(-cqe.result()));
                }
                if cqe.result() as usize != n {
                    return Err(std::io::Error::other("short transfer"));
                }
            }
            done += n;
        }
        Ok(())
    }
}

/// A device sweeping `len` bytes of memory nobody has touched yet (a fill: every page written),
/// against `madvise(MADV_POPULATE_WRITE)` of as much, on a fresh mapping each time, the
/// medians of `iters`. The device's command raises its misses as one page request group; the
/// mirror resolves one run per fault window (fault in, pin, map), then the device writes.
fn first_touch_sweep(len: usize, iters: usize) -> Result<Figure> {
    let (mut device, mut cpu) = (Vec::new(), Vec::new());
    let (mut steps, mut faults, mut batches, mut runs) = (FaultTimes::default(), 0u64, 0u64, 0u64);
    for _ in 0..iters {
        let notifier = Notifier::new();
        let buf = AnonMap::aligned(len, 2 << 20).map_err(io_err("mmap"))?;
        let m = bench_mirror(&notifier, &buf)?;
        let t = Instant::now();
        m.submit(DmaCommand::Fill {
            dst: buf.addr(),
            len: len as u64,
            value: 1,
        })
        .and_then(|f| f.wait())
        .map_err(bench_err("sweep"))?;
        device.push(t.elapsed());
        let s = m.stats();
        let t = s.fault_times;
        steps.total += t.total;
        steps.lookup += t.lookup;
        steps.range_fault += t.range_fault;
        steps.pin += t.pin;
        steps.map += t.map;
        faults += s.faults;
        batches += s.fault_batches;
        runs += s.batched_runs;
        drop(m);
        drop(buf);
        let fresh = AnonMap::aligned(len, 2 << 20).map_err(io_err("mmap"))?;
        let t = Instant::now();
        fresh
            .advise(libc::MADV_POPULATE_WRITE)
            .map_err(io_err("MADV_POPULATE_WRITE"))?;
        cpu.push(t.elapsed());
    }
    let (d, c) = (median(device.clone()), median(cpu));
    tracing::debug!(
        faults,
        batches,
        "first-touch sweep: faults and page request groups"
    );
    let per = |x: Duration| x.as_secs_f64() / iters as f64;
    let name = format!("first-touch sweep, {} MiB (device fill)", len >> 20);
    let fig = Figure::latency("sim", &name, d, "MADV_POPULATE_WRITE on the CPU", c)
        .with_target("≥ 0.5× populate", c / d >= 0.5)
        .with_part("range_fault (fault in)", per(steps.range_fault))
        .with_part("lookup", per(steps.lookup))
        .with_part("pin", per(steps.pin))
        .with_part("map", per(steps.map))
        .with_part("the writes", (mean(&device) - per(steps.total)).max(0.0))
        .with_count("faults per batch", runs as f64 / batches.max(1) as f64)
        .with_count("faults", faults as f64 / iters as f64);
    Ok(fig)
}
