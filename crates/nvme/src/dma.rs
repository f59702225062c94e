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

/// Device accesses held for a command on what it uses (its data, the driver's region): the
/// invalidations of those ranges wait until it is dropped, so the IOVAs below stay mapped to
/// these pages while the device works. Everything one command needs from one mapper is taken
/// in one [`VfioMapper::access_many`]: an access held while the same mapper is asked for
/// another could wait on an invalidation that waits for the first.
pub(crate) struct Held<'m> {
    /// `(virtual start, length, access)`.
    parts: Vec<(u64, u64, DeviceAccess<'m>)>,
}

impl<'m> Held<'m> {
    /// Faults `[addr, addr + len)` in (writable if `write`) and holds it mapped.
    pub(crate) fn new(mapper: &'m VfioMapper, addr: u64, len: u64, write: bool) -> Result<Self> {
        Self::many(&[(mapper, addr, len, write)])
    }

    /// Faults each `(mapper, addr, len, write)` in and holds them all: one acquisition per
    /// mapper, in the order the mappers first appear. Errors name the first range.
    pub(crate) fn many(ranges: &[(&'m VfioMapper, u64, u64, bool)]) -> Result<Self> {
        let mut parts = Vec::new();
        let mut done: Vec<*const VfioMapper> = Vec::new();
        for &(mapper, ..) in ranges {
            if done.contains(&std::ptr::from_ref(mapper)) {
                continue;
            }
            done.push(std::ptr::from_ref(mapper));
            // Each range cut at chunk boundaries where IOVAs are allocated per chunk.
            let mut asked = Vec::new();
            for &(m, addr, len, write) in ranges {
                if !std::ptr::eq(m, mapper) {
                    continue;
                }
                let end = addr + len;
                let mut at = addr;
                while at < end {
                    let next = if mapper.is_identity() {
                        end
                    } else {
                        ((at & !(mapper.granule() - 1)) + mapper.granule()).min(end)
                    };
                    asked.push((at, next - at, write));
                    at = next;
                }
            }
            let held = mapper.access_many(&asked).map_err(|source| {
                let (_, addr, len, _) = ranges[0];
                NvmeError::Access { addr, len, source }
            })?;
            parts.extend(asked.iter().zip(held).map(|(&(at, n, _), a)| (at, n, a)));
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
