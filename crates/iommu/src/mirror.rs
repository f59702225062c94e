//! [`IommuMirror`]: the simulated IOMMU as a mirroring backend of the core, with IOVA = process
//! virtual address (true shared virtual memory).
//!
//! # Fault path
//!
//! A device access that misses raises a page request for the bytes it wants; the mirror
//! resolves it on the device thread: it picks the run of pages to map (see [`Prefetch`]: the
//! pages the access asked for, within its fault window, widened to the CPU's huge page around
//! the address or, where the caller opted in, to the whole window; clamped to the subscription,
//! to the VMA, and to the pages not yet mapped as needed), then runs the core's fault loop,
//! [`fault_prepare_and_program`]: `read_begin` → `range_fault` (snapshot and fault in through
//! the page source) → *prepare*: pin the run → take the update lock → `read_retry` → map the IO
//! page table → unlock, and the device retries. **The pin is taken outside the update lock**,
//! because pinning may fault pages in, and a fault on memory a userfaultfd monitor serves waits
//! for that monitor, which may itself be waiting for this update lock in `invalidate`. The pin
//! is taken after `read_begin`, so the retry check covers it: if an invalidation ran since, the
//! pin is dropped (the loop's *undo*) and the loop starts over. What is left here is the run
//! (cut again when a neighbouring mapping changed under the fault) and the device work.
//!
//! # Invalidation
//!
//! The core's skeleton ([`svmirror_core::teardown::invalidate`]) skips, locks, cuts and counts;
//! the mirror's [`Teardown`] then, in one page-level section, tears down the IO page-table
//! entries (or downgrades them to read-only on `ProtectionVma`) and flushes the IOTLB; then
//! waits for device accesses in flight on the range; then releases the pins no mapping uses any
//! more. `Unmap` and `Release` free page-table pages, other events keep them for the refault. A
//! non-blocking invalidation only `try_lock`s, refuses when an access is in flight on the
//! range, and defers releasing pins (a system call) to the next sleepable point.
//!
//! # Pins
//!
//! One pin per resolved run, shared by the leaves that map it and released when the last of
//! them goes. Dropping the mirror stops the device, removes the subscription, tears everything
//! down and releases every pin (DESIGN.md invariant 7).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use svmirror_core::MirrorError;
use svmirror_core::teardown::Action;
use svmirror_core::{
    AreaKind, CounterSnapshot, Counters, CpuPte, DEFAULT_FAULT_TIMEOUT, Event, FaultRequest,
    FaultSteps, IntervalNotifierOps, InvalidateCtx, Notifier, NotifierRange, Owner, PAGE_SIZE,
    PageSource, Pass, Range, Subscription, Teardown, UpdateGuard, UpdateLock, WouldBlock, entry,
    fault_prepare_and_program,
};
use svmirror_mm::ProcessPageSource;

use crate::dma::{
    Access, DmaCommand, DmaConfig, DmaEngine, DmaHandle, Fence, PageRequest, PageRequestHandler,
};
use crate::error::{IommuError, Result};
use crate::iotlb::Violation;
use crate::mmu::{Mmu, MmuConfig};
use crate::page_table::{IOVA_END, Perms, Unmapped, check_iova_space, iova_range};
use crate::pin::{MAX_PIN_LEN, Pin, PinId, PinPool, PinPoolConfig};

/// How to build an [`IommuMirror`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorConfig {
    /// The DMA engine: fault mode, watchdog.
    pub dma: DmaConfig,
    /// The IOMMU: IOTLB size, checking mode.
    pub mmu: MmuConfig,
    /// The pin table.
    pub pins: PinPoolConfig,
    /// The fault window: a power of two from 4 KiB to 1 GiB. One page request maps at most
    /// the window-aligned block of this size around the faulting address (a request for more
    /// is answered in several, one per block, so a large run is mapped in aligned pieces that
    /// the IO page table can map with large leaves); the CPU's huge page around the address
    /// is the one exception. With [`Prefetch::Window`] it is also the prefetch window.
    pub fault_window: u64,
    /// What a page request maps besides the pages the device asked for: see [`Prefetch`].
    pub prefetch: Prefetch,
    /// How long one page request may keep racing invalidations.
    pub fault_timeout: Duration,
}

