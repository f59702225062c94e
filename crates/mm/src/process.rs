//! [`ProcessMm`]: the calling process's address space, watched through a userfaultfd.
//!
//! One per process. It owns the [`Notifier`] that backends subscribe to, a userfaultfd, and a
//! monitor (a reader thread and a handler thread, see `monitor.rs`) that turns the kernel's
//! userfaultfd events into invalidations with their reason, and it is the [`PageSource`] backends fault through: the real page table
//! ([`ProcessPageSource`]) plus what only svmirror knows (pages that live on a device, which VMAs
//! are registered, where huge pages were seen).
//!
//! # What it sees (DESIGN.md, "What userspace can and cannot see")
//!
//! | CPU change | event | invalidation |
//! |---|---|---|
//! | munmap (also mmap MAP_FIXED over a mapping, mremap shrinking) | UNMAP, after the unmap | `Unmap` |
//! | madvise DONTNEED / FREE / REMOVE | REMOVE, before the zap | `Clear`, held until the zap is seen (`zap.rs`) |
//! | mremap moving a mapping | REMAP, after the move | `Unmap` of the old range |
//! | fork | not asked for (see [`uffd_feature::WANTED`](crate::uffd_feature::WANTED)) | none: see below |
//! | the same through [`ProcessMm::munmap`] and friends | the API brackets the syscall | before the change |
//! | mprotect, MADV_PAGEOUT, swap, migration, KSM, THP collapse | nothing | only through the API |
//!
//! Events are delivered only for registered VMAs. A VMA is registered, whole, when a backend
//! first faults an address in it (or through [`ProcessMm::register`]); a VMA userfaultfd cannot
//! register is refused to the device, or mirrored without events if the caller chose
//! [`Unregistrable::MirrorWithoutEvents`] (safe through pins, coherent only through the SVM
//! API). Every invalidation that touches a window where a huge page was seen is
//! widened to the whole huge page.
//!
//! # Fork
//!
//! The parent's device mappings stay exact across fork: every page a device maps is pinned, and
//! the kernel gives the child a copy of pinned anonymous pages rather than sharing them
//! copy-on-write, so the parent keeps the very pages the device holds. The child gets no
//! monitor: without the FORK event the kernel drops the userfaultfd registration from the
//! child's VMAs, and the child mirrors nothing. Pages migrated to a device are not copied into
//! the child: the child sees zeros there. (If a kernel ever delivers a FORK event anyway, the
//! child's userfaultfd is closed at once, to the same effect.)
//!
//! # Failing closed
//!
//! If the monitor fails (a read error on the userfaultfd, a failing or panicking handler), it
//! releases the notifier (every subscription invalidated with `Release`) and every later
//! device fault is refused with [`Error::Released`]. It goes on reading and answering every
//! message (events are completed, missing faults resolved or woken), so no thread stays
//! blocked on the userfaultfd; the descriptor is closed when the `ProcessMm` is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use svmirror_core::{
    Area, AreaKind, CpuPte, Error, Event, Notifier, NotifierRange, Owner, PAGE_SHIFT, PAGE_SIZE,
    PageSource, Range,
};

use crate::error::MmError;
use crate::uffd::{self, MODE_WP, Uffd, UffdAccess, feature};
use crate::{PageSourceFeatures, ProcessPageSource};

pub use svmirror_core::DevicePages;

/// What the kernel granted and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmFeatures {
    /// userfaultfd feature bits granted (see [`feature`]).
    pub uffd_features: u64,
    /// Their names.
    pub uffd_feature_names: Vec<&'static str>,
    /// Features the kernel offered (a superset of those granted).
    pub uffd_offered: u64,
    /// How the userfaultfd was opened.
    pub access: UffdAccess,
    /// The page source's mechanisms.
    pub page_source: PageSourceFeatures,
}

impl MmFeatures {
    /// Whether write tracking ([`ProcessMm::track_writes`]) is available.
    pub fn write_tracking(&self) -> bool {
        self.uffd_features & feature::WP_ASYNC != 0
    }
}

/// Counters of one [`ProcessMm`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmStats {
    /// UNMAP events read.
    pub unmap_events: u64,
    /// REMOVE events read.
    pub remove_events: u64,
    /// REMAP events read.
    pub remap_events: u64,
    /// FORK events read.
    pub fork_events: u64,
    /// Missing faults resolved (pages brought back from a device, or zero-filled).
    pub missing_faults: u64,
    /// Events that an SVM API call had already invalidated for.
    pub events_covered_by_api: u64,
    /// VMAs registered with the userfaultfd.
    pub registrations: u64,
    /// Mappings userfaultfd cannot register (a private file mapping, a VMA another userfaultfd
    /// owns): refused to devices, or mirrored without events where the caller chose
    /// [`Unregistrable::MirrorWithoutEvents`].
    pub unregistrable: u64,
    /// Of those, how many were mirrored without events (by the caller's choice).
    pub mirrored_without_events: u64,
    /// Registrations that raced a mapping change and were looked up and tried again.
    pub registration_races: u64,
    /// Registrations made without write-protect mode because the mapping (or the kernel) does
    /// not support it: events still flow, write tracking does not.
    pub registered_without_wp: u64,
    /// UFFDIO_COPY / UFFDIO_ZEROPAGE answered EAGAIN (an event queued unread) and retried.
    pub fill_eagain: u64,
    /// Plain madvise REMOVE events whose invalidation was held open until the zap that follows
    /// the event was seen done (see `zap.rs`).
    pub zap_waits: u64,
    /// Of those, how many were ended by the time limit rather than by seeing the zap done (a
    /// page made present again after its zap, or, without `CAP_SYS_ADMIN`, a MADV_FREE).
    pub zap_timeouts: u64,
    /// Pages those holds left unexplained: device faults on them wait until each is seen
    /// zapped (or marked lazy-free), for [`ZAP_SUSPECT_WAIT`](crate::ZAP_SUSPECT_WAIT) more.
    pub zap_suspects: u64,
    /// Of those, how many that second limit ended too: the only pages a device may still map
    /// while a madvise that was read is yet to drop them (its caller kept off the CPU for
    /// longer than both limits, or a MADV_FREE that could not mark them).
    pub zap_suspects_expired: u64,
    /// Pages brought back from device memory because the CPU touched them (a missing fault).
    pub migrated_back_cpu: u64,
    /// Pages brought back for a device fault: another device's (or a mirror's that does not
    /// own them), or the owner's write that its read-only device-private entry does not allow.
    /// Only the pages the fault asked for.
    pub migrated_back_device: u64,
    /// Pages brought back because a caller asked: `migrate_to_ram`, `prepare_fork`, or a
    /// migration to a device of pages already on one.
    pub migrated_back_requested: u64,
    /// Device accesses settled ([`PageSource::settle`]: the simulated IOMMU settles before
    /// each access).
    pub settles: u64,
    /// Of those, how many found a munmap, madvise or mremap of their range read but not yet
    /// handled, and waited for it: each is an access that, without settling, could have used
    /// a translation a returned syscall had ended (the munmap window).
    pub settle_waits: u64,
    /// CPU huge pages (THP) svmirror's own operations split: mapped huge right before and
    /// with base pages right after. A device read or write never splits one by itself; what
    /// still does, and cannot be helped, is write tracking over part of a huge page
    /// ([`ProcessMm::track_writes`], [`ProcessMm::collect_writes`]: userfaultfd write-protects
    /// 4 KiB pages, and the kernel splits a huge page to protect part of it) and a device pin
    /// of a huge page shared copy-on-write with a forked child (the pin must unshare it, which
    /// the kernel does by splitting it). Splits the program makes itself are not counted.
    pub huge_splits: u64,
}

