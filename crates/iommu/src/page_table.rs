//! The IO page table: a 4-level radix tree of 512-entry tables over a 48-bit IOVA space, as on
//! x86-64, with 4 KiB, 2 MiB and 1 GiB leaves.
//!
//! A leaf maps an IOVA range to a [`Target`] (a pin and an offset into it, never a raw address:
//! DESIGN.md invariant 2) with [`Perms`]. Operations work on ranges: `map` picks the largest leaf
//! that the IOVA's alignment and the remaining length allow; `unmap` and `protect` split a large
//! leaf they cover only in part; `unmap` frees tables that become empty, and every table
//! allocated or freed is counted so tests prove nothing leaks.
//!
//! Strict operations (`map`, `unmap`, `protect`) check the whole range first and change nothing
//! on error. The `*_present` forms, used by invalidations, act on whatever is mapped in the range.
//!
//! The table is a plain data structure with no lock of its own: the [`Mmu`](crate::Mmu) keeps it
//! under its page-level lock.

use std::fmt;

use svmirror_core::MirrorError;
use svmirror_core::{PAGE_SIZE, Range};

use crate::error::{IommuError, Result};
use crate::pin::Target;

/// Width of the IOVA space.
pub const IOVA_BITS: u32 = 48;
/// One past the highest IOVA.
pub const IOVA_END: u64 = 1 << IOVA_BITS;

const ENTRIES: usize = 512;
const LEVELS: usize = 4;
const ROOT_LEVEL: usize = LEVELS - 1;

/// Bytes covered by one entry of a table at `level` (0 = the 4 KiB level).
const fn span(level: usize) -> u64 {
    PAGE_SIZE << (9 * level)
}

/// What a device may do through a mapping. Ordered: `Read < ReadWrite`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Perms {
    /// Reads only.
    Read,
    /// Reads and writes (and atomics).
    ReadWrite,
}

impl Perms {
    /// Whether a write is allowed.
    pub const fn writable(self) -> bool {
        matches!(self, Perms::ReadWrite)
    }
}

/// The size of a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeafSize {
    /// 4 KiB, a level-1 (PTE) leaf.
    Size4K,
    /// 2 MiB, a level-2 (PMD) leaf.
    Size2M,
    /// 1 GiB, a level-3 (PUD) leaf.
    Size1G,
}

impl LeafSize {
    /// Bytes covered.
    pub const fn bytes(self) -> u64 {
        span(self.level())
    }

    const fn level(self) -> usize {
        match self {
            LeafSize::Size4K => 0,
            LeafSize::Size2M => 1,
            LeafSize::Size1G => 2,
        }
    }

    const fn from_level(level: usize) -> LeafSize {
        match level {
            0 => LeafSize::Size4K,
            1 => LeafSize::Size2M,
            _ => LeafSize::Size1G,
        }
    }
}

/// One leaf as a walk finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// First IOVA of the leaf (aligned to its size).
    pub iova: u64,
    /// The leaf's size.
    pub size: LeafSize,
    /// Target of the leaf's first byte.
    pub target: Target,
    /// Permissions.
    pub perms: Perms,
}

impl Translation {
    /// One past the leaf's last IOVA.
    pub const fn end(&self) -> u64 {
        self.iova + self.size.bytes()
    }

    /// Whether `iova` lies in the leaf.
    pub const fn contains(&self, iova: u64) -> bool {
        self.iova <= iova && iova < self.end()
    }

    /// The target of `iova`, which must lie in the leaf.
    pub fn target_at(&self, iova: u64) -> Target {
        debug_assert!(self.contains(iova));
        self.target.add(iova - self.iova)
    }
}

/// A stretch of IOVAs that an unmap removed, with the target it mapped to. Adjacent leaves with
/// contiguous targets in the same pin are merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmapped {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// Target of the first byte.
    pub target: Target,
}

/// Counters of a page table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageTableStats {
    /// Tables allocated below the root, ever.
    pub tables_allocated: u64,
    /// Tables freed, ever.
    pub tables_freed: u64,
    /// Live leaves by size: 4 KiB, 2 MiB, 1 GiB.
    pub leaves: [u64; 3],
    /// Bytes mapped now.
    pub mapped_bytes: u64,
}

