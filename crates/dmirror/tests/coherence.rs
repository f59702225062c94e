//! A randomized coherence test: a long, seeded random sequence of CPU operations (writes,
//! munmap, mmap at the same address, madvise, mremap, mprotect through the SVM API, fork)
//! interleaved with device READs and WRITEs through the dmirror test device, each step checked
//! against a model of the region and against the CPU's own view.
//!
//! The seed is printed; set `SVMIRROR_COHERENCE_SEED` to replay a run.
//!
//! Deviations from a kernel device, as in `hmm_selftests.rs`: this backend pins for writing, so
//! a device READ of a read-only page it has to fault in fails (EOPNOTSUPP); one whose translation
//! the IOMMU kept (downgraded by the mprotect) reads fine. mremap is exercised only shrinking in
//! place (growing or moving does not fit the fixed-address model). fork sends no event (svmirror
//! does not use EVENT_FORK); the test checks that the parent's view, CPU and device, is unchanged.
//!
//! Plain syscalls (not through the SVM API) are seen through userfaultfd, and README's coherence
//! table makes them coherent only once the monitor thread has read *and handled* their event:
//! the syscall returns as soon as the event is read, and the monitor invalidates the devices
//! right after. A device command issued in that window may still use the old page (seen with
//! this test when the wait below is left out: a device WRITE right after a plain
//! `madvise(DONTNEED)` went to the zapped page and was lost to the CPU, and a device READ right
//! after a plain munmap succeeded). So after a plain munmap/madvise the test waits until
//! `ProcessMm::stats()` counts the event and the monitor has handled it (`Harness::settle`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use svmirror_core::{PAGE_SIZE, Range};
use svmirror_dmirror::Dmirror;
use svmirror_mm::{
    Advice, MmStats, ProcessMm, Protection, VM_PIN_SETTLE, settled_vm_pinned_bytes, vm_pinned_bytes,
};
use svmirror_testsupport::{Rng, poll_until, serial};

const PAGE: u64 = PAGE_SIZE;
/// Pages in the test region.
const NPAGES: usize = 32;
/// Out of the way, so that nothing else lands in the holes the test punches.
const BASE: u64 = 0x1300_0000_0000;
/// Longest run an operation covers.
const MAX_RUN: usize = 8;
const STEPS: u32 = 2000;
const DEFAULT_SEED: u64 = 0x5eed_c0de_2026_1121;

/// A random run `[start, start + len)` of the region.
fn random_run(rng: &mut Rng) -> (usize, usize) {
    let start = rng.below(NPAGES);
    let len = 1 + rng.below(MAX_RUN.min(NPAGES - start));
    (start, len)
}

/// What a page of the region should be.
#[derive(Clone)]
struct Page {
    data: Vec<u8>,
    writable: bool,
}

fn addr_of(i: usize) -> u64 {
    BASE + i as u64 * PAGE
}

fn range_of(start: usize, len: usize) -> Range {
    Range::with_len(addr_of(start), len as u64 * PAGE).unwrap()
}

fn pattern(rng: &mut Rng) -> Vec<u8> {
    let seed = rng.next_u64();
    (0..PAGE)
        .map(|i| (seed.rotate_left((i % 64) as u32) as u8) ^ (i as u8))
        .collect()
}

/// Reads page `i` as the CPU sees it. The page must be mapped and readable.
fn cpu_read(i: usize) -> Vec<u8> {
    let mut out = vec![0u8; PAGE as usize];
    let src = addr_of(i) as *const u8;
    // SAFETY: page `i` is mapped readable (the caller checks the model); the region is touched
    // by Rust code through raw pointers only, and no device WRITE runs concurrently.
    unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
    out
}

/// Writes `data` to page `i` from the CPU. The page must be mapped writable.
fn cpu_write(i: usize, data: &[u8]) {
    let dst = addr_of(i) as *mut u8;
    // SAFETY: page `i` is mapped writable; as for `cpu_read`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
}