/// Why a page is being brought back from device memory ([`MmStats`] counts each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackCause {
    Cpu,
    Device,
    Requested,
}

/// What svmirror does with a mapping userfaultfd cannot register (a private file mapping, a VMA
/// another userfaultfd already owns): such a mapping would be mirrored with no events at all, so
/// a munmap or madvise of it would never reach the devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unregistrable {
    /// Refuse it to devices: the fault fails with a [`MmError::Register`] inside
    /// [`Error::Source`]. The default.
    #[default]
    Refuse,
    /// Mirror it anyway, without events: safe through pins, coherent only through the SVM API.
    /// Counted in [`MmStats::mirrored_without_events`].
    MirrorWithoutEvents,
}

#[derive(Default)]
pub(crate) struct Counters {
    unmap: AtomicU64,
    remove: AtomicU64,
    remap: AtomicU64,
    fork: AtomicU64,
    pub(crate) missing: AtomicU64,
    covered: AtomicU64,
    registrations: AtomicU64,
    unregistrable: AtomicU64,
    without_events: AtomicU64,
    races: AtomicU64,
    without_wp: AtomicU64,
    pub(crate) fill_eagain: AtomicU64,
    pub(crate) zap_waits: AtomicU64,
    pub(crate) zap_timeouts: AtomicU64,
    pub(crate) zap_suspects: AtomicU64,
    pub(crate) zap_suspects_expired: AtomicU64,
    pub(crate) back_cpu: AtomicU64,
    pub(crate) back_device: AtomicU64,
    pub(crate) back_requested: AtomicU64,
    settles: AtomicU64,
    settle_waits: AtomicU64,
    pub(crate) huge_splits: AtomicU64,
}

impl Counters {
    pub(crate) fn back(&self, cause: BackCause) -> &AtomicU64 {
        match cause {
            BackCause::Cpu => &self.back_cpu,
            BackCause::Device => &self.back_device,
            BackCause::Requested => &self.back_requested,
        }
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How many times a registration that raced a mapping change is looked up and tried again.
const REGISTER_TRIES: u32 = 4;

/// An event an SVM API call is causing, inside an invalidation of its range that it started
/// before the syscall. It is consumed by exactly the event it predicts (or the part of it that
/// event covers), and whatever is left is dropped when the call returns: the syscall has
/// returned, so its events have been read, and the call waits until the monitor has handled
/// them (`ExpectGuard`). No time decides it. Because it lives only while the call's own
/// invalidation is open, an event it swallows by mistake (another thread's change of the same
/// range) is covered by that invalidation: no device can map the range until it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expected {
    event: u8,
    start: u64,
    end: u64,
    /// The call that expects it.
    id: u64,
}

/// Bookkeeping under one lock. Lock order: this lock is never held while the notifier runs
/// callbacks or while a system call that may wait for the monitor (munmap, madvise, mremap)
/// runs.
#[derive(Default)]
pub(crate) struct Book {
    /// Spans registered with the userfaultfd: start → (end, read generation when registered).
    registered: BTreeMap<u64, (u64, u64)>,
    /// Mapping extents userfaultfd refused, as counted: start → (end, 1 if counted as mirrored
    /// without events). Never used to answer a fault (see `ensure_registered`).
    refused: BTreeMap<u64, (u64, u64)>,
    /// Windows where a huge page was seen: aligned start → size.
    huge: BTreeMap<u64, u64>,
    /// Events SVM API calls are causing right now.
    expected: Vec<Expected>,
    next_expect_id: u64,
    /// Pages living in device memory: page address → owner and key.
    pub(crate) migrated: BTreeMap<u64, OnDevice>,
    /// Pages some thread is bringing back right now (`Shared::bring_back`).
    pub(crate) returning: BTreeSet<u64>,
}

/// A page living in device memory: its owner, and the address the page had when it migrated,
/// by which the owner knows it (a mremap moves the page's address, not the device's copy).
#[derive(Clone)]
pub(crate) struct OnDevice {
    pub(crate) owner: Arc<dyn DevicePages>,
    pub(crate) key: u64,
    /// The device-private entry is writable: the PTE it replaced was (mm/migrate_device.c
    /// `migrate_vma_collect_pmd` keeps `pte_write` as MIGRATE_PFN_WRITE; a zero page or hole
    /// takes the VMA's VM_WRITE in `migrate_vma_insert_page`), and no SVM API mprotect has
    /// taken write away since (mm/mprotect.c `change_pte_range` makes a writable
    /// device-private entry read-only, and never the reverse).
    pub(crate) write: bool,
}

impl OnDevice {
    /// The same device page (a page moved by mremap keeps its key, its address changes).
    pub(crate) fn same(&self, other: &OnDevice) -> bool {
        Arc::ptr_eq(&self.owner, &other.owner) && self.key == other.key
    }
}

impl Book {
    /// Forgets the huge-page windows that reach into `[start, end)`.
    fn drop_huge(&mut self, start: u64, end: u64) {
        let from = start.saturating_sub(1 << 30);
        let doomed: Vec<u64> = self
            .huge
            .range(from..end)
            .filter(|(w, size)| **w + **size > start)
            .map(|(w, _)| *w)
            .collect();
        for w in doomed {
            self.huge.remove(&w);
        }
    }