/// What a page request maps (and so pins, and has its page source register for events: a
/// [`ProcessMm`](svmirror_mm::ProcessMm) registers with its userfaultfd whatever range the
/// mirror looks up) besides the pages the device asked for.
///
/// The **demand part** is always mapped: the pages of `[iova, iova + len)` of the
/// [`PageRequest`] (the access the device attempted), or of [`IommuMirror::fault`]'s range,
/// cut to the fault window around the faulting page, to the mirrored range and to the VMA of
/// the faulting page.
///
/// The **huge-page extension** is always taken too: where the CPU maps the faulting page
/// with a huge page (a THP mapped by a PMD, or a hugetlb page: the page source reports an
/// order above 0, after faulting the page in if it was not present), the run widens to that
/// whole huge page (cut to the mirrored range). That registers and pins nothing the kernel
/// has not already tied to the demand page: a pin of any part of a huge page holds all of it
/// (and io_uring charges all of it to `VmPin`), a CPU change to any part of it invalidates all
/// of it (DESIGN.md invariant 4), and registering less than all of it would split the VMA
/// inside it, which makes the kernel split the CPU's huge mapping (and userfaultfd refuses a
/// hugetlb range that is not huge-page aligned). It is why a THP-backed 2 MiB region is mapped
/// as one 2 MiB leaf on its first fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefetch {
    /// Only the demand part and the huge-page extension: the mirror never maps, pins or has
    /// registered memory the device did not ask for. The default, and the only safe choice
    /// for a mirror over memory the caller does not own in whole mappings (the malloc heap,
    /// thread stacks, other libraries' buffers, device BARs): a registered neighbour makes an
    /// unrelated munmap or madvise wait for the userfaultfd monitor, which deadlocks when the
    /// monitor (or what it waits for) is the thread making it.
    #[default]
    Demand,
    /// Also the rest of the fault window around the faulting page, clamped to its VMA (and the
    /// mappings before it in the window are looked up, so registered, on the way): fewer page
    /// requests for a device that walks a buffer in small accesses. The caller opts in: only
    /// for a mirrored range that holds nothing but mappings the caller owns and lets the
    /// device have, whole, e.g. a mirror over one buffer of its own.
    Window,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            dma: DmaConfig::default(),
            mmu: MmuConfig::default(),
            pins: PinPoolConfig::default(),
            fault_window: 2 << 20,
            prefetch: Prefetch::Demand,
            fault_timeout: DEFAULT_FAULT_TIMEOUT,
        }
    }
}

impl MirrorConfig {
    /// The default configuration with the IOTLB checking mode on: what tests use.
    pub fn checked() -> Self {
        let mut c = Self::default();
        c.mmu.checking = true;
        c
    }
}

/// Counters of an [`IommuMirror`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorStats {
    /// Faults resolved (page requests and driver-initiated faults).
    pub faults: u64,
    /// Fault loops started over because an invalidation raced them.
    pub fault_retries: u64,
    /// Invalidations acted on.
    pub invalidations: u64,
    /// Invalidations skipped (own migration, soft-dirty).
    pub skipped: u64,
    /// Invalidations refused in non-blocking mode.
    pub would_block: u64,
    /// Pins released because their last mapping went.
    pub pins_released: u64,
    /// Pins kept because a hung device may still use them.
    pub pins_quarantined: u64,
}

/// A pin and the bytes of IO page-table leaves that target it.
struct Backing {
    pin: Pin,
    mapped: u64,
}

/// What the update lock guards.
///
/// A pin is in `pins` exactly while at least one leaf targets it, `mapped` being the sum of
/// those leaves' bytes (never 0). When the last leaf goes, the pin leaves `pins` and is
/// released once the device has drained the range; or it waits in `deferred` when the
/// invalidation could not sleep (released at the next sleepable point under this lock); or in
/// `quarantine` when the device hung with an access in flight (kept until the mirror goes).
#[derive(Default)]
struct MirrorState {
    pins: HashMap<PinId, Backing>,
    deferred: Vec<Pin>,
    quarantine: Vec<Pin>,
}

impl MirrorState {
    /// Takes the bytes `removed` off their pins and returns the pins no leaf targets any more.
    fn unback(&mut self, removed: &[Unmapped]) -> Vec<Pin> {
        let mut freed = Vec::new();
        for u in removed {
            let Some(b) = self.pins.get_mut(&u.target.pin) else {
                debug_assert!(false, "leaf targets unknown {}", u.target.pin);
                continue;
            };
            debug_assert!(b.mapped >= u.len);
            b.mapped -= u.len.min(b.mapped);
            if b.mapped == 0 {
                freed.extend(self.pins.remove(&u.target.pin).map(|b| b.pin));
            }
        }
        freed
    }
}

