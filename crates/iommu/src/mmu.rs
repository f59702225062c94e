//! The IOMMU proper: the IO page table and the IOTLB under one page-level lock, and the
//! register of device accesses in flight.
//!
//! # Locking
//!
//! `Mmu::state` is an inner lock (page level) of the lock order in `svmirror_core::context`: it is taken
//! after a backend's update lock, held only inside an [`AtomicSection`], and nothing sleeps under
//! it. Both sides use it:
//!
//! - the device, for every access: translate through the IOTLB (walking the table on a miss),
//!   check permissions and register the access as in flight, all in one critical section;
//! - the driver, under its update lock: change the page table and flush the IOTLB in one critical
//!   section, then wait (sleeping, outside it) until no access in flight overlaps the range.
//!
//! # Why that order is safe to unpin after
//!
//! An access registers itself in the same critical section that translated it. After the
//! driver's teardown-and-flush section, no new access can obtain the old translation; every
//! access that obtained it before is registered, so once the wait sees none overlapping, nothing
//! uses the old pins and they may go (DESIGN.md invariant 2). Flushing before waiting matters: an
//! access started between a wait and a later flush could load the stale translation from the
//! IOTLB and still be using it when its pin is released.

use std::sync::Condvar;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use svmirror_core::{AtomicSection, InnerGuard, InnerLock, Range, might_sleep};

use crate::command::{Access, FaultReason};
use crate::iotlb::Iotlb;
use crate::page_table::{IOVA_END, PageTable, Translation};
use crate::pin::Target;

/// How to build an [`Mmu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuConfig {
    /// IOTLB slots.
    pub iotlb_entries: usize,
    /// Check every IOTLB hit against the page table (see [`Iotlb`]).
    pub checking: bool,
}

impl Default for MmuConfig {
    fn default() -> Self {
        MmuConfig {
            iotlb_entries: crate::iotlb::DEFAULT_IOTLB_ENTRIES,
            checking: false,
        }
    }
}

/// One access in flight: up to two ranges (a copy's source and destination).
#[derive(Clone, Copy, Debug)]
struct Claim {
    id: u64,
    ranges: [(u64, u64); 2],
    n: usize,
}

impl Claim {
    fn overlaps(&self, r: &Range) -> bool {
        self.ranges[..self.n]
            .iter()
            .any(|&(s, e)| s < r.end() && r.start() < e)
    }
}

/// What the page-level lock guards.
#[derive(Debug)]
pub struct MmuState {
    pt: PageTable,
    iotlb: Iotlb,
    claims: Vec<Claim>,
    next_claim: u64,
}

impl MmuState {
    /// The IO page table.
    pub fn page_table(&self) -> &PageTable {
        &self.pt
    }

    /// The IO page table, to change it. Flush the IOTLB for what you change.
    pub fn page_table_mut(&mut self) -> &mut PageTable {
        &mut self.pt
    }

    /// The IOTLB.
    pub fn iotlb(&self) -> &Iotlb {
        &self.iotlb
    }

    /// The IOTLB, to flush it.
    pub fn iotlb_mut(&mut self) -> &mut Iotlb {
        &mut self.iotlb
    }

    /// Whether a device access in flight overlaps `range`.
    pub fn busy(&self, range: Range) -> bool {
        self.claims.iter().any(|c| c.overlaps(&range))
    }
}

/// The simulated IOMMU: page table, IOTLB, accesses in flight. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct Mmu {
    state: InnerLock<MmuState>,
    /// Signalled whenever an access ends.
    drained: Condvar,
    /// Threads waiting on `drained`, counted under the lock: an access that ends wakes them
    /// only when there are any (a condvar wake is a system call, on every access otherwise).
    waiters: AtomicUsize,
}

/// A device fault found while translating: where, what kind of access, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Miss {
    pub(crate) iova: u64,
    pub(crate) access: Access,
    pub(crate) reason: FaultReason,
}