    /// Unbooks the migrated pages in `[start, end)`, returning them with their owners.
    fn take_migrated(&mut self, start: u64, end: u64) -> Vec<OnDevice> {
        let pages: Vec<u64> = self.migrated.range(start..end).map(|(a, _)| *a).collect();
        pages
            .into_iter()
            .filter_map(|a| self.migrated.remove(&a))
            .collect()
    }
}

/// The span of `map` (start → (end, generation)) containing `addr`.
fn span_containing(map: &BTreeMap<u64, (u64, u64)>, addr: u64) -> Option<(u64, u64)> {
    map.range(..=addr)
        .next_back()
        .filter(|(_, (e, _))| *e > addr)
        .map(|(s, (e, _))| (*s, *e))
}

/// Removes `[start, end)` from a span map (start → (end, generation)), splitting spans that
/// straddle it.
fn carve_gen(map: &mut BTreeMap<u64, (u64, u64)>, start: u64, end: u64) {
    let hit: Vec<(u64, u64, u64)> = map
        .range(..end)
        .filter(|(_, (e, _))| *e > start)
        .map(|(s, (e, g))| (*s, *e, *g))
        .collect();
    for (s, e, g) in hit {
        map.remove(&s);
        if s < start {
            map.insert(s, (start, g));
        }
        if e > end {
            map.insert(end, (e, g));
        }
    }
}

pub(crate) struct Shared {
    /// First, so it is closed first on drop: once the monitor has stopped, nobody reads its
    /// events, and freeing the other fields can shrink the heap (brk) over a registered range,
    /// whose UNMAP event would wait forever for a reader while the fd is open.
    pub(crate) uffd: Uffd,
    pub(crate) notifier: Notifier,
    pub(crate) source: ProcessPageSource,
    book: Mutex<Book>,
    failed: AtomicBool,
    pub(crate) counters: Counters,
    /// What the monitor's reader has read and its handler not yet handled.
    pub(crate) queue: crate::monitor::Queue,
    /// /proc/kpageflags, where this process may read it and frame numbers (`zap.rs`).
    pub(crate) page_flags: Option<crate::pagemap::PageFlags>,
    /// Batches of events read / fully handled by the monitor: `(read, handled)`. An SVM API
    /// call whose syscall has returned knows its event (if any) has been read, and waits until
    /// `handled` catches up with `read` before it forgets what it expected.
    progress: Mutex<(u64, u64)>,
    progress_cv: Condvar,
    /// Bumped by the monitor right before and right after every read of the userfaultfd.
    pub(crate) read_gen: AtomicU64,
    /// Signalled when a page leaves `Book::returning`.
    pub(crate) returned: Condvar,
    /// [`Unregistrable`], as a `u8`.
    unregistrable: AtomicU8,
    /// MODE_WP is offered by the kernel (`PAGEFAULT_FLAG_WP`); cleared when a registration
    /// shows the mapping kind cannot take it.
    wp: AtomicBool,
    /// [`ProcessMm::track_writes`] was called: some pages may be write-protected, and a pin
    /// of a huge page must lift that first (`before_pin`). Never cleared (a stale `true`
    /// costs one harmless ioctl per huge page pinned).
    pub(crate) tracking: AtomicBool,
    /// Pages of REMOVE holds that the time limit ended while they were still unexplained
    /// (`zap.rs`): device faults on them wait until they are, for a while longer.
    pub(crate) suspects: crate::zap::Suspects,
}

impl Shared {
    pub(crate) fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The range to invalidate for a change of `r`: widened over every huge page seen there.
    pub(crate) fn widen(&self, r: Range) -> Range {
        let book = self.book();
        let mut start = r.start();
        let mut end = r.end();
        // Windows are at most 1 GiB; look back that far for one that reaches into the range.
        let from = r.start().saturating_sub(1 << 30);
        for (&w, &size) in book.huge.range(from..r.end()) {
            if w + size > r.start() {
                start = start.min(w);
                end = end.max(w + size);
            }
        }
        Range::new(start, end).unwrap_or(r)
    }

    /// The huge page around `addr` if the CPU maps `addr` huge right now.
    pub(crate) fn huge_page_at(&self, addr: u64) -> Option<Range> {
        let mut pte = [CpuPte::None];
        self.source
            .snapshot(addr & !(PAGE_SIZE - 1), &mut pte)
            .ok()?;
        match pte[0] {
            CpuPte::Present { order, .. } if order > 0 => {
                let size = PAGE_SIZE.checked_shl(u32::from(order))?;
                Range::with_len(addr & !(size - 1), size).ok()
            }
            _ => None,
        }
    }

    /// The huge pages `range` starts or ends inside of, as the CPU maps them now: those an
    /// operation on `range` alone may split.
    pub(crate) fn huge_pages_cut_by(&self, range: Range) -> Vec<Range> {
        let mut cut: Vec<Range> = Vec::new();
        for addr in [range.start(), range.end() - PAGE_SIZE] {
            if let Some(h) = self.huge_page_at(addr) {
                let inside = range.start() <= h.start() && h.end() <= range.end();
                if !inside && cut.last() != Some(&h) {
                    cut.push(h);
                }
            }
        }
        cut
    }

    /// Counts the pages of `huge` (mapped huge a moment ago) that the CPU now maps with base
    /// pages: `what` split them ([`MmStats::huge_splits`]).
    pub(crate) fn count_splits(&self, huge: &[Range], what: &str) {
        for h in huge {
            let mut pte = [CpuPte::None];
            if self.source.snapshot(h.start(), &mut pte).is_err() {
                continue;
            }
            if let CpuPte::Present { order: 0, .. } = pte[0] {
                bump(&self.counters.huge_splits);
                tracing::debug!(huge_page = %h, what, "a CPU huge page was split");
            }
        }
    }

    /// Runs one invalidation of `r` (widened) for `event`.
    fn invalidate(&self, r: Range, event: Event) -> Result<(), Error> {
        let widened = self.widen(r);
        self.notifier
            .invalidate_range_start(NotifierRange::new(widened, event))?
            .end();
        Ok(())
    }

    /// Forgets the registration records over `[start, end)` (its mappings are gone).
    fn forget_registration(&self, start: u64, end: u64) {
        let mut book = self.book();
        carve_gen(&mut book.registered, start, end);
        carve_gen(&mut book.refused, start, end);
    }

    /// Forgets everything known about `[start, end)` (it was unmapped or moved away), telling
    /// device owners to free migrated pages there.
    fn forget(&self, start: u64, end: u64) {
        {
            let mut book = self.book();
            carve_gen(&mut book.registered, start, end);
            carve_gen(&mut book.refused, start, end);
            book.drop_huge(start, end);
        }
        self.discard_migrated(start, end);
    }

