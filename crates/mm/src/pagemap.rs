//! Page state: /proc/self/pagemap entries, refined by the PAGEMAP_SCAN ioctl.
//!
//! # Where each field of [`CpuPte`] comes from
//!
//! - **Presence**: pagemap bit 63. A swapped-out page (bit 62), a migration entry or a page
//!   never touched reads as [`CpuPte::None`].
//! - **PFN**: pagemap bits 0-54. The kernel fills them only for readers with `CAP_SYS_ADMIN`
//!   (decided when the file is opened); otherwise they read 0 and so do ours.
//! - **Write**: pagemap cannot show the PTE's write bit, so we derive what a device may do: the
//!   VMA is writable, the page is present and not the zero page, and either the mapping is shared
//!   or the page is anonymous (bit 61 clear) and mapped exactly once (bit 56, "exclusively
//!   mapped"). A private page still shared copy-on-write after a fork, or a page-cache page in a
//!   private file mapping, is read-only: a CPU write would move the mapping to a new page.
//!   Limits: a page with a single mapping whose PTE is still write-protected (the parent's page
//!   after the forked child exited, or a shared file page read-faulted but not yet dirtied) is
//!   reported writable, because writing it would not change which page is mapped.
//! - **Zero**: PAGEMAP_SCAN's `PAGE_IS_PFNZERO`, for the base zero page and (on kernels with
//!   the 2025 `is_huge_zero_pmd` fix, 6.18 among them) the huge zero page. Without PAGEMAP_SCAN,
//!   a page whose frame is the base zero page's (learned at start-up by read-faulting a private
//!   page) when frame numbers are visible. Otherwise a zero page reads as a present, read-only
//!   page that is not marked zero: safe, since it is never writable.
//! - **Order**: PAGEMAP_SCAN's `PAGE_IS_HUGE` marks pages mapped by a huge entry (a PMD-mapped
//!   THP, or a hugetlb page); the order is that of the VMA's kernel page size for hugetlb and 9
//!   (2 MiB) for THP. This works unprivileged and sees the mapping, not the folio, so a THP
//!   split into PTEs or an mTHP reads as order 0, which is what a device may map. Without
//!   PAGEMAP_SCAN (before Linux 6.7) the order is always 0: /proc/self/smaps only counts huge
//!   pages per VMA, and /proc/kpageflags needs privilege and describes folios, not mappings.
//!
//! The two reads are not atomic with each other or with the CPU: a page may change between them
//! and after. The core's sequence protocol is what makes a snapshot usable; here we only keep
//! the answer self-consistent (a zero page is never writable).

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::unix::fs::FileExt;

use svmirror_core::{CpuPte, PAGE_SHIFT, PAGE_SIZE};

use crate::error::MmError;
use crate::maps::{Maps, Vma};
use crate::uapi::{self, PageRegion, PmScanArg};

const PAGEMAP: &str = "/proc/self/pagemap";

/// Pagemap entry: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry: the page is a file or shared-anonymous (shmem) page.
const PM_FILE: u64 = 1 << 61;
/// Pagemap entry: the page is mapped exactly once.
const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
/// Pagemap entry: the frame number.
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Order of a PMD-mapped THP with 4 KiB base pages (2 MiB).
const PMD_ORDER: u8 = 9;
/// Pagemap entries read per `pread`.
const CHUNK: usize = 512;
/// Regions per PAGEMAP_SCAN call.
const REGIONS: usize = 32;

/// The page-state reader of one process.
#[derive(Debug)]
pub(crate) struct Pagemap {
    file: File,
    scan: bool,
    pfn_visible: bool,
    /// Frame number of the shared zero page, when frame numbers are visible.
    zero_pfn: Option<u64>,
}

