//! What runs when the monitor hands over a userfaultfd event: UNMAP, REMAP and FORK are
//! handled here in full, a REMOVE up to its hold (`zap.rs` holds its invalidation open until
//! the zap is seen). Missing page faults are `fill.rs`'s. An event that an SVM API call is
//! causing ([`Expected`], recorded by the call before its syscall) is recognised and not
//! invalidated a second time; the registration records an event ends are forgotten before
//! the invalidation, as `register.rs` relies on.
//!
//! The monitor's handler (`monitor.rs`) calls in here; this imports only what sits below it:
//! the REMOVE hold (`zap.rs`), the shared state (`shared.rs`), the page book (`book.rs`) and
//! the kernel interfaces. The whole graph is in `process.rs`.

use std::os::fd::{FromRawFd, OwnedFd};

use svmirror_core::{Error, Event, NotifierRange, Range};

use crate::book::{Expected, carve_gen};
use crate::shared::{Shared, bump};
use crate::uffd;
use crate::zap::PendingZap;

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
    ) -> Result<Option<PendingZap<'_>>, Error> {
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

    /// Runs one invalidation of `r` (widened) for `event`.
    fn invalidate(&self, r: Range, event: Event) -> Result<(), Error> {
        let widened = self.widen(r);
        self.notifier
            .invalidate_range_start(NotifierRange::new(widened, event))?
            .end();
        Ok(())
    }

    /// Forgets the registration records over `[start, end)` (its mappings are gone).
    pub(crate) fn forget_registration(&self, start: u64, end: u64) {
        let mut book = self.book();
        carve_gen(&mut book.registered, start, end);
        carve_gen(&mut book.refused, start, end);
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
}