    /// Drops the device copies of pages in `[start, end)`: the CPU discarded them. The owners
    /// are told outside the bookkeeping lock.
    pub(crate) fn discard_migrated(&self, start: u64, end: u64) {
        let dropped = self.book().take_migrated(start, end);
        for d in dropped {
            d.owner.discard(d.key);
        }
    }

    /// Consumes the part `[start, end)` of an expected event, if an SVM API call is causing it.
    /// One call can cause several events (madvise sends one REMOVE per VMA), so an event matches
    /// any expectation of its kind that contains it, and only its part of it is consumed.
    fn take_expected(&self, event: u8, start: u64, end: u64) -> bool {
        let mut book = self.book();
        let Some(i) = book
            .expected
            .iter()
            .position(|e| e.event == event && e.start <= start && end <= e.end)
        else {
            return false;
        };
        let e = book.expected.swap_remove(i);
        for (s, t) in [(e.start, start), (end, e.end)] {
            if s < t {
                book.expected.push(Expected {
                    start: s,
                    end: t,
                    ..e
                });
            }
        }
        bump(&self.counters.covered);
        true
    }

    /// Registers the whole VMA holding `want` (part of one readable mapping, as `area` just
    /// reported it) for events, unless a record says it is registered.
    ///
    /// The whole VMA, not just what the device faulted: `userfaultfd_register` splits a VMA at
    /// the ends of the registered range (the halves differ in `vm_userfaultfd_ctx`), and
    /// `mremap` refuses an old range that spans two VMAs with EFAULT (mm/mremap.c,
    /// `vma_to_resize`). Registering part of a program's mapping would therefore make the
    /// program's own `mremap` of it fail. Registering is not mapping: only what a device asks
    /// for is pinned and mapped ([`crate::Prefetch`] is about that), the rest of the VMA only
    /// sends events. Registering an already registered range again is harmless.
    ///
    /// Records are kept exact by the events themselves: every change that can end a
    /// registration (munmap, mmap over, mremap, brk shrink) sends an UNMAP or REMAP event, and
    /// the handler forgets the record *before* it invalidates (see `handle_unmap`). A fault
    /// that trusted a record made stale by an event not yet handled therefore either retries
    /// (the invalidation moves the notifier sequence under it) or is invalidated by it
    /// afterwards. The one race left is a record written after the event that ended it was
    /// handled: a registration that succeeded on the old mapping, with the event read while the
    /// call ran. The read generation (bumped by the monitor before and after each read) is
    /// taken before the syscall, and the record is written only if it has not moved; otherwise
    /// the registration stands but the next fault makes it again.
    ///
    /// A registration error is looked into, never taken as "cannot be registered" at once
    /// (fs/userfaultfd.c `userfaultfd_register`): EINVAL in write-protect mode on a mapping or
    /// kernel without uffd-wp is tried again without it (events still flow; MISSING takes WP's
    /// place as the mode); an error after which the mapping no longer covers `want` raced a
    /// mapping change, and the fault is told to look again ([`Error::Busy`]); only an error
    /// that repeats on the same mapping (EINVAL: a kind userfaultfd refuses; EBUSY: another
    /// userfaultfd owns it) makes the mapping unregistrable, handled by the caller's
    /// [`Unregistrable`] policy. No mapping is ever mirrored without events unless the caller
    /// chose that.
    fn ensure_registered(&self, want: Range) -> Result<(), Error> {
        let addr = want.start();
        {
            let book = self.book();
            let known = |map: &BTreeMap<u64, (u64, u64)>| {
                map.range(..=addr)
                    .next_back()
                    .is_some_and(|(_, &(end, _))| end >= want.end())
            };
            // Refusals are not answered from their records: a mapping we could not register
            // sends us no event when it goes, so a record cannot tell whether the mapping at
            // this address now is the one refused. Registration is tried again every time.
            if known(&book.registered) {
                return Ok(());
            }
        }
        let generation = self.read_gen.load(Ordering::Acquire);
        // The whole VMA (see above). Gone or changed since the caller looked: look again.
        let want = match self.source.mapping(addr) {
            Ok(Some(m)) if m.range.start() <= addr && want.end() <= m.range.end() => m.range,
            Ok(_) => {
                bump(&self.counters.races);
                return Err(Error::Busy { range: want });
            }
            Err(e) => {
                return Err(Error::Source {
                    range: want,
                    source: Box::new(e),
                });
            }
        };
        let mut want = want;
        let mut mode = self.mode_for(want);
        let mut without_wp = false;
        let mut tries = 0;
        loop {
            let err = match self.uffd.register(want, mode) {
                Ok(()) => {
                    let mut book = self.book();
                    // Under the book lock, which the event handlers take to forget records: an
                    // event read from here on is handled after this record is written.
                    if self.read_gen.load(Ordering::Acquire) == generation {
                        carve_gen(&mut book.registered, want.start(), want.end());
                        carve_gen(&mut book.refused, want.start(), want.end());
                        book.registered
                            .insert(want.start(), (want.end(), generation));
                    }
                    drop(book);
                    bump(&self.counters.registrations);
                    if without_wp {
                        bump(&self.counters.without_wp);
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            let now = self.source.mapping(addr).ok().flatten();
            let still = now
                .is_some_and(|m| m.read && m.range.start() <= addr && want.end() <= m.range.end());
            if let Some(m) = now.filter(|m| still && m.page_size > PAGE_SIZE) {
                // hugetlb: userfaultfd registers whole huge pages only
                // (`userfaultfd_register`: the range must be aligned to the VMA's page size).
                let size = m.page_size;
                let wide = Range::new(
                    (want.start() & !(size - 1)).max(m.range.start()),
                    want.end().next_multiple_of(size).min(m.range.end()),
                );
                if let Some(wide) = wide.ok().filter(|w| *w != want) {
                    want = wide;
                    continue;
                }
            }
            // Widened first: an unaligned hugetlb range is refused in every mode, and MISSING
            // mode (the no-WP fallback) cannot be served on hugetlbfs (no UFFDIO_ZEROPAGE).
            if still && err.raw_os_error() == Some(libc::EINVAL) && mode & MODE_WP != 0 {
                // A mapping kind (or kernel) without uffd-wp: register for events anyway.
                mode = (mode & !MODE_WP) | uffd::MODE_MISSING;
                without_wp = true;
                continue;
            }
            if !still {
                // The mapping changed between the caller's lookup and the registration.
                bump(&self.counters.races);
                tracing::debug!(range = %want, %err, "registration raced a mapping change; looking again");
                return Err(Error::Busy { range: want });
            }
            match err.raw_os_error() {
                Some(libc::EINVAL | libc::EBUSY) if tries > 0 => {
                    return self.unregistrable_outcome(want, err);
                }
                _ if tries < REGISTER_TRIES => {
                    // Possibly replaced by a mapping of the same extent meanwhile: once more.
                    tries += 1;
                    mode = self.mode_for(want);
                    without_wp = false;
                }
                _ => {
                    return Err(Error::Source {
                        range: want,
                        source: Box::new(MmError::Register {
                            range: want,
                            source: err,
                        }),
                    });
                }
            }
        }
    }

    /// A mapping userfaultfd cannot register: refused, or mirrored without events, as the
    /// caller chose. Counted once per mapping extent (and once more as mirrored without events
    /// when the policy makes it so), with `Book::refused` recording what was counted.
    fn unregistrable_outcome(&self, want: Range, err: io::Error) -> Result<(), Error> {
        let policy = self.unregistrable_policy();
        let mirrored = policy == Unregistrable::MirrorWithoutEvents;
        let (new, newly_mirrored) = {
            let mut book = self.book();
            let known = book
                .refused
                .get(&want.start())
                .copied()
                .filter(|&(end, _)| end == want.end());
            let new = known.is_none();
            let newly_mirrored = mirrored && known.is_none_or(|(_, m)| m == 0);
            if new || newly_mirrored {
                carve_gen(&mut book.refused, want.start(), want.end());
                book.refused
                    .insert(want.start(), (want.end(), u64::from(mirrored)));
            }
            (new, newly_mirrored)
        };
        if new {
            tracing::debug!(range = %want, %err, ?policy, "userfaultfd cannot register this mapping");
            bump(&self.counters.unregistrable);
        }
        if newly_mirrored {
            bump(&self.counters.without_events);
        }
        match policy {
            Unregistrable::MirrorWithoutEvents => Ok(()),
            Unregistrable::Refuse => Err(Error::Source {
                range: want,
                source: Box::new(MmError::Register {
                    range: want,
                    source: err,
                }),
            }),
        }
    }

    fn unregistrable_policy(&self) -> Unregistrable {
        match self.unregistrable.load(Ordering::Relaxed) {
            1 => Unregistrable::MirrorWithoutEvents,
            _ => Unregistrable::Refuse,
        }
    }

    /// The registration mode for `r`: MISSING as well as WP where pages live on a device, so a
    /// CPU touch still brings them back (registering again replaces the mode).
    pub(crate) fn mode_for(&self, r: Range) -> u64 {
        let migrated = self
            .book()
            .migrated
            .range(r.start()..r.end())
            .next()
            .is_some();
        // Without uffd-wp, MISSING is the mode: a registration needs one, and events flow
        // whatever it is.
        let wp = if self.wp.load(Ordering::Relaxed) {
            MODE_WP
        } else {
            uffd::MODE_MISSING
        };
        if migrated {
            uffd::MODE_MISSING | wp
        } else {
            wp
        }
    }

    /// The monitor read a batch of events.
    pub(crate) fn batch_read(&self) {
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0 += 1;
    }

    /// The monitor finished handling the oldest batch it read and had not handled (batches
    /// are handled in the order they were read).
    pub(crate) fn batch_handled(&self) {
        let mut p = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        p.1 += 1;
        drop(p);
        self.progress_cv.notify_all();
    }

    /// Waits until the monitor has handled every event it has read so far (returns at once
    /// once the monitor has stopped or failed).
    pub(crate) fn wait_handled(&self) {
        let mut p = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        let target = p.0;
        while p.1 < target && !self.failed.load(Ordering::Acquire) {
            p = self
                .progress_cv
                .wait_timeout(p, std::time::Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn check_alive(&self) -> Result<(), Error> {
        if self.failed.load(Ordering::Acquire) {
            Err(Error::Released)
        } else {
            Ok(())
        }
    }

    /// Fails closed: invalidates everything, refuses further faults, and wakes every thread
    /// blocked in a userfaultfd fault on a registered range (each faults again and the monitor,
    /// now draining, answers it), so no CPU thread hangs on a fault nobody will resolve.
    pub(crate) fn fail(&self, why: &str) {
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        tracing::error!(why, "userfaultfd monitor failed; releasing every mirror");
        // Released first: from here on no fault can be programmed, whatever `failed` says.
        let _ = self.notifier.release();
        self.failed.store(true, Ordering::Release);
        self.wake_all();
    }

    /// UFFDIO_WAKE over every registered span.
    pub(crate) fn wake_all(&self) {
        let spans: Vec<(u64, u64)> = self
            .book()
            .registered
            .iter()
            .map(|(s, (e, _))| (*s, *e))
            .collect();
        for (s, e) in spans {
            if let Ok(r) = Range::new(s, e) {
                let _ = self.uffd.wake(r);
            }
        }
    }
}

impl Shared {
    /// Handles one event that is neither a page fault nor a REMOVE (the monitor's handler
    /// holds a REMOVE's invalidation open itself: `handle_remove`).
    pub(crate) fn handle_event(&self, m: &uffd::UffdMsg) -> Result<(), Error> {
        match m.event {
            uffd::EVENT_UNMAP => self.handle_unmap(m.arg[0], m.arg[1]),
            uffd::EVENT_REMAP => self.handle_remap(m.arg[0], m.arg[1], m.arg[2]),
            uffd::EVENT_FORK => {
                self.handle_fork(m.arg[0] as u32);
                Ok(())
            }
            other => {
                tracing::warn!(event = other, "unknown userfaultfd event ignored");
                Ok(())
            }
        }
    }

    pub(crate) fn handle_unmap(&self, start: u64, end: u64) -> Result<(), Error> {
        bump(&self.counters.unmap);
        // The registration records first, before the invalidation: a fault that reads the
        // record after this registers the new mapping; one that read it before is retried by
        // the invalidation's sequence bump (see `ensure_registered`).
        self.forget_registration(start, end);
        if !self.take_expected(uffd::EVENT_UNMAP, start, end) {
            self.invalidate(Range::new(start, end)?, Event::Unmap)?;
        }
        self.forget(start, end);
        Ok(())
    }

    /// A REMOVE (plain madvise DONTNEED, FREE or REMOVE): nothing to do if an SVM API call
    /// caused it; else the range's invalidation, returned open until the zap that follows the
    /// event is seen done (`zap.rs`).
    /// `read_frames`: the frames present when the reader read the event, if it recorded them.
    pub(crate) fn handle_remove(
        &self,
        start: u64,
        end: u64,
        read_frames: Option<Vec<(u64, u64)>>,
    ) -> Result<Option<crate::zap::PendingZap<'_>>, Error> {
        bump(&self.counters.remove);
        if self.take_expected(uffd::EVENT_REMOVE, start, end) {
            // An SVM API call (or a migration) caused it and handles its pages itself.
            return Ok(None);
        }
        self.handle_remove_open(start, end, read_frames)
    }

    /// A mremap moved `[from, from + len)` to `to`. The old range is invalidated as `Unmap`
    /// (devices must lose the old addresses) unless an SVM API call already did. The kernel
    /// follows with an UNMAP of the old range unless the call was MREMAP_DONTUNMAP
    /// (mm/mremap.c): nothing is expected of it here, and if it comes it finds nothing left.
    pub(crate) fn handle_remap(&self, from: u64, to: u64, len: u64) -> Result<(), Error> {
        bump(&self.counters.remap);
        let old = Range::with_len(from, len)?;
        self.forget_registration(from, from + len);
        if !self.take_expected(uffd::EVENT_REMAP, from, from + len) {
            self.invalidate(old, Event::Unmap)?;
        }
        // The registration and any device pages move with the mapping.
        let mut book = self.book();
        carve_gen(&mut book.registered, from, from + len);
        carve_gen(&mut book.refused, from, from + len);
        let moved: Vec<u64> = book
            .migrated
            .range(from..from + len)
            .map(|(a, _)| *a)
            .collect();
        for a in moved {
            if let Some(o) = book.migrated.remove(&a) {
                book.migrated.insert(a - from + to, o);
            }
        }
        book.drop_huge(from, from + len);
        Ok(())
    }

    pub(crate) fn handle_fork(&self, child_uffd: u32) {
        bump(&self.counters.fork);
        // SAFETY: the kernel installed this fd in our table for us with the FORK event; nobody
        // else knows it. Closing it unregisters the child's VMAs: the child is not mirrored.
        drop(unsafe { OwnedFd::from_raw_fd(child_uffd as i32) });
    }
}

pub(crate) fn source_err(addr: u64, e: io::Error) -> Error {
    Error::Source {
        range: Range::with_len(addr & !(PAGE_SIZE - 1), PAGE_SIZE).unwrap_or(Range::FULL),
        source: Box::new(e),
    }
}

/// The calling process's address space, mirrored. See the module documentation.
pub struct ProcessMm {
    pub(crate) shared: Arc<Shared>,
    monitor: Option<crate::monitor::Monitor>,
}

impl std::fmt::Debug for ProcessMm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessMm")
            .field("features", &self.features())
            .field("failed", &self.is_failed())
            .finish()
    }
}

impl ProcessMm {
    /// Opens a userfaultfd, negotiates features, and starts the monitor thread.
    ///
    /// Fails with [`MmError::MissingFeatures`] when the kernel cannot report munmap, madvise and
    /// mremap (EVENT_UNMAP, EVENT_REMOVE, EVENT_REMAP).
    pub fn new() -> Result<Self, MmError> {
        let source = ProcessPageSource::new()?;
        let uffd = Uffd::open(feature::WANTED)?;
        let missing = feature::REQUIRED & !uffd.features;
        if missing != 0 {
            return Err(MmError::MissingFeatures {
                missing: uffd::feature_names(missing),
            });
        }
        let wp = uffd.offered & feature::PAGEFAULT_FLAG_WP != 0;
        let page_flags = source
            .frames_visible()
            .then(crate::pagemap::PageFlags::open)
            .flatten();
        let shared = Arc::new(Shared {
            notifier: Notifier::new(),
            source,
            uffd,
            book: Mutex::new(Book::default()),
            failed: AtomicBool::new(false),
            counters: Counters::default(),
            queue: crate::monitor::Queue::new().map_err(|source| MmError::Monitor { source })?,
            page_flags,
            progress: Mutex::new((0, 0)),
            progress_cv: Condvar::new(),
            read_gen: AtomicU64::new(0),
            returned: Condvar::new(),
            suspects: crate::zap::Suspects::default(),
            unregistrable: AtomicU8::new(0),
            wp: AtomicBool::new(wp),
            tracking: AtomicBool::new(false),
        });
        let monitor = crate::monitor::Monitor::start(shared.clone())?;
        tracing::debug!(features = ?uffd::feature_names(shared.uffd.features), "process mm ready");
        Ok(ProcessMm {
            shared,
            monitor: Some(monitor),
        })
    }

    /// The address space's notifier: backends subscribe here.
    pub fn notifier(&self) -> &Notifier {
        &self.shared.notifier
    }

    /// What the kernel granted.
    pub fn features(&self) -> MmFeatures {
        MmFeatures {
            uffd_features: self.shared.uffd.features,
            uffd_feature_names: uffd::feature_names(self.shared.uffd.features),
            uffd_offered: self.shared.uffd.offered,
            access: self.shared.uffd.access,
            page_source: self.shared.source.features(),
        }
    }

    /// Whether the monitor failed and everything was released.
    pub fn is_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Makes the monitor thread fail, as a dying userfaultfd would: for tests that svmirror fails
    /// closed. Returns once the failure has been handled.
    #[doc(hidden)]
    pub fn inject_monitor_failure(&self) {
        if let Some(m) = &self.monitor {
            m.inject_failure();
        }
        while !self.is_failed() {
            std::thread::yield_now();
        }
    }

    /// The counters.
    pub fn stats(&self) -> MmStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MmStats {
            unmap_events: l(&c.unmap),
            remove_events: l(&c.remove),
            remap_events: l(&c.remap),
            fork_events: l(&c.fork),
            missing_faults: l(&c.missing),
            events_covered_by_api: l(&c.covered),
            registrations: l(&c.registrations),
            unregistrable: l(&c.unregistrable),
            mirrored_without_events: l(&c.without_events),
            registration_races: l(&c.races),
            registered_without_wp: l(&c.without_wp),
            fill_eagain: l(&c.fill_eagain),
            zap_waits: l(&c.zap_waits),
            zap_timeouts: l(&c.zap_timeouts),
            zap_suspects: l(&c.zap_suspects),
            zap_suspects_expired: l(&c.zap_suspects_expired),
            migrated_back_cpu: l(&c.back_cpu),
            migrated_back_device: l(&c.back_device),
            migrated_back_requested: l(&c.back_requested),
            settles: l(&c.settles),
            settle_waits: l(&c.settle_waits),
            huge_splits: l(&c.huge_splits),
        }
    }

    /// Sets what happens to mappings userfaultfd cannot register (see [`Unregistrable`]);
    /// applies to faults from now on.
    pub fn set_unregistrable(&self, policy: Unregistrable) {
        let v = match policy {
            Unregistrable::Refuse => 0,
            Unregistrable::MirrorWithoutEvents => 1,
        };
        self.shared.unregistrable.store(v, Ordering::Relaxed);
    }

    /// What happens to mappings userfaultfd cannot register.
    pub fn unregistrable(&self) -> Unregistrable {
        self.shared.unregistrable_policy()
    }

    /// Registers the mappings covering `range` for events now, rather than at the first device
    /// fault. Errors: part of the range is not mapped, it is already registered, or userfaultfd
    /// refuses the mapping kind.
    pub fn register(&self, range: Range) -> Result<(), MmError> {
        self.shared.check_alive().map_err(MmError::Core)?;
        let mut addr = range.start();
        while addr < range.end() {
            let m = self.mapping_at(addr)?;
            {
                let book = self.shared.book();
                if let Some((s, e)) = span_containing(&book.registered, addr) {
                    return Err(MmError::AlreadyRegistered {
                        range: Range::new(s, e).unwrap_or(range),
                    });
                }
            }
            let r = m.range;
            self.shared
                .uffd
                .register(r, self.shared.mode_for(r))
                .map_err(|source| MmError::Register { range: r, source })?;
            let generation = self.shared.read_gen.load(Ordering::Acquire);
            self.shared
                .book()
                .registered
                .insert(r.start(), (r.end(), generation));
            bump(&self.shared.counters.registrations);
            addr = r.end();
        }
        Ok(())
    }

    pub(crate) fn mapping_at(&self, addr: u64) -> Result<crate::Mapping, MmError> {
        match self.shared.source.mapping(addr)? {
            Some(m) if m.range.start() <= addr => Ok(m),
            _ => Err(MmError::NotMapped { addr }),
        }
    }

    /// Checks that every page of `range` is mapped.
    pub(crate) fn check_mapped(&self, range: Range) -> Result<(), MmError> {
        let mut addr = range.start();
        while addr < range.end() {
            addr = self.mapping_at(addr)?.range.end();
        }
        Ok(())
    }

    /// Records that the calling SVM API call is about to cause `event` over `[start, end)`.
    /// Call it only once the call's own invalidation of that range has started (see
    /// [`Expected`]), and drop the guard before that invalidation ends.
    pub(crate) fn expect(&self, event: u8, start: u64, end: u64) -> ExpectGuard<'_> {
        let mut book = self.shared.book();
        let id = book.next_expect_id;
        book.next_expect_id += 1;
        book.expected.push(Expected {
            event,
            start,
            end,
            id,
        });
        ExpectGuard { mm: self, id }
    }

    pub(crate) fn invalidate(
        &self,
        r: Range,
        event: Event,
    ) -> Result<svmirror_core::Invalidation<'_>, MmError> {
        let widened = self.shared.widen(r);
        self.shared
            .notifier
            .invalidate_range_start(NotifierRange::new(widened, event))
            .map_err(MmError::Core)
    }