impl Pagemap {
    /// Opens /proc/self/pagemap and probes what it offers: PAGEMAP_SCAN if `use_scan`, frame
    /// numbers if `show_pfn`.
    pub(crate) fn open(use_scan: bool, show_pfn: bool) -> Result<Self, MmError> {
        let file = File::open(PAGEMAP).map_err(|source| MmError::Open {
            path: PAGEMAP,
            source,
        })?;
        let mut this = Pagemap {
            file,
            scan: false,
            pfn_visible: false,
            zero_pfn: None,
        };
        // A page that is surely present: the one holding this local.
        let probe = 0u8;
        let page = std::ptr::from_ref(&probe) as u64 & !(PAGE_SIZE - 1);
        let mut entry = [0u64];
        this.read(page, &mut entry)
            .map_err(|source| MmError::Probe {
                mechanism: "pagemap",
                source,
            })?;
        this.pfn_visible = show_pfn && entry[0] & PM_PRESENT != 0 && entry[0] & PM_PFN_MASK != 0;
        if use_scan {
            match this.scan(page, page + PAGE_SIZE, |_, _, _| {}) {
                Ok(()) => this.scan = true,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {}
                Err(source) => {
                    return Err(MmError::Probe {
                        mechanism: "PAGEMAP_SCAN",
                        source,
                    });
                }
            }
        }
        if this.pfn_visible {
            this.zero_pfn = this.learn_zero_pfn();
        }
        Ok(this)
    }

    /// Whether PAGEMAP_SCAN is in use.
    pub(crate) fn uses_scan(&self) -> bool {
        self.scan
    }

    /// Whether frame numbers are reported.
    pub(crate) fn pfn_visible(&self) -> bool {
        self.pfn_visible
    }

