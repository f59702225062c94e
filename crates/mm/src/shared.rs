//! The state a [`ProcessMm`](crate::ProcessMm) shares between its API, the monitor's threads
//! and the event handlers: [`Shared`] (the userfaultfd, the notifier, the page source, the page
//! book, the monitor's queue, the counters, how far the monitor has got), and the methods every
//! one of them uses: the book's lock, widening to the huge pages seen, forgetting a range,
//! waiting for the monitor, failing closed.
//!
//! It sits below the API (`process.rs`), the monitor (`monitor.rs`), the event handlers
//! (`events.rs`, `fill.rs`, `zap.rs`) and the registration (`register.rs`), which all import it
//! and add their own methods to [`Shared`]; it imports only the records below it (`book.rs`,
//! `queue.rs`) and the kernel interfaces. The whole graph is in `process.rs`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use svmirror_core::{CpuPte, Error, Notifier, PAGE_SIZE, PageSource, Range};

use crate::ProcessPageSource;
use crate::book::{BackCause, Book, Suspects, carve_gen};
use crate::error::MmError;
use crate::pagemap::PageFlags;
use crate::queue::Queue;
use crate::uffd::Uffd;

/// The counters behind [`MmStats`](crate::MmStats), bumped from every thread.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) unmap: AtomicU64,
    pub(crate) remove: AtomicU64,
    pub(crate) remap: AtomicU64,
    pub(crate) fork: AtomicU64,
    pub(crate) missing: AtomicU64,
    pub(crate) covered: AtomicU64,
    pub(crate) registrations: AtomicU64,
    pub(crate) unregistrable: AtomicU64,
    pub(crate) without_events: AtomicU64,
    pub(crate) races: AtomicU64,
    pub(crate) without_wp: AtomicU64,
    pub(crate) fill_eagain: AtomicU64,
    pub(crate) zap_waits: AtomicU64,
    pub(crate) zap_timeouts: AtomicU64,
    pub(crate) zap_suspects: AtomicU64,
    pub(crate) zap_suspects_expired: AtomicU64,
    pub(crate) zap_markers: AtomicU64,
    pub(crate) zap_markers_expired: AtomicU64,
    pub(crate) zap_markers_passed: AtomicU64,
    pub(crate) back_cpu: AtomicU64,
    pub(crate) back_device: AtomicU64,
    pub(crate) back_requested: AtomicU64,
    pub(crate) settles: AtomicU64,
    pub(crate) settle_waits: AtomicU64,
    pub(crate) huge_splits: AtomicU64,
    /// Nanoseconds SVM API calls waited, after their syscall, for the monitor to handle what
    /// it had read (`ExpectGuard`).
    pub(crate) expect_wait_ns: AtomicU64,
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

/// How long [`Shared::wait_handled`] spins before it parks.
const HANDLED_SPIN: std::time::Duration = std::time::Duration::from_micros(30);

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The state of one [`ProcessMm`](crate::ProcessMm) that its API, the monitor's threads and
/// the event handlers share (one `Arc`).
pub(crate) struct Shared {
    /// First, so it is closed first on drop: once the monitor has stopped, nobody reads its
    /// events, and freeing the other fields can shrink the heap (brk) over a registered range,
    /// whose UNMAP event would wait forever for a reader while the fd is open.
    pub(crate) uffd: Uffd,
    pub(crate) notifier: Notifier,
    pub(crate) source: ProcessPageSource,
    book: Mutex<Book>,
    pub(crate) failed: AtomicBool,
    pub(crate) counters: Counters,
    /// What the monitor's reader has read and its handler not yet handled.
    pub(crate) queue: Queue,
    /// /proc/kpageflags, where this process may read it and frame numbers (`zap.rs`).
    pub(crate) page_flags: Option<crate::pagemap::PageFlags>,
    /// Batches of events read / fully handled by the monitor: `(read, handled)`. An SVM API
    /// call whose syscall has returned knows its event (if any) has been read, and waits until
    /// `handled` catches up with `read` before it forgets what it expected.
    progress: Mutex<(u64, u64)>,
    progress_cv: Condvar,
    /// Bumped by the monitor right before and right after every read of the userfaultfd.
    pub(crate) read_gen: AtomicU64,
    /// `progress.1`, readable without the lock: what [`Shared::wait_handled`] spins on before
    /// it parks. Written only under `progress`'s lock, so it never runs ahead of it.
    handled: AtomicU64,
    /// When the reader last read at least one message, in nanoseconds after `epoch` (0: never).
    /// For the benchmarks' breakdown ([`ProcessMm::last_read`](crate::ProcessMm::last_read)).
    last_read_ns: AtomicU64,
    epoch: std::time::Instant,
    /// Signalled when a page leaves `Book::returning`.
    pub(crate) returned: Condvar,
    /// [`Unregistrable`](crate::Unregistrable), as a `u8`.
    pub(crate) unregistrable: AtomicU8,
    /// MODE_WP is offered by the kernel (`PAGEFAULT_FLAG_WP`). Never cleared: a mapping kind
    /// that cannot take it is registered without it, one registration at a time (counted in
    /// `registered_without_wp`).
    pub(crate) wp: AtomicBool,
    /// [`ProcessMm::track_writes`] was called: some pages may be write-protected, and a pin
    /// of a huge page must lift that first (`before_pin`). Never cleared (a stale `true`
    /// costs one harmless ioctl per huge page pinned).
    ///
    /// [`ProcessMm::track_writes`]: crate::ProcessMm::track_writes
    pub(crate) tracking: AtomicBool,
    /// Pages of REMOVE holds that the time limit ended while they were still unexplained
    /// (`zap.rs`): device faults on them wait until they are, for a while longer.
    pub(crate) suspects: Suspects,
    /// A test's hook, run before each registration attempt with the range about to be
    /// registered ([`ProcessMm::set_register_hook`](crate::ProcessMm::set_register_hook)).
    pub(crate) register_hook: Mutex<Option<RegisterHook>>,
}