    pub(crate) fn forget(&self, start: u64, end: u64) {
        self.shared.forget(start, end);
    }

    pub(crate) fn book_migrate(&self, page: u64, owner: Arc<dyn DevicePages>, write: bool) {
        self.shared.book().migrated.insert(
            page,
            OnDevice {
                owner,
                key: page,
                write,
            },
        );
    }

    /// Takes write access away from the device-private entries of `range` (an SVM API
    /// mprotect without write). Never given back: as the kernel's, a write brings the page
    /// home, where it is writable again.
    pub(crate) fn write_protect_migrated(&self, range: Range) {
        for (_, d) in self
            .shared
            .book()
            .migrated
            .range_mut(range.start()..range.end())
        {
            d.write = false;
        }
    }

    /// Records that `r` is registered with the userfaultfd (a registration made outside
    /// `ensure_registered`, e.g. by a migration).
    pub(crate) fn record_registered(&self, r: Range) {
        let generation = self.shared.read_gen.load(Ordering::Acquire);
        let mut book = self.shared.book();
        carve_gen(&mut book.registered, r.start(), r.end());
        book.registered.insert(r.start(), (r.end(), generation));
    }

    pub(crate) fn migrated_owner(&self, page: u64) -> Option<Arc<dyn DevicePages>> {
        self.shared
            .book()
            .migrated
            .get(&page)
            .map(|d| d.owner.clone())
    }