impl Mmu {
    /// An empty IOMMU.
    pub fn new(config: MmuConfig) -> Self {
        Mmu {
            state: InnerLock::new(
                "iommu page table and IOTLB",
                MmuState {
                    pt: PageTable::new(),
                    iotlb: Iotlb::new(config.iotlb_entries, config.checking),
                    claims: Vec::new(),
                    next_claim: 0,
                },
            ),
            drained: Condvar::new(),
            waiters: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> InnerGuard<'_, MmuState> {
        // Every update under this lock leaves the state consistent at each step.
        self.state.lock()
    }

    /// Runs `f` under the page-level lock, in an atomic section: `f` must not sleep (debug
    /// builds panic if it calls anything that may).
    pub fn with<R>(&self, f: impl FnOnce(&mut MmuState) -> R) -> R {
        let mut g = self.lock();
        let _atomic = AtomicSection::enter();
        f(&mut g)
    }

    /// The page table's translation of `iova` (no IOTLB involved).
    pub fn translate(&self, iova: u64) -> Option<Translation> {
        self.with(|s| s.pt.translate(iova))
    }

    /// Translates each `(iova, access)` through the IOTLB, checks permissions and registers the
    /// access as in flight, atomically. The grant covers the longest length, at most `max_len`,
    /// that every translation covers.
    pub(crate) fn begin_access(
        &self,
        reqs: &[(u64, Access)],
        max_len: u64,
    ) -> Result<AccessGrant<'_>, Miss> {
        debug_assert!((1..=2).contains(&reqs.len()) && max_len > 0);
        let mut g = self.lock();
        let _atomic = AtomicSection::enter();
        let st = &mut *g;
        let mut targets = [None; 2];
        let mut len = max_len;
        for (i, &(iova, access)) in reqs.iter().enumerate() {
            let miss = |reason| Miss {
                iova,
                access,
                reason,
            };
            if iova >= IOVA_END {
                return Err(miss(FaultReason::OutsideIovaSpace));
            }
            let tr = st
                .iotlb
                .lookup(iova, &st.pt)
                .ok_or_else(|| miss(FaultReason::NotMapped))?;
            if access == Access::Write && !tr.perms.writable() {
                return Err(miss(FaultReason::ReadOnly));
            }
            len = len.min(tr.end() - iova);
            targets[i] = Some(tr.target_at(iova));
        }
        let mut claim = Claim {
            id: st.next_claim,
            ranges: [(0, 0); 2],
            n: reqs.len(),
        };
        for (i, &(iova, _)) in reqs.iter().enumerate() {
            claim.ranges[i] = (iova, iova + len);
        }
        st.next_claim += 1;
        st.claims.push(claim);
        Ok(AccessGrant {
            mmu: self,
            id: claim.id,
            len,
            targets,
        })
    }

    /// Registers one access in flight over the whole of `range` (device work that will use
    /// every translation in it: [`Mirror::begin_work`](svmirror_core::Mirror::begin_work)),
    /// atomically with checking in the page table that every page is mapped, writable if
    /// `write`. Returns `None` where a page is not; the claim ends when the grant drops.
    pub(crate) fn claim_range(&self, range: Range, write: bool) -> Option<AccessGrant<'_>> {
        let mut g = self.lock();
        let _atomic = AtomicSection::enter();
        let st = &mut *g;
        let mut at = range.start();
        while at < range.end() {
            let tr = st.pt.translate(at)?;
            if write && !tr.perms.writable() {
                return None;
            }
            at = tr.end();
        }
        let claim = Claim {
            id: st.next_claim,
            ranges: [(range.start(), range.end()), (0, 0)],
            n: 1,
        };
        st.next_claim += 1;
        st.claims.push(claim);
        Some(AccessGrant {
            mmu: self,
            id: claim.id,
            len: range.len(),
            targets: [None; 2],
        })
    }

    /// Waits until no access in flight overlaps `range`, or until `deadline`. Returns whether it
    /// drained. May sleep.
    pub fn wait_drained(&self, range: Range, deadline: Instant) -> bool {
        might_sleep("Mmu::wait_drained");
        let mut g = self.lock();
        loop {
            if !g.busy(range) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Counted under the lock, so an access that ends after the check above sees it.
            self.waiters.fetch_add(1, Ordering::Relaxed);
            g.wait_timeout(&self.drained, deadline - now);
            self.waiters.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn end_access(&self, id: u64) {
        let mut g = self.lock();
        if let Some(i) = g.claims.iter().position(|c| c.id == id) {
            g.claims.swap_remove(i);
        }
        // Read under the lock: a waiter counts itself under it before it sleeps.
        let wake = self.waiters.load(Ordering::Relaxed) > 0;
        drop(g);
        if wake {
            self.drained.notify_all();
        }
    }
}

/// An access in flight: the targets to use and how many bytes the translations cover. Ends the
/// access when dropped (also on unwinding, so a dying device thread releases its claims).
#[derive(Debug)]
pub(crate) struct AccessGrant<'a> {
    mmu: &'a Mmu,
    id: u64,
    pub(crate) len: u64,
    targets: [Option<Target>; 2],
}

