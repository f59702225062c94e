//! svmirror-mm on the real process: `range_fault` through `ProcessPageSource` against the raw
//! kernel interfaces it is built on, each measured in the same run.
//!
//! `cargo bench --bench mm`. Targets from the svmirror-mm issue:
//!
//! - `mm_snapshot_1g`: a snapshot walk (`fault_all(.., false)`, nothing to fault) over 1 GiB of
//!   populated 4 KiB pages runs at no less than half the rate of a raw pread of
//!   /proc/self/pagemap over the same range, the interface that yields the same information
//!   (per-page write state needs pagemap bit 56). The raw PAGEMAP_SCAN ioctl (presence, zero and
//!   huge categories) is reported beside it for reference. `range_fault` runs twice: with the
//!   page source as this process gets it (frame numbers visible with `CAP_SYS_ADMIN`, which lets
//!   it skip PAGEMAP_SCAN where no huge page can be), and with frame numbers hidden, as an
//!   unprivileged process sees pagemap (then any fully present 2 MiB block, as here, needs the
//!   PAGEMAP_SCAN too).
//! - `mm_fault_in_1g`: `range_fault` with write faults over a fresh, unpopulated 1 GiB mapping
//!   takes at most 1.2× the time of `MADV_POPULATE_WRITE` alone over the same kind of mapping.
//!
//! All mappings are private anonymous with `MADV_NOHUGEPAGE`, so every page is a 4 KiB page.

use std::ffi::c_void;
use std::fs::File;
use std::hint::black_box;
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use svmirror::core::testing::TestMirror;
use svmirror::core::{
    FaultRequest, Notifier, Owner, PAGE_SIZE, Range, Subscription, entry, range_fault,
};
use svmirror::mm::{PageSourceFeatures, ProcessPageSource};

/// Size of every mapping measured.
const LEN: usize = 1 << 30;
/// Pages in it.
const PAGES: u64 = LEN as u64 / PAGE_SIZE;

/// A private anonymous read-write mapping of `LEN` bytes with 4 KiB pages only, unmapped on drop.
struct Mapping {
    addr: *mut c_void,
}

impl Mapping {
    fn new() -> Mapping {
        // SAFETY: a new private anonymous mapping at an address the kernel picks; it aliases
        // nothing, and only `Drop` unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap of 1 GiB failed");
        let m = Mapping { addr };
        m.madvise(libc::MADV_NOHUGEPAGE);
        m
    }

    fn range(&self) -> Range {
        Range::with_len(self.addr as u64, LEN as u64).unwrap()
    }

    /// `madvise(advice)` over the whole mapping, which must succeed.
    fn madvise(&self, advice: std::ffi::c_int) {
        // SAFETY: `addr..addr + LEN` is this mapping; the advice used here (NOHUGEPAGE,
        // POPULATE_WRITE) changes a VMA flag or page-table state only, never which addresses are
        // mapped or what any byte holds, and no Rust reference points into the mapping.
        let rc = unsafe { libc::madvise(self.addr, LEN, advice) };
        assert_eq!(
            rc,
            0,
            "madvise({advice}): {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing refers to any more.
        unsafe { libc::munmap(self.addr, LEN) };
    }
}

/// `struct pm_scan_arg` (include/uapi/linux/fs.h, Linux 6.7).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
const PAGE_IS_HUGE: u64 = 1 << 6;

/// The raw PAGEMAP_SCAN over `range`, reporting every page's presence, zero and huge
/// categories as runs; returns the number of pages reported present.
fn pagemap_scan(pagemap: &File, range: Range, regions: &mut [PageRegion]) -> u64 {
    let mut at = range.start();
    let mut present = 0;
    while at < range.end() {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            start: at,
            end: range.end(),
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_PFNZERO | PAGE_IS_HUGE,
            ..PmScanArg::default()
        };
        // SAFETY: PAGEMAP_SCAN takes one `struct pm_scan_arg`, which `PmScanArg` lays out; `vec`
        // points to `regions`, live and `vec_len` entries long. With `flags` 0 the kernel only
        // reports and changes no page table.
        let n = unsafe {
            libc::ioctl(
                pagemap.as_raw_fd(),
                PAGEMAP_SCAN as std::ffi::c_ulong,
                &mut arg,
            )
        };
        assert!(n >= 0, "PAGEMAP_SCAN: {}", std::io::Error::last_os_error());
        for r in &regions[..n as usize] {
            if r.categories & PAGE_IS_PRESENT != 0 {
                present += (r.end - r.start) / PAGE_SIZE;
            }
        }
        assert!(arg.walk_end > at, "PAGEMAP_SCAN made no progress");
        at = arg.walk_end;
    }
    present
}

