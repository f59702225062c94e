//! [`VfioMapper`]: a range of this process's address space mirrored into a VFIO type1
//! container, as a backend of the core.
//!
//! # Chunks
//!
//! The mirrored range is cut into aligned chunks of one granule ([`chunk_granule`]: 2 MiB where
//! the range allows, never below the IOMMU's smallest page). Inside a chunk, each run of pages
//! of one mapping (VMA) is one type1 mapping (a `vfio_dma` entry, a *piece*): a chunk holds one
//! piece in the common case, more where VMAs end inside it or where a later fault filled a
//! gap. A piece is the unit of invalidation: type1 cannot unmap part of an earlier mapping, so
//! an invalidation unmaps every piece it touches whole (the other pieces of the chunk stay),
//! and the next fault maps again what is still valid.
//!
//! # IOVAs
//!
//! Where the whole mirrored range lies in one of the IOMMU's usable IOVA ranges, IOVA = the
//! process's virtual address (true shared virtual memory: the device uses the CPU's pointers).
//! Otherwise (an IOMMU with fewer address bits than the CPU, or the MSI window in the way) each
//! chunk gets a granule-aligned IOVA window from an [`IovaAllocator`], kept while the virtual
//! range exists and freed on `Unmap` and `Release`.
//!
//! # Fault path
//!
//! [`VfioMapper::fault`] (a driver-initiated fault: edu has no page requests) walks the chunks
//! of the request; for each run of one mapping in a chunk it runs the core's
//! [`fault_and_program`] loop: `read_begin` → `range_fault` (faults the pages in and registers
//! them with the userfaultfd when the source is a `ProcessMm`) → update lock → `read_retry` →
//! VFIO_IOMMU_MAP_DMA of the pages not mapped yet. **The map runs under the update lock**:
//! type1 pins the pages the CPU maps *at the time of the ioctl*, so mapping before the retry
//! check could pin pages that an invalidation already dropped. The pages were faulted in just
//! before, so the pin does not fault (a fault here on memory a userfaultfd monitor serves would
//! wait for a monitor that may wait for this lock). Writable mappings are always pinned
//! writable, which breaks copy-on-write at pin time: the device never keeps a shared zero or
//! COW page that a later CPU write would replace without an event.
//!
//! # Invalidation
//!
//! Under the update lock: `set_seq`; find the mappings (pieces) the range touches; wait for
//! the device accesses in flight on **any byte of those mappings** ([`VfioMapper::access`]),
//! not only on the range: type1 removes a mapping whole, so unmapping a piece for a page the
//! CPU changed also takes away its neighbours, which a command in flight may be reading; unmap
//! those pieces (the others in the chunk stay); on `Unmap` and `Release` also free IOVA
//! windows no longer backed by a virtual range. Own `Migrate`/`Exclusive` and `SoftDirty` are
//! skipped. Type1 cannot change a mapping's permissions, so a protection change unmaps too and
//! the next fault maps with the new permissions. A non-blocking invalidation only `try_lock`s
//! and refuses when an access is in flight on the pieces.
//!
//! # Device accesses
//!
//! An access ([`VfioMapper::access`], [`VfioMapper::access_many`]) keeps its pages mapped
//! until it is dropped; an invalidation that must unmap them waits for it, holding the update
//! lock, as the kernel's GPU drivers wait for their fences under their notifier lock. So the
//! rule is theirs too: **a thread that holds an access of a mapper must not ask the same mapper
//! for another** (nor fault through it): the second call may need the update lock that an
//! invalidation holds while it waits for the first. A command that needs several ranges (its
//! data, its queue memory) takes them in one [`VfioMapper::access_many`]. Such a call is
//! refused with [`VfioError::NestedAccess`] rather than left to hang; the read-outs
//! ([`VfioMapper::translate`], [`VfioMapper::stats`], ...) take the update lock as well, so a
//! thread holding an access should not rely on them while an invalidation may be waiting.
//!
//! # Budget
//!
//! The container holds at most `dma_avail` mappings (65535 by default, the module parameter
//! `dma_entry_limit`). The mapper reads it once, tracks what it maps and unmaps, and refuses a
//! chunk that needs more with [`VfioError::BudgetExhausted`] before asking the kernel. A map
//! that fails part way through a chunk unmaps what that call mapped (rollback).
//!
//! # Pinned memory
//!
//! Type1 charges pinned pages to the process's **locked** memory (`mm->locked_vm`, `VmLck` in
//! /proc/self/status), against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK; it does not
//! touch `pinned_vm` (`VmPin`, where io_uring and RDMA charge). Tearing a mapper down returns
//! `VmLck` and `dma_avail` to where they were.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use svmirror_core::MirrorError;
use svmirror_core::teardown::Action;
use svmirror_core::{
    CounterSnapshot, Counters, DEFAULT_FAULT_TIMEOUT, Event, IntervalNotifierOps, InvalidateCtx,
    Notifier, NotifierRange, Owner, PAGE_SIZE, PageSource, Pass, Range, Subscription, Teardown,
    UpdateGuard, UpdateLock, WouldBlock,
};
use vfio_ioctls::VfioContainer;

