//! The page book: what svmirror knows about the process's pages that the page table does not
//! say. Pages living in device memory ([`OnDevice`], with the [`DevicePages`] of their owner),
//! the windows where huge pages were seen, the spans registered with the userfaultfd or refused
//! by it, the events SVM API calls are causing ([`Expected`]), all in one [`Book`] under one
//! lock; and, under a lock of their own, the pages a REMOVE hold left unexplained
//! ([`Suspects`]).
//!
//! Plain records, at the bottom of the graph described in `process.rs`: nothing here imports
//! another module of the crate. `shared.rs` holds the book and the suspects in
//! [`Shared`](crate::shared::Shared), through which the API (`process.rs`), the event handlers
//! (`events.rs`, `fill.rs`, `zap.rs`) and the registration (`register.rs`) read and change them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

pub use svmirror_core::DevicePages;

/// Why a page is being brought back from device memory ([`MmStats`](crate::MmStats) counts each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackCause {
    Cpu,
    Device,
    Requested,
}

/// An event an SVM API call is causing, inside an invalidation of its range that it started
/// before the syscall. It is consumed by exactly the event it predicts (or the part of it that
/// event covers), and whatever is left is dropped when the call returns: the syscall has
/// returned, so its events have been read, and the call waits until the monitor has handled
/// them (`ExpectGuard`). No time decides it. Because it lives only while the call's own
/// invalidation is open, an event it swallows by mistake (another thread's change of the same
/// range) is covered by that invalidation: no device can map the range until it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    pub(crate) event: u8,
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The call that expects it.
    pub(crate) id: u64,
}

/// Bookkeeping under one lock. Lock order: this lock is never held while the notifier runs
/// callbacks or while a system call that may wait for the monitor (munmap, madvise, mremap)
/// runs.
#[derive(Default)]
pub(crate) struct Book {
    /// Spans registered with the userfaultfd: start → (end, read generation when registered).
    pub(crate) registered: BTreeMap<u64, (u64, u64)>,
    /// Mapping extents userfaultfd refused, as counted: start → (end, 1 if counted as mirrored
    /// without events). Never used to answer a fault (see `ensure_registered`).
    pub(crate) refused: BTreeMap<u64, (u64, u64)>,
    /// Windows where a huge page was seen: aligned start → size.
    pub(crate) huge: BTreeMap<u64, u64>,
    /// Events SVM API calls are causing right now.
    pub(crate) expected: Vec<Expected>,
    pub(crate) next_expect_id: u64,
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
    pub(crate) fn drop_huge(&mut self, start: u64, end: u64) {
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
    pub(crate) fn take_migrated(&mut self, start: u64, end: u64) -> Vec<OnDevice> {
        let pages: Vec<u64> = self.migrated.range(start..end).map(|(a, _)| *a).collect();
        pages
            .into_iter()
            .filter_map(|a| self.migrated.remove(&a))
            .collect()
    }
}

/// The span of `map` (start → (end, generation)) containing `addr`.
pub(crate) fn span_containing(map: &BTreeMap<u64, (u64, u64)>, addr: u64) -> Option<(u64, u64)> {
    map.range(..=addr)
        .next_back()
        .filter(|(_, (e, _))| *e > addr)
        .map(|(s, (e, _))| (*s, *e))
}

/// Removes `[start, end)` from a span map (start → (end, generation)), splitting spans that
/// straddle it.
pub(crate) fn carve_gen(map: &mut BTreeMap<u64, (u64, u64)>, start: u64, end: u64) {
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

/// Pages a REMOVE hold left unexplained when its time limit ended it: present, with the
/// frame they had when the event was read, not marked lazy-free (or lazy-free already then).
///
/// The event does not say whether it was a DONTNEED (whose zap is sure to come, however late
/// its caller runs) or a MADV_FREE that marks nothing (pages lazy-free already, a large folio
/// it could not split), so the hold cannot wait long: every device fault in the subscription
/// waits while it is open. Instead the hold ends, and only faults that would report one of
/// these pages wait ([`ProcessMm`](crate::ProcessMm)'s `snapshot` calls [`Suspects::wait`]),
/// until the handler sees the page zapped, replaced or marked lazy-free, or for
/// [`ZAP_SUSPECT_WAIT`] more. Faults elsewhere go on.
///
/// [`ZAP_SUSPECT_WAIT`]: crate::ZAP_SUSPECT_WAIT
#[derive(Default)]
pub(crate) struct Suspects {
    /// page → (frame recorded at the read, possibly with [`LAZY_AT_READ`]; deadline).
    ///
    /// [`LAZY_AT_READ`]: crate::queue::LAZY_AT_READ
    pages: Mutex<BTreeMap<u64, (u64, Instant)>>,
    pub(crate) cleared: Condvar,
}

impl Suspects {
    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, (u64, Instant)>> {
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether any page is suspect.
    pub(crate) fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Waits until no page of `[start, end)` is suspect (or every suspect there has expired).
    /// Called by device faults, with no lock held.
    pub(crate) fn wait(&self, start: u64, end: u64) {
        let mut pages = self.lock();
        loop {
            let now = Instant::now();
            let Some(until) = pages
                .range(start..end)
                .map(|(_, &(_, d))| d)
                .filter(|&d| d > now)
                .max()
            else {
                return;
            };
            pages = self
                .cleared
                .wait_timeout(pages, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