/// Reads the pagemap entries of `range` into `buf`, `buf.len()` bytes per `pread`.
fn pagemap_read(pagemap: &File, range: Range, buf: &mut [u8]) {
    let bytes = range.pages() * 8;
    let mut offset = range.start() / PAGE_SIZE * 8;
    let end = offset + bytes;
    while offset < end {
        let want = buf.len().min((end - offset) as usize);
        let n = pagemap.read_at(&mut buf[..want], offset).unwrap();
        assert!(n > 0, "pagemap read stopped at {offset:#x}");
        offset += n as u64;
    }
    black_box(&buf[..]);
}

/// A subscription over `range` in its own notifier, with the test mirror as the ops.
fn subscribe(range: Range) -> (Notifier, Subscription) {
    let notifier = Notifier::new();
    let sub = notifier
        .insert(range, Arc::new(TestMirror::new(Owner(1))))
        .unwrap();
    (notifier, sub)
}

fn snapshot_populated(c: &mut Criterion) {
    let source = ProcessPageSource::new().unwrap();
    let hidden = ProcessPageSource::restricted(PageSourceFeatures {
        pfn_visible: false,
        ..PageSourceFeatures::ALL
    })
    .unwrap();
    eprintln!("page source features: {:?}", source.features());
    let pagemap = File::open("/proc/self/pagemap").unwrap();
    let m = Mapping::new();
    m.madvise(libc::MADV_POPULATE_WRITE);
    let range = m.range();
    let (_notifier, sub) = subscribe(range);
    let mut entries = vec![0u64; PAGES as usize];

    // Check once, outside the timing, that the walk sees what the benchmark claims.
    for source in [&source, &hidden] {
        let seq = sub.read_begin().unwrap();
        let stats = range_fault(
            &sub,
            seq,
            source,
            &mut FaultRequest::fault_all(range, &mut entries, false),
        )
        .unwrap();
        assert_eq!(stats.faults, 0, "nothing needs faulting");
        assert!(
            entries
                .iter()
                .all(|&e| entry::is_writable(e) && entry::order(e) == 0)
        );
    }
    let mut regions = vec![PageRegion::default(); 512];
    assert_eq!(pagemap_scan(&pagemap, range, &mut regions), PAGES);

    let mut g = c.benchmark_group("mm_snapshot_1g");
    g.throughput(Throughput::Elements(PAGES))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, source) in [
        ("range_fault", &source),
        ("range_fault_pfn_hidden", &hidden),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let seq = sub.read_begin().unwrap();
                let mut req = FaultRequest::fault_all(range, &mut entries, false);
                black_box(range_fault(&sub, seq, source, &mut req).unwrap())
            })
        });
    }
    g.bench_function("raw_pagemap_scan", |b| {
        b.iter(|| black_box(pagemap_scan(&pagemap, black_box(range), &mut regions)))
    });
    // The whole range's entries (2 MiB) in one pread, and in reads of one page of entries (512
    // pages' worth, 4 KiB), the buffer a reader without a big allocation would use.
    let mut buf = vec![0u8; (PAGES * 8) as usize];
    g.bench_function("raw_pagemap_pread_2m", |b| {
        b.iter(|| pagemap_read(&pagemap, black_box(range), &mut buf))
    });
    g.bench_function("raw_pagemap_pread_4k", |b| {
        b.iter(|| pagemap_read(&pagemap, black_box(range), &mut buf[..4096]))
    });
    g.finish();
}