use crate::chunk::{Budget, IovaAllocator, chunk_granule, identity_fits, window};
use crate::error::{Result, VfioError};
use crate::uapi::{self, IommuInfo};

mod fault;

pub use fault::DeviceAccess;

/// How IOVAs are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IovaMode {
    /// IOVA = virtual address where the IOMMU's IOVA ranges hold the whole mirrored range, an
    /// allocator otherwise.
    #[default]
    Auto,
    /// IOVA = virtual address, or [`VfioMapper::new`] fails with
    /// [`VfioError::OutsideIovaRanges`].
    Identity,
    /// Always the allocator.
    Allocated,
}

/// How to build a [`VfioMapper`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapperConfig {
    /// Chunk size (a power of two, at least the IOMMU's smallest page); `None`: chosen by
    /// [`chunk_granule`].
    pub granule: Option<u64>,
    /// How IOVAs are chosen.
    pub iova: IovaMode,
    /// How long one fault may keep racing invalidations.
    pub fault_timeout: Duration,
    /// Refuse maps the budget cannot hold (the default). Off, the kernel refuses them with
    /// ENOSPC ([`VfioError::NoMappingEntries`]): for tests of the kernel's answer and of
    /// rollback.
    pub enforce_budget: bool,
}

impl Default for MapperConfig {
    fn default() -> Self {
        MapperConfig {
            granule: None,
            iova: IovaMode::Auto,
            fault_timeout: DEFAULT_FAULT_TIMEOUT,
            enforce_budget: true,
        }
    }
}

/// One type1 mapping inside a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    va: u64,
    len: u64,
    write: bool,
}

impl Piece {
    fn overlaps(&self, r: Range) -> bool {
        self.va < r.end() && r.start() < self.va + self.len
    }
}

/// A chunk: its IOVA base and the mappings in it.
#[derive(Debug)]
struct Chunk {
    /// IOVA of the chunk's aligned start (`va & !(granule - 1)`).
    iova: u64,
    /// Mappings, sorted by address, disjoint.
    pieces: Vec<Piece>,
}

/// What the update lock guards.
///
/// `chunks` is keyed by the chunk's aligned virtual start. A chunk is present while it has
/// pieces, or (allocator mode) while its IOVA window is reserved for a virtual range that still
/// exists. `budget.used` equals the number of pieces of all chunks; `mapped_bytes` their bytes.
/// Changed only under the update lock, which invalidations hold across `set_seq` and the unmap.
#[derive(Debug)]
struct State {
    chunks: BTreeMap<u64, Chunk>,
    alloc: Option<IovaAllocator>,
    budget: Budget,
    mapped_bytes: u64,
    released: bool,
}

