//! Address ranges and the reasons invalidations carry.

use std::fmt;

use crate::error::{Error, Result};

/// The CPU page size the core reasons in. svmirror targets x86-64 and arm64 with 4 KiB base
/// pages; huge pages are expressed as an order on top of it.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// A half-open, page-aligned, non-empty virtual address range `[start, end)`.
///
/// Every value of this type has been validated, so code that holds one never re-checks it.
///
/// ```
/// use svmirror_core::{Range, Error};
/// let r = Range::new(0x1000, 0x3000).unwrap();
/// assert_eq!(r.pages(), 2);
/// assert!(matches!(Range::new(0x1000, 0x1000), Err(Error::EmptyRange { .. })));
/// assert!(matches!(Range::new(0x1001, 0x3000), Err(Error::UnalignedRange { .. })));
/// assert!(matches!(Range::new(0x3000, 0x1000), Err(Error::ReversedRange { .. })));
/// assert!(matches!(Range::with_len(u64::MAX - 0xfff, 0x2000), Err(Error::RangeOverflow { .. })));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Range {
    start: u64,
    end: u64,
}

impl Range {
    /// Every address a process can map: `[0, 2^64 - PAGE_SIZE)`. Release invalidates this.
    pub const FULL: Range = Range {
        start: 0,
        end: !(PAGE_SIZE - 1),
    };

    /// Validates `[start, end)`: both page aligned, `start < end`.
    pub fn new(start: u64, end: u64) -> Result<Self> {
        if end < start {
            return Err(Error::ReversedRange { start, end });
        }
        if start == end {
            return Err(Error::EmptyRange { start, end });
        }
        if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
            return Err(Error::UnalignedRange { start, end });
        }
        Ok(Range { start, end })
    }

    /// Validates `[start, start + len)`, reporting an overflow of the end as its own error.
    pub fn with_len(start: u64, len: u64) -> Result<Self> {
        let end = start
            .checked_add(len)
            .ok_or(Error::RangeOverflow { start, len })?;
        Range::new(start, end)
    }

    /// First address in the range.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// One past the last address in the range.
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// The last address in the range (`end - 1`): interval-tree keys are inclusive.
    pub const fn last(&self) -> u64 {
        self.end - 1
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: a `Range` is never empty. Present for API symmetry with collections.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Number of base pages covered.
    pub const fn pages(&self) -> u64 {
        self.len() >> PAGE_SHIFT
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether `addr` lies in the range.
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The common part of two ranges, if any.
    pub fn intersect(&self, other: &Range) -> Option<Range> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(Range { start, end })
    }

    /// Widens the range outwards to multiples of `align` (a power of two, at least a page), so an
    /// invalidation that touches part of a huge page covers all of it (DESIGN.md invariant 4).
    /// Saturates at [`Range::FULL`]'s end rather than overflowing.
    pub fn widen_to(&self, align: u64) -> Range {
        debug_assert!(align.is_power_of_two() && align >= PAGE_SIZE);
        let start = self.start & !(align - 1);
        let end = match self.end.checked_add(align - 1) {
            Some(e) => (e & !(align - 1)).min(Range::FULL.end),
            None => Range::FULL.end,
        };
        Range {
            start,
            end: end.max(self.end),
        }
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies a driver that owns device memory or takes exclusive access: the
/// `owner` of `Migrate`/`Exclusive` events and of device-private pages in `range_fault`.
/// Choose a value unique among the drivers sharing one address space (the address of the driver's
/// own state is the usual choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner(pub u64);

/// Why the CPU side is invalidating a range (the kernel's `mmu_notifier_event`). Backends use it:
/// free page-table memory on `Unmap`, downgrade instead of tearing down on a protection change,
/// skip their own `Migrate`, ignore `SoftDirty` (DESIGN.md invariant 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// The range is unmapped (munmap, or mremap moving it away). The virtual range is gone.
    Unmap,
    /// Pages are dropped but the mapping stays (madvise DONTNEED/FREE/REMOVE, hole punch).
    Clear,
    /// The VMA's protection changes (mprotect): entries may be downgraded rather than removed.
    ProtectionVma,
    /// Protection of individual pages changes (write-protect for dirty tracking, KSM).
    ProtectionPage,
    /// Soft-dirty bits are being reset: no page or permission changes.
    SoftDirty,
    /// The address space is going away: every subscription is invalidated over everything.
    Release,
    /// Pages are migrating; the driver that started it (`owner`) may skip its own event.
    Migrate {
        /// The driver performing the migration.
        owner: Owner,
    },
    /// A driver takes exclusive (atomic) access to the pages.
    Exclusive {
        /// The driver taking exclusive access.
        owner: Owner,
    },
}

impl Event {
    /// Number of distinct event kinds, for per-kind counters.
    pub const KINDS: usize = 8;

    /// A dense index in `0..Event::KINDS`, for per-kind counters.
    pub const fn index(&self) -> usize {
        match self {
            Event::Unmap => 0,
            Event::Clear => 1,
            Event::ProtectionVma => 2,
            Event::ProtectionPage => 3,
            Event::SoftDirty => 4,
            Event::Release => 5,
            Event::Migrate { .. } => 6,
            Event::Exclusive { .. } => 7,
        }
    }

    /// The kind's name, as counters and logs print it.
    pub const fn name(&self) -> &'static str {
        Event::NAMES[self.index()]
    }

    /// Names of the kinds, indexed by [`Event::index`].
    pub const NAMES: [&'static str; Event::KINDS] = [
        "unmap",
        "clear",
        "protection-vma",
        "protection-page",
        "soft-dirty",
        "release",
        "migrate",
        "exclusive",
    ];

    /// The driver named in a `Migrate` or `Exclusive` event.
    pub const fn owner(&self) -> Option<Owner> {
        match self {
            Event::Migrate { owner } | Event::Exclusive { owner } => Some(*owner),
            _ => None,
        }
    }
}