/// Maps page `i` fresh with plain mmap, failing if anything is there.
fn plain_mmap(i: usize) {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr_of(i) as *mut libc::c_void,
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, addr_of(i), "mmap at page {i}: {}", errno_str());
}

fn errno_str() -> std::io::Error {
    std::io::Error::last_os_error()
}

struct Harness {
    mm: Arc<ProcessMm>,
    dev: Dmirror,
    model: Vec<Option<Page>>,
    /// A page outside the region, for `settle`'s barrier.
    scratch: Range,
    rng: Rng,
    step: u32,
    /// Device READs and WRITEs that succeeded, and that failed as expected.
    dev_ok: u32,
    dev_failed: u32,
    /// What each step did, for failure messages.
    log: Vec<String>,
}

impl Harness {
    fn stats(&self) -> MmStats {
        self.mm.stats()
    }

    /// Waits until the monitor has read the event `want(stats)` looks for, and has finished
    /// handling it: a plain munmap/madvise is coherent only from then on (see the module
    /// documentation). The event counters are bumped *before* the invalidation, so after they
    /// move, an SVM API madvise of a scratch page serves as the barrier: it returns only once
    /// the monitor has handled every event it has read.
    fn settle(&self, want: impl Fn(&MmStats) -> bool) {
        let seen = poll_until(Duration::from_secs(10), Duration::from_micros(50), || {
            want(&self.stats())
        });
        assert!(
            seen,
            "step {}: userfaultfd event not seen: {:?}",
            self.step,
            self.stats()
        );
        // SAFETY: the scratch page holds nothing and nothing refers into it.
        unsafe { self.mm.madvise(self.scratch, Advice::DontNeed) }.unwrap();
    }

    fn mapped(&self, start: usize, len: usize) -> bool {
        self.model[start..start + len].iter().all(Option::is_some)
    }

    fn writable(&self, start: usize, len: usize) -> bool {
        self.model[start..start + len]
            .iter()
            .all(|p| p.as_ref().is_some_and(|p| p.writable))
    }

    /// Every mapped page reads as the model says.
    fn check_cpu(&self, what: &str) {
        for (i, p) in self.model.iter().enumerate() {
            if let Some(p) = p {
                assert!(
                    cpu_read(i) == p.data,
                    "step {} ({what}): CPU view of page {i} differs from the model; log {:?}",
                    self.step,
                    self.recent_log()
                );
            }
        }
    }

    fn op_cpu_write(&mut self) {
        let i = self.rng.below(NPAGES);
        if !self.model[i].as_ref().is_some_and(|p| p.writable) {
            return;
        }
        let data = pattern(&mut self.rng);
        cpu_write(i, &data);
        self.model[i].as_mut().unwrap().data = data;
    }

    fn op_plain_munmap(&mut self) {
        let (start, len) = random_run(&mut self.rng);
        let any_mapped = self.model[start..start + len].iter().any(Option::is_some);
        let before = self.stats().unmap_events;
        // SAFETY: nothing in Rust refers into the region.
        let rc = unsafe { libc::munmap(addr_of(start) as *mut libc::c_void, len * PAGE as usize) };
        assert_eq!(rc, 0, "munmap: {}", errno_str());
        self.model[start..start + len].fill(None);
        self.log.push(format!("plain munmap {start}+{len}"));
        if any_mapped {
            // Every mapped page is registered, so the munmap sends one UNMAP event.
            self.settle(|s| s.unmap_events > before);
        }
    }

    fn op_api_munmap(&mut self) {
        let (start, len) = random_run(&mut self.rng);
        if !self.mapped(start, len) {
            return;
        }
        // SAFETY: nothing in Rust refers into the region.
        unsafe { self.mm.munmap(range_of(start, len)) }.unwrap();
        self.model[start..start + len].fill(None);
        self.log.push(format!("api munmap {start}+{len}"));
    }

