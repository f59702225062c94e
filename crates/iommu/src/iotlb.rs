//! The IOTLB: a bounded cache of IO page-table leaves, filled on a miss by walking the table and
//! emptied only by explicit invalidation, by range or whole, as a real IOMMU's is.
//!
//! Because it is only emptied on request, a driver that changes the page table and forgets to
//! flush leaves the device using the old translation. The **checking mode** (a constructor flag,
//! on in tests) catches that: on every hit it walks the page table too, and when the table no
//! longer has the translation, maps the address to a different target, or grants fewer
//! permissions, it records a [`Violation`] (and the access still goes ahead through the cached
//! translation, as hardware would: the pins keep it memory-safe).
//!
//! Replacement is the clock algorithm over a fixed number of slots. Every operation runs in an
//! [`AtomicSection`]: the IOTLB is page-level state and nothing here may sleep (DESIGN.md
//! invariant 3). The cache has no lock of its own; the [`Mmu`](crate::Mmu) keeps it under its
//! page-level lock together with the page table.

use std::collections::HashMap;

use svmirror_core::{AtomicSection, Range};

use crate::page_table::{PageTable, Translation};

/// The IOTLB size a [`Mmu`](crate::Mmu) gets by default.
pub const DEFAULT_IOTLB_ENTRIES: usize = 256;
/// Violation records kept; the count goes on past it.
const MAX_RECORDS: usize = 64;

/// An access through a cached translation that the page table no longer backs: a missing flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The address accessed.
    pub iova: u64,
    /// What the IOTLB said.
    pub cached: Translation,
    /// What the page table says now (`None`: not mapped).
    pub table: Option<Translation>,
}

/// Counters of an [`Iotlb`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that walked the page table.
    pub misses: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Range or full invalidations.
    pub flushes: u64,
    /// Entries removed by invalidations.
    pub flushed_entries: u64,
    /// Violations seen in checking mode.
    pub violations: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    tr: Translation,
    referenced: bool,
}

/// The translation cache. See the [module documentation](self).
pub struct Iotlb {
    slots: Vec<Option<Slot>>,
    /// Slot of each cached leaf, by [`key`]. Every slot it names is full: `insert` indexes a
    /// slot it has just filled; eviction and invalidation unindex a slot as they empty it.
    index: HashMap<u64, usize>,
    hand: usize,
    checking: bool,
    violations: Vec<Violation>,
    stats: IotlbStats,
}

impl std::fmt::Debug for Iotlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iotlb")
            .field("capacity", &self.slots.len())
            .field("len", &self.index.len())
            .field("checking", &self.checking)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Cache key of the leaf of size `bytes` that covers `iova`: its base with the size's log2 in
/// the low (always zero) bits.
fn key(iova: u64, bytes: u64) -> u64 {
    (iova & !(bytes - 1)) | u64::from(bytes.trailing_zeros())
}

const SIZES: [u64; 3] = [4 << 10, 2 << 20, 1 << 30];

impl Iotlb {
    /// An empty cache of `entries` slots (at least one), checking every hit against the page
    /// table if `checking`.
    pub fn new(entries: usize, checking: bool) -> Self {
        let entries = entries.max(1);
        Iotlb {
            slots: vec![None; entries],
            index: HashMap::with_capacity(entries),
            hand: 0,
            checking,
            violations: Vec::new(),
            stats: IotlbStats::default(),
        }
    }

