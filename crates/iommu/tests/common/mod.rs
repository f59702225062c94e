//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::alloc::Layout;

use svmirror_core::{Notifier, Range};
use svmirror_iommu::{IommuMirror, MirrorConfig};

pub const PAGE: u64 = 4096;

/// A mirror over the whole user address space below 2^47, IOTLB checking on.
pub fn mirror(notifier: &Notifier) -> IommuMirror {
    mirror_with(notifier, MirrorConfig::checked())
}

pub fn mirror_with(notifier: &Notifier, config: MirrorConfig) -> IommuMirror {
    let range = Range::new(PAGE, 1 << 47).unwrap();
    // SAFETY: the tests touch device-written memory only through raw pointers.
    unsafe { IommuMirror::new(notifier, range, config) }.unwrap()
}

/// A mirror over the whole user address space whose page source is `mm`: faults register what
/// they map with `mm`'s userfaultfd, as the dmirror device and the app's backend do.
pub fn mm_mirror(mm: &std::sync::Arc<svmirror_mm::ProcessMm>, config: MirrorConfig) -> IommuMirror {
    let range = Range::new(PAGE, 1 << 47).unwrap();
    // SAFETY: the tests touch device-written memory only through raw pointers.
    unsafe { IommuMirror::with_page_source(mm.notifier(), range, config, Box::new(mm.clone())) }
        .unwrap()
}

/// A page-aligned buffer from the Rust global allocator, touched through raw pointers only.
pub struct RustBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl RustBuf {
    pub fn new(len: usize) -> RustBuf {
        let layout = Layout::from_size_align(len, PAGE as usize).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        RustBuf { ptr, layout }
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn write(&self, data: &[u8]) {
        assert!(data.len() <= self.len());
        // SAFETY: in bounds; the source is a distinct slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, data.len()) };
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        // SAFETY: in bounds; the destination is a distinct vector.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr(), self.len()) };
        v
    }
}

impl Drop for RustBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