impl PageTableStats {
    /// Tables alive below the root.
    pub const fn live_tables(&self) -> u64 {
        self.tables_allocated - self.tables_freed
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leaf {
    target: Target,
    perms: Perms,
}

enum Entry {
    Empty,
    Table(Box<Table>),
    Leaf(Leaf),
}

/// One 512-entry table. `used` counts the entries that are not `Empty`.
struct Table {
    entries: [Entry; ENTRIES],
    used: u16,
}

impl Table {
    fn new() -> Box<Table> {
        Box::new(Table {
            entries: std::array::from_fn(|_| Entry::Empty),
            used: 0,
        })
    }
}

/// A multi-level IO page table. See the [module documentation](self).
pub struct PageTable {
    root: Box<Table>,
    stats: PageTableStats,
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PageTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTable")
            .field("stats", &self.stats)
            .finish()
    }
}

/// The whole IOVA space, `[0, IOVA_END)`.
#[expect(
    clippy::expect_used,
    reason = "IOVA_END is a non-zero multiple of the page size (asserted at compile time)"
)]
pub(crate) fn iova_space() -> Range {
    const { assert!(IOVA_END > 0 && IOVA_END % PAGE_SIZE == 0) };
    Range::new(0, IOVA_END).expect("the IOVA space is a range")
}

/// Validates `[iova, iova + len)` as a page-aligned range inside the IOVA space.
pub fn iova_range(iova: u64, len: u64) -> Result<Range> {
    let range = Range::with_len(iova, len).map_err(|source| {
        IommuError::Mirror(MirrorError::InvalidRange {
            addr: iova,
            len,
            source,
        })
    })?;
    check_iova_space(range)
}

/// Checks that `range` lies inside the IOVA space.
pub fn check_iova_space(range: Range) -> Result<Range> {
    if range.end() > IOVA_END {
        return Err(IommuError::OutsideIovaSpace { range });
    }
    Ok(range)
}

/// The index range of `table`'s entries (at `level`, first IOVA `base`) that `[start, end)` touches,
/// with each entry's base.
fn entries_in(level: usize, base: u64, start: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let s = span(level);
    let first = ((start.max(base) - base) / s) as usize;
    let last = ((end.min(base + s * ENTRIES as u64) - 1 - base) / s) as usize;
    (first..=last).map(move |i| (i, base + i as u64 * s))
}