/// Device accesses in flight: invalidations of their range wait for them.
#[derive(Debug, Default)]
struct InFlight {
    next: u64,
    /// `(id, range, the thread that took it)`.
    ranges: Vec<(u64, Range, std::thread::ThreadId)>,
}

/// The backend half the notifier calls.
struct Inner {
    container: Arc<VfioContainer>,
    fd: RawFd,
    range: Range,
    granule: u64,
    identity: bool,
    owner: Owner,
    config: MapperConfig,
    info: IommuInfo,
    state: UpdateLock<State>,
    inflight: Mutex<InFlight>,
    inflight_cv: Condvar,
    /// Serializes this mapper's faults (plan, map, publish). No invalidation takes it, so it
    /// may be held across VFIO_IOMMU_MAP_DMA.
    fault_lock: Mutex<()>,
    counters: Counters,
    unmap_errors: AtomicU64,
    /// Test hook: runs with each run a fault looked up, before it faults the run in.
    fault_hook: FaultHook,
}

/// A test hook on the fault path ([`VfioMapper::set_fault_hook`]).
type FaultHook = Mutex<Option<Box<dyn FnMut(Range) + Send>>>;

/// Counts of what a [`VfioMapper`] holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapperStats {
    /// Chunks with at least one mapping.
    pub chunks_mapped: u64,
    /// Type1 mappings (`vfio_dma` entries) held.
    pub mappings: u32,
    /// Bytes mapped.
    pub mapped_bytes: u64,
    /// Mappings the container may still create, as tracked.
    pub budget_available: u32,
    /// Unmaps the kernel refused (each logged as an error).
    pub unmap_errors: u64,
}

impl Inner {
    fn key(&self, va: u64) -> u64 {
        va & !(self.granule - 1)
    }

