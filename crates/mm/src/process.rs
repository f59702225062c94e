//! [`ProcessMm`]: the calling process's address space, watched through a userfaultfd.
//!
//! One per process. It owns the [`Notifier`] that backends subscribe to, a userfaultfd, and a
//! monitor thread that turns the kernel's userfaultfd events into invalidations with their
//! reason, and it is the [`PageSource`] backends fault through: the real page table
//! ([`ProcessPageSource`]) plus what only svmirror knows (pages that live on a device, which VMAs
//! are registered, where huge pages were seen).
//!
//! # What it sees (DESIGN.md, "What userspace can and cannot see")
//!
//! | CPU change | event | invalidation |
//! |---|---|---|
//! | munmap (also mmap MAP_FIXED over a mapping, mremap shrinking) | UNMAP, after the unmap | `Unmap` |
//! | madvise DONTNEED / FREE / REMOVE | REMOVE, before the zap | `Clear` |
//! | mremap moving a mapping | REMAP, after the move | `Unmap` of the old range |
//! | fork | not asked for (see [`uffd_feature::WANTED`](crate::uffd_feature::WANTED)) | none: see below |
//! | the same through [`ProcessMm::munmap`] and friends | the API brackets the syscall | before the change |
//! | mprotect, MADV_PAGEOUT, swap, migration, KSM, THP collapse | nothing | only through the API |
//!
//! Events are delivered only for registered VMAs. A VMA is registered when a backend first
//! faults an address in it (or through [`ProcessMm::register`]); VMAs userfaultfd cannot register
//! (private file mappings) are mirrored without events, safe through pins and coherent only
//! through the SVM API. Every invalidation that touches a window where a huge page was seen is
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
//! If the monitor thread fails (a read error on the userfaultfd, a panic in a callback), it
//! releases the notifier (every subscription invalidated with `Release`), closes the
//! userfaultfd so no thread stays blocked on an unread event, and every later fault is refused
//! with [`Error::Released`].

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use svmirror_core::{
    Area, AreaKind, CpuPte, Error, Event, Notifier, NotifierRange, Owner, PAGE_SHIFT, PAGE_SIZE,
    PageSource, Range,
};

use crate::error::MmError;
use crate::uffd::{self, MODE_WP, Uffd, UffdAccess, feature};
use crate::{PageSourceFeatures, ProcessPageSource};

/// A backend's device memory, holding pages migrated out of the process
/// (the kernel's device-private pages with their `migrate_to_ram`).
pub trait DevicePages: Send + Sync {
    /// The driver's identity: its own `Migrate` invalidations carry it, and `range_fault` with
    /// this owner reports its pages instead of faulting them back.
    fn owner(&self) -> Owner;

    /// Copies the page that lived at `addr` into the device's memory. `src` is the CPU page,
    /// readable for `PAGE_SIZE` bytes until this returns; read it with volatile or `copy`
    /// operations only.
    fn copy_out(&self, addr: u64, src: *const u8) -> Result<(), Error>;

    /// The CPU touched the page copied out from `addr`: write the page's contents to `dst`
    /// (`PAGE_SIZE` writable bytes) and free the device copy. `addr` here, in
    /// [`device_pfn`](Self::device_pfn) and in [`discard`](Self::discard) is always the address
    /// the page was copied out from, even after a mremap moved it.
    fn copy_back(&self, addr: u64, dst: *mut u8) -> Result<(), Error>;

    /// The device page's frame number, reported in `range_fault` entries for its owner.
    fn device_pfn(&self, addr: u64) -> u64;

    /// The CPU dropped `addr` (munmap, madvise DONTNEED) while it lived on the device: free it.
    fn discard(&self, addr: u64);

    /// The event that invalidates a page moving into this memory and back: `Migrate` with the
    /// owner for device memory (the default), `Exclusive` with the owner for memory that holds
    /// pages a device has exclusive (atomic) access to, as the kernel's
    /// `make_device_exclusive` and the CPU fault that revokes it do.
    fn event(&self) -> Event {
        Event::Migrate {
            owner: self.owner(),
        }
    }
}

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
    /// VMAs that userfaultfd refused (mirrored without events).
    pub unregistrable: u64,
}

#[derive(Default)]
struct Counters {
    unmap: AtomicU64,
    remove: AtomicU64,
    remap: AtomicU64,
    fork: AtomicU64,
    missing: AtomicU64,
    covered: AtomicU64,
    registrations: AtomicU64,
    unregistrable: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How long an expected event may stay unclaimed.
const EXPECTATION_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// An event an SVM API call is about to cause and has already invalidated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expected {
    event: u8,
    start: u64,
    end: u64,
}