impl PageTable {
    /// An empty page table (just the root).
    pub fn new() -> Self {
        PageTable {
            root: Table::new(),
            stats: PageTableStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> PageTableStats {
        self.stats
    }

    /// Maps `[iova, iova + len)` to `target` onwards with `perms`, each piece with the largest
    /// leaf its alignment and length allow. Errors, with nothing changed: an invalid range,
    /// [`IommuError::AlreadyMapped`] at the first page already mapped.
    pub fn map(&mut self, iova: u64, len: u64, target: Target, perms: Perms) -> Result<()> {
        let range = iova_range(iova, len)?;
        if let Some(at) = self.first_page(range, true) {
            return Err(IommuError::AlreadyMapped { iova: at });
        }
        let leaf = Leaf { target, perms };
        let stats = &mut self.stats;
        map_rec(
            &mut self.root,
            ROOT_LEVEL,
            0,
            range,
            range.start(),
            leaf,
            stats,
        );
        self.stats.mapped_bytes += range.len();
        Ok(())
    }

    /// Unmaps `[iova, iova + len)`, which must be mapped in full, and frees tables left empty.
    /// Errors, with nothing changed: an invalid range, [`IommuError::NotMapped`] at the first page
    /// not mapped (a double unmap).
    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<Vec<Unmapped>> {
        let range = iova_range(iova, len)?;
        if let Some(at) = self.first_page(range, false) {
            return Err(IommuError::NotMapped { iova: at });
        }
        Ok(self.unmap_present(range, true))
    }

    /// Unmaps whatever is mapped in `range` and returns it; frees tables left empty when
    /// `free_tables` (an `Unmap` event), else keeps them for the refault that is likely to follow.
    /// Empty tables in the range are freed too when `free_tables`.
    pub fn unmap_present(&mut self, range: Range, free_tables: bool) -> Vec<Unmapped> {
        let mut out = Vec::new();
        if range.start() >= IOVA_END {
            return out;
        }
        let end = range.end().min(IOVA_END);
        let mut w = Walk {
            stats: &mut self.stats,
            out: &mut out,
            free_tables,
        };
        unmap_rec(&mut self.root, ROOT_LEVEL, 0, range.start(), end, &mut w);
        out
    }

    /// Downgrades the permissions of `[iova, iova + len)`, which must be mapped in full, to at
    /// most `perms` (a permission is never added). Errors, with nothing changed: an invalid
    /// range, [`IommuError::NotMapped`] at the first page not mapped.
    pub fn protect(&mut self, iova: u64, len: u64, perms: Perms) -> Result<u64> {
        let range = iova_range(iova, len)?;
        if let Some(at) = self.first_page(range, false) {
            return Err(IommuError::NotMapped { iova: at });
        }
        Ok(self.protect_present(range, perms))
    }

    /// Downgrades whatever is mapped in `range` to at most `perms`; returns the bytes changed.
    pub fn protect_present(&mut self, range: Range, perms: Perms) -> u64 {
        if range.start() >= IOVA_END {
            return 0;
        }
        let end = range.end().min(IOVA_END);
        protect_rec(
            &mut self.root,
            ROOT_LEVEL,
            0,
            (range.start(), end),
            perms,
            &mut self.stats,
        )
    }

    /// The leaf that maps `iova`, if any.
    pub fn translate(&self, iova: u64) -> Option<Translation> {
        if iova >= IOVA_END {
            return None;
        }
        let mut table = &self.root;
        let mut level = ROOT_LEVEL;
        loop {
            let s = span(level);
            let i = ((iova / s) % ENTRIES as u64) as usize;
            match &table.entries[i] {
                Entry::Empty => return None,
                Entry::Table(t) => {
                    table = t;
                    level -= 1;
                }
                Entry::Leaf(l) => {
                    return Some(Translation {
                        iova: iova & !(s - 1),
                        size: LeafSize::from_level(level),
                        target: l.target,
                        perms: l.perms,
                    });
                }
            }
        }
    }

    /// Every leaf overlapping `range`, in IOVA order.
    pub fn leaves(&self, range: Range) -> Vec<Translation> {
        let mut out = Vec::new();
        let mut at = range.start();
        while at < range.end().min(IOVA_END) {
            match self.translate(at) {
                Some(t) => {
                    at = t.end();
                    out.push(t);
                }
                None => at = self.next_boundary(at),
            }
        }
        out
    }

    /// The next address after `iova` where a walk could find something new: the end of the
    /// empty entry (at whatever level) that covers `iova`.
    fn next_boundary(&self, iova: u64) -> u64 {
        let mut table = &self.root;
        let mut level = ROOT_LEVEL;
        loop {
            let s = span(level);
            let i = ((iova / s) % ENTRIES as u64) as usize;
            match &table.entries[i] {
                Entry::Table(t) if level > 0 => {
                    table = t;
                    level -= 1;
                }
                _ => return (iova & !(s - 1)) + s,
            }
        }
    }

    /// The first page of `range` that is mapped (`mapped`) or not mapped (`!mapped`).
    fn first_page(&self, range: Range, mapped: bool) -> Option<u64> {
        let mut at = range.start();
        while at < range.end() {
            match (self.translate(at), mapped) {
                (Some(_), true) | (None, false) => return Some(at),
                (Some(t), false) => at = t.end(),
                (None, true) => at = self.next_boundary(at),
            }
        }
        None
    }
}

/// Maps `range ∩ this table` with leaves from `leaf`, whose target is that of `origin`.
fn map_rec(
    table: &mut Table,
    level: usize,
    base: u64,
    range: Range,
    origin: u64,
    leaf: Leaf,
    stats: &mut PageTableStats,
) {
    let s = span(level);
    for (i, entry_base) in entries_in(level, base, range.start(), range.end()) {
        let whole = range.start() <= entry_base && entry_base + s <= range.end();
        if whole && level < ROOT_LEVEL {
            // A table that an invalidation emptied but kept (`Clear` keeps page-table memory)
            // goes, with any empty tables below it, before the whole leaf takes its place.
            if let Entry::Table(t) = &table.entries[i] {
                if let Some(n) = leafless_tables(t) {
                    table.entries[i] = Entry::Empty;
                    table.used -= 1;
                    stats.tables_freed += n;
                }
            }
            debug_assert!(matches!(table.entries[i], Entry::Empty));
            table.entries[i] = Entry::Leaf(Leaf {
                target: leaf.target.add(entry_base - origin),
                perms: leaf.perms,
            });
            table.used += 1;
            stats.leaves[level] += 1;
            continue;
        }
        if matches!(table.entries[i], Entry::Empty) {
            table.entries[i] = Entry::Table(Table::new());
            table.used += 1;
            stats.tables_allocated += 1;
        }
        match &mut table.entries[i] {
            Entry::Table(t) => map_rec(t, level - 1, entry_base, range, origin, leaf, stats),
            // The caller checked the range is free.
            _ => debug_assert!(false, "map over a leaf at {entry_base:#x}"),
        }
    }
}

/// How many tables `t` and the tables below it are, if none of them holds a leaf.
fn leafless_tables(t: &Table) -> Option<u64> {
    let mut n = 1;
    for e in &t.entries {
        match e {
            Entry::Empty => {}
            Entry::Leaf(_) => return None,
            Entry::Table(c) => n += leafless_tables(c)?,
        }
    }
    Some(n)
}

/// Replaces the leaf in `entry` (at `level`) with a table of 512 smaller leaves.
fn split(entry: &mut Entry, level: usize, stats: &mut PageTableStats) {
    let Entry::Leaf(leaf) = *entry else {
        return;
    };
    let child = span(level - 1);
    let mut t = Table::new();
    for (i, e) in t.entries.iter_mut().enumerate() {
        *e = Entry::Leaf(Leaf {
            target: leaf.target.add(i as u64 * child),
            perms: leaf.perms,
        });
    }
    t.used = ENTRIES as u16;
    stats.tables_allocated += 1;
    stats.leaves[level] -= 1;
    stats.leaves[level - 1] += ENTRIES as u64;
    *entry = Entry::Table(t);
}

struct Walk<'a> {
    stats: &'a mut PageTableStats,
    out: &'a mut Vec<Unmapped>,
    free_tables: bool,
}

impl Walk<'_> {
    fn record(&mut self, iova: u64, len: u64, target: Target) {
        if let Some(last) = self.out.last_mut() {
            if last.iova + last.len == iova
                && last.target.pin == target.pin
                && last.target.offset + last.len == target.offset
            {
                last.len += len;
                return;
            }
        }
        self.out.push(Unmapped { iova, len, target });
    }
}