    fn op_mmap(&mut self) {
        let i = self.rng.below(NPAGES);
        if self.model[i].is_some() {
            return;
        }
        plain_mmap(i);
        // Registered right away, so that a later plain munmap/madvise is seen.
        self.mm.register(range_of(i, 1)).unwrap();
        self.model[i] = Some(Page {
            data: vec![0; PAGE as usize],
            writable: true,
        });
    }

    fn op_madvise(&mut self, api: bool) {
        if api {
            let (start, len) = random_run(&mut self.rng);
            if !self.mapped(start, len) {
                return;
            }
            // SAFETY: the contents may go; nothing in Rust refers into the region.
            unsafe { self.mm.madvise(range_of(start, len), Advice::DontNeed) }.unwrap();
            for p in self.model[start..start + len].iter_mut().flatten() {
                p.data.fill(0);
            }
        } else {
            // One page: one mapping, so exactly one REMOVE event.
            let i = self.rng.below(NPAGES);
            let Some(p) = self.model[i].as_mut() else {
                return;
            };
            let before = self.mm.stats().remove_events;
            // SAFETY: the page's contents may go; nothing in Rust refers into the region.
            let rc = unsafe {
                libc::madvise(
                    addr_of(i) as *mut libc::c_void,
                    PAGE as usize,
                    libc::MADV_DONTNEED,
                )
            };
            assert_eq!(rc, 0, "madvise: {}", errno_str());
            p.data.fill(0);
            self.settle(|s| s.remove_events > before);
        }
    }

    fn op_mprotect(&mut self) {
        let (start, len) = random_run(&mut self.rng);
        if !self.mapped(start, len) {
            return;
        }
        // Back to read-write twice as often as to read-only.
        let writable = self.rng.below(3) != 0;
        let prot = if writable {
            Protection::READ_WRITE
        } else {
            Protection::READ
        };
        self.mm.mprotect(range_of(start, len), prot).unwrap();
        self.log
            .push(format!("mprotect {start}+{len} writable {writable}"));
        for p in self.model[start..start + len].iter_mut().flatten() {
            p.writable = writable;
        }
    }

    /// mremap through the API, shrinking a run in place: its tail is unmapped (the kernel
    /// unmaps the tail even where the run spans several mappings). Growing or moving is left
    /// out: it does not fit the fixed-address model.
    fn op_mremap(&mut self) {
        let (start, len) = random_run(&mut self.rng);
        if len < 2 || !self.mapped(start, len) {
            return;
        }
        let keep = 1 + self.rng.below(len - 1);
        // SAFETY: nothing in Rust refers into the region.
        let r = unsafe {
            self.mm
                .mremap(range_of(start, len), keep as u64 * PAGE, false)
        }
        .unwrap_or_else(|e| panic!("step {}: mremap: {e}", self.step));
        assert_eq!(r, range_of(start, keep), "step {}: mremap moved", self.step);
        self.model[start + keep..start + len].fill(None);
        self.log.push(format!("mremap {start}+{len} to {keep}"));
    }

