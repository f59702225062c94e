//! Pure planning, no system calls: the chunk granule, chunk windows, the IOVA allocator and
//! the mapping budget.
//!
//! Type1 cannot unmap part of an earlier mapping (an unmap that splits one fails), so the mapper
//! maps in fixed, aligned chunks, each run of one VMA in a chunk one mapping, and invalidates
//! whole mappings: an invalidation of part of one unmaps all of it, and the next fault maps
//! again what is still valid.

use std::collections::BTreeMap;

use svmirror_core::{PAGE_SIZE, Range};

use crate::error::{Result, VfioError};

/// The largest chunk the mapper uses: one 2 MiB IOMMU leaf.
pub const MAX_GRANULE: u64 = 2 << 20;

/// The chunk size for mirroring `range` on an IOMMU with page-size bitmap `page_sizes`: the
/// largest power of two not above [`MAX_GRANULE`] nor the range's length, and at least the
/// IOMMU's smallest page (and [`PAGE_SIZE`]). 2 MiB for any range of 2 MiB or more.
///
/// ```
/// use svmirror_core::Range;
/// use svmirror_vfio::chunk_granule;
/// let vtd = 0x4020_1000; // 4 KiB | 2 MiB | 1 GiB
/// assert_eq!(chunk_granule(vtd, Range::with_len(0, 64 << 20)?), 2 << 20);
/// assert_eq!(chunk_granule(vtd, Range::with_len(0, 96 << 10)?), 64 << 10);
/// assert_eq!(chunk_granule(vtd, Range::with_len(0, 4096)?), 4096);
/// # Ok::<(), svmirror_core::Error>(())
/// ```
pub fn chunk_granule(page_sizes: u64, range: Range) -> u64 {
    let min_page = if page_sizes == 0 {
        PAGE_SIZE
    } else {
        (1u64 << page_sizes.trailing_zeros()).max(PAGE_SIZE)
    };
    let fit = 1u64 << (63 - range.len().leading_zeros());
    fit.min(MAX_GRANULE).max(min_page)
}

/// The chunk window of `granule` holding `addr`, clamped to `limit`.
pub(crate) fn window(addr: u64, granule: u64, limit: Range) -> Option<Range> {
    let start = addr & !(granule - 1);
    Range::with_len(start, granule).ok()?.intersect(&limit)
}

/// A first-fit allocator of aligned IOVA windows out of the IOMMU's usable ranges, for
/// mirrors whose virtual addresses the IOMMU cannot take as IOVAs.
///
/// Invariant: `free` holds disjoint, non-adjacent `[start, end)` spans keyed by start; every
/// allocated window lies outside them, and freeing a window merges it back.
#[derive(Debug, Default)]
pub struct IovaAllocator {
    free: BTreeMap<u64, u64>,
}

impl IovaAllocator {
    /// An allocator over `ranges` (`(first, last)` inclusive, as the kernel reports them),
    /// minus the page at IOVA 0 so that 0 never names a mapping.
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        let mut a = IovaAllocator::default();
        for &(first, last) in ranges {
            let start = first.max(PAGE_SIZE).next_multiple_of(PAGE_SIZE);
            let end = last.saturating_add(1) & !(PAGE_SIZE - 1);
            if start < end {
                a.insert(start, end);
            }
        }
        a
    }

    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.free.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.free.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.free.range(start..=end).next() {
            end = end.max(e);
            self.free.remove(&s);
        }
        self.free.insert(start, end);
    }

    /// Allocates a `len`-byte window aligned to `align` (both powers of two, at least a page).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        let found = self.free.iter().find_map(|(&s, &e)| {
            let at = s.checked_next_multiple_of(align)?;
            (at.checked_add(len)? <= e).then_some((s, e, at))
        });
        let (s, e, at) = found.ok_or(VfioError::IovaExhausted { len })?;
        self.free.remove(&s);
        if s < at {
            self.free.insert(s, at);
        }
        if at + len < e {
            self.free.insert(at + len, e);
        }
        Ok(at)
    }

    /// Returns a window from [`alloc`](Self::alloc).
    pub fn free(&mut self, at: u64, len: u64) {
        debug_assert!(
            self.free
                .range(..at + len)
                .next_back()
                .is_none_or(|(_, &e)| e <= at),
            "double free of IOVA {at:#x}"
        );
        self.insert(at, at + len);
    }

    /// Free bytes left.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }
}

/// Whether `range` (identity IOVA) lies inside one of the usable IOVA ranges.
pub fn identity_fits(ranges: &[(u64, u64)], range: Range) -> bool {
    ranges.is_empty()
        || ranges
            .iter()
            .any(|&(first, last)| first <= range.start() && range.last() <= last)
}

