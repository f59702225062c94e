//! The GPU page table: storage buffers that map CPU pages to device addresses, read by
//! `shaders/svm.glsl`.
//!
//! # Layout (shared with the shader)
//!
//! - **Directory**: `dir_mask + 1` entries of two `u64`: the key (the 2 MiB block number plus
//!   one; [`EMPTY`] or [`DELETED`]) and the index of the block's leaf. Open addressing with
//!   linear probing from [`home`]; no key sits more than [`MAX_PROBE`] slots from its home, so
//!   a lookup stops after that many.
//! - **Leaves**: 512 `u64` entries each, one per 4 KiB page of the block: the device address of
//!   the page with [`VALID`] and [`WRITE`] in the top bits, or 0.
//!
//! Both live in host-visible memory and are written by the host only under the mirror's update
//! lock; the shader reads them at every translation (there is no device TLB to flush). A leaf
//! whose last entry goes is freed only on `Unmap` and `Release`, as the kernel frees page-table
//! pages only when the address range goes away. A freed leaf is reused only after the
//! invalidation that freed it has waited for the work in flight: a shader that read the old
//! directory entry must not then find another block's entries in the leaf. That holds for a
//! leaf freed with no entry cleared too (one an earlier `Clear` left empty): whoever frees
//! leaves compares `PageTable::leaves_freed` before and after, and drains on a change, under
//! the update lock, before any fault can take the leaf.

use std::collections::HashMap;
use std::sync::Arc;

use gpu_allocator::MemoryLocation;
use svmirror_core::MirrorError;
use svmirror_core::{PAGE_SHIFT, PAGE_SIZE, Range};

use crate::device::Gpu;
use crate::error::{Result, VulkanError};
use crate::memory::HostBuffer;

/// Leaf entry: the page is mapped.
pub const VALID: u64 = 1 << 63;
/// Leaf entry: the page may be written.
pub const WRITE: u64 = 1 << 62;
/// Directory key of a free slot.
pub const EMPTY: u64 = 0;
/// Directory key of a slot whose block was removed (lookups probe past it).
pub const DELETED: u64 = u64::MAX;
/// Longest probe sequence, host and shader alike.
pub const MAX_PROBE: u32 = 32;
/// Pages per leaf.
const LEAF_PAGES: u64 = 512;
/// Bytes one leaf maps.
pub const BLOCK: u64 = LEAF_PAGES * PAGE_SIZE;

/// The directory slot probing starts at for `block` (the shader computes the same).
pub fn home(block: u64, mask: u32) -> u32 {
    // 32-bit arithmetic only: 64-bit multiplies are slow on many shader cores (and emulated on
    // lavapipe's SIMD lanes).
    let folded = (block as u32) ^ ((block >> 32) as u32);
    (folded.wrapping_mul(0x9E37_79B1) >> 8) & mask
}

/// The page table. See the [module documentation](self).
pub(crate) struct PageTable {
    dir: HostBuffer,
    leaves: HostBuffer,
    mask: u32,
    leaf_count: u32,
    /// Host shadow: block → (directory slot, leaf index, valid entries in the leaf).
    blocks: HashMap<u64, (u32, u32, u32)>,
    free_leaves: Vec<u32>,
    /// Leaves freed since the table was made (only grows).
    leaves_freed: u64,
}

impl PageTable {
    /// A table of `leaf_count` leaves (each maps 2 MiB) and a directory twice that size.
    pub(crate) fn new(gpu: &Arc<Gpu>, leaf_count: u32) -> Result<Self> {
        if leaf_count == 0 || leaf_count > 1 << 20 {
            return Err(VulkanError::Mirror(MirrorError::InvalidConfig {
                reason: "page table leaves must be 1 to 2^20",
            }));
        }
        let slots = (u64::from(leaf_count) * 2).next_power_of_two();
        let dir = HostBuffer::new(gpu, slots * 16, MemoryLocation::CpuToGpu, "svm page dir")?;
        let leaves = HostBuffer::new(
            gpu,
            u64::from(leaf_count) * LEAF_PAGES * 8,
            MemoryLocation::CpuToGpu,
            "svm page leaves",
        )?;
        dir.zero(0, dir.size);
        leaves.zero(0, leaves.size);
        Ok(PageTable {
            dir,
            leaves,
            mask: (slots - 1) as u32,
            leaf_count,
            blocks: HashMap::new(),
            free_leaves: (0..leaf_count).rev().collect(),
            leaves_freed: 0,
        })
    }