    fn lock_state(&self) -> UpdateGuard<'_, State> {
        self.state.lock()
    }

    /// Unmaps every piece of the chunk at `key`; keeps the chunk record. Returns the bytes.
    fn unmap_chunk(&self, g: &mut State, key: u64) -> u64 {
        self.unmap_pieces(g, key, |_| true)
    }

    /// The pieces of the chunks `r` touches that overlap `r`, as ranges: what an invalidation
    /// of `r` unmaps, and so what the device must be done with first.
    fn pieces_touching(&self, g: &State, r: Range) -> Vec<Range> {
        g.chunks
            .range(self.key(r.start())..r.end())
            .flat_map(|(_, c)| c.pieces.iter())
            .filter(|p| p.overlaps(r))
            .filter_map(|p| Range::with_len(p.va, p.len).ok())
            .collect()
    }

    /// Unmaps the pieces of the chunk at `key` that `which` picks; keeps the chunk record.
    /// Returns the bytes.
    ///
    /// Each piece is unmapped with its exact IOVA and length (vfio-ioctls checks the unmapped
    /// size against the asked one). Type1 refuses such an unmap only when the container has
    /// lost its IOMMU (its last group detached, which removed every mapping) or on a bug: a
    /// refusal is logged, counted in [`MapperStats::unmap_errors`], and the piece forgotten.
    fn unmap_pieces(&self, g: &mut State, key: u64, which: impl Fn(&Piece) -> bool) -> u64 {
        let Some(chunk) = g.chunks.get_mut(&key) else {
            return 0;
        };
        let (pieces, kept): (Vec<Piece>, Vec<Piece>) = std::mem::take(&mut chunk.pieces)
            .into_iter()
            .partition(|p| which(p));
        chunk.pieces = kept;
        let base = chunk.iova;
        let mut bytes = 0;
        for p in &pieces {
            let iova = base + (p.va - key);
            if let Err(e) = self.container.vfio_dma_unmap(iova, p.len as usize) {
                self.unmap_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(iova, len = p.len, error = %e, "VFIO unmap failed");
            }
            bytes += p.len;
        }
        g.budget.give(pieces.len() as u32);
        g.mapped_bytes -= bytes;
        self.counters.record_unmap(bytes);
        bytes
    }

    /// Drops the chunk record and its IOVA window (allocator mode).
    fn forget_chunk(&self, g: &mut State, key: u64) {
        if let Some(c) = g.chunks.remove(&key) {
            debug_assert!(c.pieces.is_empty());
            if let Some(a) = g.alloc.as_mut() {
                a.free(c.iova, self.granule);
            }
        }
    }

    /// Waits until no device access overlaps any of `ranges`; with `block` false, says whether
    /// one does.
    fn drain(&self, ranges: &[Range], block: bool) -> bool {
        let mut f = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if !f
                .ranges
                .iter()
                .any(|(_, x, _)| ranges.iter().any(|r| x.overlaps(r)))
            {
                return true;
            }
            if !block {
                return false;
            }
            f = self.inflight_cv.wait(f).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Refuses a call from a thread that holds one of this mapper's accesses (see "Device
    /// accesses" above): it could wait for the update lock, or in `drain`, for an
    /// invalidation that waits for the access it holds.
    fn not_nested(&self) -> Result<()> {
        let me = std::thread::current().id();
        let f = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        match f.ranges.iter().find(|(_, _, t)| *t == me) {
            Some(&(_, held, _)) => Err(VfioError::NestedAccess { held }),
            None => Ok(()),
        }
    }

    /// Unmaps and forgets everything.
    fn teardown_all(&self) {
        let mut g = self.lock_state();
        let keys: Vec<u64> = g.chunks.keys().copied().collect();
        for k in keys {
            self.unmap_chunk(&mut g, k);
            self.forget_chunk(&mut g, k);
        }
        g.released = true;
        debug_assert_eq!(g.budget.used, 0);
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
    type Garbage = ();

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
        "vfio"
    }

    /// VFIO type1 cannot downgrade a mapping: every action unmaps the pieces touching the
    /// range, once the device is done with them (refused when it may not wait). `FreeLeaves` also
    /// gives back the IOVA windows whose whole virtual range went (every window on `Release`).
    /// `unmap_chunk` counts the bytes it unmaps itself: none are returned.
    fn teardown(
        &self,
        g: &mut UpdateGuard<'_, State>,
        r: Range,
        action: Action,
        event: Event,
        blockable: bool,
    ) -> std::result::Result<(u64, ()), WouldBlock> {
        // Type1 unmaps a piece whole: the device must be done with every byte of the pieces
        // the range touches, not only with the range (the others in the chunk stay mapped).
        let hit = self.pieces_touching(g, r);
        if !self.drain(&hit, blockable) {
            return Err(WouldBlock);
        }
        let first = self.key(r.start());
        let keys: Vec<u64> = g.chunks.range(first..r.end()).map(|(k, _)| *k).collect();
        for k in keys {
            self.unmap_pieces(g, k, |p| p.overlaps(r));
            let gone = action == Action::FreeLeaves
                && (event == Event::Release
                    // The IOVA window goes with the last byte of its virtual range.
                    || window(k, self.granule, self.range)
                        .is_some_and(|w| r.start() <= w.start() && w.end() <= r.end()));
            // Identity chunks own no IOVA window: an empty one is simply dropped. A window
            // whose whole virtual range went holds no piece any more (each overlapped `r`).
            let empty = g.chunks.get(&k).is_some_and(|c| c.pieces.is_empty());
            if gone || (g.alloc.is_none() && empty) {
                self.forget_chunk(g, k);
            }
        }
        if event == Event::Release {
            g.released = true;
        }
        Ok((0, ()))
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("range", &self.range)
            .field("granule", &self.granule)
            .finish()
    }
}

