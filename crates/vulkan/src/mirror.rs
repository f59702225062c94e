//! [`VulkanMirror`]: a GPU page table that mirrors a range of the process's address space,
//! subscribed to the process's notifier.
//!
//! # Fault path
//!
//! A miss the shader records (or a [`prefetch`](VulkanMirror::prefetch)) names a page. The
//! mirror finds the mapping around it, picks the chunk to import ([`crate::import`]), and runs
//! the core's fault loop, [`svmirror_core::fault_prepare_and_program`]: `read_begin` →
//! `range_fault` over the chunk (fault in and snapshot through the [`AddressSpace`]) → *prepare*:
//! import the chunk's host memory → take the update lock → `read_retry` → write the chunk's
//! page-table entries → unlock. The import is made **outside** the update lock, because a driver
//! pins pages on import and pinning may fault, and a fault on memory the userfaultfd monitor
//! serves may wait for that monitor, which may be waiting for this update lock in `invalidate`.
//! The import is made after `read_begin`, so the retry check covers it: if an invalidation ran
//! since, the import is dropped (after the lock) and the loop starts over.
//!
//! # Invalidation
//!
//! The core's skeleton ([`svmirror_core::teardown::invalidate`]) skips, locks, cuts and counts;
//! the mirror's teardown clears the page-table entries of every chunk the range touches (a
//! partial invalidation drops the whole chunk), or on `ProtectionVma` only takes their write
//! permission; then waits for the fences of every submission in flight if anything was mapped
//! there (a dispatch may touch any mapped page); the imports are freed after the lock. `Unmap`
//! and `Release` free page-table leaves left empty. The mirror's own `Migrate` and `SoftDirty`
//! are skipped: the migration code updates the table itself.
//!
//! # Locks
//!
//! The order is the one in `svmirror_core::context` ("Lock order"): the update lock, then the
//! gpu-allocator, pool and queue mutexes as inner locks; imports (`Import::new` checks
//! `might_fault`) run under none of them. A dispatch submits under the update lock, so an
//! invalidation either runs before the submission (the shader then misses) or finds its fence
//! in the in-flight list.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use svmirror_core::MirrorError;
use svmirror_core::teardown::Action;
use svmirror_core::{
    AddressSpace, AreaKind, CounterSnapshot, Counters, DEFAULT_FAULT_TIMEOUT, Event, FaultRequest,
    FaultSteps, IntervalNotifierOps, InvalidateCtx, NotifierRange, Owner, PAGE_SIZE, PageSource,
    Pass, Range, Subscription, Teardown, UpdateGuard, UpdateLock, WouldBlock,
    fault_prepare_and_program,
};

use crate::device::Gpu;
use crate::error::{Result, VulkanError};
use crate::import::{DEFAULT_CHUNK_SIZES, Import, choose_chunk};
use crate::kernels::Pipelines;
use crate::memory::wait_fences;
use crate::page_table::{PageTable, VALID, WRITE};
use crate::state::State;

/// How to build a [`VulkanMirror`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Chunk sizes to import, largest first (powers of two, at least a page).
    pub chunk_sizes: Vec<u64>,
    /// Misses one pass can record; more are found again on replay.
    pub fault_capacity: u32,
    /// Page-table leaves (each maps 2 MiB).
    pub page_table_leaves: u32,
    /// Fault-and-replay passes one dispatch may take.
    pub max_passes: u32,
    /// How long one fault may keep racing invalidations.
    pub fault_timeout: Duration,
    /// Most chunks this mirror keeps imported at once (the driver's
    /// `maxMemoryAllocationCount` applies as well); a fault past it is
    /// [`VulkanError::TooManyAllocations`].
    pub max_imports: u32,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            chunk_sizes: DEFAULT_CHUNK_SIZES.to_vec(),
            fault_capacity: 4096,
            page_table_leaves: 1024,
            max_passes: 10_000,
            fault_timeout: DEFAULT_FAULT_TIMEOUT,
            max_imports: u32::MAX,
        }
    }
}