    /// Translates `iova` for a device access: from the cache, or by walking `pt` and caching
    /// the leaf. `None` when neither has a translation (a device fault).
    pub fn lookup(&mut self, iova: u64, pt: &PageTable) -> Option<Translation> {
        let _atomic = AtomicSection::enter();
        let hit = SIZES
            .iter()
            .find_map(|&b| self.index.get(&key(iova, b)).copied());
        if let Some(i) = hit {
            self.stats.hits += 1;
            #[expect(
                clippy::expect_used,
                reason = "every slot `index` names is full (see the field)"
            )]
            let slot = self.slots[i].as_mut().expect("indexed slot is full");
            slot.referenced = true;
            let cached = slot.tr;
            if self.checking {
                self.check(iova, cached, pt);
            }
            return Some(cached);
        }
        self.stats.misses += 1;
        let tr = pt.translate(iova)?;
        self.insert(tr);
        Some(tr)
    }

    fn check(&mut self, iova: u64, cached: Translation, pt: &PageTable) {
        let table = pt.translate(iova);
        let ok = table.is_some_and(|t| {
            t.target_at(iova) == cached.target_at(iova) && cached.perms <= t.perms
        });
        if ok {
            return;
        }
        self.stats.violations += 1;
        let v = Violation {
            iova,
            cached,
            table,
        };
        tracing::error!(
            iova,
            cached = %cached.target,
            table = ?table.map(|t| t.target_at(iova)),
            "IOTLB violation: access through a translation the page table no longer has \
             (a missing IOTLB flush)"
        );
        if self.violations.len() < MAX_RECORDS {
            self.violations.push(v);
        }
    }

    fn insert(&mut self, tr: Translation) {
        let k = key(tr.iova, tr.size.bytes());
        if let Some(&i) = self.index.get(&k) {
            self.slots[i] = Some(Slot {
                tr,
                referenced: true,
            });
            return;
        }
        let n = self.slots.len();
        let i = loop {
            match &mut self.slots[self.hand] {
                None => break self.hand,
                Some(s) if !s.referenced => {
                    let old = s.tr;
                    self.index.remove(&key(old.iova, old.size.bytes()));
                    self.stats.evictions += 1;
                    break self.hand;
                }
                Some(s) => s.referenced = false,
            }
            self.hand = (self.hand + 1) % n;
        };
        self.hand = (i + 1) % n;
        self.slots[i] = Some(Slot {
            tr,
            referenced: true,
        });
        self.index.insert(k, i);
    }

    /// Drops every cached leaf that overlaps `range`.
    pub fn invalidate_range(&mut self, range: Range) {
        let _atomic = AtomicSection::enter();
        self.stats.flushes += 1;
        for slot in &mut self.slots {
            if let Some(s) = slot {
                if s.tr.iova < range.end() && range.start() < s.tr.end() {
                    self.index.remove(&key(s.tr.iova, s.tr.size.bytes()));
                    *slot = None;
                    self.stats.flushed_entries += 1;
                }
            }
        }
    }

    /// Drops everything.
    pub fn invalidate_all(&mut self) {
        let _atomic = AtomicSection::enter();
        self.stats.flushes += 1;
        self.stats.flushed_entries += self.index.len() as u64;
        self.index.clear();
        self.slots.fill(None);
    }

    /// Whether hits are checked against the page table.
    pub fn is_checking(&self) -> bool {
        self.checking
    }

    /// Entries cached now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The first violations seen (at most 64 are kept; [`IotlbStats::violations`] counts all).
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// The counters.
    pub fn stats(&self) -> IotlbStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_table::Perms;
    use crate::pin::{PinId, Target};

    fn target(pin: u32, offset: u64) -> Target {
        Target {
            pin: PinId::for_tests(pin),
            offset,
        }
    }

    fn table() -> PageTable {
        let mut pt = PageTable::new();
        pt.map(0x20_0000, 0x20_0000, target(1, 0), Perms::ReadWrite)
            .unwrap();
        pt.map(0x1000, 0x3000, target(2, 0), Perms::Read).unwrap();
        pt
    }

    #[test]
    fn miss_fills_from_page_table_and_then_hits() {
        let pt = table();
        let mut tlb = Iotlb::new(8, true);
        let a = tlb.lookup(0x20_1234, &pt).unwrap();
        let b = tlb.lookup(0x3f_0000, &pt).unwrap();
        assert_eq!(a, b, "one 2 MiB leaf serves both");
        assert_eq!(tlb.stats().misses, 1);
        assert_eq!(tlb.stats().hits, 1);
        assert_eq!(tlb.len(), 1);
    }

    #[test]
    fn unmapped_address_is_not_cached() {
        let pt = table();
        let mut tlb = Iotlb::new(8, false);
        assert_eq!(tlb.lookup(0x9000, &pt), None);
        assert!(tlb.is_empty());
    }

    #[test]
    fn stale_entry_is_served_until_flushed() {
        let mut pt = table();
        let mut tlb = Iotlb::new(8, false);
        tlb.lookup(0x1000, &pt).unwrap();
        pt.unmap(0x1000, 0x1000).unwrap();
        assert!(tlb.lookup(0x1000, &pt).is_some(), "no flush, still cached");
        tlb.invalidate_range(Range::new(0x1000, 0x2000).unwrap());
        assert_eq!(tlb.lookup(0x1000, &pt), None);
    }

    #[test]
    fn checking_mode_reports_access_through_unflushed_unmapped_entry() {
        let mut pt = table();
        let mut tlb = Iotlb::new(8, true);
        let cached = tlb.lookup(0x2000, &pt).unwrap();
        pt.unmap(0x2000, 0x1000).unwrap();
        tlb.lookup(0x2010, &pt).unwrap();
        assert_eq!(tlb.stats().violations, 1);
        assert_eq!(
            tlb.violations(),
            &[Violation {
                iova: 0x2010,
                cached,
                table: None
            }]
        );
    }

    #[test]
    fn checking_mode_reports_remap_to_other_target() {
        let mut pt = table();
        let mut tlb = Iotlb::new(8, true);
        tlb.lookup(0x2000, &pt).unwrap();
        pt.unmap(0x2000, 0x1000).unwrap();
        pt.map(0x2000, 0x1000, target(3, 0), Perms::Read).unwrap();
        tlb.lookup(0x2000, &pt).unwrap();
        let v = tlb.violations()[0];
        assert_eq!(v.table.unwrap().target, target(3, 0));
        assert_eq!(v.cached.target, target(2, 0x1000));
    }

    #[test]
    fn checking_mode_reports_unflushed_permission_downgrade() {
        let mut pt = table();
        let mut tlb = Iotlb::new(8, true);
        tlb.lookup(0x20_0000, &pt).unwrap();
        pt.protect(0x20_0000, 0x20_0000, Perms::Read).unwrap();
        tlb.lookup(0x20_0000, &pt).unwrap();
        assert_eq!(tlb.stats().violations, 1);
    }

    #[test]
    fn checking_mode_is_quiet_when_flushed() {
        let mut pt = table();
        let mut tlb = Iotlb::new(8, true);
        for iova in [0x1000, 0x2000, 0x3000, 0x20_0000] {
            tlb.lookup(iova, &pt).unwrap();
        }
        pt.unmap(0x1000, 0x3000).unwrap();
        tlb.invalidate_range(Range::new(0x1000, 0x4000).unwrap());
        pt.map(0x1000, 0x3000, target(4, 0), Perms::ReadWrite)
            .unwrap();
        for iova in [0x1000, 0x2000, 0x3000, 0x20_0000, 0x1000] {
            tlb.lookup(iova, &pt).unwrap();
        }
        assert_eq!(tlb.stats().violations, 0);
    }

    #[test]
    fn clock_evicts_when_full() {
        let mut pt = PageTable::new();
        pt.map(0, 0x10_0000, target(1, 0), Perms::Read).unwrap();
        let mut tlb = Iotlb::new(4, false);
        for i in 0..6u64 {
            tlb.lookup(i * 0x1000, &pt).unwrap();
        }
        assert_eq!(tlb.len(), 4);
        assert_eq!(tlb.stats().evictions, 2);
    }

    #[test]
    fn clock_keeps_recently_used_entry() {
        let mut pt = PageTable::new();
        pt.map(0, 0x10_0000, target(1, 0), Perms::Read).unwrap();
        let mut tlb = Iotlb::new(2, false);
        tlb.lookup(0x0000, &pt).unwrap();
        tlb.lookup(0x1000, &pt).unwrap();
        tlb.lookup(0x2000, &pt).unwrap(); // clears both bits, evicts 0x0000
        tlb.lookup(0x2000, &pt).unwrap(); // marks 0x2000 used again
        tlb.lookup(0x3000, &pt).unwrap(); // evicts 0x1000, not 0x2000
        let misses = tlb.stats().misses;
        tlb.lookup(0x2000, &pt).unwrap();
        assert_eq!(tlb.stats().misses, misses, "0x2000 stayed cached");
    }

    #[test]
    fn invalidate_range_drops_only_overlapping_entries() {
        let pt = table();
        let mut tlb = Iotlb::new(8, false);
        tlb.lookup(0x1000, &pt).unwrap();
        tlb.lookup(0x20_0000, &pt).unwrap();
        // A range touching one page of the 2 MiB leaf drops all of it.
        tlb.invalidate_range(Range::new(0x3f_f000, 0x40_0000).unwrap());
        assert_eq!(tlb.len(), 1);
        assert_eq!(tlb.stats().flushed_entries, 1);
        tlb.invalidate_all();
        assert!(tlb.is_empty());
    }
}