/// The backend half the notifier calls.
struct MirrorInner {
    range: Range,
    owner: Owner,
    mmu: Arc<Mmu>,
    pins: Arc<PinPool>,
    dma: DmaHandle,
    state: UpdateLock<MirrorState>,
    skip_flush: AtomicBool,
    stats: Mutex<MirrorStats>,
    /// The shared counters ([`IommuMirror::counters`]), kept beside `stats`.
    counters: Counters,
    config: MirrorConfig,
}

impl MirrorInner {
    fn stat(&self, f: impl FnOnce(&mut MirrorStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Waits for the device on `range` and releases `freed`, or quarantines them if the device
    /// hung there. Under the update lock, sleepable.
    fn release_after_drain(&self, g: &mut MirrorState, range: Range, freed: Vec<Pin>) {
        let n = freed.len() as u64;
        match self.dma.wait_idle_range(range) {
            Ok(()) => {
                drop(freed);
                self.stat(|s| s.pins_released += n);
            }
            Err(e) => {
                tracing::error!(%range, error = %e, "device hung: keeping its pins");
                g.quarantine.extend(freed);
                self.stat(|s| s.pins_quarantined += n);
            }
        }
    }

    /// Tears everything down and releases every pin (or leaks them if the device hung).
    fn teardown_all(&self, device_hung: bool) {
        let mut g = self.state.lock();
        let all = Range::new(0, IOVA_END).expect("the IOVA space is a range");
        let removed = self.mmu.with(|s| {
            let u = s.page_table_mut().unmap_present(all, true);
            s.iotlb_mut().invalidate_all();
            u
        });
        self.counters
            .record_unmap(removed.iter().map(|u| u.len).sum());
        let mut freed = g.unback(&removed);
        debug_assert!(g.pins.is_empty(), "every pin backs a leaf");
        freed.append(&mut g.deferred);
        freed.append(&mut g.quarantine);
        if device_hung {
            tracing::error!(pins = freed.len(), "device hung: leaking its pins");
            std::mem::forget(freed);
        }
    }
}

impl IntervalNotifierOps for MirrorInner {
    fn invalidate(
        &self,
        ctx: &InvalidateCtx<'_>,
        nr: &NotifierRange,
    ) -> std::result::Result<Pass, WouldBlock> {
        svmirror_core::teardown::invalidate(self, ctx, nr)
    }
}

impl Teardown for MirrorInner {
    type State = MirrorState;
    type Garbage = ();

    fn update_lock(&self) -> &UpdateLock<MirrorState> {
        &self.state
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn owner(&self) -> Owner {
        self.owner
    }

    fn name(&self) -> &'static str {
        "iommu"
    }

    fn clamp(&self, r: Range) -> Option<Range> {
        r.intersect(&Range::new(0, IOVA_END).expect("IOVA space"))
    }

    fn skipped(&self) {
        self.stat(|s| s.skipped += 1);
    }

    fn would_block(&self) {
        self.stat(|s| s.would_block += 1);
    }

    /// Downgrades or unmaps the IO page table's entries and flushes the IOTLB under the MMU
    /// lock, after checking there that no access in flight uses the range (refused when it may
    /// not wait). The pins go once the device has drained, or, non-blocking (no access in
    /// flight could see them), at the next fault.
    fn teardown(
        &self,
        g: &mut UpdateGuard<'_, MirrorState>,
        r: Range,
        action: Action,
        _event: Event,
        blockable: bool,
    ) -> std::result::Result<(u64, ()), WouldBlock> {
        let flush = !self.skip_flush.load(Ordering::Relaxed);
        let removed = self.mmu.with(|s| {
            if !blockable && s.busy(r) {
                return Err(WouldBlock);
            }
            let pt = s.page_table_mut();
            let removed = match action {
                Action::Downgrade => {
                    pt.protect_present(r, Perms::Read);
                    Vec::new()
                }
                Action::FreeLeaves => pt.unmap_present(r, true),
                Action::Clear => pt.unmap_present(r, false),
            };
            if flush {
                s.iotlb_mut().invalidate_range(r);
            }
            Ok(removed)
        })?;
        self.stat(|s| s.invalidations += 1);
        let bytes = removed.iter().map(|u| u.len).sum();
        let freed = g.unback(&removed);
        if blockable {
            self.release_after_drain(g, r, freed);
        } else {
            g.deferred.extend(freed);
        }
        Ok((bytes, ()))
    }
}

/// The driver side of page requests: the subscription and the CPU page table.
struct Resolver {
    inner: Arc<MirrorInner>,
    sub: Subscription,
    source: Box<dyn PageSource + Send + Sync>,
}

fn core_err(op: &'static str, range: Range) -> impl FnOnce(svmirror_core::Error) -> IommuError {
    move |source| IommuError::Core { op, range, source }
}

/// The pages `[iova, iova + len)` touches, if that is a range at all.
fn pages_of(iova: u64, len: u64) -> Option<Range> {
    let start = iova & !(PAGE_SIZE - 1);
    let end = iova.saturating_add(len.max(1)).next_multiple_of(PAGE_SIZE);
    Range::new(start, end).ok()
}

impl PageRequestHandler for Resolver {
    fn page_request(&self, req: &PageRequest) -> Result<()> {
        self.resolve(req.iova, req.len, req.access == Access::Write)
    }

    fn settle(&self, iova: u64, len: u64) -> Result<u64> {
        let Some(r) = pages_of(iova, len) else {
            // Outside any address a CPU change can name: the access faults and says why.
            return Ok(0);
        };
        self.source
            .settle(r)
            .map_err(core_err("settle before a device access", r))
    }

    fn changed_since(&self, iova: u64, len: u64, since: u64) -> bool {
        pages_of(iova, len).is_some_and(|r| self.source.changed_since(r, since))
    }
}

impl Resolver {
    /// Maps the run of pages at `iova` that is not mapped (or not writable, for a write): the
    /// pages of `[iova, iova + len)` in the fault window, widened as [`Prefetch`] says.
    fn resolve(&self, iova: u64, len: u64, write: bool) -> Result<()> {
        let inner = &*self.inner;
        let _span = tracing::trace_span!("iommu.fault", iova, write).entered();
        let page = iova & !(PAGE_SIZE - 1);
        let outside = || IommuError::OutsideMirror {
            iova,
            range: inner.range,
        };
        if !inner.range.contains(page) || page >= IOVA_END {
            return Err(outside());
        }
        let win = inner.config.fault_window;
        let window = Range::with_len(page & !(win - 1), win)
            .ok()
            .and_then(|w| self.mirrored(w))
            .ok_or_else(outside)?;
        let requested = Instant::now();
        let demand = {
            let end = iova.saturating_add(len.max(1)).min(window.end());
            Range::new(page, end.next_multiple_of(PAGE_SIZE)).map_err(|_| outside())?
        };
        let bounds = match inner.config.prefetch {
            Prefetch::Window if !self.window_brings_back(window, demand) => window,
            _ => demand,
        };
        let bounds = match self.huge_page_at(page, bounds, write) {
            Some(h) => Range::new(h.start().min(bounds.start()), h.end().max(bounds.end()))
                .map_err(|_| outside())?,
            None => bounds,
        };
        let mut vma = self.vma_run(bounds, page, write)?;
        let started = Instant::now();
        let mut retries = 0;
        loop {
            let run = inner.mmu.with(|s| {
                let pt = s.page_table();
                let needs = |p: u64| pt.translate(p).is_none_or(|t| write && !t.perms.writable());
                if !needs(page) {
                    return None;
                }
                let (mut s, mut e) = (page, page + PAGE_SIZE);
                while s > vma.start() && needs(s - PAGE_SIZE) {
                    s -= PAGE_SIZE;
                }
                while e < vma.end() && needs(e) {
                    e += PAGE_SIZE;
                }
                Range::new(s, e).ok()
            });
            let Some(run) = run else {
                return Ok(());
            };
            let left = inner.config.fault_timeout.saturating_sub(started.elapsed());
            if retries > 0 && left.is_zero() {
                let elapsed = started.elapsed();
                return Err(core_err("fault", run)(svmirror_core::Error::Timeout {
                    range: run,
                    retries,
                    elapsed,
                }));
            }
            let mut entries = vec![0u64; run.pages() as usize];
            let mut req = FaultRequest::fault_all(run, &mut entries, write).with_owner(inner.owner);
            // The core's loop: snapshot and fault, pin outside the update lock (see the module
            // documentation), then publish under it unless an invalidation raced the pass.
            let steps = FaultSteps {
                prepare: |_: &FaultRequest<'_>| {
                    // The page source first makes the run's huge pages pinnable whole (the pin
                    // is taken for writing, even for a device that only reads: see
                    // `PageSource::before_pin`).
                    let huge = self
                        .source
                        .before_pin(run)
                        .map_err(core_err("fault", run))?;
                    // SAFETY: `IommuMirror::new`'s contract covers device writes anywhere in
                    // the mirrored range, which `run` lies in.
                    let pinned = unsafe { inner.pins.pin(run.start(), run.len()) };
                    self.source.after_pin(&huge);
                    pinned
                },
                undo: |_: &mut UpdateGuard<'_, MirrorState>, pin: Result<Pin>| drop(pin),
                program: |g: &mut UpdateGuard<'_, MirrorState>,
                          req: &FaultRequest<'_>,
                          pin: Result<Pin>| {
                    let pin = pin?;
                    drop(std::mem::take(&mut g.deferred));
                    self.program(g, pin, run, req.entries, write)
                },
            };
            let outcome = fault_prepare_and_program(
                &self.sub,
                &inner.state,
                &*self.source,
                &mut req,
                left,
                steps,
            );
            let raced = svmirror_core::FaultStats::retries_in(&outcome);
            inner.counters.record_retries(raced);
            retries += raced;
            match outcome {
                Ok((Ok(()), _)) => {}
                // The run was cut to the mapping as it was before the fault; a neighbour
                // munmapped or protected since (its event may still be on its way) makes the
                // run fail (its fault, or its pin) where the faulting page would not: cut it
                // again and retry.
                Ok((Err(e), _)) if self.vma_moved(bounds, page, write, &mut vma) => {
                    tracing::debug!(%run, error = %e, "mapping changed under a pin: retrying");
                    retries += 1;
                    inner.counters.record_retry();
                    continue;
                }
                Ok((Err(e), _)) => return Err(e),
                Err(e @ svmirror_core::Error::Timeout { .. }) => {
                    return Err(core_err("fault", run)(e));
                }
                Err(e) if self.vma_moved(bounds, page, write, &mut vma) => {
                    tracing::debug!(%run, error = %e, "mapping changed under a fault: retrying");
                    retries += 1;
                    inner.counters.record_retry();
                    continue;
                }
                Err(e) => return Err(core_err("fault", run)(e)),
            }
            inner.stat(|s| {
                s.faults += 1;
                s.fault_retries += retries;
            });
            inner.counters.record_fault(run.len(), requested.elapsed());
            return Ok(());
        }
    }

    /// Whether prefetching `window` around `demand` would bring home pages that live in
    /// another device's memory: a fault brings back only the pages the device asked for (the
    /// kernel's `migrate_to_ram` moves the one faulting page, lib/test_hmm.c
    /// `dmirror_devmem_fault`), so the window is used only where it is all in RAM (or
    /// absent, or this mirror's own). When unsure (the snapshot failed), it would.
    fn window_brings_back(&self, window: Range, demand: Range) -> bool {
        let mut ptes = vec![CpuPte::None; window.pages() as usize];
        if self.source.snapshot(window.start(), &mut ptes).is_err() {
            return true;
        }
        ptes.iter().enumerate().any(|(i, p)| {
            let addr = window.start() + i as u64 * PAGE_SIZE;
            !demand.contains(addr)
                && matches!(p, CpuPte::DevicePrivate { owner, .. } if *owner != self.inner.owner)
        })
    }

    /// `r` cut to the mirrored range and the IOVA space.
    fn mirrored(&self, r: Range) -> Option<Range> {
        r.intersect(&self.inner.range)?
            .intersect(&Range::new(0, IOVA_END).ok()?)
    }

    /// The CPU's huge page around `page`, cut to the mirrored range, when the CPU maps `page`
    /// huge and `bounds` does not already cover the 2 MiB around it ([`Prefetch`]'s huge-page
    /// extension). Looks before the run is looked up (so registered): registering part of a
    /// huge mapping would split it. A page not present is faulted in first (the fault loop
    /// would fault it anyway), so that a THP or hugetlb area gets its huge page now. A hint
    /// only: the fault loop checks what it maps.
    fn huge_page_at(&self, page: u64, bounds: Range, write: bool) -> Option<Range> {
        const PMD: u64 = 2 << 20;
        let pmd = Range::with_len(page & !(PMD - 1), PMD).ok()?;
        if bounds.start() <= pmd.start() && pmd.end() <= bounds.end() {
            return None;
        }
        let mut pte = [CpuPte::None];
        self.source.snapshot(page, &mut pte).ok()?;
        if pte[0] == CpuPte::None {
            let one = Range::with_len(page, PAGE_SIZE).ok()?;
            // An error (a hole, a protection) is the fault loop's to report.
            self.source.fault(one, write).ok()?;
            self.source.snapshot(page, &mut pte).ok()?;
        }
        match pte[0] {
            CpuPte::Present { order, .. } if order > 0 => {
                let size = PAGE_SIZE.checked_shl(u32::from(order))?;
                self.mirrored(Range::with_len(page & !(size - 1), size).ok()?)
            }
            _ => None,
        }
    }

    /// Whether the mapping at `page` no longer covers exactly `vma` (and, if so, makes `vma`
    /// what it covers now). False when it cannot be looked up: the caller's error stands.
    fn vma_moved(&self, window: Range, page: u64, write: bool, vma: &mut Range) -> bool {
        match self.vma_run(window, page, write) {
            Ok(now) if now != *vma => {
                *vma = now;
                true
            }
            _ => false,
        }
    }

    /// The part of `window` covered by the mapping at `page`, which must be one the device may
    /// use for `write`. Looks up (so has the page source register) the mappings from the start
    /// of `window` to the end of that one.
    fn vma_run(&self, window: Range, page: u64, write: bool) -> Result<Range> {
        let mut at = window.start();
        loop {
            let a = self
                .source
                .area(at, window.end())
                .map_err(core_err("fault", window))?;
            if page < a.end {
                return match a.kind {
                    AreaKind::Mapped {
                        read: true,
                        write: true,
                    } => Range::new(at, a.end).map_err(core_err("fault", window)),
                    AreaKind::Mapped { read: true, .. } if write => Err(core_err("fault", window)(
                        svmirror_core::Error::WriteToReadOnly { addr: page },
                    )),
                    AreaKind::Mapped { read: true, .. } => {
                        Err(IommuError::ReadOnlyMemory { iova: page })
                    }
                    _ => Err(core_err("fault", window)(
                        svmirror_core::Error::BadAddress { addr: page },
                    )),
                };
            }
            at = a.end;
        }
    }

    /// Maps `run` from the current `entries` through `pin`, under the update lock.
    fn program(
        &self,
        g: &mut UpdateGuard<'_, MirrorState>,
        pin: Pin,
        run: Range,
        entries: &[u64],
        write: bool,
    ) -> Result<()> {
        let inner = &*self.inner;
        let want = |e: u64| {
            if entry::is_writable(e) {
                Some(Perms::ReadWrite)
            } else if entry::is_valid(e) {
                Some(Perms::Read)
            } else {
                None
            }
        };
        // Pages to (re)map: (start, end, perms). Read-only leaves are replaced for a write.
        let outcome = inner.mmu.with(|s| {
            let pt = s.page_table_mut();
            let mut pieces: Vec<(u64, u64, Perms, bool)> = Vec::new();
            for (i, &e) in entries.iter().enumerate() {
                let p = run.start() + i as u64 * PAGE_SIZE;
                let Some(perms) = want(e) else { continue };
                let replace = match pt.translate(p) {
                    None => false,
                    Some(t) if write && !t.perms.writable() && perms.writable() => true,
                    Some(_) => continue,
                };
                match pieces.last_mut() {
                    Some(l) if l.1 == p && l.2 == perms && l.3 == replace => l.1 += PAGE_SIZE,
                    _ => pieces.push((p, p + PAGE_SIZE, perms, replace)),
                }
            }
            let mut removed = Vec::new();
            let mut mapped = 0;
            let mut result = Ok(());
            for &(s0, e0, perms, replace) in &pieces {
                let r = Range::new(s0, e0).expect("page-aligned piece");
                if replace {
                    removed.extend(pt.unmap_present(r, false));
                }
                let t = pin.target_of(s0).expect("piece lies in the pinned run");
                // Both locks are held and every page was checked free: a failure is a bug,
                // reported without leaving a leaf on a pin that is not tracked.
                result = pt.map(s0, e0 - s0, t, perms);
                if result.is_err() {
                    break;
                }
                mapped += e0 - s0;
            }
            for u in &removed {
                let r = Range::with_len(u.iova, u.len).expect("unmapped piece");
                s.iotlb_mut().invalidate_range(r);
            }
            (removed, mapped, result)
        });
        let (removed, mapped, result) = outcome;
        inner.counters.record_map(mapped);
        inner
            .counters
            .record_unmap(removed.iter().map(|u| u.len).sum());
        if mapped > 0 {
            g.pins.insert(pin.id(), Backing { pin, mapped });
        }
        let freed = g.unback(&removed);
        if !freed.is_empty() {
            inner.release_after_drain(g, run, freed);
        }
        result
    }
}

/// The simulated IOMMU mirroring one range of this process's address space, with its DMA device.
/// See the [module documentation](self).
pub struct IommuMirror {
    inner: Arc<MirrorInner>,
    resolver: Arc<Resolver>,
    dma: DmaEngine,
}

impl std::fmt::Debug for IommuMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuMirror")
            .field("range", &self.inner.range)
            .field("stats", &self.stats())
            .finish()
    }
}