/// A range of this process's address space mirrored into a VFIO type1 container. See the
/// [crate documentation](crate), and the notes at the top of `mapper.rs` (chunks, IOVAs, the
/// fault path, invalidation).
///
/// ```no_run
/// use std::path::Path;
/// use std::sync::Arc;
/// use svmirror_mm::ProcessMm;
/// use svmirror_vfio::{MapperConfig, VfioContainer, VfioMapper};
/// # fn program_dma(_device: &vfio_ioctls::VfioDevice, _iova: u64, _len: u64) {}
///
/// let mm = Arc::new(ProcessMm::new()?);
/// let container = Arc::new(VfioContainer::new(None)?);
/// // Opening a device bound to vfio-pci attaches its group, which sets the container's IOMMU
/// // (svmirror-edu's `EduDevice::open` does this for QEMU's edu device).
/// let device = vfio_ioctls::VfioDevice::new(
///     Path::new("/sys/bus/pci/devices/0000:00:03.0"),
///     container.clone(),
///     false,
/// )?;
/// let buf = mm.mmap_anonymous(64 << 10, svmirror_mm::Protection::READ_WRITE)?;
/// // SAFETY: `buf` is touched through raw pointers only while mapped.
/// let mapper = unsafe { VfioMapper::new(mm.notifier(), mm.clone(), container, buf, MapperConfig::default())? };
/// // Faulted in for a device read, and held mapped while the device works.
/// let access = mapper.access(buf.start(), 4096, false)?;
/// program_dma(&device, access.iova(), 4096); // the device's own driver
/// drop(access); // invalidations of the range may go on
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct VfioMapper {
    inner: Arc<Inner>,
    sub: Subscription,
    source: Arc<dyn PageSource + Send + Sync>,
}

impl std::fmt::Debug for VfioMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioMapper")
            .field("range", &self.inner.range)
            .field("granule", &self.inner.granule)
            .field("identity", &self.inner.identity)
            .field("stats", &self.stats())
            .finish()
    }
}

