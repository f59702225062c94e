//! svmirror-iommu: the simulated IOMMU's fault path, DMA copies and dmirror migration (the test
//! device of svmirror-dmirror), each measured against its baseline in the same run.
//!
//! `cargo bench --bench iommu`. Targets from the svmirror-iommu issue:
//!
//! - `iommu_fault_replay_{4k,2m}`: a device read of a few bytes that misses (page request
//!   resolved, mapped, access replayed) completes in at most 10 µs for a 4 KiB page and 100 µs
//!   for a 2 MiB THP. Every iteration faults: the range is invalidated through the notifier
//!   (`Event::Clear`, which drops the mapping and its pin) before it, outside the timed part.
//!   Baseline `warm`: the same read with the translation already in place. `resolve_only`
//!   times what the driver does for the page request (`IommuMirror::fault`) on the bench
//!   thread, without the submit / device-thread / fence hand-offs. `fault_parked`: `fault`
//!   with `DmaConfig::spin` zero, so every hand-off parks and wakes a thread.
//! - `iommu_dma_copy/{dma,memcpy}/{1m,16m}`: a device copy between two mirrored, pre-faulted
//!   buffers (2 MiB leaves) with the IOTLB warm runs at no less than half the rate of
//!   `ptr::copy_nonoverlapping` of the same size. `dma` copies through the pin pool's pipe
//!   (inline), `dma_memfd` (diagnostic) through its staging memfd (on io_uring's workers): two
//!   kernel copies either way.
//! - `dmirror_migrate/*/{512k,2m,16m,256m}`: dmirror MIGRATE_TO_DEV then MIGRATE_TO_SYS of a
//!   2 MiB-aligned buffer of 4 KiB pages (`MADV_NOHUGEPAGE`), against one
//!   `ptr::copy_nonoverlapping` of the same size; `thp_{2m,16m}`: the same with
//!   `MADV_HUGEPAGE`. The round trip moves every byte at least twice (plus the device's READ
//!   that MIGRATE_TO_DEV does).
//!
//! Every device command hands off between threads (submit → device thread → fence waiter), so
//! `fault` and `warm` depend on how fast an idle CPU wakes: on a small VM whose other vCPUs are
//! halted, each hand-off can cost tens of µs; `resolve_only` does not. The device thread and the
//! fence waiter spin for `DmaConfig::spin` (50 µs, yielding) before they park, which takes most hand-offs
//! off that path.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use svmirror::core::{Event, Notifier, NotifierRange, PAGE_SIZE, Range};
use svmirror::mm::{Advice, ProcessMm, ProcessPageSource, Protection};
use svmirror_dmirror::Dmirror;
use svmirror_iommu::{DmaCommand, DmaConfig, IommuMirror, MirrorConfig, PinPoolConfig};
use svmirror_mm::testing::AnonMap;

const HUGE: usize = 2 << 20;

/// A mirror of `range` subscribed to `notifier`, which the benchmark feeds by hand, reading
/// this process's page table raw (no userfaultfd monitor in the way).
///
/// # Safety
///
/// As for [`IommuMirror::new`].
unsafe fn raw_mirror(notifier: &Notifier, range: Range, config: MirrorConfig) -> IommuMirror {
    let source = Box::new(ProcessPageSource::new().unwrap());
    // SAFETY: this function's contract, passed on.
    unsafe { IommuMirror::with_page_source(notifier, range, config, source) }.unwrap()
}

/// Notifier, mirror and buffer of one fault benchmark.
struct FaultSetup {
    notifier: Notifier,
    buf: AnonMap,
    mirror: IommuMirror,
}