    /// The directory's device address.
    pub(crate) fn dir_addr(&self) -> u64 {
        self.dir.addr
    }

    /// The leaves' device address.
    pub(crate) fn leaves_addr(&self) -> u64 {
        self.leaves.addr
    }

    /// The directory's index mask.
    pub(crate) fn dir_mask(&self) -> u32 {
        self.mask
    }

    fn entry_offset(leaf: u32, page: u64) -> u64 {
        (u64::from(leaf) * LEAF_PAGES + ((page >> PAGE_SHIFT) % LEAF_PAGES)) * 8
    }

    /// The entry for the page at `addr` (0 when not mapped).
    pub(crate) fn get(&self, addr: u64) -> u64 {
        match self.blocks.get(&(addr / BLOCK)) {
            Some(&(_, leaf, _)) => self.leaves.read_u64(Self::entry_offset(leaf, addr)),
            None => 0,
        }
    }

    /// A leaf for `block`, made if needed.
    fn leaf_for(&mut self, block: u64) -> Result<u32> {
        if let Some(&(_, leaf, _)) = self.blocks.get(&block) {
            return Ok(leaf);
        }
        let full = VulkanError::PageTableFull {
            leaves: self.leaf_count,
        };
        let Some(&leaf) = self.free_leaves.last() else {
            return Err(full);
        };
        let mut slot = home(block, self.mask);
        let mut found = None;
        for _ in 0..MAX_PROBE {
            let key = self.dir.read_u64(u64::from(slot) * 16);
            if key == EMPTY || key == DELETED {
                found = Some(slot);
                break;
            }
            slot = (slot + 1) & self.mask;
        }
        let slot = found.ok_or(full)?;
        self.free_leaves.pop();
        // The leaf is all zeros (freed leaves are cleared); the value before the key, so a
        // concurrent lookup never sees the key with a stale leaf index.
        self.dir
            .write_u64(u64::from(slot) * 16 + 8, u64::from(leaf));
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.dir.write_u64(u64::from(slot) * 16, block + 1);
        self.blocks.insert(block, (slot, leaf, 0));
        Ok(leaf)
    }

    /// Sets the entry of the page at `addr` to `value` (a device address with [`VALID`], and
    /// [`WRITE`] if writable).
    pub(crate) fn set(&mut self, addr: u64, value: u64) -> Result<()> {
        debug_assert!(value & VALID != 0);
        let block = addr / BLOCK;
        let leaf = self.leaf_for(block)?;
        let off = Self::entry_offset(leaf, addr);
        let old = self.leaves.read_u64(off);
        self.leaves.write_u64(off, value);
        if old & VALID == 0 {
            if let Some(b) = self.blocks.get_mut(&block) {
                b.2 += 1;
            }
        }
        Ok(())
    }

    /// Clears the entries of `range`; with `free`, frees leaves left empty. Returns the number of
    /// entries that were valid.
    pub(crate) fn clear(&mut self, range: Range, free: bool) -> u64 {
        self.clear_span(range.start(), range.end(), free)
    }

    /// Clears the entry of the page at `addr`, as [`clear`](Self::clear) does; returns 1 if it
    /// was valid, else 0.
    pub(crate) fn clear_page(&mut self, addr: u64, free: bool) -> u64 {
        let page = addr & !(PAGE_SIZE - 1);
        self.clear_span(page, page.saturating_add(PAGE_SIZE), free)
    }