    pub(crate) fn uffd(&self) -> &Uffd {
        &self.shared.uffd
    }
}

/// Drops what is left of an SVM API call's expectations when the call returns.
pub(crate) struct ExpectGuard<'a> {
    mm: &'a ProcessMm,
    id: u64,
}

impl Drop for ExpectGuard<'_> {
    fn drop(&mut self) {
        // The syscall has returned, so every event it caused has been read (munmap and madvise
        // wait for the read in `userfaultfd_event_wait_completion`, mremap in
        // `mremap_userfaultfd_complete` / `userfaultfd_unmap_complete`). Once the monitor has
        // handled what it read, anything still expected was never sent: drop it, so it cannot
        // swallow a later, real event.
        self.mm.shared.wait_handled();
        self.mm.shared.book().expected.retain(|x| x.id != self.id);
    }
}

impl Drop for ProcessMm {
    fn drop(&mut self) {
        if let Some(m) = self.monitor.take() {
            m.stop();
        }
    }
}

impl PageSource for ProcessMm {
    fn area(&self, addr: u64, limit: u64) -> Result<Area, Error> {
        self.shared.check_alive()?;
        let area = self.shared.source.area(addr, limit)?;
        if let (AreaKind::Mapped { read: true, .. }, Ok(want)) =
            (area.kind, Range::new(addr, area.end))
        {
            self.shared.ensure_registered(want)?;
        }
        Ok(area)
    }