/// What a mirror holds right now: for tests that nothing leaks and for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Imported chunks.
    pub imports: u64,
    /// Bytes imported.
    pub imported_bytes: u64,
    /// Valid page-table entries.
    pub mapped_pages: u64,
    /// Page-table leaves in use.
    pub leaves: u32,
    /// Pages living in device-local memory.
    pub device_pages: u64,
    /// Submissions in flight.
    pub in_flight: u64,
}

/// The backend half the notifier calls.
pub(crate) struct Inner {
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) range: Range,
    pub(crate) owner: Owner,
    pub(crate) state: UpdateLock<State>,
    pub(crate) counters: Counters,
    pub(crate) config: MirrorConfig,
}

impl Inner {
    /// Waits for every submission in flight (under the update lock). A lost device runs
    /// nothing, so its fences are as good as signalled.
    pub(crate) fn drain(&self, g: &State) {
        if let Err(e) = wait_fences(&self.gpu, &g.fences()) {
            tracing::error!(error = %e, "waiting for the GPU failed; it can no longer run");
        }
    }
}

impl IntervalNotifierOps for Inner {
    fn invalidate(
        &self,
        ctx: &InvalidateCtx<'_>,
        nr: &NotifierRange,
    ) -> std::result::Result<Pass, WouldBlock> {
        svmirror_core::teardown::invalidate(self, ctx, nr)
    }
}

impl Teardown for Inner {
    type State = State;
    type Garbage = Vec<Import>;

    fn update_lock(&self) -> &UpdateLock<State> {
        &self.state
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn owner(&self) -> Owner {
        self.owner
    }

    fn name(&self) -> &'static str {
        "vulkan"
    }

    /// Downgrade: the entries lose WRITE. Otherwise the chunks touching the range go (a
    /// partial invalidation drops the whole chunk) and pages in device memory lose their
    /// entries (svmirror-mm frees them through `DevicePages::discard` when the CPU drops them).
    /// Whatever changed, the GPU drains before the callback returns; a non-blocking
    /// invalidation with submissions in flight over the range is refused.
    fn teardown(
        &self,
        g: &mut UpdateGuard<'_, State>,
        r: Range,
        action: Action,
        _event: Event,
        blockable: bool,
    ) -> std::result::Result<(u64, Vec<Import>), WouldBlock> {
        // Work in flight may use `r` through an import or device page there, or through a
        // leaf this teardown would free (even one with no entry left).
        let frees_leaf = action == Action::FreeLeaves && g.table().has_leaf_in(r);
        if !blockable && g.in_flight() > 0 && (g.occupied(r) || frees_leaf) {
            return Err(WouldBlock);
        }
        let freed = g.table().leaves_freed();
        let (imports, bytes) = match action {
            Action::Downgrade => (Vec::new(), g.protect(r) * PAGE_SIZE),
            Action::FreeLeaves | Action::Clear => {
                let free_leaves = action == Action::FreeLeaves;
                let (imports, bytes) = g.take_chunks(r, free_leaves);
                let mut dev_bytes = 0;
                for a in g.device_pages_in(r) {
                    dev_bytes += g.unmap_device_page(a, free_leaves) * PAGE_SIZE;
                }
                (imports, bytes + dev_bytes)
            }
        };
        if bytes > 0 || g.table().leaves_freed() != freed {
            self.drain(g);
        }
        Ok((bytes, imports))
    }
}

/// A Vulkan device mirroring one range of this process's address space. See the
/// [module documentation](self).
pub struct VulkanMirror {
    pub(crate) inner: Arc<Inner>,
    pub(crate) sub: Subscription,
    pub(crate) mm: Arc<dyn AddressSpace>,
    pub(crate) pipelines: Pipelines,
    pub(crate) dispatch_buffers: Mutex<Option<crate::dispatch::DispatchBuffers>>,
    pub(crate) device_memory: Arc<crate::migrate::DeviceMemory>,
    /// Test hook: runs with each chunk a fault chose, before it faults the chunk in.
    pub(crate) fault_hook: FaultHook,
}

/// A test hook on the fault path ([`VulkanMirror::set_fault_hook`]).
pub(crate) type FaultHook = Mutex<Option<Box<dyn FnMut(Range) + Send>>>;

impl std::fmt::Debug for VulkanMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanMirror")
            .field("range", &self.inner.range)
            .field("device", &self.inner.gpu.info.name)
            .field("resources", &self.resources())
            .finish()
    }
}