/// Bookkeeping under one lock. Lock order: this lock is never held while the notifier runs
/// callbacks or while a system call that may wait for the monitor (munmap, madvise, mremap)
/// runs.
#[derive(Default)]
struct Book {
    /// Spans registered with the userfaultfd: start → (end, read generation when registered).
    registered: BTreeMap<u64, (u64, u64)>,
    /// Spans userfaultfd refused: start → (end, read generation).
    refused: BTreeMap<u64, (u64, u64)>,
    /// Windows where a huge page was seen: aligned start → size.
    huge: BTreeMap<u64, u64>,
    /// Events SVM API calls are causing right now, and when each was announced.
    expected: Vec<Expected>,
    expected_at: Vec<std::time::Instant>,
    /// Pages living in device memory: page address → owner and key.
    migrated: BTreeMap<u64, OnDevice>,
}

/// A page living in device memory: its owner, and the address the page had when it migrated,
/// by which the owner knows it (a mremap moves the page's address, not the device's copy).
#[derive(Clone)]
struct OnDevice {
    owner: Arc<dyn DevicePages>,
    key: u64,
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
    counters: Counters,
    /// Batches of events read / fully handled by the monitor: `(read, handled)`. An SVM API
    /// call whose syscall has returned knows its event (if any) has been read, and waits until
    /// `handled` catches up with `read` before it forgets what it expected.
    progress: Mutex<(u64, u64)>,
    progress_cv: Condvar,
    /// Bumped by the monitor right before and right after every read of the userfaultfd.
    pub(crate) read_gen: AtomicU64,
    /// Serialises bringing pages back from devices.
    returning: Mutex<()>,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The range to invalidate for a change of `r`: widened over every huge page seen there.
    fn widen(&self, r: Range) -> Range {
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

    /// Runs one invalidation of `r` (widened) for `event`.
    fn invalidate(&self, r: Range, event: Event) -> Result<(), Error> {
        let widened = self.widen(r);
        self.notifier
            .invalidate_range_start(NotifierRange::new(widened, event))?
            .end();
        Ok(())
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
        // An expectation whose event never came (our registration record was stale) must not
        // linger and swallow a later, real event: they expire after a second.
        let now = std::time::Instant::now();
        let mut i = 0;
        while i < book.expected.len() {
            if now.duration_since(book.expected_at[i]) > EXPECTATION_TTL {
                book.expected.swap_remove(i);
                book.expected_at.swap_remove(i);
            } else {
                i += 1;
            }
        }
        let Some(i) = book
            .expected
            .iter()
            .position(|e| e.event == event && e.start <= start && end <= e.end)
        else {
            return false;
        };
        let e = book.expected.swap_remove(i);
        let at = book.expected_at.swap_remove(i);
        for (s, t) in [(e.start, start), (end, e.end)] {
            if s < t {
                book.expected.push(Expected {
                    event,
                    start: s,
                    end: t,
                });
                book.expected_at.push(at);
            }
        }
        bump(&self.counters.covered);
        true
    }

    /// Registers `want` (part of one readable mapping, as `area` just reported it) for events,
    /// unless a record says it is registered and nothing has been read from the userfaultfd
    /// since. It reuses the caller's mapping lookup: no second PROCMAP_QUERY on the fault path.
    ///
    /// Only what a device faults is registered, never the rest of its VMA: anonymous VMAs merge
    /// with their neighbours, and registering a whole one could take in unrelated memory, even
    /// the monitor's own allocations (whose munmap would then wait for the monitor itself).
    ///
    /// A record can go stale without our knowing at once: munmap returns as soon as the monitor
    /// has read its event, before the bookkeeping is updated, so a new mapping can appear where a
    /// recorded one was. Records therefore carry the userfaultfd read generation they were made
    /// in, and any read since (the monitor bumps the generation before and after each read)
    /// makes the next fault register again; registering twice with the same userfaultfd is
    /// harmless.
    fn ensure_registered(&self, want: Range) {
        let addr = want.start();
        let generation = self.read_gen.load(Ordering::Acquire);
        {
            let book = self.book();
            let fresh = |map: &BTreeMap<u64, (u64, u64)>| {
                map.range(..=addr)
                    .next_back()
                    .is_some_and(|(_, &(end, g))| end >= want.end() && g == generation)
            };
            if fresh(&book.registered) || fresh(&book.refused) {
                return;
            }
        }
        match self.uffd.register(want, self.mode_for(want)) {
            Ok(()) => {
                let mut book = self.book();
                carve_gen(&mut book.registered, want.start(), want.end());
                book.registered
                    .insert(want.start(), (want.end(), generation));
                bump(&self.counters.registrations);
            }
            // Not a kind userfaultfd supports (a private file mapping): mirrored without events.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(range = %want, %e, "userfaultfd cannot register this mapping; mirrored without events");
                let mut book = self.book();
                carve_gen(&mut book.refused, want.start(), want.end());
                book.refused.insert(want.start(), (want.end(), generation));
                bump(&self.counters.unregistrable);
            }
            // The mapping changed under us (unmapped meanwhile): the next lookup tries again.
            Err(e) => tracing::debug!(range = %want, %e, "registration raced a mapping change"),
        }
    }

