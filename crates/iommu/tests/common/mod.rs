//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::alloc::Layout;

use std::sync::Arc;

use svmirror_core::{Notifier, Range};
use svmirror_iommu::{IommuMirror, MirrorConfig};
use svmirror_mm::{ProcessMm, ProcessPageSource};

pub const PAGE: u64 = 4096;

/// A mirror over the whole user address space below 2^47, IOTLB checking on, subscribed to
/// `notifier` (which the test feeds by hand) and reading this process's page table raw.
pub fn mirror(notifier: &Notifier) -> IommuMirror {
    mirror_with(notifier, MirrorConfig::checked())
}

pub fn mirror_with(notifier: &Notifier, config: MirrorConfig) -> IommuMirror {
    let range = Range::new(PAGE, 1 << 47).unwrap();
    let source = Box::new(raw_source());
    // SAFETY: the tests touch device-written memory only through raw pointers.
    unsafe { IommuMirror::with_page_source(notifier, range, config, source) }.unwrap()
}

/// This process's page table, read raw: no userfaultfd, no waiting for settles.
pub fn raw_source() -> ProcessPageSource {
    ProcessPageSource::new().expect("the process page source opens")
}

/// A mirror over the whole user address space of `mm`: invalidations come from its notifier,
/// and faults register what they map with its userfaultfd, as the dmirror device and the app's
/// backend do.
pub fn mm_mirror(mm: &Arc<ProcessMm>, config: MirrorConfig) -> IommuMirror {
    let range = Range::new(PAGE, 1 << 47).unwrap();
    // SAFETY: the tests touch device-written memory only through raw pointers.
    unsafe { IommuMirror::new(mm.clone(), range, config) }.unwrap()
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