impl FaultSetup {
    /// A populated buffer of `len` bytes (2 MiB-aligned THP if `huge`), mirrored with `config`.
    fn new(len: usize, huge: bool, config: MirrorConfig) -> FaultSetup {
        let notifier = Notifier::new();
        let buf = AnonMap::aligned(len, HUGE).unwrap();
        buf.advise(if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        })
        .expect("madvise");
        buf.fill(0x5a);
        let range = Range::with_len(buf.addr(), len as u64).unwrap();
        // SAFETY: the device only reads `buf`, which the CPU touches through raw pointers only.
        let mirror = unsafe { raw_mirror(&notifier, range, config) };
        FaultSetup {
            notifier,
            buf,
            mirror,
        }
    }

    fn range(&self) -> Range {
        self.mirror.range()
    }

    /// Drops the device's mapping (and pin) of the whole buffer, as a CPU-side change would.
    fn invalidate(&self) {
        self.notifier
            .invalidate_range_start(NotifierRange::new(self.range(), Event::Clear))
            .unwrap()
            .end();
    }

    /// The timed device access: an 8-byte read in the middle of the buffer.
    fn read(&self) -> u32 {
        let src = self.buf.addr() + (self.buf.len() as u64 / 2);
        let done = self
            .mirror
            .submit(DmaCommand::Read { src, len: 8 })
            .unwrap()
            .wait()
            .unwrap();
        black_box(&done.data);
        done.page_requests
    }

    /// `iters` faults, each after an untimed invalidation: the time from the device's access to
    /// its replay completing.
    fn time_faults(&self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            self.invalidate();
            let t = Instant::now();
            let requests = self.read();
            total += t.elapsed();
            assert_eq!(requests, 1, "every iteration faults");
        }
        total
    }
}

fn fault_replay(c: &mut Criterion) {
    for (name, len, huge) in [
        ("iommu_fault_replay_4k", PAGE_SIZE as usize, false),
        ("iommu_fault_replay_2m", HUGE, true),
    ] {
        let s = FaultSetup::new(len, huge, MirrorConfig::default());
        // Diagnostic: the same with the device thread and the fence waiter parking at once
        // (`DmaConfig::spin` zero), the wake-up cost of every hand-off included.
        let parked = FaultSetup::new(
            len,
            huge,
            MirrorConfig {
                dma: DmaConfig {
                    spin: Duration::ZERO,
                    ..DmaConfig::default()
                },
                ..MirrorConfig::default()
            },
        );
        assert_eq!(parked.read(), 1);
        assert_eq!(s.read(), 1, "the first read faults");
        let leaf = s.mirror.mmu().translate(s.buf.addr()).unwrap().size;
        eprintln!("{name}: device leaf {leaf:?}");
        let mut g = c.benchmark_group(name);
        g.sample_size(30)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        g.bench_function("fault", |b| b.iter_custom(|iters| s.time_faults(iters)));
        g.bench_function("fault_parked", |b| {
            b.iter_custom(|iters| parked.time_faults(iters))
        });
        // Diagnostic: the driver's side of the fault alone (`IommuMirror::fault`, the resolver a
        // page request runs: snapshot, pin, map), on this thread, without the device round trip.
        g.bench_function("resolve_only", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    s.invalidate();
                    let t = Instant::now();
                    s.mirror
                        .fault(s.buf.addr(), s.buf.len() as u64, false)
                        .unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
        s.read();
        g.bench_function("warm", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    assert_eq!(s.read(), 0, "no fault when warm");
                }
                t.elapsed()
            })
        });
        g.finish();
    }
}

fn dma_copy(c: &mut Criterion) {
    let max = 16 << 20;
    let notifier = Notifier::new();
    let buf = AnonMap::aligned(2 * max, HUGE).unwrap();
    buf.advise(libc::MADV_HUGEPAGE).expect("madvise");
    buf.fill(0x33);
    let range = Range::with_len(buf.addr(), 2 * max as u64).unwrap();
    // SAFETY: the device writes the second half of `buf`, which the CPU touches through raw
    // pointers only, never while a command runs.
    let mirror = unsafe { raw_mirror(&notifier, range, MirrorConfig::default()) };
    mirror.fault(range.start(), range.len(), true).unwrap();
    // Diagnostic: the same device copying through the staging memfd instead of a pipe (each
    // transfer handed to an io_uring worker).
    let memfd_config = MirrorConfig {
        pins: PinPoolConfig {
            transfer: svmirror_iommu::Transfer::Memfd,
            ..PinPoolConfig::default()
        },
        ..MirrorConfig::default()
    };
    // SAFETY: as for `mirror`.
    let memfd = unsafe { raw_mirror(&notifier, range, memfd_config) };
    memfd.fault(range.start(), range.len(), true).unwrap();
    let leaf = mirror.mmu().translate(buf.addr()).unwrap().size;
    eprintln!("iommu_dma_copy: device leaf {leaf:?}");
    let src = buf.addr();
    let dst = buf.addr() + max as u64;
    let mut g = c.benchmark_group("iommu_dma_copy");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (label, len) in [("1m", 1usize << 20), ("16m", 16 << 20)] {
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("dma", label), |b| {
            b.iter(|| {
                let done = mirror
                    .submit(DmaCommand::Copy {
                        src,
                        dst,
                        len: len as u64,
                    })
                    .unwrap()
                    .wait()
                    .unwrap();
                assert_eq!(done.page_requests, 0, "IOTLB warm, nothing faults");
            })
        });
        g.bench_function(BenchmarkId::new("dma_memfd", label), |b| {
            b.iter(|| {
                let done = memfd
                    .submit(DmaCommand::Copy {
                        src,
                        dst,
                        len: len as u64,
                    })
                    .unwrap()
                    .wait()
                    .unwrap();
                assert_eq!(done.page_requests, 0, "IOTLB warm, nothing faults");
            })
        });
        g.bench_function(BenchmarkId::new("memcpy", label), |b| {
            b.iter(|| {
                // SAFETY: both halves of `buf` are mapped, `len` ≤ half its length, they do not
                // overlap, and no device command runs while the CPU copies.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        black_box(src) as *const u8,
                        black_box(dst) as *mut u8,
                        len,
                    )
                }
            })
        });
    }
    g.finish();
    drop(memfd);
    drop(mirror);
}