    /// The registration mode for `r`: MISSING as well as WP where pages live on a device, so a
    /// CPU touch still brings them back (registering again replaces the mode).
    pub(crate) fn mode_for(&self, r: Range) -> u64 {
        if self
            .book()
            .migrated
            .range(r.start()..r.end())
            .next()
            .is_some()
        {
            uffd::MODE_MISSING | MODE_WP
        } else {
            MODE_WP
        }
    }

    /// The monitor read a batch of events.
    pub(crate) fn batch_read(&self) {
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0 += 1;
    }

    /// The monitor finished handling the batch it read last.
    pub(crate) fn batch_handled(&self) {
        let mut p = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        p.1 = p.0;
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

    /// Fails closed: invalidates everything, refuses further faults.
    pub(crate) fn fail(&self, why: &str) {
        tracing::error!(why, "userfaultfd monitor failed; releasing every mirror");
        // Released first: from here on no fault can be programmed, whatever `failed` says.
        let _ = self.notifier.release();
        self.failed.store(true, Ordering::Release);
    }
}

impl Shared {
    pub(crate) fn handle_unmap(&self, start: u64, end: u64) -> Result<(), Error> {
        bump(&self.counters.unmap);
        if !self.take_expected(uffd::EVENT_UNMAP, start, end) {
            self.invalidate(Range::new(start, end)?, Event::Unmap)?;
        }
        self.forget(start, end);
        Ok(())
    }

    pub(crate) fn handle_remove(&self, start: u64, end: u64) -> Result<(), Error> {
        bump(&self.counters.remove);
        if self.take_expected(uffd::EVENT_REMOVE, start, end) {
            // An SVM API call (or a migration) caused it and handles its pages itself.
            return Ok(());
        }
        self.invalidate(Range::new(start, end)?, Event::Clear)?;
        // The pages are being dropped: any that lived on a device are discarded with them.
        self.discard_migrated(start, end);
        Ok(())
    }

