//! What the mirror's update lock guards: the imports (chunks of host memory the GPU reaches),
//! the GPU page table, the pages living in device-local memory, and the submissions in flight.
//!
//! The fields are private: every change goes through a method that keeps the invariants below,
//! so the fault path (mirror.rs), the invalidation (mirror.rs), migration (migrate.rs) and
//! submission (dispatch.rs) cannot break them between them.
//!
//! # Invariants
//!
//! - Every valid page-table entry belongs either to a chunk (pointing into its import) or to a
//!   resident device page (pointing into its buffer).
//! - A chunk leaves the state only with its entries cleared ([`State::take_chunks`]); its import
//!   is freed by the caller once every submission in flight at that time has finished.
//! - A device page leaves with its entry ([`State::remove_device_page`],
//!   [`State::take_device_pages`]).
//! - `in_flight` holds the fence of every submission made and not yet waited for by its
//!   submitter; a submitter takes its fence off ([`State::untrack`]) before destroying it.

use std::collections::BTreeMap;

use ash::vk;
use svmirror_core::{PAGE_SIZE, Range};

use crate::error::Result;
use crate::import::Import;
use crate::memory::GpuBuffer;
use crate::page_table::{PageTable, VALID, WRITE};

/// A page migrated to device-local memory.
pub(crate) enum DevicePage {
    /// Copied out of the CPU; not yet uploaded.
    Pending(Box<[u8]>),
    /// In device-local memory.
    Resident(GpuBuffer),
}

/// What the update lock guards. See the [module documentation](self).
pub(crate) struct State {
    chunks: BTreeMap<u64, Import>,
    table: PageTable,
    device_pages: BTreeMap<u64, DevicePage>,
    in_flight: Vec<(u64, vk::Fence)>,
    next_submission: u64,
}

/// The entry flags for a page mapped writable or not.
fn flags(writable: bool) -> u64 {
    if writable { VALID | WRITE } else { VALID }
}

impl State {
    /// An empty state over `table`.
    pub(crate) fn new(table: PageTable) -> Self {
        State {
            chunks: BTreeMap::new(),
            table,
            device_pages: BTreeMap::new(),
            in_flight: Vec::new(),
            next_submission: 0,
        }
    }

    // --- the page table ---

    /// The page table, to read (its buffers' addresses for a dispatch, its counts).
    pub(crate) fn table(&self) -> &PageTable {
        &self.table
    }

    /// The entry of the page at `page` (0 when unmapped).
    pub(crate) fn entry(&self, page: u64) -> u64 {
        self.table.get(page)
    }

    /// Whether the page at `page` is mapped, for writing if `write`.
    pub(crate) fn maps(&self, page: u64, write: bool) -> bool {
        let e = self.table.get(page);
        e & VALID != 0 && (!write || e & WRITE != 0)
    }

    /// Takes WRITE from every entry in `r`; returns how many entries changed.
    pub(crate) fn protect(&mut self, r: Range) -> u64 {
        self.table.protect(r)
    }

    // --- chunks (imports) ---

    /// How many chunks are imported, and the bytes they cover.
    pub(crate) fn imports(&self) -> (u64, u64) {
        (
            self.chunks.len() as u64,
            self.chunks.values().map(|c| c.range.len()).sum(),
        )
    }

    /// Whether `r` overlaps an import or a device page.
    pub(crate) fn occupied(&self, r: Range) -> bool {
        let chunk = self
            .chunks
            .range(..r.end())
            .next_back()
            .is_some_and(|(_, c)| c.range.end() > r.start());
        chunk || self.device_pages.range(r.start()..r.end()).next().is_some()
    }

    /// The chunk holding `addr`.
    pub(crate) fn chunk_at(&self, addr: u64) -> Option<Range> {
        self.chunks
            .range(..=addr)
            .next_back()
            .filter(|(_, c)| c.range.contains(addr))
            .map(|(_, c)| c.range)
    }

    /// The device address of the import of exactly `chunk`, if it is imported.
    pub(crate) fn chunk_base(&self, chunk: Range) -> Option<u64> {
        self.chunks
            .get(&chunk.start())
            .filter(|c| c.range == chunk)
            .map(|c| c.addr)
    }

    /// Maps the pages of `chunk` into the import at device address `base`: page `i` as the
    /// core's entry `entries[i]` says (skipped when not valid or device-private; writable when
    /// the entry is). Adds `import` as the chunk's import if given. On failure (the page table
    /// is full) nothing of the chunk stays mapped: its entries are cleared and its imports,
    /// the new one and any already in the state, are returned for the caller to free once
    /// work in flight is done.
    pub(crate) fn map_chunk(
        &mut self,
        chunk: Range,
        base: u64,
        entries: &[u64],
        import: Option<Import>,
    ) -> std::result::Result<(), (crate::error::VulkanError, Vec<Import>)> {
        use svmirror_core::entry;
        let mut result = Ok(());
        for (i, &e) in entries.iter().enumerate() {
            if !entry::is_valid(e) || e & entry::DEVICE_PRIVATE != 0 {
                continue;
            }
            let off = i as u64 * PAGE_SIZE;
            result = self.table.set(
                chunk.start() + off,
                (base + off) | flags(entry::is_writable(e)),
            );
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {
                if let Some(i) = import {
                    self.chunks.insert(chunk.start(), i);
                }
                Ok(())
            }
            Err(e) => {
                self.table.clear(chunk, true);
                let mut gone: Vec<Import> = import.into_iter().collect();
                gone.extend(self.take_chunks(chunk, true).0);
                Err((e, gone))
            }
        }
    }