    fn op_fork(&mut self) {
        // SAFETY: the child only calls `_exit`, which is async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child: leave at once, running nothing of the parent's.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork: {}", errno_str());
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid, "waitpid: {}", errno_str());
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        self.check_cpu("after fork");
    }

    /// A device READ must succeed, with the model's data, where every page is mapped read-write;
    /// fail where a page is unmapped (EFAULT); and where every page is mapped but some are
    /// read-only, either succeed with the model's data (the IOMMU still holds the page's
    /// translation, downgraded to read-only by the mprotect) or fail with EOPNOTSUPP (this
    /// backend cannot pin read-only memory to fault it in).
    fn op_dev_read(&mut self) {
        let (start, len) = random_run(&mut self.rng);
        let mut buf = vec![0x5au8; len * PAGE as usize];
        self.log.push(format!("dev read {start}+{len}"));
        let res = self.dev.read(addr_of(start), len as u64, &mut buf);
        let mapped = self.mapped(start, len);
        let check_data = |h: &Self, buf: &[u8]| {
            for (k, chunk) in buf.chunks(PAGE as usize).enumerate() {
                let want = &h.model[start + k].as_ref().unwrap().data;
                assert!(
                    chunk == &want[..],
                    "step {}: device read of page {} differs from the model; log {:?}",
                    h.step,
                    start + k,
                    h.recent_log()
                );
            }
        };
        match res {
            Ok(cmd) if mapped => {
                assert_eq!(cmd.cpages, len as u64);
                check_data(self, &buf);
                self.dev_ok += 1;
            }
            Ok(cmd) => panic!(
                "step {}: device read of pages {start}..{} ({:?}) succeeded: {cmd:?}; log {:?}",
                self.step,
                start + len,
                self.states(start, len),
                self.recent_log()
            ),
            Err(e) => {
                let errno = e.errno();
                if self.writable(start, len) {
                    panic!(
                        "step {}: device read: {e}; log {:?}",
                        self.step,
                        self.recent_log()
                    );
                } else if mapped {
                    assert_eq!(errno, libc::EOPNOTSUPP, "step {}: {e}", self.step);
                } else {
                    assert!(
                        errno == libc::EFAULT || errno == libc::EOPNOTSUPP,
                        "step {}: {e}",
                        self.step
                    );
                }
                assert!(buf.iter().all(|&b| b == 0x5a), "buffer changed on error");
                self.dev_failed += 1;
            }
        }
    }

    fn states(&self, start: usize, len: usize) -> Vec<&'static str> {
        self.model[start..start + len]
            .iter()
            .map(|p| match p {
                None => "unmapped",
                Some(p) if p.writable => "rw",
                Some(_) => "ro",
            })
            .collect()
    }

    fn recent_log(&self) -> &[String] {
        &self.log[self.log.len().saturating_sub(16)..]
    }

    fn op_dev_write(&mut self) {
        let (start, len) = random_run(&mut self.rng);
        if !self.mapped(start, len) {
            return;
        }
        let data: Vec<u8> = (0..len).flat_map(|_| pattern(&mut self.rng)).collect();
        let res = self.dev.write(addr_of(start), len as u64, &data);
        self.log.push(format!(
            "dev write {start}+{len}: {:?}",
            res.as_ref().map_err(|e| e.errno())
        ));
        let page_data = |k: usize| &data[k * PAGE as usize..(k + 1) * PAGE as usize];
        if self.writable(start, len) {
            res.unwrap_or_else(|e| panic!("step {}: device write: {e}", self.step));
            self.dev_ok += 1;
            for k in 0..len {
                self.model[start + k].as_mut().unwrap().data = page_data(k).to_vec();
            }
        } else {
            let e = res.expect_err("device write to a read-only page succeeded");
            assert_eq!(e.errno(), libc::EPERM, "step {}: {e}", self.step);
            // Pages before the first read-only one may have been written (the device copies in
            // order); from the first read-only one on, nothing was.
            let first_ro = (0..len)
                .find(|&k| !self.model[start + k].as_ref().unwrap().writable)
                .unwrap();
            for k in 0..first_ro {
                let now = cpu_read(start + k);
                let p = self.model[start + k].as_mut().unwrap();
                assert!(
                    now == p.data || now == page_data(k),
                    "step {}: page {} neither old nor new after a failed write",
                    self.step,
                    start + k
                );
                p.data = now;
            }
            self.dev_failed += 1;
        }
    }
}