    fn snapshot(&self, addr: u64, out: &mut [CpuPte]) -> Result<(), Error> {
        self.shared.check_alive()?;
        let end = addr.saturating_add((out.len() as u64) << PAGE_SHIFT);
        // A page a plain madvise may still drop is not reported until it has (`zap.rs`).
        self.shared.suspects.wait(addr, end);
        self.shared.source.snapshot(addr, out)?;
        let mut huge = Vec::new();
        for (i, pte) in out.iter().enumerate() {
            if let CpuPte::Present { order, .. } = pte {
                if *order > 0 {
                    let size = PAGE_SIZE << order;
                    let w = (addr + ((i as u64) << PAGE_SHIFT)) & !(size - 1);
                    if huge.last() != Some(&(w, size)) {
                        huge.push((w, size));
                    }
                }
            }
        }
        let migrated: Vec<(u64, u64, Owner, bool)> = {
            let mut book = self.shared.book();
            for (w, size) in huge {
                book.huge.insert(w, size);
            }
            book.migrated
                .range(addr..end)
                .map(|(&page, d)| (page, d.owner.device_pfn(d.key), d.owner.owner(), d.write))
                .collect()
        };
        // A device-private entry is writable only while its mapping is: a plain mprotect sends
        // no event, so the mapping's protection is looked up here (the kernel's entry would
        // have been made read-only by it, mm/mprotect.c).
        // The pages come in address order: one lookup per mapping.
        let mut vma: Option<Area> = None;
        for (page, pfn, owner, write) in migrated {
            let i = ((page - addr) >> PAGE_SHIFT) as usize;
            if out[i] != CpuPte::None {
                continue;
            }
            if vma.is_none_or(|a| page >= a.end) {
                vma = Some(self.shared.source.area(page, end)?);
            }
            let vma_write = matches!(
                vma,
                Some(Area {
                    kind: AreaKind::Mapped { write: true, .. },
                    ..
                })
            );
            out[i] = CpuPte::DevicePrivate {
                pfn,
                owner,
                write: write && vma_write,
            };
        }
        Ok(())
    }

