//! Device memory: pages of a range move into device-local memory (gpu-allocator) through
//! svmirror-mm's migration hooks, and a CPU touch brings them home.
//!
//! Out ([`VulkanMirror::migrate_to_device`]): svmirror-mm invalidates the range with
//! `Migrate { owner }` (which this mirror skips: it updates its own table here), then hands
//! each page to [`DevicePages::copy_out`]: under the update lock the chunk holding it is
//! dropped (its CPU pages are about to go) after the device drains, and the contents are kept.
//! Once svmirror-mm has dropped the CPU pages, the kept pages are uploaded into one device-local
//! buffer per page and their entries point there.
//!
//! Back: a CPU access (or [`VulkanMirror::migrate_to_ram`], or another device's fault) calls
//! [`DevicePages::copy_back`]: under the update lock the entry goes, the device drains, the page
//! is copied back through a readback buffer and its device memory is freed.

use std::sync::{Arc, Weak};

use gpu_allocator::MemoryLocation;
use svmirror_core::DevicePages;
use svmirror_core::MirrorError;
use svmirror_core::{Owner, PAGE_SIZE, PageSource, Range};

use crate::error::{Result, VulkanError};
use crate::memory::{GpuBuffer, HostBuffer, Submission};
use crate::mirror::{Inner, VulkanMirror};
use crate::state::DevicePage;

/// This mirror's device memory, as svmirror-mm sees it.
pub(crate) struct DeviceMemory {
    inner: Weak<Inner>,
    owner: Owner,
}

fn to_core(page: Range) -> impl FnOnce(VulkanError) -> svmirror_core::Error {
    move |e| svmirror_core::Error::Source {
        range: page,
        source: Box::new(e),
    }
}

impl DeviceMemory {
    pub(crate) fn new(inner: &Arc<Inner>) -> Arc<Self> {
        Arc::new(DeviceMemory {
            inner: Arc::downgrade(inner),
            owner: inner.owner,
        })
    }

    fn inner(&self, addr: u64) -> std::result::Result<Arc<Inner>, svmirror_core::Error> {
        self.inner
            .upgrade()
            .ok_or(svmirror_core::Error::BadAddress { addr })
    }

    /// Uploads every page copied out and not yet in device memory, and maps it (writable where
    /// `writable(page)`: its device-private entry allows writes).
    pub(crate) fn upload_pending(&self, writable: impl Fn(u64) -> bool) -> Result<()> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let gpu = &inner.gpu;
        let mut g = inner.state.lock();
        let pending = g.pending_pages();
        if pending.is_empty() {
            return Ok(());
        }
        let staging = HostBuffer::new(
            gpu,
            pending.len() as u64 * PAGE_SIZE,
            MemoryLocation::CpuToGpu,
            "migrate upload",
        )?;
        let dst = staging.host_ptr();
        let mut targets = Vec::with_capacity(pending.len());
        for (i, a) in pending.iter().enumerate() {
            if let Some(DevicePage::Pending(data)) = g.device_page(*a) {
                // SAFETY: `dst` is mapped for `pending.len()` pages; slot `i` is in bounds and
                // distinct from `data`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        dst.wrapping_add(i * PAGE_SIZE as usize),
                        PAGE_SIZE as usize,
                    )
                };
            }
            // Allocation failures leave every page pending (its contents safe in host memory).
            targets.push(GpuBuffer::new(
                gpu,
                PAGE_SIZE,
                MemoryLocation::GpuOnly,
                "migrated page",
            )?);
        }
        let mut sub = Submission::begin(gpu)?;
        for (i, t) in targets.iter().enumerate() {
            let region = [ash::vk::BufferCopy::default()
                .src_offset(i as u64 * PAGE_SIZE)
                .size(PAGE_SIZE)];
            // SAFETY: `sub.cb` is recording on this thread; both buffers are live and the region
            // is in bounds of each.
            unsafe {
                gpu.device
                    .cmd_copy_buffer(sub.cb, staging.buffer, t.buffer, &region)
            };
        }
        sub.submit()?;
        sub.wait()?;
        drop(sub);
        for (a, t) in pending.iter().zip(targets) {
            g.add_resident(*a, t, writable(*a))?;
        }
        drop(g);
        inner.counters.record_map(pending.len() as u64 * PAGE_SIZE);
        Ok(())
    }

    /// Maps `page` if it lives in device memory (writable if `writable`: its device-private
    /// entry allows writes); false if it does not.
    pub(crate) fn resolve(&self, page: u64, writable: bool) -> Result<bool> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(false);
        };
        let mut g = inner.state.lock();
        match g.device_page(page) {
            None => Ok(false),
            Some(DevicePage::Resident(_)) => g.map_resident(page, writable),
            Some(DevicePage::Pending(_)) => {
                drop(g);
                // Other pages still pending are mapped read-only: a write to one faults and
                // maps it as its own entry allows.
                self.upload_pending(|a| writable && a == page)?;
                Ok(true)
            }
        }
    }

    /// Reads a resident page back into `dst` (a page). Under the update lock, device drained.
    fn download(inner: &Inner, buf: &GpuBuffer, dst: *mut u8) -> Result<()> {
        let gpu = &inner.gpu;
        let rb = HostBuffer::new(gpu, PAGE_SIZE, MemoryLocation::GpuToCpu, "migrate readback")?;
        let mut sub = Submission::begin(gpu)?;
        let region = [ash::vk::BufferCopy::default().size(PAGE_SIZE)];
        // SAFETY: `sub.cb` is recording on this thread; both buffers are a page long.
        unsafe {
            gpu.device
                .cmd_copy_buffer(sub.cb, buf.buffer, rb.buffer, &region)
        };
        sub.submit()?;
        sub.wait()?;
        let src = rb.host_ptr();
        // SAFETY: `src` is mapped for a page written by the finished copy; `dst` is a writable
        // page (`DevicePages::copy_back`'s contract), distinct from it.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE as usize) };
        Ok(())
    }

    /// Frees every device page (their contents are dropped): for teardown, after they were
    /// brought home.
    pub(crate) fn release_all(&self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut g = inner.state.lock();
            let pages = g.take_device_pages();
            if !pages.is_empty() {
                inner.drain(&g);
            }
        }
    }
}