/// One invalidation: what range, why, and whether callbacks may sleep
/// (the kernel's `mmu_notifier_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierRange {
    /// The range being invalidated.
    pub range: Range,
    /// Why.
    pub event: Event,
    /// False only for non-blocking starts (the kernel's OOM reaper): callbacks that would have to
    /// sleep must refuse with [`WouldBlock`](crate::WouldBlock) instead.
    pub blockable: bool,
}

impl NotifierRange {
    /// A blockable invalidation of `range` for `event`.
    pub const fn new(range: Range, event: Event) -> Self {
        NotifierRange {
            range,
            event,
            blockable: true,
        }
    }

    /// The same invalidation in non-blocking mode.
    pub const fn non_blocking(mut self) -> Self {
        self.blockable = false;
        self
    }

    /// Whether this is a `Migrate` or `Exclusive` event started by `owner`: the kernel's
    /// `range->owner == driver` test that lets a driver skip its own migration.
    pub fn is_own(&self, owner: Owner) -> bool {
        self.event.owner() == Some(owner)
    }

    /// Whether a mirror owned by `owner` may skip this invalidation altogether: its own
    /// migration or exclusive access ([`is_own`](Self::is_own)), or a soft-dirty reset, which
    /// changes no page and no permission a device sees.
    pub fn skippable_by(&self, owner: Owner) -> bool {
        self.is_own(owner) || self.event == Event::SoftDirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_migration_and_soft_dirty_are_skippable_anything_else_is_not() {
        let r = Range::new(0x1000, 0x2000).unwrap();
        let (me, other) = (Owner(1), Owner(2));
        let skip = |e| NotifierRange::new(r, e).skippable_by(me);
        assert!(skip(Event::Migrate { owner: me }));
        assert!(skip(Event::Exclusive { owner: me }));
        assert!(skip(Event::SoftDirty));
        assert!(!skip(Event::Migrate { owner: other }));
        assert!(!skip(Event::Exclusive { owner: other }));
        for e in [
            Event::Unmap,
            Event::Clear,
            Event::ProtectionVma,
            Event::ProtectionPage,
            Event::Release,
        ] {
            assert!(!skip(e), "{e:?}");
        }
    }

    #[test]
    fn zero_length_range_is_rejected() {
        assert!(matches!(
            Range::new(0x2000, 0x2000),
            Err(Error::EmptyRange { .. })
        ));
        assert!(matches!(
            Range::with_len(0x2000, 0),
            Err(Error::EmptyRange { .. })
        ));
    }

    #[test]
    fn unaligned_start_or_end_is_rejected() {
        assert!(matches!(
            Range::new(0x2001, 0x3000),
            Err(Error::UnalignedRange { .. })
        ));
        assert!(matches!(
            Range::new(0x2000, 0x3001),
            Err(Error::UnalignedRange { .. })
        ));
    }

    #[test]
    fn overflowing_length_is_rejected() {
        let e = Range::with_len(!0xfff, 0x2000).unwrap_err();
        assert!(matches!(e, Error::RangeOverflow { .. }));
        assert!(e.to_string().contains("overflows"), "{e}");
    }

    #[test]
    fn reversed_range_is_rejected() {
        assert!(matches!(
            Range::new(0x3000, 0x1000),
            Err(Error::ReversedRange { .. })
        ));
    }

    #[test]
    fn widen_covers_whole_huge_page() {
        let r = Range::new(0x20_1000, 0x20_3000).unwrap();
        assert_eq!(
            r.widen_to(0x20_0000),
            Range::new(0x20_0000, 0x40_0000).unwrap()
        );
        let top = Range::new(Range::FULL.end() - 0x1000, Range::FULL.end()).unwrap();
        assert_eq!(top.widen_to(0x20_0000).end(), Range::FULL.end());
    }

    #[test]
    fn overlap_is_half_open() {
        let a = Range::new(0x1000, 0x2000).unwrap();
        let b = Range::new(0x2000, 0x3000).unwrap();
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&Range::new(0x1000, 0x3000).unwrap()));
        assert_eq!(a.intersect(&b), None);
    }
}