    fn clear_span(&mut self, start: u64, end: u64, free: bool) -> u64 {
        let mut cleared = 0;
        let mut addr = start;
        while addr < end {
            let block = addr / BLOCK;
            let block_end = ((block + 1) * BLOCK).min(end);
            if let Some(b) = self.blocks.get_mut(&block) {
                let (slot, leaf) = (b.0, b.1);
                let mut n = 0;
                let mut a = addr;
                while a < block_end {
                    let off = Self::entry_offset(leaf, a);
                    if self.leaves.read_u64(off) & VALID != 0 {
                        self.leaves.write_u64(off, 0);
                        n += 1;
                    }
                    a += PAGE_SIZE;
                }
                cleared += u64::from(n);
                b.2 -= n;
                if free && b.2 == 0 {
                    self.dir.write_u64(u64::from(slot) * 16, DELETED);
                    self.blocks.remove(&block);
                    self.free_leaves.push(leaf);
                    self.leaves_freed += 1;
                }
            }
            addr = block_end;
        }
        cleared
    }

    /// Takes write permission from the entries of `range`; returns how many had it.
    pub(crate) fn protect(&mut self, range: Range) -> u64 {
        let mut n = 0;
        let mut addr = range.start();
        while addr < range.end() {
            let block = addr / BLOCK;
            let block_end = ((block + 1) * BLOCK).min(range.end());
            if let Some(&(_, leaf, _)) = self.blocks.get(&block) {
                let mut a = addr;
                while a < block_end {
                    let off = Self::entry_offset(leaf, a);
                    let e = self.leaves.read_u64(off);
                    if e & WRITE != 0 {
                        self.leaves.write_u64(off, e & !WRITE);
                        n += 1;
                    }
                    a += PAGE_SIZE;
                }
            }
            addr = block_end;
        }
        n
    }

    /// Leaves freed so far: a caller that sees it move must wait for the work in flight before
    /// it lets go of the update lock (see the [module documentation](self)).
    pub(crate) fn leaves_freed(&self) -> u64 {
        self.leaves_freed
    }

    /// Whether a leaf maps any 2 MiB block overlapping `range` (a clear with `free` could free
    /// it even when it clears no entry).
    pub(crate) fn has_leaf_in(&self, range: Range) -> bool {
        let (first, last) = (range.start() / BLOCK, (range.end() - 1) / BLOCK);
        if last - first < self.blocks.len() as u64 {
            (first..=last).any(|b| self.blocks.contains_key(&b))
        } else {
            self.blocks.keys().any(|&b| (first..=last).contains(&b))
        }
    }

    /// Valid entries in the whole table.
    pub(crate) fn mapped_pages(&self) -> u64 {
        self.blocks.values().map(|b| u64::from(b.2)).sum()
    }

    /// Leaves in use.
    pub(crate) fn leaves_in_use(&self) -> u32 {
        self.leaf_count - self.free_leaves.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linear-probing insert of `blocks` into a directory of `mask + 1` slots, as
    /// `PageTable::leaf_for` does; returns the longest probe distance.
    fn longest_probe(blocks: impl Iterator<Item = u64>, mask: u32) -> u32 {
        let mut slots = vec![None; mask as usize + 1];
        let mut longest = 0;
        for b in blocks {
            let mut s = home(b, mask);
            let mut d = 0;
            while slots[s as usize].is_some() {
                s = (s + 1) & mask;
                d += 1;
            }
            slots[s as usize] = Some(b);
            longest = longest.max(d);
        }
        longest
    }

    #[test]
    fn a_full_table_of_neighbouring_blocks_stays_within_the_probe_limit() {
        // 1024 leaves (the default) of consecutive 2 MiB blocks around a heap and a stack.
        let mask = 2047;
        let heap = 0x5555_5555_4000u64 / BLOCK;
        assert!(longest_probe(heap..heap + 1024, mask) < MAX_PROBE);
        let stack = 0x7fff_f000_0000u64 / BLOCK;
        let mixed = (heap..heap + 512).chain(stack - 512..stack);
        assert!(longest_probe(mixed, mask) < MAX_PROBE);
    }

    #[test]
    fn home_uses_both_halves_of_the_block_number() {
        assert_ne!(home(1, 0xffff), home(1 | (1 << 32), 0xffff));
    }
}