fn unmap_rec(table: &mut Table, level: usize, base: u64, start: u64, end: u64, w: &mut Walk<'_>) {
    let s = span(level);
    for (i, entry_base) in entries_in(level, base, start, end) {
        let whole = start <= entry_base && entry_base + s <= end;
        if let Entry::Leaf(leaf) = table.entries[i] {
            if whole {
                table.entries[i] = Entry::Empty;
                table.used -= 1;
                w.stats.leaves[level] -= 1;
                w.stats.mapped_bytes -= s;
                w.record(entry_base, s, leaf.target);
                continue;
            }
            split(&mut table.entries[i], level, w.stats);
        }
        let emptied = match &mut table.entries[i] {
            Entry::Table(t) => {
                unmap_rec(t, level - 1, entry_base, start, end, w);
                t.used == 0
            }
            _ => false,
        };
        if emptied && w.free_tables {
            table.entries[i] = Entry::Empty;
            table.used -= 1;
            w.stats.tables_freed += 1;
        }
    }
}

fn protect_rec(
    table: &mut Table,
    level: usize,
    base: u64,
    (start, end): (u64, u64),
    perms: Perms,
    stats: &mut PageTableStats,
) -> u64 {
    let s = span(level);
    let mut changed = 0;
    for (i, entry_base) in entries_in(level, base, start, end) {
        let whole = start <= entry_base && entry_base + s <= end;
        if let Entry::Leaf(leaf) = &mut table.entries[i] {
            let new = leaf.perms.min(perms);
            if new == leaf.perms {
                continue;
            }
            if whole {
                leaf.perms = new;
                changed += s;
                continue;
            }
            split(&mut table.entries[i], level, stats);
        }
        if let Entry::Table(t) = &mut table.entries[i] {
            changed += protect_rec(t, level - 1, entry_base, (start, end), perms, stats);
        }
    }
    changed
}

#[cfg(test)]
#[path = "page_table_tests.rs"]
mod tests;