fn fault_err(addr: u64, write: bool) -> impl FnOnce(svmirror_core::Error) -> VulkanError {
    move |source| VulkanError::Fault {
        addr,
        write,
        source,
    }
}

impl VulkanMirror {
    /// Subscribes `range` of `mm`'s address space and sets up the page table and pipelines on
    /// `gpu`. Nothing is imported until a dispatch faults or a prefetch asks.
    pub fn new(
        gpu: Arc<Gpu>,
        mm: Arc<dyn AddressSpace>,
        range: Range,
        config: MirrorConfig,
    ) -> Result<Self> {
        if config.chunk_sizes.is_empty()
            || config
                .chunk_sizes
                .iter()
                .any(|s| !s.is_power_of_two() || *s < PAGE_SIZE || *s > crate::page_table::BLOCK)
        {
            return Err(VulkanError::Mirror(MirrorError::InvalidConfig {
                reason: "chunk sizes must be powers of two from 4 KiB to 2 MiB",
            }));
        }
        if config.fault_capacity == 0 || config.max_passes == 0 {
            return Err(VulkanError::Mirror(MirrorError::InvalidConfig {
                reason: "fault capacity and passes must not be zero",
            }));
        }
        let mut config = config;
        config.chunk_sizes.sort_unstable_by(|a, b| b.cmp(a));
        let table = PageTable::new(&gpu, config.page_table_leaves)?;
        let pipelines = Pipelines::new(&gpu)?;
        let inner = Arc::new_cyclic(|w: &Weak<Inner>| Inner {
            gpu: gpu.clone(),
            range,
            owner: Owner(w.as_ptr() as u64),
            state: UpdateLock::new(State::new(table)),
            counters: Counters::default(),
            config,
        });
        let sub = mm
            .notifier()
            .insert(range, inner.clone())
            .map_err(MirrorError::refused("subscribe", range))?;
        let device_memory = crate::migrate::DeviceMemory::new(&inner);
        tracing::debug!(%range, device = %gpu.info.name, "vulkan mirror ready");
        Ok(VulkanMirror {
            inner,
            sub,
            mm,
            pipelines,
            dispatch_buffers: Mutex::new(None),
            device_memory,
            fault_hook: Mutex::new(None),
        })
    }

    /// Mirrors the whole user address space of `mm` (64 KiB up to 128 TiB) on the device
    /// [`Gpu::new`] picks with the default configuration: what an application that hands the
    /// GPU pointers into any of its memory wants.
    pub fn open(mm: Arc<dyn AddressSpace>) -> Result<Self> {
        let gpu = Arc::new(Gpu::new(&crate::GpuConfig::default())?);
        let range = MirrorError::range(1 << 16, (1 << 47) - (1 << 16))?;
        Self::new(gpu, mm, range, MirrorConfig::default())
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.inner.gpu
    }

    /// The mirrored range.
    pub fn range(&self) -> Range {
        self.inner.range
    }

