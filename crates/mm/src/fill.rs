//! Resolving missing pages: UFFDIO_COPY and UFFDIO_ZEROPAGE under the kernel's `mmap_changing`
//! rule, and bringing pages back from device memory.
//!
//! # The rule (fs/userfaultfd.c)
//!
//! A thread that munmaps, madvises or mremaps a registered range raises the context's
//! `mmap_changing` before the change (`userfaultfd_unmap_prep`, `userfaultfd_remove`,
//! `mremap_userfaultfd_prep`) and drops it only once its event has been read and the thread has
//! run again (`userfaultfd_event_wait_completion`). In between, `mfill_atomic` answers every
//! UFFDIO_COPY and UFFDIO_ZEROPAGE with EAGAIN and copies nothing. `read()` hands out page
//! faults before events (`userfaultfd_ctx_read`), so a monitor that resolves a fault it has just
//! read while another thread's munmap is queued behind it meets EAGAIN as the common case.
//!
//! So a fill retries on EAGAIN: the monitor (the only reader) reads the queued events itself and
//! handles them, answering any page fault it reads meanwhile with UFFDIO_WAKE (the thread faults
//! again and the main loop serves it); any other thread waits for the monitor to read. The
//! device's copy of a page is released only after UFFDIO_COPY put its contents in place: a
//! failed or timed-out fill leaves the page on the device, booked, and wakes the page's waiters.

use std::io;
use std::time::{Duration, Instant};

use svmirror_core::{Error, NotifierRange, PAGE_SIZE, Range};

use crate::book::BackCause;
use crate::buffers::Bounce;
use crate::shared::{Shared, bump, source_err};

/// How long a fill waits for queued events to be read before it gives up (the page stays where
/// it was: on the device, or missing, and its waiters are woken to fault again).
const FILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The retry state of one fill.
struct EventWait {
    deadline: Instant,
    backoff: Duration,
}

impl EventWait {
    fn new() -> Self {
        EventWait {
            deadline: Instant::now() + FILL_TIMEOUT,
            backoff: Duration::from_micros(5),
        }
    }
}

/// Who is filling a page, which decides whether it may wait for another thread's bring-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// The monitor's handler (or the thread stopping the monitor): it never waits for another
    /// thread's bring-back of the same page (that thread may be waiting for an event the
    /// handler has yet to handle), and leaves the page to it.
    Monitor,
    /// Any other thread: it waits for another thread's bring-back of the same page.
    Other,
}

/// What [`Shared::bring_back`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Back {
    /// The page was not on a device (never migrated, or already back).
    NotOnDevice,
    /// This call brought it back.
    Landed,
    /// Another thread is bringing it back; its UFFDIO_COPY (or its UFFDIO_WAKE if it fails)
    /// wakes every thread waiting on the page.
    InFlight,
    /// The page left this address while it was being brought back (unmapped, or moved by
    /// mremap, where it is booked now): nothing to map here.
    Gone,
}

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// UFFDIO_COPY/ZEROPAGE errors meaning "no registered mapping here any more"
/// (`mfill_atomic`: ENOENT when the VMA is gone or no longer ours, EFAULT past its end).
fn no_mapping(e: &io::Error) -> bool {
    matches!(errno(e), Some(libc::ENOENT | libc::EFAULT))
}

impl Shared {
    /// Maps `src` (a page of our own, never monitored memory) or the zero page (`None`) at the
    /// missing page `page`, retrying while an event is queued unread.
    pub(crate) fn fill(&self, page: u64, src: Option<*const u8>) -> io::Result<()> {
        let mut wait = EventWait::new();
        loop {
            match self.fill_once(page, src) {
                Err(e) if errno(&e) == Some(libc::EAGAIN) => self.await_events(&mut wait)?,
                other => return other,
            }
        }
    }

    fn fill_once(&self, page: u64, src: Option<*const u8>) -> io::Result<()> {
        match src {
            // SAFETY: `src` is a page of our own (the monitor's page or a bounce page), readable
            // for PAGE_SIZE bytes and never monitored.
            Some(p) => unsafe { self.uffd.copy_page(page, p) },
            None => self.uffd.zero_page(page),
        }
    }

