//! The kernel ABI this crate speaks that `libc` does not carry: the PROCMAP_QUERY and
//! PAGEMAP_SCAN ioctls, written out from `include/uapi/linux/fs.h`.
//!
//! Both structs are versioned by their `size` field; we pass the size of the first published
//! layout, which every kernel that has the ioctl accepts.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

/// `_IOWR(ty, nr, T)`, encoded by vmm-sys-util (`asm-generic/ioctl.h`: x86-64 and arm64 alike).
const fn iowr<T>(ty: u8, nr: u32) -> u64 {
    use vmm_sys_util::ioctl::{_IOC_READ, _IOC_WRITE, ioctl_expr};
    ioctl_expr(_IOC_READ | _IOC_WRITE, ty as u32, nr, size_of::<T>() as u32) as u64
}

/// `struct procmap_query` (Linux 6.11): one VMA of /proc/PID/maps, asked for by address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ProcmapQuery {
    /// In: `size_of::<ProcmapQuery>()`.
    pub size: u64,
    /// In: `PROCMAP_QUERY_*` flags.
    pub query_flags: u64,
    /// In: the address asked about.
    pub query_addr: u64,
    /// Out: start of the VMA found.
    pub vma_start: u64,
    /// Out: end of the VMA found (exclusive).
    pub vma_end: u64,
    /// Out: `PROCMAP_QUERY_VMA_*` permission flags.
    pub vma_flags: u64,
    /// Out: the kernel's page size for the VMA (larger than 4 KiB for hugetlb).
    pub vma_page_size: u64,
    /// Out: file offset of `vma_start`.
    pub vma_offset: u64,
    /// Out: inode of the backing file, 0 for anonymous memory.
    pub inode: u64,
    /// Out: device of the backing file.
    pub dev_major: u32,
    /// Out: device of the backing file.
    pub dev_minor: u32,
    /// In: size of the name buffer; out: length of the name including its NUL, 0 if none.
    pub vma_name_size: u32,
    /// In: size of the build-id buffer (we pass 0).
    pub build_id_size: u32,
    /// In: address of the name buffer.
    pub vma_name_addr: u64,
    /// In: address of the build-id buffer (we pass 0).
    pub build_id_addr: u64,
}

/// `PROCMAP_QUERY`: `_IOWR('f', 17, struct procmap_query)` on an fd of /proc/PID/maps.
pub(crate) const PROCMAP_QUERY: u64 = iowr::<ProcmapQuery>(b'f', 17);
const _: () = assert!(size_of::<ProcmapQuery>() == 104 && PROCMAP_QUERY == 0xc068_6611);

/// The VMA is readable (`VM_READ`).
pub(crate) const PROCMAP_QUERY_VMA_READABLE: u64 = 0x01;
/// The VMA is writable (`VM_WRITE`).
pub(crate) const PROCMAP_QUERY_VMA_WRITABLE: u64 = 0x02;
/// The VMA is shared (`VM_MAYSHARE`).
pub(crate) const PROCMAP_QUERY_VMA_SHARED: u64 = 0x08;
/// Return the VMA covering the address, or else the next one above it.
pub(crate) const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;

/// `struct pm_scan_arg` (Linux 6.7): the argument of PAGEMAP_SCAN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PmScanArg {
    /// `size_of::<PmScanArg>()`.
    pub size: u64,
    /// `PM_SCAN_*` operation flags (we pass 0: report only, write-protect nothing).
    pub flags: u64,
    /// Start of the range to scan (page aligned).
    pub start: u64,
    /// End of the range to scan.
    pub end: u64,
    /// Out: where the walk stopped; `end` when it covered the whole range.
    pub walk_end: u64,
    /// Address of a `PageRegion` array.
    pub vec: u64,
    /// Length of that array.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories that match when clear instead of set.
    pub category_inverted: u64,
    /// Skip pages that lack any of these categories.
    pub category_mask: u64,
    /// Skip pages that have none of these categories (0: no filter).
    pub category_anyof_mask: u64,
    /// Categories reported in each region.
    pub return_mask: u64,
}

/// `struct page_region`: a run of pages with the same categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PageRegion {
    /// Start of the run.
    pub start: u64,
    /// End of the run (exclusive).
    pub end: u64,
    /// `PAGE_IS_*` categories, masked by `return_mask`.
    pub categories: u64,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` on an fd of /proc/PID/pagemap.
pub(crate) const PAGEMAP_SCAN: u64 = iowr::<PmScanArg>(b'f', 16);
const _: () = assert!(size_of::<PmScanArg>() == 96 && PAGEMAP_SCAN == 0xc060_6610);
const _: () = assert!(size_of::<PageRegion>() == 24);

/// The page is present in RAM.
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;
/// The page is the shared zero page (`is_zero_pfn`).
pub(crate) const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// The page is mapped by a huge entry: a PMD-mapped THP or a hugetlb page.
pub(crate) const PAGE_IS_HUGE: u64 = 1 << 6;

/// Calls `ioctl(file, request, arg)`.
///
/// # Safety
///
/// `request` must be an `_IOWR` request whose argument is one `T`, and every address stored in
/// `*arg` must be valid for whatever that request makes the kernel read or write there.
pub(crate) unsafe fn ioctl_rw<T>(file: &File, request: u64, arg: &mut T) -> io::Result<i32> {
    let arg: *mut T = arg;
    // SAFETY: `arg` is a live, exclusive `T`; the caller vouches for the request and for the
    // addresses inside `*arg`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