/// See [`Shared::register_hook`].
pub(crate) type RegisterHook = Box<dyn FnMut(Range) + Send>;

impl Shared {
    /// The shared state of a new [`ProcessMm`](crate::ProcessMm), before its monitor starts.
    pub(crate) fn new(
        source: ProcessPageSource,
        uffd: Uffd,
        page_flags: Option<PageFlags>,
        wp: bool,
    ) -> Result<Self, MmError> {
        Ok(Shared {
            notifier: Notifier::new(),
            source,
            uffd,
            book: Mutex::new(Book::default()),
            failed: AtomicBool::new(false),
            counters: Counters::default(),
            queue: Queue::new().map_err(|source| MmError::Monitor { source })?,
            page_flags,
            progress: Mutex::new((0, 0)),
            progress_cv: Condvar::new(),
            read_gen: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            last_read_ns: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            returned: Condvar::new(),
            suspects: Suspects::default(),
            unregistrable: AtomicU8::new(0),
            wp: AtomicBool::new(wp),
            tracking: AtomicBool::new(false),
            register_hook: Mutex::new(None),
        })
    }

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
    /// pages: `what` split them ([`MmStats::huge_splits`](crate::MmStats::huge_splits)).
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

    /// Forgets everything known about `[start, end)` (it was unmapped or moved away), telling
    /// device owners to free migrated pages there.
    pub(crate) fn forget(&self, start: u64, end: u64) {
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
        self.handled.store(p.1, Ordering::Release);
        drop(p);
        self.progress_cv.notify_all();
    }

    /// Whether an SVM API call is between its syscall and the end of its wait for the monitor
    /// (it has an expectation outstanding).
    pub(crate) fn api_call_waiting(&self) -> bool {
        !self.book().expected.is_empty()
    }

    /// The time for [`Shared::note_read`], taken by the reader right before a read: the read
    /// itself lets the event's caller go, so a time taken after it could fall after the call
    /// returned. No allocation, no lock.
    pub(crate) fn read_clock(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The read that started at `at` ([`Shared::read_clock`]) took at least one message.
    pub(crate) fn note_read(&self, at: u64) {
        self.last_read_ns.store(at, Ordering::Release);
    }

    /// When the reader last read at least one message, if it ever did.
    pub(crate) fn last_read(&self) -> Option<std::time::Instant> {
        match self.last_read_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.epoch + std::time::Duration::from_nanos(ns)),
        }
    }

    /// Waits until the monitor has handled every event it has read so far (returns at once
    /// once the monitor has stopped or failed).
    ///
    /// It spins for up to [`HANDLED_SPIN`] first: an SVM API call's own event is usually
    /// handled within microseconds of the read, and parking then costs a wake-up (tens of
    /// microseconds on a loaded machine) on the caller's path.
    pub(crate) fn wait_handled(&self) {
        let target = self
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        let spin_until = std::time::Instant::now() + HANDLED_SPIN;
        while self.handled.load(Ordering::Acquire) < target
            && !self.failed.load(Ordering::Acquire)
            && std::time::Instant::now() < spin_until
        {
            std::hint::spin_loop();
        }
        let mut p = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        while p.1 < target && !self.failed.load(Ordering::Acquire) {
            p = self
                .progress_cv
                .wait_timeout(p, std::time::Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    pub(crate) fn check_alive(&self) -> Result<(), Error> {
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

pub(crate) fn source_err(addr: u64, e: io::Error) -> Error {
    Error::Source {
        range: Range::with_len(addr & !(PAGE_SIZE - 1), PAGE_SIZE).unwrap_or(Range::FULL),
        source: Box::new(e),
    }
}
