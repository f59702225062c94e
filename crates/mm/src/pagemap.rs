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
//! # Cost
//!
//! A snapshot reads pagemap in `pread`s of up to 2048 entries, then runs PAGEMAP_SCAN only if
//! the entries leave a zero or huge page possible (see [`ScanNeed`]): with frame numbers visible,
//! ordinary 4 KiB pages rule both out, and the snapshot costs one pagemap read; without them, any
//! 2 MiB block of present pages needs the scan, which costs about half as much again.
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
/// Bytes in one pagemap entry.
const ENTRY: usize = size_of::<u64>();
/// Pagemap entries read per `pread` in a snapshot, at most. A `pread` of pagemap costs about as
/// much as reading a hundred entries or more (measured on 6.18 in a VM: 1-2 µs a call, about
/// 10 ns an entry), so a snapshot reads many at once, into a 16 KiB buffer.
const CHUNK: usize = 2048;
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
    ///
    /// PAGEMAP_SCAN runs only when the pagemap entries leave something for it to find (see
    /// [`ScanNeed`]): it costs about half as much again as the pagemap read.
    pub(crate) fn snapshot(
        &self,
        maps: &Maps,
        vma: &Vma,
        addr: u64,
        out: &mut [CpuPte],
    ) -> Result<(), MmError> {
        let mut bytes = [0u8; CHUNK * ENTRY];
        let mut need = ScanNeed::new(self, vma);
        let rule = PteRule::new(self, vma);
        for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
            let at = addr + (((i * CHUNK) as u64) << PAGE_SHIFT);
            let bytes = &mut bytes[..chunk.len() * ENTRY];
            self.read_raw(at, bytes)
                .map_err(|source| MmError::ReadPagemap { addr: at, source })?;
            need.entries(at >> PAGE_SHIFT, bytes);
            for (pte, raw) in chunk.iter_mut().zip(bytes.chunks_exact(ENTRY)) {
                *pte = rule.pte(decode(raw));
            }
        }
        if !self.scan || !need.needed() {
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
    #[cfg(test)]
    fn pte(&self, vma: &Vma, e: u64) -> CpuPte {
        PteRule::new(self, vma).pte(e)
    }

    /// Calls `each(address, frame)` for every present page of `[start, end)` (the frame 0 when
    /// frame numbers are hidden), reading through a buffer on the stack: no allocation, for
    /// the monitor's reader.
    pub(crate) fn each_present(
        &self,
        start: u64,
        end: u64,
        mut each: impl FnMut(u64, u64),
    ) -> io::Result<()> {
        let mut bytes = [0u8; 512 * ENTRY];
        let mut at = start;
        while at < end {
            let n = (((end - at) >> PAGE_SHIFT) as usize).min(512);
            let bytes = &mut bytes[..n * ENTRY];
            self.read_raw(at, bytes)?;
            for (i, raw) in bytes.chunks_exact(ENTRY).enumerate() {
                let e = decode(raw);
                if e & PM_PRESENT != 0 {
                    each(at + ((i as u64) << PAGE_SHIFT), e & PM_PFN_MASK);
                }
            }
            at += (n as u64) << PAGE_SHIFT;
        }
        Ok(())
    }

    /// Reads the pagemap entries of `out.len()` pages from `addr` (for probes: few pages, small
    /// reads). Entries past the end of the address space read as 0 (not present).
    fn read(&self, addr: u64, out: &mut [u64]) -> io::Result<()> {
        let mut bytes = [0u8; 64 * ENTRY];
        for (i, part) in out.chunks_mut(64).enumerate() {
            let bytes = &mut bytes[..part.len() * ENTRY];
            self.read_raw(addr + (((i * 64) as u64) << PAGE_SHIFT), bytes)?;
            for (entry, raw) in part.iter_mut().zip(bytes.chunks_exact(ENTRY)) {
                *entry = decode(raw);
            }
        }
        Ok(())
    }

    /// Reads the raw pagemap entries of `bytes.len() / ENTRY` pages from `addr` into `bytes`
    /// (whole entries only), in one `pread` when the kernel answers in full. Entries past the end
    /// of the address space read as 0 (not present).
    fn read_raw(&self, addr: u64, bytes: &mut [u8]) -> io::Result<()> {
        let offset = (addr >> PAGE_SHIFT) * ENTRY as u64;
        let mut done = 0;
        while done < bytes.len() {
            match self.file.read_at(&mut bytes[done..], offset + done as u64) {
                // The kernel answers in whole entries; 0 is the end of the address space.
                Ok(n) if n >= ENTRY => done += n - n % ENTRY,
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        bytes[done..].fill(0);
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

/// How pagemap entries of one VMA become [`CpuPte`]s (see the module docs), with what the
/// answer depends on besides the entry fetched once.
#[derive(Clone, Copy)]
struct PteRule {
    /// Mask of the frame number bits: all of them, or none when frame numbers are hidden.
    pfn_mask: u64,
    /// The zero page's frame number, or a value no frame number has.
    zero_pfn: u64,
    /// The VMA is writable.
    write: bool,
    /// The VMA is shared.
    shared: bool,
}

impl PteRule {
    fn new(pagemap: &Pagemap, vma: &Vma) -> Self {
        PteRule {
            pfn_mask: if pagemap.pfn_visible { PM_PFN_MASK } else { 0 },
            zero_pfn: pagemap.zero_pfn.unwrap_or(u64::MAX),
            write: vma.write,
            shared: vma.shared,
        }
    }

    /// The page state entry `e` describes (order 0; the scan adds huge orders).
    fn pte(self, e: u64) -> CpuPte {
        if e & PM_PRESENT == 0 {
            return CpuPte::None;
        }
        let pfn = e & self.pfn_mask;
        let kind = e & (PM_MMAP_EXCLUSIVE | PM_FILE);
        // The zero page has no `struct page`: the kernel marks it neither exclusive nor file.
        let zero = kind == 0 && pfn == self.zero_pfn;
        let exclusive_anon = kind == PM_MMAP_EXCLUSIVE;
        CpuPte::Present {
            pfn,
            write: self.write && !zero && (self.shared || exclusive_anon),
            zero,
            order: 0,
        }
    }
}

/// Base pages a PMD maps (2 MiB of 4 KiB pages).
const PMD_PAGES: u64 = 1 << PMD_ORDER;

/// Whether PAGEMAP_SCAN could add anything to a snapshot read from pagemap, judged from the
/// pagemap entries as they are read.
///
/// The scan marks zero pages and pages mapped by a huge entry; pagemap rules both out for most
/// pages:
/// - **Zero**: the zero page is present, anonymous and never "exclusively mapped" (the kernel
///   has no `struct page` for it). With frame numbers, pagemap itself marks it by its frame.
/// - **Huge** (base-page VMAs): a PMD maps a whole 2 MiB block of present pages, and with frame
///   numbers each page's frame is aligned as its address is (the PMD's frame is 2 MiB aligned
///   and pagemap reports `frame + index` for each page, the huge zero page included). A block
///   with one page that is not so holds no huge entry. Only the pages of a block that the
///   snapshot covers are judged. A hugetlb VMA (or one whose page size is unknown) maps huge
///   entries only: there, any present page needs the scan.
///
/// Judging costs little next to the read: a block is ruled out at its first page that fails
/// (without frame numbers, at its first absent page), and once one block needs the scan, the
/// rest is not looked at.
struct ScanNeed {
    /// The entries seen so far leave something for the scan to find.
    needed: bool,
    /// Every present page is in a huge entry (hugetlb, or the page size is unknown).
    hugetlb: bool,
    /// Frame numbers are visible: huge blocks are also judged by frame alignment.
    frames: bool,
    /// Pagemap does not mark the zero page itself: zero-page candidates need the scan.
    zero_unknown: bool,
    /// Some page has been seen, so a block is open.
    open: bool,
    /// Every page of the open 2 MiB block seen so far could be mapped by a PMD.
    block_may_be_huge: bool,
}

impl ScanNeed {
    fn new(pagemap: &Pagemap, vma: &Vma) -> Self {
        ScanNeed {
            needed: false,
            hugetlb: vma.page_size != Some(PAGE_SIZE),
            frames: pagemap.pfn_visible,
            zero_unknown: !(pagemap.pfn_visible && pagemap.zero_pfn.is_some()),
            open: false,
            block_may_be_huge: true,
        }
    }

    /// Takes in `raw`, the pagemap entries of consecutive pages from page number `vpn` on,
    /// following those taken in before.
    fn entries(&mut self, vpn: u64, raw: &[u8]) {
        if self.needed {
            return;
        }
        let entry = |k: u64| decode(&raw[k as usize * ENTRY..][..ENTRY]);
        let n = (raw.len() / ENTRY) as u64;
        if self.hugetlb {
            self.needed = (0..n).any(|k| entry(k) & PM_PRESENT != 0);
            return;
        }
        let mut k = 0;
        while k < n {
            let at = vpn + k;
            if at % PMD_PAGES == 0 && self.open {
                if self.block_may_be_huge {
                    self.needed = true;
                    return;
                }
                self.block_may_be_huge = true;
            }
            self.open = true;
            let end = (k + PMD_PAGES - at % PMD_PAGES).min(n);
            if self.block_may_be_huge {
                self.block_may_be_huge = (k..end).all(|j| {
                    let e = entry(j);
                    e & PM_PRESENT != 0
                        && (!self.frames || (e & PM_PFN_MASK) % PMD_PAGES == (vpn + j) % PMD_PAGES)
                });
            }
            if self.zero_unknown
                && (k..end)
                    .any(|j| entry(j) & (PM_PRESENT | PM_MMAP_EXCLUSIVE | PM_FILE) == PM_PRESENT)
            {
                self.needed = true;
                return;
            }
            k = end;
        }
    }

    /// Whether the scan is needed, once every page is taken in.
    fn needed(&self) -> bool {
        self.needed || (self.open && self.block_may_be_huge)
    }
}

/// One pagemap entry from its `ENTRY` bytes.
fn decode(raw: &[u8]) -> u64 {
    let mut b = [0u8; ENTRY];
    b.copy_from_slice(raw);
    u64::from_ne_bytes(b)
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

    /// Runs [`ScanNeed`] over `entries`, the first at page number `vpn`, in a base-page VMA:
    /// in one part, and in parts as a snapshot's pagemap reads split them, which must agree.
    fn scan_needed(p: &Pagemap, vpn: u64, entries: &[u64]) -> bool {
        let mut v = vma(true, false);
        v.page_size = Some(PAGE_SIZE);
        let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_ne_bytes()).collect();
        let run = |parts: usize| {
            let mut need = ScanNeed::new(p, &v);
            for (i, part) in raw.chunks(parts * ENTRY).enumerate() {
                need.entries(vpn + (i * parts) as u64, part);
            }
            need.needed()
        };
        let whole = run(entries.len().max(1));
        for parts in [1, 3, 512] {
            assert_eq!(run(parts), whole, "in parts of {parts}");
        }
        whole
    }

    /// Entries of `n` present pages with frames from `pfn` on.
    fn run_of(pfn: u64, n: u64) -> Vec<u64> {
        (0..n)
            .map(|i| PM_PRESENT | PM_MMAP_EXCLUSIVE | (pfn + i))
            .collect()
    }

    #[test]
    fn absent_pages_need_no_scan() {
        for visible in [true, false] {
            let mut p = source(Some(0x99));
            p.pfn_visible = visible;
            assert!(!scan_needed(&p, 0x400, &[0, 1 << 62 | 5, 0]));
            assert!(!scan_needed(&p, 0x400, &[0; 600]));
        }
    }

    #[test]
    fn a_block_of_frames_aligned_as_their_addresses_needs_the_scan() {
        let p = source(Some(0x99));
        assert!(scan_needed(&p, 0x400, &run_of(0x8_0000, 512)));
        // Part of a block at either end of the snapshot is judged by the pages seen.
        assert!(scan_needed(&p, 0x5f0, &run_of(0x8_01f0, 32)));
        let mut tail = run_of(0x1234, 512);
        tail.extend(run_of(0x8_0000, 3));
        assert!(scan_needed(&p, 0x400, &tail));
    }

    #[test]
    fn blocks_with_a_misaligned_or_absent_page_need_no_scan() {
        let p = source(Some(0x99));
        assert!(!scan_needed(&p, 0x400, &run_of(0x8_0001, 1024)));
        let mut hole = run_of(0x8_0000, 512);
        hole[100] = 0;
        assert!(!scan_needed(&p, 0x400, &hole));
    }

    #[test]
    fn without_frame_numbers_a_fully_present_block_needs_the_scan() {
        let mut p = source(None);
        p.pfn_visible = false;
        assert!(scan_needed(&p, 0x400, &run_of(0x8_0001, 512)));
        assert!(scan_needed(&p, 0x5f0, &run_of(0, 16)));
        let mut hole = run_of(0, 1024);
        hole[100] = 0;
        hole[600] = 0;
        assert!(!scan_needed(&p, 0x400, &hole));
    }

    #[test]
    fn a_possible_zero_page_needs_the_scan_unless_its_frame_is_known() {
        let shared_anon = PM_PRESENT | 0x99;
        let mut hole = vec![0; 1024];
        hole[700] = shared_anon;
        assert!(!scan_needed(&source(Some(0x99)), 0x400, &hole));
        assert!(scan_needed(&source(None), 0x400, &hole));
        let mut hidden = source(None);
        hidden.pfn_visible = false;
        assert!(scan_needed(&hidden, 0x400, &hole));
        // Exclusive or file pages are never the zero page.
        hole[700] = PM_PRESENT | PM_MMAP_EXCLUSIVE;
        assert!(!scan_needed(&hidden, 0x400, &hole));
        hole[700] = PM_PRESENT | PM_FILE;
        assert!(!scan_needed(&hidden, 0x400, &hole));
    }

    #[test]
    fn in_a_hugetlb_vma_any_present_page_needs_the_scan() {
        let p = source(Some(0x99));
        let mut v = vma(true, false);
        v.page_size = Some(2 << 20);
        let mut need = ScanNeed::new(&p, &v);
        let mut raw = vec![0u8; 8 * ENTRY];
        need.entries(0x400, &raw);
        assert!(!need.needed());
        raw[3 * ENTRY..4 * ENTRY]
            .copy_from_slice(&(PM_PRESENT | PM_MMAP_EXCLUSIVE | 5).to_ne_bytes());
        need.entries(0x408, &raw);
        assert!(need.needed());
    }

    #[test]
    fn entries_past_the_address_space_read_as_absent() {
        let p = source(None);
        let mut e = [u64::MAX; 3];
        p.read(0xffff_ffff_ffff_d000, &mut e).unwrap();
        assert_eq!(e, [0; 3]);
    }
}

/// /proc/kpageflags (root only): the flags of a page frame.
#[derive(Debug)]
pub(crate) struct PageFlags(File);

/// `KPF_ANON` (include/uapi/linux/kernel-page-flags.h).
pub(crate) const KPF_ANON: u64 = 1 << 12;
/// `KPF_SWAPBACKED`: cleared on an anonymous page by MADV_FREE (mm/swap.c `folio_mark_lazyfree`).
pub(crate) const KPF_SWAPBACKED: u64 = 1 << 14;

impl PageFlags {
    /// Opens /proc/kpageflags, if this process may read it.
    pub(crate) fn open() -> Option<Self> {
        File::open("/proc/kpageflags").ok().map(PageFlags)
    }

    /// The flags of frames `pfn .. pfn + out.len()` into `out`, in one read. No allocation.
    pub(crate) fn flags_run(&self, pfn: u64, out: &mut [u64]) -> io::Result<()> {
        // SAFETY: `out` is a live, exclusively borrowed slice of u64; viewing its bytes as u8
        // (alignment 1, every bit pattern valid both ways) for the read is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                out.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(out),
            )
        };
        self.0.read_exact_at(bytes, pfn * ENTRY as u64)
    }
}

/// Whether `flags` (from /proc/kpageflags) are those of a lazy-free anonymous page: MADV_FREE
/// cleared its `KPF_SWAPBACKED` (mm/swap.c `folio_mark_lazyfree`).
pub(crate) fn lazy_free(flags: u64) -> bool {
    flags & KPF_ANON != 0 && flags & KPF_SWAPBACKED == 0
}