impl DevicePages for DeviceMemory {
    fn owner(&self) -> Owner {
        self.owner
    }

    fn copy_out(&self, addr: u64, src: *const u8) -> std::result::Result<(), svmirror_core::Error> {
        let inner = self.inner(addr)?;
        let page = Range::with_len(addr, PAGE_SIZE)?;
        let mut g = inner.state.lock();
        // The CPU page is about to be dropped: the chunk that imports it goes first.
        let (imports, bytes) = g.take_chunks(page, false);
        if bytes > 0 {
            inner.drain(&g);
        }
        let mut data = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
        // SAFETY: `DevicePages::copy_out`'s contract: `src` is readable for a page; the device
        // no longer reaches it (drained above).
        unsafe { std::ptr::copy_nonoverlapping(src, data.as_mut_ptr(), data.len()) };
        g.add_pending(addr, data);
        drop(g);
        drop(imports);
        inner.counters.record_unmap(bytes);
        Ok(())
    }

    fn copy_back(&self, addr: u64, dst: *mut u8) -> std::result::Result<(), svmirror_core::Error> {
        let inner = self.inner(addr)?;
        let mut g = inner.state.lock();
        match g.device_page(addr) {
            None => return Err(svmirror_core::Error::BadAddress { addr }),
            Some(DevicePage::Pending(data)) => {
                // SAFETY: `DevicePages::copy_back`'s contract: `dst` is a writable page. The
                // copy stays until svmirror discards it.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
                return Ok(());
            }
            Some(DevicePage::Resident(_)) => {}
        }
        // The GPU stops using its copy now; the copy itself is freed by `discard` once the CPU
        // page holds the contents.
        g.unmap_device_page(addr, false);
        inner.drain(&g);
        let Some(DevicePage::Resident(buf)) = g.device_page(addr) else {
            return Err(svmirror_core::Error::BadAddress { addr });
        };
        let page = Range::with_len(addr, PAGE_SIZE)?;
        Self::download(&inner, buf, dst).map_err(to_core(page))
    }

    fn device_pfn(&self, addr: u64) -> u64 {
        // Device frame numbers, far from RAM's, for readable logs.
        (1 << 40) + (addr >> svmirror_core::PAGE_SHIFT)
    }

    fn discard(&self, addr: u64) {
        let Ok(inner) = self.inner(addr) else {
            return;
        };
        let mut g = inner.state.lock();
        if let Some(p) = g.remove_device_page(addr) {
            inner.drain(&g);
            drop(g);
            if matches!(p, DevicePage::Resident(_)) {
                inner.counters.record_unmap(PAGE_SIZE);
            }
            drop(p);
        }
    }
}

impl VulkanMirror {
    /// Moves the pages of `range` (private anonymous memory inside the mirror) into
    /// device-local memory; returns how many moved. The caller must not write the range while
    /// it migrates (svmirror-mm's rule: userspace cannot stop the CPU meanwhile).
    pub fn migrate_to_device(&self, addr: u64, len: u64) -> Result<u64> {
        let range = self.check_range(addr, len)?;
        let _span = tracing::debug_span!(
            "vulkan.migrate_to_device",
            start = range.start(),
            end = range.end()
        )
        .entered();
        let moved = self
            .mm
            .migrate_to_device(range, self.device_memory.clone())
            .map_err(MirrorError::refused("migrate to device", range))?;
        // Each page as writable as its device-private entry: the PTE it replaced was
        // (mm/migrate_device.c), and its mapping still is.
        let mut ptes = vec![svmirror_core::CpuPte::None; range.pages() as usize];
        self.mm
            .snapshot(range.start(), &mut ptes)
            .map_err(MirrorError::refused("look up the migrated pages", range))?;
        let writable = |a: u64| {
            range.contains(a)
                && matches!(
                    ptes[((a - range.start()) / PAGE_SIZE) as usize],
                    svmirror_core::CpuPte::DevicePrivate { write: true, .. }
                )
        };
        self.device_memory.upload_pending(writable)?;
        Ok(moved)
    }

    /// Brings every page of `range` that lives in device memory back into RAM; returns how
    /// many came back.
    pub fn migrate_to_ram(&self, addr: u64, len: u64) -> Result<u64> {
        let range = self.check_range(addr, len)?;
        self.mm.migrate_to_ram(range).map_err(|source| {
            VulkanError::Mirror(MirrorError::Core {
                op: "migrate to RAM",
                range,
                source,
            })
        })
    }

    /// Pages now in device-local memory, in runs.
    pub fn device_runs(&self) -> Vec<Range> {
        self.inner.state.lock().device_runs()
    }
}