impl VfioMapper {
    /// Mirrors `range` of this process into `container` (whose IOMMU must be set: at least one
    /// device's group attached, as opening a `vfio_ioctls::VfioDevice` in it does), reading
    /// the CPU page table through `source` and subscribing to `notifier`, which must be fed
    /// every change to the address space (a `ProcessMm` is both).
    ///
    /// # Safety
    ///
    /// Devices behind the container may read and write any memory mapped in `range` while it
    /// is mapped, behind Rust's back. The caller must not hold Rust references to memory a
    /// device may write (STYLE.md rule 6): DMA buffers are touched through raw pointers only.
    pub unsafe fn new(
        notifier: &Notifier,
        source: Arc<dyn PageSource + Send + Sync>,
        container: Arc<VfioContainer>,
        range: Range,
        config: MapperConfig,
    ) -> Result<Self> {
        let fd = container.as_raw_fd();
        let info = uapi::iommu_info(fd).map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => VfioError::Mirror(MirrorError::InvalidConfig {
                reason: "the container has no IOMMU set: attach a device's group first",
            }),
            _ => VfioError::Io {
                op: "VFIO_IOMMU_GET_INFO",
                source: e,
            },
        })?;
        let granule = config
            .granule
            .unwrap_or_else(|| chunk_granule(info.page_sizes, range));
        let min_page = if info.page_sizes == 0 {
            PAGE_SIZE
        } else {
            1 << info.page_sizes.trailing_zeros()
        };
        if !granule.is_power_of_two() || granule < min_page.max(PAGE_SIZE) || granule > 1 << 30 {
            return Err(VfioError::Mirror(MirrorError::InvalidConfig {
                reason: "granule must be a power of two from the IOMMU's smallest page to 1 GiB",
            }));
        }
        let fits = identity_fits(&info.iova_ranges, range.widen_to(granule));
        let identity = match config.iova {
            IovaMode::Auto => fits,
            IovaMode::Identity if fits => true,
            IovaMode::Identity => return Err(VfioError::OutsideIovaRanges { range }),
            IovaMode::Allocated => false,
        };
        let alloc = (!identity).then(|| {
            if info.iova_ranges.is_empty() {
                IovaAllocator::new(&[(0, u64::MAX)])
            } else {
                IovaAllocator::new(&info.iova_ranges)
            }
        });
        let budget = Budget {
            available: info.dma_avail.unwrap_or(u32::MAX),
            used: 0,
        };
        // The owner identity is the address of the shared state, unique while it lives.
        let inner = Arc::new_cyclic(|me| Inner {
            owner: Owner(me.as_ptr() as u64),
            fd,
            container,
            range,
            granule,
            identity,
            config,
            info,
            state: UpdateLock::new(State {
                chunks: BTreeMap::new(),
                alloc,
                budget,
                mapped_bytes: 0,
                released: false,
            }),
            inflight: Mutex::new(InFlight::default()),
            inflight_cv: Condvar::new(),
            fault_lock: Mutex::new(()),
            counters: Counters::default(),
            unmap_errors: AtomicU64::new(0),
            fault_hook: Mutex::new(None),
        });
        let sub = notifier
            .insert(range, inner.clone())
            .map_err(MirrorError::refused("subscribe", range))?;
        tracing::debug!(%range, granule, identity, "vfio mapper ready");
        Ok(VfioMapper { inner, sub, source })
    }

    /// The mirrored range.
    pub fn range(&self) -> Range {
        self.inner.range
    }

    /// The chunk size.
    pub fn granule(&self) -> u64 {
        self.inner.granule
    }

    /// Whether IOVA = virtual address.
    pub fn is_identity(&self) -> bool {
        self.inner.identity
    }

    /// The owner identity the mapper skips its own `Migrate`/`Exclusive` events by.
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }

    /// What the IOMMU reported when the mapper was made.
    pub fn iommu_info(&self) -> &IommuInfo {
        &self.inner.info
    }

    /// What the kernel reports now (`dma_avail` moves with every mapping in the container).
    pub fn query_iommu_info(&self) -> Result<IommuInfo> {
        uapi::iommu_info(self.inner.fd).map_err(|source| VfioError::Io {
            op: "VFIO_IOMMU_GET_INFO",
            source,
        })
    }

    /// What the mapper holds now.
    pub fn stats(&self) -> MapperStats {
        let g = self.inner.lock_state();
        MapperStats {
            chunks_mapped: g.chunks.values().filter(|c| !c.pieces.is_empty()).count() as u64,
            mappings: g.budget.used,
            mapped_bytes: g.mapped_bytes,
            budget_available: g.budget.available,
            unmap_errors: self.inner.unmap_errors.load(Ordering::Relaxed),
        }
    }

    /// Device accesses in flight ([`VfioMapper::access`] guards alive).
    pub fn accesses_in_flight(&self) -> usize {
        let f = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f.ranges.len()
    }

    /// Runs `hook` with each run (one mapping's pages in a chunk) a fault has looked up, before
    /// it faults the run in (`None` removes it). For tests that change the address space in
    /// that window; not for production use.
    #[doc(hidden)]
    pub fn set_fault_hook(&self, hook: Option<Box<dyn FnMut(Range) + Send>>) {
        *self
            .inner
            .fault_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hook;
    }

    /// The shared counters: faults by size and latency, retries, invalidations by reason,
    /// bytes mapped and unmapped.
    pub fn counters(&self) -> CounterSnapshot {
        self.inner.counters.snapshot()
    }

    /// The IOVA a device uses for `addr` now, if it is mapped (for writes too if `write`).
    pub fn translate(&self, addr: u64, write: bool) -> Option<u64> {
        let g = self.inner.lock_state();
        let key = self.inner.key(addr);
        let c = g.chunks.get(&key)?;
        c.pieces
            .iter()
            .any(|p| p.va <= addr && addr < p.va + p.len && (p.write || !write))
            .then(|| c.iova + (addr - key))
    }

    /// The IOVA of `addr` whether or not it is mapped now: the virtual address in identity
    /// mode, else the chunk's reserved window, if it has one.
    pub fn iova_of(&self, addr: u64) -> Option<u64> {
        if self.inner.identity {
            return Some(addr);
        }
        let g = self.inner.lock_state();
        let key = self.inner.key(addr);
        g.chunks.get(&key).map(|c| c.iova + (addr - key))
    }

    /// Unmaps every chunk and forgets every IOVA window, as an invalidation of the whole range
    /// would, without removing the subscription (the next fault maps again). Waits for the
    /// device accesses in flight first (so the calling thread must hold none).
    pub fn unmap_all(&self) {
        let inner = &*self.inner;
        let mut g = inner.lock_state();
        inner.drain(&[inner.range], true);
        let keys: Vec<u64> = g.chunks.keys().copied().collect();
        for k in keys {
            inner.unmap_chunk(&mut g, k);
            inner.forget_chunk(&mut g, k);
        }
    }

    /// Removes the subscription and unmaps everything; what `Drop` does, with the errors.
    pub fn close(self) -> Result<MapperStats> {
        let r = self.sub.remove();
        self.inner.teardown_all();
        let stats = self.stats();
        r.map_err(MirrorError::refused("unsubscribe", self.inner.range))?;
        Ok(stats)
    }
}