    /// A fill met EAGAIN: an event is queued unread (`mmap_changing`). The monitor's reader
    /// reads it (it never waits for anyone but the ring's room), and its thread drops
    /// `mmap_changing` as soon as it runs again; back off until then, or give up with
    /// ETIMEDOUT after [`FILL_TIMEOUT`].
    fn await_events(&self, wait: &mut EventWait) -> io::Result<()> {
        bump(&self.counters.fill_eagain);
        if Instant::now() >= wait.deadline {
            return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
        std::thread::sleep(wait.backoff);
        wait.backoff = (wait.backoff * 2).min(Duration::from_millis(1));
        Ok(())
    }

    /// A missing fault at `addr`: bring the page back from its device, or zero-fill a page never
    /// migrated. Whatever happens, no thread stays blocked on the page: a failure wakes it.
    pub(crate) fn handle_missing(
        &self,
        addr: u64,
        buf: *mut u8,
        caller: Caller,
    ) -> Result<(), Error> {
        bump(&self.counters.missing);
        let page = addr & !(PAGE_SIZE - 1);
        match self.bring_back(page, buf, caller, BackCause::Cpu)? {
            Back::Landed | Back::InFlight | Back::Gone => return Ok(()),
            Back::NotOnDevice => {}
        }
        // Never migrated (or already back): a zero page; EEXIST if someone mapped it meanwhile.
        match self.fill(page, None) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.wake_page(page);
                if no_mapping(&e) {
                    Ok(())
                } else {
                    Err(source_err(page, e))
                }
            }
        }
    }

    fn wake_page(&self, page: u64) {
        if let Ok(r) = Range::with_len(page, PAGE_SIZE) {
            let _ = self.uffd.wake(r);
        }
    }

    /// Brings the migrated page at `page` back from its device, if it is still there: a
    /// `Migrate` invalidation by its owner, the owner's copy into `buf`, UFFDIO_COPY (which
    /// needs no pending fault, so it works for the monitor and for callers alike, privileged or
    /// not), and only then the device copy released. One bring-back per page at a time: another
    /// thread waits for it; the reading thread never waits (the returner may be waiting for it
    /// to read events) and leaves the page to the returner.
    pub(crate) fn bring_back(
        &self,
        page: u64,
        buf: *mut u8,
        caller: Caller,
        cause: BackCause,
    ) -> Result<Back, Error> {
        let d = {
            let mut book = self.book();
            loop {
                let Some(d) = book.migrated.get(&page).cloned() else {
                    return Ok(Back::NotOnDevice);
                };
                if book.returning.insert(page) {
                    break d;
                }
                if caller == Caller::Monitor {
                    return Ok(Back::InFlight);
                }
                book = self
                    .returned
                    .wait(book)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        let _returning = Returning { shared: self, page };
        let r = Range::with_len(page, PAGE_SIZE)?;
        let inv = self
            .notifier
            .invalidate_range_start(NotifierRange::new(r, d.owner.event()))?;
        if let Err(e) = d.owner.copy_back(d.key, buf) {
            inv.end();
            self.wake_page(page);
            return Err(e);
        }
        let still_here = || self.book().migrated.get(&page).is_some_and(|x| x.same(&d));
        let mut wait = EventWait::new();
        let landed = loop {
            // The copy is made holding the monitor's queue, so the reader reads nothing
            // meanwhile: every event read so far is in the ring, and one that is not read yet
            // keeps `mmap_changing` up, which fails the copy with EAGAIN. An UNMAP, REMOVE or
            // REMAP of the page that was read (its change made, or being made, by the thread the
            // read released) but is not handled yet stops the copy, so the old contents never
            // land after the page was dropped or moved. An event read after the copy changes
            // the page after it landed, as it would have changed the page had it never left.
            let queue = self.queue.hold();
            if !still_here() || self.queue.pending_change(&queue, page) {
                break Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            // SAFETY: `buf` is a page of our own, never monitored. Nobody is woken until the
            // device copy is released below, so a woken thread finds the page home for good.
            match unsafe { self.uffd.copy_page_dontwake(page, buf) } {
                Err(e) if errno(&e) == Some(libc::EAGAIN) => {
                    drop(queue);
                    if let Err(e) = self.await_events(&mut wait) {
                        break Err(e);
                    }
                }
                other => break other,
            }
        };
        match landed {
            Ok(()) => {
                // In place: only now is the device copy released. Unbooked before the
                // invalidation ends, so no faulter finds the page "on the device" any more.
                let mine = {
                    let mut book = self.book();
                    match book.migrated.get(&page) {
                        Some(x) if x.same(&d) => book.migrated.remove(&page),
                        _ => None,
                    }
                };
                if mine.is_some() {
                    d.owner.discard(d.key);
                    bump(self.counters.back(cause));
                } else {
                    // The monitor handled a madvise of this page between our check and the
                    // copy (another thread's REMOVE is handled concurrently): its zap may
                    // already have run, so drop what we copied, as the kernel's zap would
                    // have. A thread other than the monitor may make this call (its REMOVE
                    // event is read by the monitor).
                    // SAFETY: the page is part of a mapping the caller's madvise is dropping
                    // anyway; nothing in Rust refers to it.
                    unsafe {
                        libc::madvise(
                            page as usize as *mut libc::c_void,
                            PAGE_SIZE as usize,
                            libc::MADV_DONTNEED,
                        )
                    };
                }
                inv.end();
                self.wake_page(page);
                Ok(Back::Landed)
            }
            Err(e) => {
                inv.end();
                self.wake_page(page);
                if no_mapping(&e) || !still_here() {
                    // Unmapped (its UNMAP handler discards the copy) or moved (booked at its
                    // new address): the device keeps the page for whoever owns it now.
                    Ok(Back::Gone)
                } else {
                    Err(source_err(page, e))
                }
            }
        }
    }

    /// Brings back every migrated page of `range` from the calling thread, through a bounce
    /// page of its own; returns how many came back.
    pub(crate) fn bring_back_range(&self, range: Range, cause: BackCause) -> Result<u64, Error> {
        let pages: Vec<u64> = self
            .book()
            .migrated
            .range(range.start()..range.end())
            .map(|(a, _)| *a)
            .collect();
        if pages.is_empty() {
            return Ok(0);
        }
        let bounce = Bounce::new().map_err(|e| source_err(range.start(), e))?;
        let mut back = 0;
        for page in pages {
            if self.bring_back(page, bounce.ptr(), Caller::Other, cause)? == Back::Landed {
                back += 1;
            }
        }
        Ok(back)
    }
}

/// A page being brought back: the mark comes off (and waiters wake) however the bring-back
/// ends.
struct Returning<'a> {
    shared: &'a Shared,
    page: u64,
}

impl Drop for Returning<'_> {
    fn drop(&mut self) {
        self.shared.book().returning.remove(&self.page);
        self.shared.returned.notify_all();
    }
}