    /// Waits until the monitor has handled every UNMAP, REMOVE or REMAP over `range` that it
    /// has read (so whose syscall may have returned).
    fn settle(&self, range: Range) -> Result<u64, Error> {
        self.shared.check_alive()?;
        let (at, waited) = self.shared.queue.settle(range.start(), range.end());
        let c = &self.shared.counters;
        bump(&c.settles);
        if waited {
            bump(&c.settle_waits);
        }
        Ok(at)
    }

    /// Whether the monitor has read an UNMAP, REMOVE or REMAP over `range` since
    /// [`settle`](PageSource::settle) returned `since`.
    fn changed_since(&self, range: Range, since: u64) -> bool {
        self.shared
            .queue
            .changed_since(since, range.start(), range.end())
    }

    fn fault(&self, range: Range, write: bool) -> Result<(), Error> {
        self.shared.check_alive()?;
        let on_device = self
            .shared
            .book()
            .migrated
            .range(range.start()..range.end())
            .next()
            .is_some();
        if write && on_device {
            // A write to a read-only mapping is refused before anything moves (mm/hmm.c
            // `hmm_vma_fault` returns EPERM without VM_WRITE): a page on a device stays there.
            let mut at = range.start();
            while at < range.end() {
                let a = self.shared.source.area(at, range.end())?;
                match a.kind {
                    AreaKind::Mapped {
                        read: true,
                        write: false,
                    } => {
                        return Err(Error::WriteToReadOnly { addr: at });
                    }
                    AreaKind::Mapped {
                        read: true,
                        write: true,
                    } => {}
                    // The populate explains a hole, PROT_NONE or an I/O area.
                    _ => break,
                }
                at = a.end;
            }
        }
        // Pages living on a device come back from here, not through a kernel fault (which a
        // user-mode-only userfaultfd would refuse); only the pages this fault asked for (the
        // kernel's `migrate_to_ram` moves the one faulting page).
        self.shared.bring_back_range(range, BackCause::Device)?;
        self.shared.source.fault(range, write)
    }

    /// Lifts write tracking's protection from the huge pages of `range` that the CPU maps
    /// huge, each whole, and returns them (for [`after_pin`](PageSource::after_pin)).
    ///
    /// Why: a device pin is taken for writing (io_uring, like VFIO, pins with `FOLL_WRITE`),
    /// so GUP meets a write-protected huge PMD (`can_follow_write_pmd` refuses it) and faults
    /// it for writing, and under userfaultfd's asynchronous write-protect mode the kernel
    /// resolves that fault by splitting the PMD (mm/memory.c `wp_huge_pmd`: a uffd-wp PMD in
    /// a `WP_ASYNC` context goes to `__split_huge_pmd` and the fault is retried on 4 KiB
    /// entries). A device that only read the memory split the CPU's huge page. Lifting the
    /// protection from the whole huge page first goes through `change_huge_pmd`, which keeps
    /// the PMD whole when the range covers it (mm/mprotect.c `change_pmd_range` splits only a
    /// partial range), and tracking loses nothing: the pin's fault would have lifted it from
    /// every page it pinned, and pages pinned for writing may be written by the device
    /// anyway, so all of them read as written at the next [`ProcessMm::collect_writes`].
    ///
    /// Linux's own `hmm_range_fault` never write-faults a page to read it; svmirror needs the
    /// pin (DESIGN.md invariant 2), and this keeps the pin from costing the huge page.
    fn before_pin(&self, range: Range) -> Result<Vec<Range>, Error> {
        self.shared.check_alive()?;
        // Huge pages seen here (the fault's snapshot just recorded them): nothing to do, and
        // no system call, for a run of base pages.
        let seen: Vec<(u64, u64)> = {
            let book = self.shared.book();
            let from = range.start().saturating_sub(1 << 30);
            book.huge
                .range(from..range.end())
                .filter(|(w, size)| **w + **size > range.start())
                .map(|(w, size)| (*w, *size))
                .collect()
        };
        let tracking = self.shared.tracking.load(Ordering::Relaxed);
        let mut huge = Vec::new();
        for (w, _) in seen {
            let Some(h) = self.shared.huge_page_at(w.max(range.start())) else {
                continue;
            };
            if tracking {
                // Fails where the range is not registered in write-protect mode (nothing is
                // protected there) or while an event is queued unread (EAGAIN): the pin then
                // splits the page, and `after_pin` counts it.
                if let Err(e) = self.shared.uffd.write_unprotect(h) {
                    tracing::debug!(huge_page = %h, %e, "write protection not lifted before a pin");
                }
            }
            huge.push(h);
        }
        Ok(huge)
    }

    /// Counts the huge pages the pin split anyway: one shared copy-on-write with a forked
    /// child must be unshared for the pin, and the kernel unshares a PMD-mapped THP by
    /// splitting it (mm/huge_memory.c `do_huge_pmd_wp_page`, its `fallback` path).
    fn after_pin(&self, huge: &[Range]) {
        self.shared.count_splits(huge, "device pin");
    }
}