fn fault_in_unpopulated(c: &mut Criterion) {
    let source = ProcessPageSource::new().unwrap();
    let mut entries = vec![0u64; PAGES as usize];
    let mut g = c.benchmark_group("mm_fault_in_1g");
    // Each iteration zero-fills 1 GiB: a handful of iterations, one per sample.
    g.throughput(Throughput::Elements(PAGES))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("range_fault", |b| {
        b.iter_batched(
            || {
                let m = Mapping::new();
                let (notifier, sub) = subscribe(m.range());
                (m, notifier, sub)
            },
            |(m, notifier, sub)| {
                let seq = sub.read_begin().unwrap();
                let mut req = FaultRequest::fault_all(m.range(), &mut entries, true);
                let stats = range_fault(&sub, seq, &source, &mut req).unwrap();
                assert_eq!(stats.faults, 1, "one fault for the whole range");
                // Returned, so that the unmap happens outside the timing.
                (m, notifier, sub)
            },
            BatchSize::PerIteration,
        );
        assert!(entries.iter().all(|&e| entry::is_writable(e)));
    });
    g.bench_function("raw_madv_populate_write", |b| {
        b.iter_batched(
            Mapping::new,
            |m| {
                m.madvise(libc::MADV_POPULATE_WRITE);
                m
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// 2 MiB of private anonymous memory, populated, outside any notifier.
/// A fresh private anonymous mapping of `len` bytes, every page written.
fn populated(len: usize) -> Range {
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: populating our own fresh mapping.
    let rc = unsafe { libc::madvise(p, len, libc::MADV_POPULATE_WRITE) };
    assert_eq!(rc, 0);
    Range::with_len(p as u64, len as u64).unwrap()
}

fn unmap(r: Range) {
    // SAFETY: the range is a mapping this benchmark made and nothing refers into it.
    let rc = unsafe { libc::munmap(r.start() as *mut c_void, r.len() as usize) };
    assert_eq!(rc, 0);
}

/// munmap of a 2 MiB mirrored range: plain (no monitor), with the userfaultfd monitor seeing
/// it (the syscall waits until the monitor reads the UNMAP event), and through the SVM API
/// (invalidation bracketed around the syscall).
fn munmap_2m(c: &mut Criterion) {
    munmap_sized(c, "mm_munmap_2m", 2 << 20, Owner(2));
}

/// The same at 4 KiB, where the fixed cost (the monitor's read, the caller's wake-up) is all
/// there is to see.
fn munmap_4k(c: &mut Criterion) {
    munmap_sized(c, "mm_munmap_4k", 4096, Owner(4));
}

fn munmap_sized(c: &mut Criterion, group: &str, len: usize, owner: Owner) {
    let mut g = c.benchmark_group(group);
    g.sample_size(50).measurement_time(Duration::from_secs(3));
    g.bench_function("without_monitor", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let r = populated(len);
                let t = std::time::Instant::now();
                unmap(r);
                total += t.elapsed();
            }
            total
        })
    });
    let mm = svmirror::mm::ProcessMm::new().unwrap();
    let mirror = Arc::new(TestMirror::new(owner));
    g.bench_function("with_monitor", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let r = populated(len);
                let sub = mm.notifier().insert(r, mirror.clone()).unwrap();
                mirror.fault(&sub, &mm, r, true).unwrap();
                let t = std::time::Instant::now();
                unmap(r);
                total += t.elapsed();
                drop(sub);
            }
            total
        })
    });
    g.bench_function("svm_api", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let r = populated(len);
                let sub = mm.notifier().insert(r, mirror.clone()).unwrap();
                mirror.fault(&sub, &mm, r, true).unwrap();
                let t = std::time::Instant::now();
                // SAFETY: nothing refers into the range.
                unsafe { mm.munmap(r).unwrap() };
                total += t.elapsed();
                drop(sub);
            }
            total
        })
    });
    g.finish();
}

/// madvise(MADV_DONTNEED) of a 2 MiB mirrored range, refilled before each sample: plain with
/// no monitor, plain with the monitor seeing it (the syscall waits until the REMOVE is read),
/// and through the SVM API (invalidation bracketed around the syscall, the one way a DONTNEED
/// is exact for every device), in the same run. The README's coherence table quotes these.
fn madvise_2m(c: &mut Criterion) {
    madvise_sized(c, "mm_madvise_dontneed_2m", 2 << 20, Owner(3));
}

/// The same at 4 KiB.
fn madvise_4k(c: &mut Criterion) {
    madvise_sized(c, "mm_madvise_dontneed_4k", 4096, Owner(5));
}

fn madvise_sized(c: &mut Criterion, group: &str, len: usize, owner: Owner) {
    let mut g = c.benchmark_group(group);
    g.sample_size(50).measurement_time(Duration::from_secs(3));
    let refill = |r: Range| {
        // SAFETY: populating our own mapping.
        let rc = unsafe {
            libc::madvise(
                r.start() as *mut c_void,
                r.len() as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        assert_eq!(rc, 0);
    };
    let plain = |r: Range| {
        // SAFETY: the range is a mapping this benchmark made and nothing refers into it.
        let rc = unsafe {
            libc::madvise(
                r.start() as *mut c_void,
                r.len() as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
    };
    let r = populated(len);
    g.bench_function("without_monitor", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                refill(r);
                let t = std::time::Instant::now();
                plain(r);
                total += t.elapsed();
            }
            total
        })
    });
    unmap(r);
    let mm = svmirror::mm::ProcessMm::new().unwrap();
    let mirror = Arc::new(TestMirror::new(owner));
    let r = populated(len);
    let sub = mm.notifier().insert(r, mirror.clone()).unwrap();
    for (name, api) in [("with_monitor", false), ("svm_api", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    refill(r);
                    mirror.fault(&sub, &mm, r, true).unwrap();
                    let t = std::time::Instant::now();
                    if api {
                        // SAFETY: nothing refers into the range.
                        unsafe { mm.madvise(r, svmirror::mm::Advice::DontNeed).unwrap() };
                    } else {
                        plain(r);
                    }
                    total += t.elapsed();
                }
                total
            })
        });
    }
    drop(sub);
    unmap(r);
    g.finish();
}

criterion_group!(
    benches,
    snapshot_populated,
    fault_in_unpopulated,
    munmap_2m,
    madvise_2m,
    munmap_4k,
    madvise_4k
);
criterion_main!(benches);