impl IommuMirror {
    /// Creates the IOMMU, its pins and its DMA device, and subscribes `range` (IOVA = virtual
    /// address; it must lie in the 48-bit IOVA space) to `notifier`, which must be fed every
    /// change to this process's address space that should reach the device.
    ///
    /// # Safety
    ///
    /// Device commands may read and write any memory the process maps in `range`, through pins
    /// that the kernel writes behind Rust's back. The caller must ensure no memory a command
    /// writes is accessed through Rust references while the device may write it (STYLE.md
    /// rule 6): DMA buffers are touched by the CPU through raw pointers only.
    pub unsafe fn new(notifier: &Notifier, range: Range, config: MirrorConfig) -> Result<Self> {
        let source =
            ProcessPageSource::new().map_err(|source| IommuError::PageSource { source })?;
        // SAFETY: the caller upholds this function's contract, which is the same.
        unsafe { Self::with_page_source(notifier, range, config, Box::new(source)) }
    }

    /// As [`new`](Self::new), with the CPU page table read through `source` instead of this
    /// process's own (a wrapper that injects races or failures, in tests). The source must
    /// describe this process: pins are taken at the addresses it reports.
    ///
    /// # Safety
    ///
    /// As for [`new`](Self::new).
    pub unsafe fn with_page_source(
        notifier: &Notifier,
        range: Range,
        config: MirrorConfig,
        source: Box<dyn PageSource + Send + Sync>,
    ) -> Result<Self> {
        check_iova_space(range)?;
        let win = config.fault_window;
        if !win.is_power_of_two() || !(PAGE_SIZE..=MAX_PIN_LEN).contains(&win) {
            return Err(IommuError::InvalidConfig {
                reason: "fault window must be a power of two from 4 KiB to 1 GiB",
            });
        }
        let pins = PinPool::new(config.pins)?;
        let mmu = Arc::new(Mmu::new(config.mmu));
        let dma = DmaEngine::new(mmu.clone(), pins.clone(), config.dma)?;
        let inner = Arc::new(MirrorInner {
            range,
            owner: Owner(Arc::as_ptr(&mmu) as u64),
            mmu,
            pins,
            dma: dma.handle(),
            state: UpdateLock::new(MirrorState::default()),
            skip_flush: AtomicBool::new(false),
            stats: Mutex::new(MirrorStats::default()),
            counters: Counters::default(),
            config,
        });
        let sub = notifier
            .insert(range, inner.clone())
            .map_err(core_err("subscribe", range))?;
        let resolver = Arc::new(Resolver {
            inner: inner.clone(),
            sub,
            source,
        });
        dma.set_page_request_handler(resolver.clone());
        tracing::debug!(%range, "iommu mirror ready");
        Ok(IommuMirror {
            inner,
            resolver,
            dma,
        })
    }