    pub(crate) fn handle_remap(&self, from: u64, to: u64, len: u64) -> Result<(), Error> {
        bump(&self.counters.remap);
        let old = Range::with_len(from, len)?;
        if !self.take_expected(uffd::EVENT_REMAP, from, from + len) {
            self.invalidate(old, Event::Unmap)?;
            // The same mremap sends an UNMAP of the old range next (the kernel completes both
            // events from the mremap before it returns): it is already invalidated.
            let mut book = self.book();
            book.expected.push(Expected {
                event: uffd::EVENT_UNMAP,
                start: from,
                end: from + len,
            });
            book.expected_at.push(std::time::Instant::now());
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

    /// A missing fault: bring the page back from its device, or zero-fill a page never migrated.
    pub(crate) fn handle_missing(&self, addr: u64, buf: *mut u8) -> Result<(), Error> {
        bump(&self.counters.missing);
        let page = addr & !(PAGE_SIZE - 1);
        if self.bring_back(page, buf)? {
            return Ok(());
        }
        // Never migrated (or already back): a zero page; EEXIST if someone mapped it meanwhile.
        self.uffd.zero_page(page).map_err(|e| source_err(page, e))
    }

    /// Brings the migrated page at `page` back from its device, if it is still there: a
    /// `Migrate` invalidation by its owner, the owner's copy into `buf`, UFFDIO_COPY (which
    /// needs no pending fault, so it works for the monitor and for callers alike, privileged or
    /// not). One bring-back at a time, so the monitor never zero-fills a page that another
    /// thread is bringing back. Returns whether this call brought it back.
    pub(crate) fn bring_back(&self, page: u64, buf: *mut u8) -> Result<bool, Error> {
        let _one = self
            .returning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(d) = self.book().migrated.get(&page).cloned() else {
            return Ok(false);
        };
        let r = Range::with_len(page, PAGE_SIZE)?;
        let inv = self
            .notifier
            .invalidate_range_start(NotifierRange::new(r, d.owner.event()))?;
        d.owner.copy_back(d.key, buf)?;
        // Unbooked before it is mapped: a thread woken by the copy must not find it "on the
        // device" any more.
        self.book().migrated.remove(&page);
        // SAFETY: `buf` is a page-sized buffer of our own (the monitor's, or a bounce page),
        // never monitored memory.
        unsafe { self.uffd.copy_page(page, buf) }.map_err(|e| source_err(page, e))?;
        inv.end();
        Ok(true)
    }

    /// Brings back every migrated page of `range` from the calling thread, through a bounce
    /// page of its own; returns how many came back.
    pub(crate) fn bring_back_range(&self, range: Range) -> Result<u64, Error> {
        let pages: Vec<u64> = self
            .book()
            .migrated
            .range(range.start()..range.end())
            .map(|(a, _)| *a)
            .collect();
        if pages.is_empty() {
            return Ok(0);
        }
        let bounce = crate::monitor::Bounce::new().map_err(|e| source_err(range.start(), e))?;
        let mut back = 0;
        for page in pages {
            if self.bring_back(page, bounce.ptr())? {
                back += 1;
            }
        }
        Ok(back)
    }
}

fn source_err(addr: u64, e: io::Error) -> Error {
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
        let shared = Arc::new(Shared {
            notifier: Notifier::new(),
            source,
            uffd,
            book: Mutex::new(Book::default()),
            failed: AtomicBool::new(false),
            counters: Counters::default(),
            progress: Mutex::new((0, 0)),
            progress_cv: Condvar::new(),
            read_gen: AtomicU64::new(0),
            returning: Mutex::new(()),
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
        }
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

    pub(crate) fn expect(&self, event: u8, start: u64, end: u64) -> ExpectGuard<'_> {
        let e = Expected { event, start, end };
        let mut book = self.shared.book();
        // The kernel sends the event only if part of the range is registered. Then the
        // expectation stays until the monitor consumes it (the syscall returns as soon as the
        // event is read, possibly before the monitor looks at it); otherwise it goes with the
        // guard.
        let registered = book.registered.range(..end).any(|(_, (e, _))| *e > start);
        book.expected.push(e);
        book.expected_at.push(std::time::Instant::now());
        ExpectGuard {
            mm: self,
            e,
            keep: registered,
        }
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

    pub(crate) fn book_migrate(&self, page: u64, owner: Arc<dyn DevicePages>) {
        self.shared
            .book()
            .migrated
            .insert(page, OnDevice { owner, key: page });
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

/// Removes an expected event the kernel will not send (the range was not registered).
pub(crate) struct ExpectGuard<'a> {
    mm: &'a ProcessMm,
    e: Expected,
    keep: bool,
}

impl Drop for ExpectGuard<'_> {
    fn drop(&mut self) {
        // The syscall has returned, so its event, if the kernel sent one, has been read; give
        // the monitor the chance to finish handling it before returning to the caller.
        self.mm.shared.wait_handled();
        if self.keep {
            return;
        }
        let mut book = self.mm.shared.book();
        let e = self.e;
        let mut i = 0;
        while i < book.expected.len() {
            let x = book.expected[i];
            if x.event == e.event && e.start <= x.start && x.end <= e.end {
                book.expected.swap_remove(i);
                book.expected_at.swap_remove(i);
            } else {
                i += 1;
            }
        }
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
            self.shared.ensure_registered(want);
        }
        Ok(area)
    }

    fn snapshot(&self, addr: u64, out: &mut [CpuPte]) -> Result<(), Error> {
        self.shared.check_alive()?;
        self.shared.source.snapshot(addr, out)?;
        let end = addr + ((out.len() as u64) << PAGE_SHIFT);
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
        let mut book = self.shared.book();
        for (w, size) in huge {
            book.huge.insert(w, size);
        }
        for (&page, d) in book.migrated.range(addr..end) {
            let i = ((page - addr) >> PAGE_SHIFT) as usize;
            if out[i] == CpuPte::None {
                out[i] = CpuPte::DevicePrivate {
                    pfn: d.owner.device_pfn(d.key),
                    owner: d.owner.owner(),
                    write: true,
                };
            }
        }
        Ok(())
    }

    fn fault(&self, range: Range, write: bool) -> Result<(), Error> {
        self.shared.check_alive()?;
        // Pages living on a device come back from here, not through a kernel fault (which a
        // user-mode-only userfaultfd would refuse).
        self.shared.bring_back_range(range)?;
        self.shared.source.fault(range, write)
    }
}
