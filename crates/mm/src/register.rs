//! Registering VMAs with the userfaultfd, so that their munmap, madvise and mremap reach the
//! monitor as events: a VMA is registered whole when a device first faults in it
//! ([`Shared::ensure_registered`], from the API's `area`), a registration error is looked into
//! before a mapping is called unregistrable, and what happens to one that is follows the
//! caller's [`Unregistrable`] policy.
//!
//! Called by the API (`process.rs`, `migrate.rs`); imports only the shared state
//! (`shared.rs`), the page book (`book.rs`) and the kernel interfaces. The events that end a
//! registration forget its record in `events.rs`. The whole graph is in `process.rs`.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::Ordering;

use svmirror_core::{Error, PAGE_SIZE, Range};

use crate::book::carve_gen;
use crate::error::MmError;
use crate::shared::{Shared, bump};
use crate::uffd::{self, MODE_WP};

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
    /// Counted in [`MmStats::mirrored_without_events`](crate::MmStats::mirrored_without_events).
    MirrorWithoutEvents,
}

/// How many times a registration that raced a mapping change is looked up and tried again.
const REGISTER_TRIES: u32 = 4;

impl Shared {
    /// Registers the whole VMA holding `want` (part of one readable mapping, as `area` just
    /// reported it) for events, unless a record says it is registered.
    ///
    /// The whole VMA, not just what the device faulted: `userfaultfd_register` splits a VMA at
    /// the ends of the registered range (the halves differ in `vm_userfaultfd_ctx`), and
    /// `mremap` refuses an old range that spans two VMAs with EFAULT (mm/mremap.c,
    /// `vma_to_resize`). Registering part of a program's mapping would therefore make the
    /// program's own `mremap` of it fail. Registering is not mapping: only what a device asks
    /// for is pinned and mapped (svmirror-iommu's `Prefetch` is about that), the rest of the VMA only
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
    pub(crate) fn ensure_registered(&self, want: Range) -> Result<(), Error> {
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
        if let Some(hook) = self
            .register_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            hook(want);
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

    pub(crate) fn unregistrable_policy(&self) -> Unregistrable {
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
}