    /// The owner identity this mirror's own migrations carry.
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }

    /// The counters: faults by size with latencies, retries, invalidations by reason, bytes
    /// mapped and unmapped.
    pub fn counters(&self) -> CounterSnapshot {
        self.inner.counters.snapshot()
    }

    /// What the mirror holds now.
    pub fn resources(&self) -> Resources {
        let g = self.inner.state.lock();
        let (imports, imported_bytes) = g.imports();
        Resources {
            imports,
            imported_bytes,
            mapped_pages: g.table().mapped_pages(),
            leaves: g.table().leaves_in_use(),
            device_pages: g.device_page_count(),
            in_flight: g.in_flight(),
        }
    }

    /// The page-table entry of the page at `addr`: `Some(writable)` when mapped.
    pub fn entry(&self, addr: u64) -> Option<bool> {
        let e = self.inner.state.lock().entry(addr & !(PAGE_SIZE - 1));
        (e & VALID != 0).then_some(e & WRITE != 0)
    }

    /// Maps `[addr, addr + len)` ahead of a dispatch (writable if `write`), as faults would.
    pub fn prefetch(&self, addr: u64, len: u64, write: bool) -> Result<()> {
        let r = self.check_range(addr, len)?;
        let _span =
            tracing::debug_span!("vulkan.prefetch", start = r.start(), end = r.end()).entered();
        let mut at = r.start();
        while at < r.end() {
            self.resolve(at, write)?;
            let next = self.inner.state.lock().chunk_at(at).map(|c| c.end());
            at = next.unwrap_or(at + PAGE_SIZE).max(at + PAGE_SIZE);
        }
        Ok(())
    }

    pub(crate) fn check_range(&self, addr: u64, len: u64) -> Result<Range> {
        let start = addr & !(PAGE_SIZE - 1);
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE));
        let r = match (len, end) {
            (0, _) => Range::new(start, start),
            (_, Some(end)) => Range::new(start, end),
            (_, None) => Range::with_len(addr, len),
        }
        .map_err(|source| VulkanError::Mirror(MirrorError::InvalidRange { addr, len, source }))?;
        if r.start() < self.inner.range.start() || r.end() > self.inner.range.end() {
            return Err(VulkanError::Mirror(MirrorError::OutsideMirror {
                addr,
                range: self.inner.range,
            }));
        }
        Ok(r)
    }

    /// The part of the 2 MiB block around `page` that its mapping covers (clipped to the
    /// mirror), and whether the mapping is writable.
    fn mapping_around(&self, page: u64, write: bool) -> Result<(Range, bool)> {
        let block = crate::page_table::BLOCK;
        let window = Range::with_len(page & !(block - 1), block)
            .ok()
            .and_then(|w| w.intersect(&self.inner.range))
            .ok_or(VulkanError::Mirror(MirrorError::OutsideMirror {
                addr: page,
                range: self.inner.range,
            }))?;
        let mut at = window.start();
        loop {
            let a = self
                .mm
                .area(at, window.end())
                .map_err(fault_err(page, write))?;
            if page < a.end {
                return match a.kind {
                    AreaKind::Mapped {
                        read: true,
                        write: w,
                    } => {
                        if write && !w {
                            return Err(fault_err(page, write)(
                                svmirror_core::Error::WriteToReadOnly { addr: page },
                            ));
                        }
                        let r = Range::new(at, a.end).map_err(fault_err(page, write))?;
                        Ok((r, w))
                    }
                    _ => Err(fault_err(page, write)(svmirror_core::Error::BadAddress {
                        addr: page,
                    })),
                };
            }
            at = a.end;
        }
    }

    /// Runs `hook` with each chunk a fault has chosen around its page, before it faults the
    /// chunk in (`None` removes it). For tests that change the address space in that window;
    /// not for production use.
    #[doc(hidden)]
    pub fn set_fault_hook(&self, hook: Option<Box<dyn FnMut(Range) + Send>>) {
        *self
            .fault_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hook;
    }

    /// Makes the page at `page` translatable (writable if `write`): the fault path of the
    /// [module documentation](self).
    pub(crate) fn resolve(&self, page: u64, write: bool) -> Result<()> {
        let inner = &*self.inner;
        let page = page & !(PAGE_SIZE - 1);
        if !inner.range.contains(page) {
            return Err(VulkanError::Mirror(MirrorError::OutsideMirror {
                addr: page,
                range: inner.range,
            }));
        }
        let _span = tracing::trace_span!("vulkan.fault", page, write).entered();
        // A change whose event was read but not handled yet (its syscall may have returned)
        // must not leave `maps` below answering for the old page (see `run_tracked`).
        let one = Range::with_len(page, PAGE_SIZE).map_err(fault_err(page, write))?;
        self.mm.settle(one).map_err(fault_err(page, write))?;
        let started = Instant::now();
        let mut retries = 0u64;
        loop {
            if retries > 0 && started.elapsed() > inner.config.fault_timeout {
                let range = Range::with_len(page, PAGE_SIZE).map_err(fault_err(page, write))?;
                return Err(fault_err(page, write)(svmirror_core::Error::Timeout {
                    range,
                    retries,
                    elapsed: started.elapsed(),
                }));
            }
            let existing = {
                let g = inner.state.lock();
                if g.maps(page, write) {
                    return Ok(());
                }
                g.chunk_at(page)
            };
            let (allowed, vma_write) = self.mapping_around(page, write)?;
            if inner.state.lock().is_device_page(page) {
                // In device memory: mapped as writable as its device-private entry is (the PTE
                // it replaced, less what an SVM API mprotect took away since). A write that
                // entry does not allow brings the page home, as the kernel's write fault on a
                // read-only device-private entry does (`do_swap_page` → `migrate_to_ram`);
                // the read-only mapping case was refused above.
                let mut pte = [svmirror_core::CpuPte::None];
                self.mm
                    .snapshot(page, &mut pte)
                    .map_err(fault_err(page, write))?;
                let dev_write = vma_write
                    && matches!(
                        pte[0],
                        svmirror_core::CpuPte::DevicePrivate { write: true, .. }
                    );
                if !write || dev_write {
                    if self.device_memory.resolve(page, dev_write)? {
                        return Ok(());
                    }
                } else {
                    self.mm.fault(one, true).map_err(fault_err(page, write))?;
                }
            }
            let chunk = match existing {
                Some(c) => c,
                None => {
                    let g = inner.state.lock();
                    let count = g.imports().0 as u32;
                    if count >= inner.config.max_imports {
                        return Err(VulkanError::TooManyAllocations {
                            count,
                            limit: inner.config.max_imports,
                        });
                    }
                    choose_chunk(
                        page,
                        allowed,
                        &inner.config.chunk_sizes,
                        inner.gpu.info.import_alignment,
                        |r| g.occupied(r),
                    )
                    .ok_or(VulkanError::NoChunk {
                        addr: page,
                        alignment: inner.gpu.info.import_alignment,
                    })?
                }
            };
            if let Some(hook) = self
                .fault_hook
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_mut()
            {
                hook(chunk);
            }
            let mut entries = vec![0u64; chunk.pages() as usize];
            let mut req =
                FaultRequest::fault_all(chunk, &mut entries, vma_write).with_owner(inner.owner);
            let left = inner.config.fault_timeout.saturating_sub(started.elapsed());
            // Imports to free once the update lock is released (freeing device memory under it
            // would make invalidations wait on the allocator).
            let garbage: RefCell<Vec<Import>> = RefCell::new(Vec::new());
            // The core's loop: snapshot and fault, import outside the update lock (see the
            // module documentation), publish under it unless an invalidation raced the pass.
            let steps = FaultSteps {
                prepare: |_: &FaultRequest<'_>| match existing {
                    Some(_) => Ok(None),
                    // SAFETY: `chunk` lies in a readable mapping that was just faulted in; the
                    // device writes it only through dispatches, whose callers promise no Rust
                    // reference aliases what the kernel writes (`VulkanMirror::dispatch`).
                    None => unsafe { Import::new(&inner.gpu, chunk) }.map(Some),
                },
                undo: |_: &mut UpdateGuard<'_, State>, import: Result<Option<Import>>| {
                    if let Ok(Some(i)) = import {
                        garbage.borrow_mut().push(i);
                    }
                },
                program: |g: &mut UpdateGuard<'_, State>,
                          req: &FaultRequest<'_>,
                          import: Result<Option<Import>>| {
                    let import = import?;
                    let base = match &import {
                        // Another fault imported around here meanwhile: use what it mapped.
                        Some(_) if g.occupied(chunk) => None,
                        Some(i) => Some(i.addr),
                        None => g.chunk_base(chunk),
                    };
                    let Some(base) = base else {
                        garbage.borrow_mut().extend(import);
                        return Ok(false);
                    };
                    if let Err((e, gone)) = g.map_chunk(chunk, base, req.entries, import) {
                        // Fail closed: nothing of this chunk stays mapped, and its imports go
                        // once work in flight, which may have seen the entries just written,
                        // is done.
                        garbage.borrow_mut().extend(gone);
                        inner.drain(g);
                        return Err(e);
                    }
                    Ok(true)
                },
            };
            let outcome = fault_prepare_and_program(
                &self.sub,
                &inner.state,
                &*self.mm,
                &mut req,
                left,
                steps,
            );
            drop(garbage);
            let raced = svmirror_core::FaultStats::retries_in(&outcome);
            inner.counters.record_retries(raced);
            retries += raced;
            let failed = match outcome {
                Ok((Ok(true), _)) => None,
                Ok((Ok(false), _)) => continue,
                Ok((Err(e), _)) => Some(e),
                Err(e) => Some(fault_err(page, write)(e)),
            };
            if let Some(e) = failed {
                // The chunk was cut to the mapping as it was looked up: a page of it beside
                // this one, unmapped or protected by another thread since (its event may still
                // be on its way), fails the chunk where this page would not. Look again.
                if self
                    .mapping_around(page, write)
                    .is_ok_and(|(now, _)| now != allowed)
                {
                    retries += 1;
                    inner.counters.record_retry();
                    continue;
                }
                return Err(e);
            }
            inner.counters.record_fault(chunk.len(), started.elapsed());
            inner.counters.record_map(chunk.len());
            return Ok(());
        }
    }

    /// Drops every mapping and import (the device loses everything; faults map it again).
    pub fn evict_all(&self) {
        let mut g = self.inner.state.lock();
        let freed = g.table().leaves_freed();
        let (imports, bytes) = g.take_chunks(Range::FULL, true);
        if !imports.is_empty() || g.table().leaves_freed() != freed {
            self.inner.drain(&g);
        }
        drop(g);
        drop(imports);
        self.inner.counters.record_unmap(bytes);
    }
}