/// The container's mapping budget: how many mappings (`vfio_dma` entries) it may still hold.
///
/// `available` starts at the `dma_avail` the kernel reported when the mapper was made and
/// moves with every mapping the mapper makes or removes; the mapper refuses a chunk that needs
/// more than is left instead of letting the kernel fail with ENOSPC half way through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Mappings the container may still create.
    pub available: u32,
    /// Mappings this mapper holds.
    pub used: u32,
}

impl Budget {
    /// Takes `n` mappings, or says why not.
    pub fn take(&mut self, n: u32) -> Result<()> {
        if n > self.available {
            return Err(VfioError::BudgetExhausted {
                needed: n,
                available: self.available,
            });
        }
        self.available -= n;
        self.used += n;
        Ok(())
    }

    /// Gives back `n` mappings.
    pub fn give(&mut self, n: u32) {
        debug_assert!(n <= self.used);
        self.available += n;
        self.used -= n.min(self.used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VTD: u64 = 0x4020_1000;

    #[test]
    fn granule_is_2m_where_it_fits_and_never_below_the_iommu_page() {
        let r = |len| Range::with_len(0x40_0000, len).unwrap();
        assert_eq!(chunk_granule(VTD, r(1 << 30)), 2 << 20);
        assert_eq!(chunk_granule(VTD, r(2 << 20)), 2 << 20);
        assert_eq!(chunk_granule(VTD, r((2 << 20) - 4096)), 1 << 20);
        assert_eq!(chunk_granule(VTD, r(8192)), 8192);
        // An IOMMU whose smallest page is 64 KiB.
        assert_eq!(chunk_granule(0x1_0000, r(8192)), 64 << 10);
    }

    #[test]
    fn window_is_aligned_and_clamped_to_the_limit() {
        let limit = Range::new(0x1f_f000, 0x40_1000).unwrap();
        let g = 2 << 20;
        assert_eq!(
            window(0x1f_f000, g, limit),
            Some(Range::new(0x1f_f000, 0x20_0000).unwrap())
        );
        assert_eq!(
            window(0x30_0000, g, limit),
            Some(Range::new(0x20_0000, 0x40_0000).unwrap())
        );
        assert_eq!(
            window(0x40_0000, g, limit),
            Some(Range::new(0x40_0000, 0x40_1000).unwrap())
        );
    }

    #[test]
    fn allocator_aligns_skips_iova_zero_and_reuses_freed_windows() {
        let mut a = IovaAllocator::new(&[(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]);
        let g = 2 << 20;
        let x = a.alloc(g, g).unwrap();
        assert_eq!(x, g, "IOVA 0 is never handed out");
        let y = a.alloc(g, g).unwrap();
        assert_eq!(y, 2 * g);
        a.free(x, g);
        assert_eq!(a.alloc(g, g).unwrap(), x);
        let small = a.alloc(4096, 4096).unwrap();
        assert_eq!(small, 4096);
    }

    #[test]
    fn allocator_merges_on_free_and_reports_exhaustion() {
        let mut a = IovaAllocator::new(&[(0x10_0000, 0x2f_ffff)]);
        let total = a.free_bytes();
        assert_eq!(total, 0x20_0000);
        let x = a.alloc(0x10_0000, 0x10_0000).unwrap();
        let y = a.alloc(0x10_0000, 0x10_0000).unwrap();
        assert!(matches!(
            a.alloc(4096, 4096),
            Err(VfioError::IovaExhausted { len: 4096 })
        ));
        a.free(y, 0x10_0000);
        a.free(x, 0x10_0000);
        assert_eq!(a.free_bytes(), total);
        assert_eq!(a.alloc(0x20_0000, 0x10_0000).unwrap(), 0x10_0000);
    }

    #[test]
    fn identity_needs_the_whole_range_in_one_usable_range() {
        let ranges = [(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)];
        let low = Range::with_len(0x1000_0000, 0x20_0000).unwrap();
        let across_msi = Range::new(0xfe00_0000, 0xff00_0000).unwrap();
        let high = Range::with_len(0x7fff_0000_0000, 0x1000).unwrap();
        assert!(identity_fits(&ranges, low));
        assert!(!identity_fits(&ranges, across_msi));
        assert!(!identity_fits(&ranges, high));
        assert!(identity_fits(&[], high), "no ranges reported: all of it");
    }

    #[test]
    fn budget_refuses_what_it_does_not_have_and_takes_nothing() {
        let mut b = Budget {
            available: 2,
            used: 0,
        };
        b.take(2).unwrap();
        assert!(matches!(
            b.take(1),
            Err(VfioError::BudgetExhausted {
                needed: 1,
                available: 0
            })
        ));
        assert_eq!(
            b,
            Budget {
                available: 0,
                used: 2
            }
        );
        b.give(2);
        assert_eq!(
            b,
            Budget {
                available: 2,
                used: 0
            }
        );
    }
}