/// A private anonymous read-write buffer of `len` bytes made through the SVM API, 2 MiB-aligned,
/// with `MADV_HUGEPAGE` if `huge` and `MADV_NOHUGEPAGE` otherwise.
fn aligned_buffer(mm: &ProcessMm, len: u64, huge: bool) -> Range {
    let h = HUGE as u64;
    let whole = mm.mmap_anonymous(len + h, Protection::READ_WRITE).unwrap();
    let start = whole.start().next_multiple_of(h);
    let buf = Range::with_len(start, len).unwrap();
    // An empty end is an `Err` (`EmptyRange`) and skipped.
    for r in [
        Range::new(whole.start(), start),
        Range::new(buf.end(), whole.end()),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: the trimmed ends of a mapping made just above, which nothing refers into.
        unsafe { mm.munmap(r) }.unwrap();
    }
    let advice = if huge {
        Advice::HugePage
    } else {
        Advice::NoHugePage
    };
    // SAFETY: advice only; no contents change.
    unsafe { mm.madvise(buf, advice) }.unwrap();
    buf
}

fn migrate(c: &mut Criterion) {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    // SAFETY: the migrated buffers are touched by the CPU through raw pointers only.
    let dev = unsafe { Dmirror::open(mm.clone()) }.unwrap();
    let mut g = c.benchmark_group("dmirror_migrate");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (label, len, huge) in [
        ("512k", 512u64 << 10, false),
        ("2m", 2 << 20, false),
        ("16m", 16 << 20, false),
        ("256m", 256 << 20, false),
        ("thp_2m", 2 << 20, true),
        ("thp_16m", 16 << 20, true),
    ] {
        let buf = aligned_buffer(&mm, len, huge);
        let p = buf.start() as *mut u8;
        // SAFETY: `buf` is a fresh read-write mapping of `len` bytes that nothing else uses.
        unsafe { std::ptr::write_bytes(p, 0x77, len as usize) };
        let npages = len / PAGE_SIZE;
        let mut host = vec![0u8; len as usize];
        g.throughput(Throughput::Bytes(len));
        g.bench_function(BenchmarkId::new("to_dev_and_back", label), |b| {
            b.iter(|| {
                let to = dev.migrate_to_dev(buf.start(), npages, &mut host).unwrap();
                assert_eq!(to.cpages, npages);
                let back = dev.migrate_to_sys(buf.start(), npages).unwrap();
                assert_eq!(back.cpages, npages);
            })
        });
        g.bench_function(BenchmarkId::new("memcpy", label), |b| {
            b.iter(|| {
                // SAFETY: `buf` is mapped, in RAM and `len` bytes long, `host` is a distinct
                // `len`-byte vector, and no device command runs while the CPU copies.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        black_box(p) as *const u8,
                        black_box(host.as_mut_ptr()),
                        len as usize,
                    )
                }
            })
        });
        // SAFETY: the buffer holds no Rust objects and nothing refers into it any more.
        unsafe { mm.munmap(buf) }.unwrap();
    }
    g.finish();
    drop(dev);
}

criterion_group!(benches, fault_replay, dma_copy, migrate);
criterion_main!(benches);