impl Drop for VulkanMirror {
    fn drop(&mut self) {
        // No callback runs or will run after this; an already released one is fine.
        let _ = self.sub.remove();
        // Pages living in device memory come home first; svmirror-mm would otherwise ask this
        // mirror for them after it is gone.
        for run in self.device_runs() {
            if let Err(e) = self.mm.migrate_to_ram(run) {
                tracing::error!(%run, error = %e, "could not bring pages home at teardown");
            }
        }
        self.device_memory.release_all();
        self.evict_all();
        *self
            .dispatch_buffers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// The contract every backend keeps ([`svmirror_core::Mirror`]).
impl svmirror_core::Mirror for VulkanMirror {
    fn backend(&self) -> &'static str {
        "vulkan"
    }

    fn range(&self) -> Range {
        self.inner.range
    }

    fn owner(&self) -> Owner {
        self.inner.owner
    }

    fn fault(&self, range: Range, write: bool) -> std::result::Result<(), MirrorError> {
        self.prefetch(range.start(), range.len(), write)
            .map_err(MirrorError::from)
    }

    /// Faults the range in, then submits work that waits on the GPU until the token drops
    /// (`HeldWork`); checks the range is still mapped once the work is in flight, and tries
    /// again if an invalidation took it in between. The fault comes first because bringing a
    /// device-private page home submits a copy, which would queue behind the held work.
    fn begin_work(
        &self,
        range: Range,
        write: bool,
    ) -> std::result::Result<svmirror_core::InFlight<'_>, MirrorError> {
        svmirror_core::begin_work_retrying(range, self.inner.config.fault_timeout, || {
            svmirror_core::Mirror::fault(self, range, write)?;
            let held = self.hold_work().map_err(MirrorError::from)?;
            let g = self.inner.state.lock();
            let mapped = (range.start()..range.end())
                .step_by(PAGE_SIZE as usize)
                .all(|p| g.maps(p, write));
            drop(g);
            // Not mapped: an invalidation came in between; the held work ends here.
            Ok(mapped.then(|| svmirror_core::InFlight::new(held)))
        })
    }

    fn evict_all(&self) {
        VulkanMirror::evict_all(self);
    }

    fn translation(&self, addr: u64) -> Option<bool> {
        self.entry(addr)
    }

    fn counters(&self) -> CounterSnapshot {
        self.inner.counters.snapshot()
    }
}

impl From<VulkanError> for MirrorError {
    fn from(e: VulkanError) -> Self {
        match e {
            VulkanError::Mirror(m) => m,
            VulkanError::Fault {
                addr,
                write,
                source,
            } => MirrorError::Core {
                op: if write { "write fault" } else { "read fault" },
                range: Range::with_len(addr & !(PAGE_SIZE - 1), PAGE_SIZE).unwrap_or(Range::FULL),
                source,
            },
            e => MirrorError::Device {
                backend: "vulkan",
                source: Box::new(e),
            },
        }
    }
}
