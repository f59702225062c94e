//! The driver's own DMA memory (queues, the PRP list, the Identify buffer): one page-aligned
//! heap allocation, ordinary process memory that the mapper mirrors like any other; and
//! [`Held`], the device accesses a command holds on the memory it uses.

use std::alloc::Layout;
use std::ptr::NonNull;

use svmirror_vfio::{DeviceAccess, VfioMapper};

use crate::error::{NvmeError, Result};
use crate::regs::PAGE;

/// A zeroed, page-aligned allocation of whole pages that a device reads and writes: touched
/// through raw pointers and volatile accesses only, never a Rust reference (STYLE.md rule 6).
pub(crate) struct DmaRegion {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the region is plain heap memory owned by this value; every access goes through the
// raw pointer with volatile loads and stores, by the owner (`Nvme`, which takes `&mut self`
// for every command).
unsafe impl Send for DmaRegion {}

impl DmaRegion {
    pub(crate) fn new(pages: usize) -> Result<DmaRegion> {
        let len = pages * PAGE as usize;
        let layout = Layout::from_size_align(len.max(PAGE as usize), PAGE as usize)
            .map_err(|_| NvmeError::Alloc { len })?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or(NvmeError::Alloc { len })?;
        Ok(DmaRegion { ptr, layout })
    }

    /// Address of page `i`.
    pub(crate) fn page(&self, i: usize) -> u64 {
        debug_assert!(i * (PAGE as usize) < self.layout.size());
        self.ptr.as_ptr() as u64 + i as u64 * PAGE
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub(crate) fn len(&self) -> u64 {
        self.layout.size() as u64
    }

    /// Gives the memory up without freeing it: a controller that could not be disabled may
    /// still write it.
    pub(crate) fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Device accesses held on one range for a command (one per chunk where IOVAs are allocated
/// per chunk): invalidations of the range wait until it is dropped, so the IOVAs below stay
/// mapped to these pages while the device works.
pub(crate) struct Held<'m> {
    /// `(virtual start, length, access)`.
    parts: Vec<(u64, u64, DeviceAccess<'m>)>,
}

impl<'m> Held<'m> {
    /// Faults `[addr, addr + len)` in (writable if `write`) and holds it mapped.
    pub(crate) fn new(mapper: &'m VfioMapper, addr: u64, len: u64, write: bool) -> Result<Self> {
        let mut parts = Vec::new();
        let end = addr + len;
        let mut at = addr;
        while at < end {
            let next = if mapper.is_identity() {
                end
            } else {
                ((at & !(mapper.granule() - 1)) + mapper.granule()).min(end)
            };
            let access =
                mapper
                    .access(at, next - at, write)
                    .map_err(|source| NvmeError::Access {
                        addr: at,
                        len: next - at,
                        source,
                    })?;
            parts.push((at, next - at, access));
            at = next;
        }
        Ok(Held { parts })
    }

    /// The bus address of `va`, which must lie in the held range or in the page of its
    /// start (a page is never split between chunks).
    pub(crate) fn iova(&self, va: u64) -> Option<u64> {
        self.parts
            .iter()
            .find(|(s, l, _)| (s & !(PAGE - 1)) <= va && va < s + l)
            .and_then(|(s, _, a)| (a.iova() + va).checked_sub(*s))
    }
}