    /// Removes every chunk overlapping `r`, clearing its entries; returns the imports to free
    /// once the device is idle there, and the bytes they covered.
    pub(crate) fn take_chunks(&mut self, r: Range, free_leaves: bool) -> (Vec<Import>, u64) {
        let starts: Vec<u64> = self
            .chunks
            .range(..r.end())
            .rev()
            .take_while(|(_, c)| c.range.end() > r.start())
            .map(|(&s, _)| s)
            .collect();
        let mut out = Vec::new();
        let mut bytes = 0;
        for s in starts {
            if let Some(c) = self.chunks.remove(&s) {
                self.table.clear(c.range, free_leaves);
                bytes += c.range.len();
                out.push(c);
            }
        }
        (out, bytes)
    }

    // --- device pages ---

    /// How many pages live in device memory.
    pub(crate) fn device_page_count(&self) -> u64 {
        self.device_pages.len() as u64
    }

    /// Whether the page at `page` lives in device memory.
    pub(crate) fn is_device_page(&self, page: u64) -> bool {
        self.device_pages.contains_key(&page)
    }

    /// The device page at `page`.
    pub(crate) fn device_page(&self, page: u64) -> Option<&DevicePage> {
        self.device_pages.get(&page)
    }

    /// The addresses of the device pages in `r`, in order.
    pub(crate) fn device_pages_in(&self, r: Range) -> Vec<u64> {
        self.device_pages
            .range(r.start()..r.end())
            .map(|(&a, _)| a)
            .collect()
    }

    /// The pages copied out and not yet uploaded, in order.
    pub(crate) fn pending_pages(&self) -> Vec<u64> {
        self.device_pages
            .iter()
            .filter(|(_, p)| matches!(p, DevicePage::Pending(_)))
            .map(|(&a, _)| a)
            .collect()
    }

    /// Keeps the contents of the page copied out from `page` until it is uploaded.
    pub(crate) fn add_pending(&mut self, page: u64, data: Box<[u8]>) {
        self.device_pages.insert(page, DevicePage::Pending(data));
    }

    /// Makes `buf` the device-memory home of `page` and maps it there.
    pub(crate) fn add_resident(&mut self, page: u64, buf: GpuBuffer, writable: bool) -> Result<()> {
        self.table.set(page, buf.addr | flags(writable))?;
        self.device_pages.insert(page, DevicePage::Resident(buf));
        Ok(())
    }

    /// Maps the resident device page at `page` again; false if it is not resident.
    pub(crate) fn map_resident(&mut self, page: u64, writable: bool) -> Result<bool> {
        let Some(DevicePage::Resident(b)) = self.device_pages.get(&page) else {
            return Ok(false);
        };
        let addr = b.addr;
        self.table.set(page, addr | flags(writable))?;
        Ok(true)
    }

    /// Takes the entry of the device page at `page` away (the page itself stays); returns
    /// how many entries it cleared (0 or 1).
    pub(crate) fn unmap_device_page(&mut self, page: u64, free_leaves: bool) -> u64 {
        self.table.clear_page(page, free_leaves)
    }

    /// Removes the device page at `page` with its entry.
    pub(crate) fn remove_device_page(&mut self, page: u64) -> Option<DevicePage> {
        let p = self.device_pages.remove(&page)?;
        self.table.clear_page(page, false);
        Some(p)
    }

    /// Removes every device page with its entry.
    pub(crate) fn take_device_pages(&mut self) -> BTreeMap<u64, DevicePage> {
        let pages = std::mem::take(&mut self.device_pages);
        for &a in pages.keys() {
            self.table.clear_page(a, true);
        }
        pages
    }

    /// The device pages, in runs of adjacent pages.
    pub(crate) fn device_runs(&self) -> Vec<Range> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &a in self.device_pages.keys() {
            match runs.last_mut() {
                Some(r) if r.1 == a => r.1 += PAGE_SIZE,
                _ => runs.push((a, a + PAGE_SIZE)),
            }
        }
        runs.into_iter()
            .filter_map(|(s, e)| Range::new(s, e).ok())
            .collect()
    }

    // --- submissions in flight ---

    /// Records a submission made with `fence`; returns its id for [`untrack`](Self::untrack).
    pub(crate) fn track(&mut self, fence: vk::Fence) -> u64 {
        let id = self.next_submission;
        self.next_submission += 1;
        self.in_flight.push((id, fence));
        id
    }

    /// Takes submission `id` off the list (its submitter waited for it).
    pub(crate) fn untrack(&mut self, id: u64) {
        self.in_flight.retain(|&(i, _)| i != id);
    }

    /// How many submissions are in flight.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.len() as u64
    }

    /// Fences of every submission in flight.
    pub(crate) fn fences(&self) -> Vec<vk::Fence> {
        self.in_flight.iter().map(|&(_, f)| f).collect()
    }
}
