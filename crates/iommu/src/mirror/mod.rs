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
//!
//! The fault path lives in `resolve` (the resolver the DMA engine hands page requests to);
//! this module holds the configuration, the state under the update lock, the invalidation and
//! the [`IommuMirror`] itself.
//!
//! [`fault_prepare_and_program`]: svmirror_core::fault_prepare_and_program

mod resolve;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use svmirror_core::MirrorError;
use svmirror_core::teardown::Action;
use svmirror_core::{
    AddressSpace, CounterSnapshot, Counters, DEFAULT_FAULT_TIMEOUT, Event, IntervalNotifierOps,
    InvalidateCtx, Notifier, NotifierRange, Owner, PAGE_SIZE, PageSource, Pass, Range, Teardown,
    UpdateGuard, UpdateLock, WouldBlock,
};

use self::resolve::Resolver;
use crate::dma::{DmaCommand, DmaConfig, DmaEngine, DmaHandle, Fence};
use crate::error::{IommuError, Result};
use crate::iotlb::Violation;
use crate::mmu::{Mmu, MmuConfig};
use crate::page_table::{Perms, Unmapped, check_iova_space, iova_range, iova_space};
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

/// What a page request maps (and so pins, and has its page source register for events:
/// svmirror-mm's `ProcessMm` registers with its userfaultfd whatever range the mirror looks up)
/// besides the pages the device asked for.
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
///
/// [`PageRequest`]: crate::PageRequest
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
    /// Where the resolved faults' time went, summed over `faults`.
    pub fault_times: FaultTimes,
    /// Batches of page requests resolved together (a command's page request group).
    pub fault_batches: u64,
    /// Runs those batches resolved (each also counted in `faults`): `batched_runs /
    /// fault_batches` is the faults per batch.
    pub batched_runs: u64,
    /// Bytes of page request groups faulted in ahead of a sweeping device rather than resolved
    /// with the group (`resolve.rs`, `Ahead`): the device's own requests map them as it
    /// reaches them.
    pub faulted_ahead: u64,
    /// Time invalidations spent under the MMU lock tearing down or downgrading IO page-table
    /// entries and flushing the IOTLB, summed over `invalidations`.
    pub unmap_flush_time: Duration,
    /// Time blockable invalidations spent waiting for the device's accesses in flight on the
    /// range (`DmaHandle::wait_idle_range`) before releasing pins, summed.
    pub drain_time: Duration,
    /// Time blockable invalidations spent releasing the pins no mapping uses any more, summed.
    pub release_time: Duration,
}

/// The steps of resolving faults, each summed over the faults a mirror resolved: divide by
/// [`MirrorStats::faults`] for the mean of one. `total` runs from the page request reaching the
/// driver to the translation being in place; the steps are parts of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultTimes {
    /// The whole resolution.
    pub total: Duration,
    /// Choosing the run: the fault window, the CPU's huge page, the mapping (`PageSource::area`).
    pub lookup: Duration,
    /// The core's fault loop outside the two steps below: the snapshot of the CPU page table,
    /// faulting in what is missing (`range_fault`), and the sequence check.
    pub range_fault: Duration,
    /// Pinning the run (`PinPool::pin`, with `PageSource::before_pin`).
    pub pin: Duration,
    /// Programming the IO page table under the update lock.
    pub map: Duration,
}

impl FaultTimes {
    /// `self / n`, each step: the mean of one fault.
    pub fn per(&self, n: u64) -> FaultTimes {
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        FaultTimes {
            total: self.total / n,
            lookup: self.lookup / n,
            range_fault: self.range_fault / n,
            pin: self.pin / n,
            map: self.map / n,
        }
    }
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
    /// hung there. Under the update lock, sleepable. Returns how long the wait and the release
    /// took.
    fn release_after_drain(
        &self,
        g: &mut MirrorState,
        range: Range,
        freed: Vec<Pin>,
    ) -> (Duration, Duration) {
        let n = freed.len() as u64;
        let t = Instant::now();
        let idle = self.dma.wait_idle_range(range);
        let drain = t.elapsed();
        let t = Instant::now();
        match idle {
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
        (drain, t.elapsed())
    }

    /// Tears everything down and releases every pin (or leaks them if the device hung).
    fn teardown_all(&self, device_hung: bool) {
        let mut g = self.state.lock();
        let removed = self.mmu.with(|s| {
            let u = s.page_table_mut().unmap_present(iova_space(), true);
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
        r.intersect(&iova_space())
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
        let t = Instant::now();
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
        let unmap_flush = t.elapsed();
        let bytes = removed.iter().map(|u| u.len).sum();
        let freed = g.unback(&removed);
        let (drain, release) = if blockable {
            self.release_after_drain(g, r, freed)
        } else {
            g.deferred.extend(freed);
            (Duration::ZERO, Duration::ZERO)
        };
        self.stat(|s| {
            s.invalidations += 1;
            s.unmap_flush_time += unmap_flush;
            s.drain_time += drain;
            s.release_time += release;
        });
        Ok((bytes, ()))
    }
}

/// [`MirrorError::refused`] as an [`IommuError`], for the places that build the error as a
/// value rather than through `?`.
fn core_err(op: &'static str, range: Range) -> impl FnOnce(svmirror_core::Error) -> IommuError {
    move |source| MirrorError::refused(op, range)(source).into()
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
    /// address; it must lie in the 48-bit IOVA space) to `space`'s notifier; page requests read
    /// the CPU page table through `space`, which the mirror keeps alive. `space` must be this
    /// process's address space (svmirror-mm's `ProcessMm`): pins are taken at the addresses it
    /// reports.
    ///
    /// # Safety
    ///
    /// Device commands may read and write any memory the process maps in `range`, through pins
    /// that the kernel writes behind Rust's back. The caller must ensure no memory a command
    /// writes is accessed through Rust references while the device may write it (STYLE.md
    /// rule 6): DMA buffers are touched by the CPU through raw pointers only.
    pub unsafe fn new(
        space: Arc<dyn AddressSpace>,
        range: Range,
        config: MirrorConfig,
    ) -> Result<Self> {
        let source: Box<dyn PageSource + Send + Sync> = Box::new(space.clone());
        // SAFETY: the caller upholds this function's contract, which is the same.
        unsafe { Self::with_page_source(space.notifier(), range, config, source) }
    }

    /// As [`new`](Self::new), subscribed to `notifier` and with the CPU page table read
    /// through `source`: a notifier of its own, fed by hand (tests, benchmarks), with
    /// svmirror-mm's raw `ProcessPageSource`, or a wrapper around a page source that injects
    /// races or failures (tests). `notifier` must be fed every change to this process's address
    /// space that should reach the device, and `source` must describe this process: pins are
    /// taken at the addresses it reports.
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
            return Err(IommuError::Mirror(MirrorError::InvalidConfig {
                reason: "fault window must be a power of two from 4 KiB to 1 GiB",
            }));
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
            source: Arc::from(source),
            ahead: Default::default(),
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
            return Err(IommuError::Mirror(MirrorError::OutsideMirror {
                addr: iova,
                range: self.inner.range,
            }));
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
        svmirror_core::begin_work_retrying(range, self.inner.config.fault_timeout, || {
            svmirror_core::Mirror::fault(self, range, write)?;
            Ok(self
                .inner
                .mmu
                .claim_range(range, write)
                .map(svmirror_core::InFlight::new))
        })
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
            IommuError::Mirror(m) => m,
            e => MirrorError::Device {
                backend: "iommu",
                source: Box::new(e),
            },
        }
    }
}