impl Drop for VfioMapper {
    fn drop(&mut self) {
        // No callback runs or will run after this; an already removed one is fine.
        let _ = self.sub.remove();
        self.inner.teardown_all();
    }
}

/// The contract every backend keeps ([`svmirror_core::Mirror`]).
impl svmirror_core::Mirror for VfioMapper {
    fn backend(&self) -> &'static str {
        "vfio"
    }

    fn range(&self) -> Range {
        VfioMapper::range(self)
    }

    fn owner(&self) -> Owner {
        VfioMapper::owner(self)
    }

    fn fault(&self, range: Range, write: bool) -> std::result::Result<(), MirrorError> {
        VfioMapper::fault(self, range.start(), range.len(), write).map_err(MirrorError::from)
    }

    /// One access per chunk the range touches (an access through allocated IOVAs stays within
    /// one chunk), taken together; the invalidations of the range wait for all of them.
    fn begin_work(
        &self,
        range: Range,
        write: bool,
    ) -> std::result::Result<svmirror_core::InFlight<'_>, MirrorError> {
        let mut parts = Vec::new();
        let mut at = range.start();
        while at < range.end() {
            let end = if self.inner.identity {
                range.end()
            } else {
                (self.inner.key(at) + self.inner.granule).min(range.end())
            };
            parts.push((at, end - at, write));
            at = end;
        }
        // One acquisition for all of them (see "Device accesses" in mapper.rs).
        let held = self.access_many(&parts).map_err(MirrorError::from)?;
        Ok(svmirror_core::InFlight::new(held))
    }

    fn evict_all(&self) {
        self.unmap_all();
    }

    /// VFIO type1 cannot map a page read-only after mapping it writable and back: a
    /// translation is writable where the chunk's piece was mapped for writing.
    fn translation(&self, addr: u64) -> Option<bool> {
        if self.translate(addr, true).is_some() {
            Some(true)
        } else {
            self.translate(addr, false).map(|_| false)
        }
    }

    fn counters(&self) -> CounterSnapshot {
        VfioMapper::counters(self)
    }
}

impl From<VfioError> for MirrorError {
    fn from(e: VfioError) -> Self {
        match e {
            VfioError::Mirror(m) => m,
            e => MirrorError::Device {
                backend: "vfio",
                source: Box::new(e),
            },
        }
    }
}