    /// Fills `out` with the state of the pages from `addr` on, all inside `vma`.
    pub(crate) fn snapshot(
        &self,
        maps: &Maps,
        vma: &Vma,
        addr: u64,
        out: &mut [CpuPte],
    ) -> Result<(), MmError> {
        let mut entries = [0u64; CHUNK];
        for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
            let at = addr + (((i * CHUNK) as u64) << PAGE_SHIFT);
            let entries = &mut entries[..chunk.len()];
            self.read(at, entries)
                .map_err(|source| MmError::ReadPagemap { addr: at, source })?;
            for (pte, &e) in chunk.iter_mut().zip(entries.iter()) {
                *pte = self.pte(vma, e);
            }
        }
        if !self.scan {
            return Ok(());
        }
        let end = addr + ((out.len() as u64) << PAGE_SHIFT);
        let mut huge_order = None;
        let mut failure = None;
        let scanned = self.scan(addr, end, |start, stop, categories| {
            let order = if categories & uapi::PAGE_IS_HUGE == 0 {
                0
            } else if let Some(order) = huge_order {
                order
            } else {
                match maps.page_size(vma) {
                    Ok(size) => *huge_order.insert(huge_page_order(size)),
                    Err(e) => {
                        failure.get_or_insert(e);
                        return;
                    }
                }
            };
            let zero = categories & uapi::PAGE_IS_PFNZERO != 0;
            let first = ((start - addr) >> PAGE_SHIFT) as usize;
            let last = ((stop - addr) >> PAGE_SHIFT) as usize;
            for pte in &mut out[first..last] {
                if let CpuPte::Present {
                    write,
                    zero: z,
                    order: o,
                    ..
                } = pte
                {
                    *o = order;
                    // A page pagemap saw as writable cannot be the zero page: the two reads
                    // raced a change, keep pagemap's view.
                    if zero && !*write {
                        *z = true;
                    }
                }
            }
        });
        scanned.map_err(|source| MmError::Scan {
            start: addr,
            end,
            source,
        })?;
        failure.map_or(Ok(()), Err)
    }

    /// The page state one pagemap entry describes (order 0; the scan adds huge orders).
    fn pte(&self, vma: &Vma, e: u64) -> CpuPte {
        if e & PM_PRESENT == 0 {
            return CpuPte::None;
        }
        let pfn = if self.pfn_visible { e & PM_PFN_MASK } else { 0 };
        let exclusive = e & PM_MMAP_EXCLUSIVE != 0;
        let file = e & PM_FILE != 0;
        let zero = !exclusive && !file && self.zero_pfn.is_some_and(|z| z == pfn);
        CpuPte::Present {
            pfn,
            write: vma.write && !zero && (vma.shared || (exclusive && !file)),
            zero,
            order: 0,
        }
    }

    /// Reads the pagemap entries of `out.len()` pages from `addr`. Entries past the end of the
    /// address space read as 0 (not present).
    fn read(&self, addr: u64, out: &mut [u64]) -> io::Result<()> {
        const ENTRY: usize = size_of::<u64>();
        let mut bytes = [0u8; CHUNK * ENTRY];
        for (i, part) in out.chunks_mut(CHUNK).enumerate() {
            let bytes = &mut bytes[..part.len() * ENTRY];
            let vpn = (addr >> PAGE_SHIFT) + (i * CHUNK) as u64;
            let mut done = 0;
            while done < bytes.len() {
                let offset = vpn * ENTRY as u64 + done as u64;
                match self.file.read_at(&mut bytes[done..], offset) {
                    // The kernel answers in whole entries; 0 is the end of the address space.
                    Ok(n) if n >= ENTRY => done += n - n % ENTRY,
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            bytes[done..].fill(0);
            for (entry, raw) in part.iter_mut().zip(bytes.chunks_exact(ENTRY)) {
                let mut b = [0u8; ENTRY];
                b.copy_from_slice(raw);
                *entry = u64::from_ne_bytes(b);
            }
        }
        Ok(())
    }

    /// Runs PAGEMAP_SCAN over `[start, end)` and calls `each(start, end, categories)` for every
    /// run of zero or huge pages, clamped to the range.
    fn scan(&self, start: u64, end: u64, mut each: impl FnMut(u64, u64, u64)) -> io::Result<()> {
        let mut regions = [PageRegion::default(); REGIONS];
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                start: at,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: REGIONS as u64,
                category_anyof_mask: uapi::PAGE_IS_PFNZERO | uapi::PAGE_IS_HUGE,
                return_mask: uapi::PAGE_IS_PRESENT | uapi::PAGE_IS_PFNZERO | uapi::PAGE_IS_HUGE,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN takes one `struct pm_scan_arg`, which `PmScanArg` lays out;
            // `vec` points to `regions`, live and `vec_len` entries long. With `flags` 0 the
            // kernel only reports and changes no page table.
            let n = unsafe { uapi::ioctl_rw(&self.file, uapi::PAGEMAP_SCAN, &mut arg) }?;
            for r in &regions[..(n as usize).min(REGIONS)] {
                let (s, e) = (r.start.max(at) & !(PAGE_SIZE - 1), r.end.min(end));
                if s < e {
                    each(s, e, r.categories);
                }
            }
            if arg.walk_end <= at {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            at = arg.walk_end;
        }
        Ok(())
    }

    /// Frame number of the shared zero page: read-fault a private anonymous page, read its
    /// entry. `None` if any step fails or the kernel does not use the zero page there.
    fn learn_zero_pfn(&self) -> Option<u64> {
        let len = PAGE_SIZE as usize;
        // SAFETY: a new private anonymous read-only mapping at an address the kernel picks; it
        // aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `p` is the start of the readable page mapped just above.
        let _ = unsafe { std::ptr::read_volatile(p.cast::<u8>()) };
        let mut entry = [0u64];
        let read = self.read(p as u64, &mut entry);
        // SAFETY: unmaps exactly the page mapped above, which nothing refers to any more.
        unsafe { libc::munmap(p, len) };
        let e = entry[0];
        let zero_like = e & PM_PRESENT != 0 && e & (PM_MMAP_EXCLUSIVE | PM_FILE) == 0;
        (read.is_ok() && zero_like && e & PM_PFN_MASK != 0).then_some(e & PM_PFN_MASK)
    }
}

/// The order of a huge entry in a VMA whose kernel page size is `page_size`: that size for
/// hugetlb, a PMD for a THP in a base-page VMA.
fn huge_page_order(page_size: u64) -> u8 {
    if page_size > PAGE_SIZE && page_size.is_power_of_two() {
        (page_size.trailing_zeros() - PAGE_SHIFT) as u8
    } else {
        PMD_ORDER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(write: bool, shared: bool) -> Vma {
        Vma {
            start: 0x1000,
            end: 0x2000,
            read: true,
            write,
            shared,
            io: false,
            page_size: None,
        }
    }

    fn source(zero_pfn: Option<u64>) -> Pagemap {
        let mut p = Pagemap::open(false, true).unwrap();
        p.pfn_visible = true;
        p.zero_pfn = zero_pfn;
        p
    }

    #[test]
    fn absent_and_swapped_entries_are_none() {
        let p = source(None);
        assert_eq!(p.pte(&vma(true, false), 0), CpuPte::None);
        assert_eq!(p.pte(&vma(true, false), 1 << 62 | 0x1234), CpuPte::None);
    }

    #[test]
    fn exclusive_anonymous_page_in_writable_private_vma_is_writable() {
        let p = source(None);
        let e = PM_PRESENT | PM_MMAP_EXCLUSIVE | 0x42;
        assert_eq!(
            p.pte(&vma(true, false), e),
            CpuPte::Present {
                pfn: 0x42,
                write: true,
                zero: false,
                order: 0
            }
        );
    }

    #[test]
    fn shared_copy_on_write_page_is_read_only() {
        let p = source(None);
        let pte = p.pte(&vma(true, false), PM_PRESENT | 0x42);
        assert!(matches!(pte, CpuPte::Present { write: false, .. }));
    }

    #[test]
    fn page_cache_page_in_private_mapping_is_read_only() {
        let p = source(None);
        let pte = p.pte(
            &vma(true, false),
            PM_PRESENT | PM_FILE | PM_MMAP_EXCLUSIVE | 7,
        );
        assert!(matches!(pte, CpuPte::Present { write: false, .. }));
    }

    #[test]
    fn page_of_shared_mapping_is_writable_even_if_mapped_twice() {
        let p = source(None);
        let pte = p.pte(&vma(true, true), PM_PRESENT | PM_FILE | 7);
        assert!(matches!(pte, CpuPte::Present { write: true, .. }));
    }

    #[test]
    fn read_only_vma_gives_read_only_pages() {
        let p = source(None);
        let pte = p.pte(&vma(false, true), PM_PRESENT | PM_MMAP_EXCLUSIVE | 7);
        assert!(matches!(pte, CpuPte::Present { write: false, .. }));
    }

    #[test]
    fn zero_pfn_marks_the_zero_page() {
        let p = source(Some(0x99));
        let pte = p.pte(&vma(true, false), PM_PRESENT | 0x99);
        assert_eq!(
            pte,
            CpuPte::Present {
                pfn: 0x99,
                write: false,
                zero: true,
                order: 0
            }
        );
    }

    #[test]
    fn hidden_frame_numbers_read_as_zero() {
        let mut p = source(None);
        p.pfn_visible = false;
        let pte = p.pte(&vma(true, false), PM_PRESENT | PM_MMAP_EXCLUSIVE | 0x42);
        assert!(matches!(pte, CpuPte::Present { pfn: 0, .. }));
    }

    #[test]
    fn huge_orders() {
        assert_eq!(huge_page_order(PAGE_SIZE), 9);
        assert_eq!(huge_page_order(2 << 20), 9);
        assert_eq!(huge_page_order(1 << 30), 18);
        assert_eq!(huge_page_order(3 << 20), 9);
    }

    #[test]
    fn entries_past_the_address_space_read_as_absent() {
        let p = source(None);
        let mut e = [u64::MAX; 3];
        p.read(0xffff_ffff_ffff_d000, &mut e).unwrap();
        assert_eq!(e, [0; 3]);
    }
}
