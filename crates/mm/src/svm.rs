//! The SVM API: munmap, mprotect, madvise and mremap bracketed by an invalidation with the
//! right reason, so a change made through it is coherent on every device before the call
//! returns (the kernel's mmu-notifier call sites, in userspace).
//!
//! Each call checks its range first: a range that is not entirely mapped is
//! [`MmError::NotMapped`] (this is how a double unmap is caught, where plain munmap would
//! succeed). The event the kernel sends for the same change is recognised and not invalidated a
//! second time.

use std::io;

use svmirror_core::{Event, Range};

use crate::error::MmError;
use crate::process::ProcessMm;
use crate::uffd;

/// Page protection for [`ProcessMm::mprotect`] and [`ProcessMm::mmap_anonymous`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protection {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

impl Protection {
    /// PROT_NONE.
    pub const NONE: Protection = Protection {
        read: false,
        write: false,
    };
    /// PROT_READ.
    pub const READ: Protection = Protection {
        read: true,
        write: false,
    };
    /// PROT_READ | PROT_WRITE.
    pub const READ_WRITE: Protection = Protection {
        read: true,
        write: true,
    };

    fn bits(self) -> libc::c_int {
        (if self.read { libc::PROT_READ } else { 0 })
            | (if self.write { libc::PROT_WRITE } else { 0 })
    }
}

/// madvise advice the SVM API knows the effect of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// MADV_DONTNEED: drop the pages; private anonymous memory reads as zeros afterwards.
    DontNeed,
    /// MADV_FREE: the kernel may drop the pages lazily.
    Free,
    /// MADV_REMOVE: punch a hole in shared memory.
    Remove,
    /// MADV_PAGEOUT: reclaim the pages now (no userfaultfd event: coherent only through here).
    PageOut,
    /// MADV_WILLNEED: read ahead. Changes no mapping.
    WillNeed,
    /// MADV_HUGEPAGE: allow transparent huge pages. Changes no mapping now.
    HugePage,
    /// MADV_NOHUGEPAGE: forbid transparent huge pages. Changes no mapping now.
    NoHugePage,
}

impl Advice {
    fn raw(self) -> libc::c_int {
        match self {
            Advice::DontNeed => libc::MADV_DONTNEED,
            Advice::Free => libc::MADV_FREE,
            Advice::Remove => libc::MADV_REMOVE,
            Advice::PageOut => libc::MADV_PAGEOUT,
            Advice::WillNeed => libc::MADV_WILLNEED,
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
        }
    }

    /// Whether the kernel reports this advice with a REMOVE event.
    fn has_remove_event(self) -> bool {
        matches!(self, Advice::DontNeed | Advice::Free | Advice::Remove)
    }

    /// Whether it drops pages (and so must invalidate).
    fn drops_pages(self) -> bool {
        self.has_remove_event() || self == Advice::PageOut
    }
}

fn syscall(op: &'static str, range: Range, rc: libc::c_int) -> Result<(), MmError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(MmError::Syscall {
            op,
            range,
            source: io::Error::last_os_error(),
        })
    }
}

fn ptr(addr: u64) -> *mut libc::c_void {
    addr as usize as *mut libc::c_void
}