#[test]
fn coherence_random_ops() {
    let _s = serial();
    let seed = std::env::var("SVMIRROR_COHERENCE_SEED")
        .ok()
        .map(|s| {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse(), |h| u64::from_str_radix(h, 16))
                .expect("SVMIRROR_COHERENCE_SEED: a decimal or 0x-hex u64")
        })
        .unwrap_or(DEFAULT_SEED);
    println!("coherence_random_ops: seed {seed:#x} (SVMIRROR_COHERENCE_SEED to replay)");

    let pinned = vm_pinned_bytes().unwrap();
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    // SAFETY: the region is touched by the CPU through raw pointers only, and never while a
    // device command runs (one thread does both).
    let dev = unsafe { Dmirror::open(mm.clone()) }.unwrap();

    // The region: 32 pages at a fixed address, registered for events up front.
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            BASE as *mut libc::c_void,
            NPAGES * PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, BASE, "mmap of the region: {}", errno_str());
    let region = range_of(0, NPAGES);
    // SAFETY: advice only; no contents change.
    unsafe { mm.madvise(region, Advice::NoHugePage) }.unwrap();
    mm.register(region).unwrap();
    let scratch = mm.mmap_anonymous(PAGE, Protection::READ_WRITE).unwrap();

    let mut h = Harness {
        mm,
        dev,
        model: vec![
            Some(Page {
                data: vec![0; PAGE as usize],
                writable: true,
            });
            NPAGES
        ],
        scratch,
        rng: Rng::new(seed),
        step: 0,
        dev_ok: 0,
        dev_failed: 0,
        log: Vec::new(),
    };

    let started = Instant::now();
    // Weights: device commands and CPU writes most often; page-dropping operations rarely
    // enough that most runs stay mapped read-write (else most device commands just fail).
    const WEIGHTS: [u32; 11] = [4, 1, 1, 3, 1, 1, 2, 1, 1, 5, 5];
    let total: u32 = WEIGHTS.iter().sum();
    let mut counts = [0u32; 11];
    for step in 0..STEPS {
        h.step = step;
        let mut pick = h.rng.below(total as usize) as u32;
        let op = WEIGHTS
            .iter()
            .position(|&w| {
                let hit = pick < w;
                pick = pick.saturating_sub(w);
                hit
            })
            .unwrap();
        counts[op] += 1;
        h.log.push(format!("{step}: op {op}"));
        match op {
            0 => h.op_cpu_write(),
            1 => h.op_plain_munmap(),
            2 => h.op_api_munmap(),
            3 => h.op_mmap(),
            4 => h.op_madvise(false),
            5 => h.op_madvise(true),
            6 => h.op_mprotect(),
            7 => h.op_mremap(),
            8 => h.op_fork(),
            9 => h.op_dev_read(),
            _ => h.op_dev_write(),
        }
        h.check_cpu("after the step");
        // Keep the region from emptying out: try to refill a hole at every step.
        h.op_mmap();
    }
    println!(
        "coherence_random_ops: {STEPS} steps in {:?}; ops {counts:?}; device commands {} ok, \
         {} failed as expected; mm {:?}; mirror {:?}",
        started.elapsed(),
        h.dev_ok,
        h.dev_failed,
        h.stats(),
        h.dev.mirror().stats()
    );

    let (violations, total) = h.dev.mirror().violations();
    assert_eq!(total, 0, "IOTLB violations: {violations:?}");

    let Harness {
        mm, dev, scratch, ..
    } = h;
    drop(dev);
    // SAFETY: nothing refers into the region; plain munmap of whatever is left of it.
    let rc = unsafe { libc::munmap(BASE as *mut libc::c_void, NPAGES * PAGE as usize) };
    assert_eq!(rc, 0, "munmap of the region: {}", errno_str());
    // SAFETY: nothing refers into the scratch page.
    unsafe { mm.munmap(scratch) }.unwrap();
    drop(mm);
    assert_eq!(
        settled_vm_pinned_bytes(pinned, VM_PIN_SETTLE).unwrap(),
        pinned,
        "pins leaked"
    );
}