    /// Queues a command on the device (see [`DmaEngine::submit`]).
    pub fn submit(&self, cmd: DmaCommand) -> Result<Fence> {
        self.dma.submit(cmd)
    }

    /// The DMA engine.
    pub fn dma(&self) -> &DmaEngine {
        &self.dma
    }

    /// The IOMMU: page table, IOTLB, accesses in flight. For reading: changing the page table
    /// behind the mirror's back breaks its pin accounting.
    pub fn mmu(&self) -> &Mmu {
        &self.inner.mmu
    }

    /// The pins.
    pub fn pins(&self) -> &PinPool {
        &self.inner.pins
    }

    /// The mirrored range.
    pub fn range(&self) -> Range {
        self.inner.range
    }

    /// The owner identity this mirror skips its own `Migrate`/`Exclusive` events by.
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }

    /// Faults `[iova, iova + len)` in and maps it for the device, writable if `write`, as page
    /// requests for that range would (a prefetch the caller asks for: the range is the demand
    /// part, see [`Prefetch`]). Errors as page requests fail.
    pub fn fault(&self, iova: u64, len: u64, write: bool) -> Result<()> {
        let r = iova_range(iova, len)?;
        if r.start() < self.inner.range.start() || r.end() > self.inner.range.end() {
            return Err(IommuError::OutsideMirror {
                iova,
                range: self.inner.range,
            });
        }
        let mut at = r.start();
        while at < r.end() {
            self.resolver.resolve(at, r.end() - at, write)?;
            at = self
                .inner
                .mmu
                .translate(at)
                .map_or(at + PAGE_SIZE, |t| t.end());
        }
        Ok(())
    }

    /// IOTLB violations seen in checking mode (the first 64) and their total.
    pub fn violations(&self) -> (Vec<Violation>, u64) {
        self.inner.mmu.with(|s| {
            (
                s.iotlb().violations().to_vec(),
                s.iotlb().stats().violations,
            )
        })
    }

    /// The counters.
    pub fn stats(&self) -> MirrorStats {
        *self.inner.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared counters: faults by size with their latency from the device's request to
    /// the mapping being in place, fault retries, invalidations by reason (acted on, or skipped
    /// as the mirror's own migration or soft-dirty), and bytes mapped and torn down in the IO
    /// page table.
    pub fn counters(&self) -> CounterSnapshot {
        self.inner.counters.snapshot()
    }

    /// Test hook: when on, invalidations leave the IOTLB alone, breaking the protocol on
    /// purpose so tests can prove the checking mode catches a missing flush.
    pub fn set_skip_iotlb_flush(&self, skip: bool) {
        self.inner.skip_flush.store(skip, Ordering::Relaxed);
    }
}