impl ProcessMm {
    /// Maps `len` bytes (rounded up to pages) of private anonymous memory: the allocation
    /// helper. The memory is ordinary; nothing is registered until a device faults it.
    pub fn mmap_anonymous(&self, len: u64, prot: Protection) -> Result<Range, MmError> {
        let len = len
            .checked_next_multiple_of(svmirror_core::PAGE_SIZE)
            .ok_or(MmError::Core(svmirror_core::Error::RangeOverflow {
                start: 0,
                len,
            }))?;
        let want = Range::with_len(0, len).map_err(MmError::Core)?;
        let size = usize::try_from(len)
            .map_err(|_| MmError::Core(svmirror_core::Error::RangeOverflow { start: 0, len }))?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; no
        // existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                prot.bits(),
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MmError::Syscall {
                op: "mmap",
                range: want,
                source: io::Error::last_os_error(),
            });
        }
        Range::with_len(p as u64, len).map_err(MmError::Core)
    }

    /// Unmaps `range` after every device has lost it (event `Unmap`).
    ///
    /// The range is unregistered from the userfaultfd first, so the munmap sends no UNMAP event
    /// and does not wait for the monitor to read one (fs/userfaultfd.c `userfaultfd_unmap_prep`
    /// queues an event only for a VMA with a userfaultfd context, which UFFDIO_UNREGISTER
    /// clears): the call's own invalidation is what devices see, and it is open from before
    /// the unregistration until the mapping is gone. It waits for nothing of the monitor's:
    /// events other calls caused may still be being handled when it returns
    /// ([`sync_events`](Self::sync_events) waits for them). Where the kernel refuses to
    /// unregister (a VMA userfaultfd cannot take, or no room to split one), the call expects
    /// its event as any other SVM API call does.
    ///
    /// # Safety
    /// No Rust reference into `range` may outlive this call, exactly as for `libc::munmap`.
    pub unsafe fn munmap(&self, range: Range) -> Result<(), MmError> {
        self.check_mapped(range)?;
        // The registration records first, as the UNMAP handler does (`handle_unmap`): a fault
        // that reads them after this registers again; one that read them before is retried by
        // the invalidation below, or waits for it to end and finds the mapping gone.
        self.shared.forget_registration(range.start(), range.end());
        let inv = self.invalidate(range, Event::Unmap)?;
        let quiet = self.uffd().unregister(range).is_ok();
        let expected = (!quiet).then(|| self.expect(uffd::EVENT_UNMAP, range.start(), range.end()));
        // SAFETY: the caller guarantees nothing in Rust refers into `range`; devices lost it
        // above, and their pins keep any in-flight access off the freed pages.
        let rc = unsafe { libc::munmap(ptr(range.start()), range.len() as usize) };
        let res = syscall("munmap", range, rc);
        if res.is_err() && quiet {
            // Still mapped: registered again before any device may map it, so that what
            // happens to it next is seen.
            match self.uffd().register(range, self.shared.mode_for(range)) {
                Ok(()) => self.record_registered(range),
                Err(e) => {
                    tracing::warn!(%range, %e, "a failed munmap left the range unregistered; device faults register it again")
                }
            }
        }
        drop(expected);
        inv.end();
        self.forget(range.start(), range.end());
        res
    }

    /// Changes the protection of `range` after every device has been told.
    ///
    /// A protection that keeps the range readable is event `ProtectionVma`: devices may
    /// downgrade their entries to read-only rather than drop them. A protection that makes it
    /// unreadable (`Protection::NONE`, or write without read, which x86 cannot express anyway)
    /// is event `Clear`: every device must lose all access, which a downgrade would not give,
    /// and the next device fault sees the new protection and is refused.
    pub fn mprotect(&self, range: Range, prot: Protection) -> Result<(), MmError> {
        self.check_mapped(range)?;
        let event = if prot.read {
            Event::ProtectionVma
        } else {
            Event::Clear
        };
        let inv = self.invalidate(range, event)?;
        // SAFETY: changing protection does not free memory; Rust code that then touches the
        // range against its new protection faults, as with any mprotect.
        let rc = unsafe { libc::mprotect(ptr(range.start()), range.len() as usize, prot.bits()) };
        let res = syscall("mprotect", range, rc);
        if res.is_ok() && !prot.write {
            self.write_protect_migrated(range);
        }
        inv.end();
        res
    }

    /// Gives the kernel `advice` about `range`. Advice that drops pages invalidates first
    /// (event `Clear`); the rest changes no mapping and invalidates nothing.
    ///
    /// # Safety
    /// As for `libc::madvise`: after `DontNeed`/`Free`/`Remove` the contents may be gone, which
    /// Rust code holding references into the range must be prepared for.
    pub unsafe fn madvise(&self, range: Range, advice: Advice) -> Result<(), MmError> {
        self.check_mapped(range)?;
        let inv = if advice.drops_pages() {
            Some(self.invalidate(range, Event::Clear)?)
        } else {
            None
        };
        let expected = advice
            .has_remove_event()
            .then(|| self.expect(uffd::EVENT_REMOVE, range.start(), range.end()));
        // SAFETY: per this function's contract.
        let rc = unsafe { libc::madvise(ptr(range.start()), range.len() as usize, advice.raw()) };
        let res = syscall("madvise", range, rc);
        if advice.has_remove_event() {
            self.discard_migrated(range);
        }
        drop(expected);
        drop(inv);
        res
    }

    /// Resizes `old` to `new_len` bytes (rounded up to pages), moving it if `may_move` and it
    /// cannot grow in place; returns the new range.
    ///
    /// Devices are told what happens, and only that: shrinking invalidates the cut tail
    /// (`Unmap`); growing in place invalidates nothing (nothing that exists changes); a move
    /// first takes the old range from every device (`Clear`, before the move, since the old
    /// addresses stop working when it happens) and then releases it (`Unmap`, after the move,
    /// which is when it is known to be gone). Growing is tried in place first, so a call that
    /// may move but does not never costs a device its mappings.
    ///
    /// # Safety
    /// As for `libc::mremap`: the memory may move, so no Rust reference into `old` may outlive
    /// the call.
    pub unsafe fn mremap(
        &self,
        old: Range,
        new_len: u64,
        may_move: bool,
    ) -> Result<Range, MmError> {
        self.check_mapped(old)?;
        let new_len = new_len
            .checked_next_multiple_of(svmirror_core::PAGE_SIZE)
            .filter(|l| *l > 0)
            .ok_or(MmError::Core(svmirror_core::Error::EmptyRange {
                start: old.start(),
                end: old.start(),
            }))?;
        let fail = || MmError::Syscall {
            op: "mremap",
            range: old,
            source: io::Error::last_os_error(),
        };
        if new_len < old.len() {
            let tail = Range::new(old.start() + new_len, old.end()).map_err(MmError::Core)?;
            let inv = self.invalidate(tail, Event::Unmap)?;
            let expected = self.expect(uffd::EVENT_UNMAP, tail.start(), tail.end());
            // SAFETY: per this function's contract; devices lost the tail above.
            let p = unsafe { raw_mremap(old, new_len, 0) };
            drop(expected);
            inv.end();
            if p.is_none() {
                return Err(fail());
            }
            self.forget(tail.start(), tail.end());
            return Range::with_len(old.start(), new_len).map_err(MmError::Core);
        }
        // SAFETY: growing in place (or keeping the size) moves and frees nothing.
        if unsafe { raw_mremap(old, new_len, 0) }.is_some() {
            return Range::with_len(old.start(), new_len).map_err(MmError::Core);
        }
        let err = fail();
        let no_room = matches!(&err, MmError::Syscall { source, .. } if source.raw_os_error() == Some(libc::ENOMEM));
        if !may_move || !no_room {
            return Err(err);
        }
        let inv = self.invalidate(old, Event::Clear)?;
        let expected = (
            self.expect(uffd::EVENT_REMAP, old.start(), old.end()),
            self.expect(uffd::EVENT_UNMAP, old.start(), old.end()),
        );
        // SAFETY: per this function's contract; devices lost the old range above.
        let p = unsafe { raw_mremap(old, new_len, libc::MREMAP_MAYMOVE) };
        let err = p.is_none().then(fail);
        drop(expected);
        let new = match p {
            Some(p) => Range::with_len(p, new_len).map_err(MmError::Core)?,
            None => {
                inv.end();
                return Err(err.unwrap_or_else(fail));
            }
        };
        if new.start() != old.start() {
            // It moved: the old range is gone, and devices may free what they kept for it.
            self.invalidate(old, Event::Unmap)?.end();
            self.forget(old.start(), old.end());
        }
        inv.end();
        Ok(new)
    }
}

/// `mremap(old, new_len, flags)`; the new address, or `None` with errno set.
///
/// # Safety
/// As for `libc::mremap`.
unsafe fn raw_mremap(old: Range, new_len: u64, flags: libc::c_int) -> Option<u64> {
    // SAFETY: per this function's contract.
    let p = unsafe {
        libc::mremap(
            ptr(old.start()),
            old.len() as usize,
            new_len as usize,
            flags,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_bits_match_libc() {
        assert_eq!(Protection::NONE.bits(), libc::PROT_NONE);
        assert_eq!(Protection::READ.bits(), libc::PROT_READ);
        assert_eq!(
            Protection::READ_WRITE.bits(),
            libc::PROT_READ | libc::PROT_WRITE
        );
    }

    #[test]
    fn only_page_dropping_advice_invalidates() {
        assert!(Advice::DontNeed.drops_pages() && Advice::DontNeed.has_remove_event());
        assert!(Advice::PageOut.drops_pages() && !Advice::PageOut.has_remove_event());
        assert!(!Advice::WillNeed.drops_pages());
        assert!(!Advice::HugePage.drops_pages());
    }
}