impl AccessGrant<'_> {
    /// The target of the `i`-th request given to `begin_access`.
    #[expect(
        clippy::expect_used,
        reason = "`begin_access` sets a target for each of its requests, the only ones asked for"
    )]
    pub(crate) fn target(&self, i: usize) -> Target {
        self.targets[i].expect("a granted request has a target")
    }
}

impl Drop for AccessGrant<'_> {
    fn drop(&mut self) {
        self.mmu.end_access(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::page_table::Perms;
    use crate::pin::PinId;

    fn mmu() -> Mmu {
        let m = Mmu::new(MmuConfig {
            iotlb_entries: 16,
            checking: true,
        });
        let t = Target {
            pin: PinId::for_tests(1),
            offset: 0,
        };
        m.with(|s| {
            s.page_table_mut()
                .map(0x1000, 0x2000, t, Perms::ReadWrite)
                .unwrap();
            s.page_table_mut()
                .map(0x3000, 0x1000, t.add(0x2000), Perms::Read)
                .unwrap();
        });
        m
    }

    #[test]
    fn grant_length_stops_at_the_leaf_end() {
        let m = mmu();
        let g = m.begin_access(&[(0x1800, Access::Read)], 0x10000).unwrap();
        assert_eq!(g.len, 0x800);
        assert_eq!(g.target(0).offset, 0x800);
    }

    #[test]
    fn write_to_read_only_mapping_faults() {
        let m = mmu();
        let miss = m.begin_access(&[(0x3000, Access::Write)], 8).unwrap_err();
        assert_eq!(miss.reason, FaultReason::ReadOnly);
        assert!(m.with(|s| !s.busy(Range::new(0x3000, 0x4000).unwrap())));
    }

    #[test]
    fn unmapped_source_faults_and_claims_nothing() {
        let m = mmu();
        let miss = m
            .begin_access(&[(0x8000, Access::Read), (0x1000, Access::Write)], 8)
            .unwrap_err();
        assert_eq!(miss.iova, 0x8000);
        assert_eq!(miss.reason, FaultReason::NotMapped);
        assert!(m.with(|s| s.claims.is_empty()));
    }

    #[test]
    fn access_in_flight_keeps_range_busy_until_dropped() {
        let m = mmu();
        let r = Range::new(0x1000, 0x2000).unwrap();
        let g = m.begin_access(&[(0x1000, Access::Read)], 16).unwrap();
        assert!(m.with(|s| s.busy(r)));
        assert!(!m.with(|s| s.busy(Range::new(0x2000, 0x3000).unwrap())));
        assert!(!m.wait_drained(r, Instant::now() + Duration::from_millis(10)));
        drop(g);
        assert!(m.wait_drained(r, Instant::now()));
    }

    #[test]
    fn wait_drained_wakes_when_access_ends_on_another_thread() {
        let m = mmu();
        let r = Range::new(0x1000, 0x2000).unwrap();
        std::thread::scope(|sc| {
            let g = m.begin_access(&[(0x1000, Access::Read)], 16).unwrap();
            sc.spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                drop(g);
            });
            assert!(m.wait_drained(r, Instant::now() + Duration::from_secs(10)));
        });
    }
}