impl Drop for IommuMirror {
    fn drop(&mut self) {
        self.dma.shutdown();
        // No callback runs or will run after this; an already removed or released one is fine.
        let _ = self.resolver.sub.remove();
        self.inner.teardown_all(self.dma.handle().has_failed());
    }
}

#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;

/// The contract every backend keeps ([`svmirror_core::Mirror`]).
impl svmirror_core::Mirror for IommuMirror {
    fn backend(&self) -> &'static str {
        "iommu"
    }

    fn range(&self) -> Range {
        self.inner.range
    }

    fn owner(&self) -> Owner {
        self.inner.owner
    }

    fn fault(&self, range: Range, write: bool) -> std::result::Result<(), MirrorError> {
        IommuMirror::fault(self, range.start(), range.len(), write).map_err(MirrorError::from)
    }

    /// Faults the range in and claims all of it on the IOMMU as one access in flight (atomically
    /// with checking it is still mapped; faults again if an invalidation took part of it in
    /// between). An invalidation waits for the claim before it releases the pins
    /// (`release_after_drain`), as it waits for a DMA command's accesses.
    fn begin_work(
        &self,
        range: Range,
        write: bool,
    ) -> std::result::Result<svmirror_core::InFlight<'_>, MirrorError> {
        let started = std::time::Instant::now();
        loop {
            svmirror_core::Mirror::fault(self, range, write)?;
            if let Some(grant) = self.inner.mmu.claim_range(range, write) {
                return Ok(svmirror_core::InFlight::new(grant));
            }
            if started.elapsed() > self.inner.config.fault_timeout {
                return Err(MirrorError::Core {
                    op: "begin work",
                    range,
                    source: svmirror_core::Error::Timeout {
                        range,
                        retries: 0,
                        elapsed: started.elapsed(),
                    },
                });
            }
        }
    }

    /// Tears down every IO page-table entry, as an `Unmap` of the whole range would, once
    /// accesses in flight are done, and releases the pins.
    fn evict_all(&self) {
        let inner = &*self.inner;
        let mut g = inner.state.lock();
        if let Ok((bytes, ())) =
            inner.teardown(&mut g, inner.range, Action::FreeLeaves, Event::Unmap, true)
        {
            inner.counters.record_unmap(bytes);
        }
    }

    fn translation(&self, addr: u64) -> Option<bool> {
        self.inner.mmu.translate(addr).map(|t| t.perms.writable())
    }

    fn counters(&self) -> CounterSnapshot {
        self.inner.counters.snapshot()
    }
}

impl From<IommuError> for MirrorError {
    fn from(e: IommuError) -> Self {
        match e {
            IommuError::OutsideMirror { iova, range } => {
                MirrorError::OutsideMirror { addr: iova, range }
            }
            IommuError::Core { op, range, source } => MirrorError::Core { op, range, source },
            e => MirrorError::Device {
                backend: "iommu",
                source: Box::new(e),
            },
        }
    }
}
