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
//!
//! # Modules
//!
//! This file is the API: [`ProcessMm`], its constructor, registration, counters and the
//! [`PageSource`] impl; `svm.rs`, `migrate.rs` and `writes.rs` add the SVM API, migration and
//! write tracking to it. What runs behind it is split so that every dependency goes down this
//! list, never up (`*`: calls methods that module defines on `Shared`, without importing it):
//!
//! ```text
//! process  ─► monitor, register, fill*, shared, book      the API
//! monitor  ─► events*, zap, fill, shared, queue, buffers  the reader and handler threads
//! events   ─► zap, shared, book                           UNMAP, REMAP, FORK, a REMOVE's start
//! zap      ─► shared, queue                               the REMOVE hold
//! fill     ─► shared, book, buffers                       missing faults, pages back
//! register ─► shared, book                                registering VMAs for events
//! shared   ─► book, queue                                 the state all of these share
//! queue    ─► buffers                                     the reader-to-handler ring
//! book                                                    the page book
//! buffers                                                 mappings of our own
//! ```
//!
//! Below all of them sit the kernel interfaces (`uffd`, `pagemap`, `maps`, `populate`, `uapi`),
//! the errors and the crate root's [`ProcessPageSource`]. The layers below the API each add
//! methods to `Shared` in an `impl` block of their own, and none of them calls a method that a
//! layer above it defines.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use svmirror_core::{
    Area, AreaKind, CpuPte, Error, Event, Notifier, NotifierRange, Owner, PAGE_SHIFT, PAGE_SIZE,
    PageSource, Range,
};

use crate::book::{BackCause, DevicePages, Expected, OnDevice, carve_gen, span_containing};
use crate::error::MmError;
use crate::monitor::Monitor;
use crate::register::Unregistrable;
use crate::shared::{Shared, bump};
use crate::uffd::{self, Uffd, UffdAccess, feature};
use crate::{PageSourceFeatures, ProcessPageSource};

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
    /// Absent pages of a plain madvise's REMOVE at which the monitor's reader mapped the zero
    /// page as it read the event, so that the zap to come shows when it came (see `zap.rs`,
    /// "absent pages"): device faults on them wait until it did.
    pub zap_markers: u64,
    /// Of those, how many no zap dropped within both limits (`ZAP_WAIT` and
    /// `ZAP_SUSPECT_WAIT`): a MADV_FREE (which leaves the zero page), a marker mapped after the
    /// zap had passed, or a caller kept off the CPU for longer.
    pub zap_markers_expired: u64,
    /// Markers cleared because their REMOVE's hold saw the caller's walk pass them (a page
    /// above them dropped or marked lazy-free): a MADV_FREE keeps the zero page, and faults on
    /// it need not wait for a zap that is not coming.
    pub zap_markers_passed: u64,
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
    /// Time SVM API calls spent, after their syscall returned, waiting until the monitor had
    /// handled the events it had read (so that what the call expected and never came can be
    /// dropped): summed over the calls.
    pub expect_wait: std::time::Duration,
}

/// The calling process's address space, mirrored. See the module documentation.
pub struct ProcessMm {
    pub(crate) shared: Arc<Shared>,
    monitor: Option<Monitor>,
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
        let shared = Arc::new(Shared::new(source, uffd, page_flags, wp)?);
        let monitor = Monitor::start(shared.clone())?;
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

    /// Returns once the monitor has handled every event it has read, which includes every
    /// event of a munmap, madvise or mremap that has returned (each waits for its event to be
    /// read): a barrier for callers that act on what plain calls changed. Returns at once if
    /// the monitor has stopped or failed.
    pub fn sync_events(&self) {
        self.shared.wait_handled();
    }

    /// Test hook: `hook` runs before each attempt to register a mapping with the userfaultfd,
    /// given the range about to be registered, on the faulting thread, with no lock of
    /// svmirror's held (`None` removes it). For tests that force a mapping change into the
    /// window between a fault's lookup and its registration; not for production use.
    #[doc(hidden)]
    pub fn set_register_hook(&self, hook: Option<Box<dyn FnMut(Range) + Send>>) {
        *self
            .shared
            .register_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hook;
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
            zap_markers: l(&c.zap_markers),
            zap_markers_expired: l(&c.zap_markers_expired),
            zap_markers_passed: l(&c.zap_markers_passed),
            migrated_back_cpu: l(&c.back_cpu),
            migrated_back_device: l(&c.back_device),
            migrated_back_requested: l(&c.back_requested),
            settles: l(&c.settles),
            settle_waits: l(&c.settle_waits),
            huge_splits: l(&c.huge_splits),
            expect_wait: std::time::Duration::from_nanos(l(&c.expect_wait_ns)),
        }
    }

    /// When the monitor's reader last read a userfaultfd message, if it ever did: the moment
    /// right before the read, so for a call whose event it was it falls inside the call.
    /// Reading an event is what lets the munmap or madvise that raised it go on (DESIGN.md),
    /// so for one such call this splits its time into "until the event was read" and "after":
    /// the benchmarks' breakdown of the invalidation cost. It is recorded just after the read
    /// returns, which may be after the call has: it is certain once the monitor has handled
    /// the event (after `PageSource::settle` over the range, or once an SVM API call returns).
    pub fn last_read(&self) -> Option<std::time::Instant> {
        self.shared.last_read()
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
        let t = std::time::Instant::now();
        self.mm.shared.wait_handled();
        let waited = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.mm
            .shared
            .counters
            .expect_wait_ns
            .fetch_add(waited, Ordering::Relaxed);
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

/// Lookups [`ProcessMm`]'s `area` makes when its registration keeps racing mapping changes,
/// before it reports [`Error::Busy`] to its caller.
pub const AREA_TRIES: u32 = 8;

impl PageSource for ProcessMm {
    /// The area at `addr`, its mapping registered with the userfaultfd first. A registration
    /// that finds the mapping changed since this lookup (a munmap or mmap racing it:
    /// [`Error::Busy`]) is this lookup's to make again, so it is, up to [`AREA_TRIES`] times,
    /// before the caller is told to start over: every caller walks the mappings around a
    /// fault, neighbours included, and a neighbour changing is no reason to fail the fault.
    fn area(&self, addr: u64, limit: u64) -> Result<Area, Error> {
        let mut tries = 1;
        loop {
            self.shared.check_alive()?;
            let area = self.shared.source.area(addr, limit)?;
            if let (AreaKind::Mapped { read: true, .. }, Ok(want)) =
                (area.kind, Range::new(addr, area.end))
            {
                match self.shared.ensure_registered(want) {
                    Err(Error::Busy { .. }) if tries < AREA_TRIES => {
                        tries += 1;
                        continue;
                    }
                    r => r?,
                }
            }
            return Ok(area);
        }
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
