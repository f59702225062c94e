//! svmirror-mm: the CPU side of svmirror, the process's own address space.
//!
//! This first piece is the page source: [`ProcessPageSource`] implements the core's
//! [`PageSource`] for the calling process, so that [`range_fault`](svmirror_core::range_fault)
//! walks the real CPU page table.
//!
//! | `PageSource` call | mechanism | fallback |
//! |---|---|---|
//! | [`area`](PageSource::area) | PROCMAP_QUERY ioctl on /proc/self/maps (Linux 6.11+) | parsing /proc/self/maps |
//! | [`snapshot`](PageSource::snapshot) | /proc/self/pagemap entries + PAGEMAP_SCAN ioctl (6.7+) | pagemap entries alone |
//! | [`fault`](PageSource::fault) | `madvise(MADV_POPULATE_READ / _WRITE)` (5.14+) | none |
//!
//! [`ProcessPageSource::features`] says which mechanisms are in use.
//!
//! # Where each field of a [`CpuPte`] comes from
//!
//! - **present**: pagemap bit 63; swapped-out and never-touched pages are [`CpuPte::None`].
//! - **pfn**: pagemap bits 0-54, which the kernel fills only for `CAP_SYS_ADMIN`; else 0.
//! - **write**: not the PTE bit, which userspace cannot read, but what a device may rely on:
//!   the VMA is writable, the page is not the zero page, and the mapping is shared or the page
//!   is anonymous and mapped once (pagemap bit 56). A page shared copy-on-write after a fork is
//!   read-only. A page mapped once whose PTE is still write-protected (a shared file page only
//!   read so far, a parent's page after its forked child exited) reads as writable.
//! - **zero**: PAGEMAP_SCAN's `PAGE_IS_PFNZERO` (the huge zero page too, on 6.18); without
//!   PAGEMAP_SCAN, the base zero page's frame number when frame numbers are visible.
//! - **order**: PAGEMAP_SCAN's `PAGE_IS_HUGE` (a PMD-mapped THP: 9; hugetlb: the VMA's page
//!   size), unprivileged and exact for the mapping. Without PAGEMAP_SCAN, always 0: nothing
//!   else unprivileged says which pages a huge entry maps.
//!
//! The crate reads page tables and faults pages in; it never reads or writes the memory it
//! inspects, and never turns it into a Rust reference. ([`testing::AnonMap`], the anonymous
//! mapping that tests and benchmarks put device buffers in, copies bytes in and out of its own
//! mapping through raw pointers.)
//!
//! # What is the caller's job
//!
//! - **Use it through the core's sequence protocol.** A snapshot is a moment's view that the
//!   CPU may change right after; only `range_fault` under `read_begin`/`read_retry`, with every
//!   CPU change reported to the notifier, makes it safe to program a device from it.
//! - **Pin before a device uses a page.** Frame numbers (visible only with `CAP_SYS_ADMIN`) are
//!   not references: a page not pinned can be freed or moved at any time.
//! - **One source per process, made in that process.** The /proc files are opened in
//!   [`ProcessPageSource::new`] and keep describing the process that opened them: a forked
//!   child must create its own.
//! - **Do not fault memory that the faulting thread itself must serve**, e.g. a range
//!   registered with userfaultfd whose monitor is this thread: populate waits for the fault.
//!
//! ```
//! use svmirror_core::{AreaKind, CpuPte, PageSource, Range, PAGE_SIZE};
//! use svmirror_mm::ProcessPageSource;
//!
//! let source = ProcessPageSource::new()?;
//! let buf = vec![1u8; 4 * PAGE_SIZE as usize];
//! let start = (buf.as_ptr() as u64).next_multiple_of(PAGE_SIZE);
//! let area = source.area(start, start + PAGE_SIZE)?;
//! assert_eq!(area.kind, AreaKind::Mapped { read: true, write: true });
//!
//! source.fault(Range::with_len(start, PAGE_SIZE)?, true)?;
//! let mut pte = [CpuPte::None];
//! source.snapshot(start, &mut pte)?;
//! assert!(matches!(pte[0], CpuPte::Present { write: true, zero: false, .. }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg(target_os = "linux")]
// Library code reports what can fail as an error value (STYLE.md rule 4); an unwrap or expect
// that stays names its invariant in an `#[expect(.., reason = "..")]` on the smallest item.
// Unit tests (cfg(test)) and the integration tests in tests/, crates of their own, may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod book;
mod buffers;
mod error;
mod events;
mod fill;
mod limits;
mod maps;
mod migrate;
mod monitor;
mod pagemap;
mod populate;
mod process;
mod queue;
mod register;
#[cfg(feature = "scenarios")]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "the scenario suite, built only for tests (the `scenarios` feature)"
)]
pub mod scenarios;
mod shared;
mod svm;
pub mod testing;
mod uapi;
mod uffd;
mod writes;
mod zap;

use svmirror_core::{Area, AreaKind, CpuPte, Error, PAGE_SHIFT, PAGE_SIZE, PageSource, Range};

pub use crate::book::DevicePages;
pub use crate::error::MmError;
pub use crate::limits::{
    MemlockLimit, VM_PIN_SETTLE, memlock_limit, raise_memlock_limit, settled_vm_pinned_bytes,
    vm_pinned_bytes,
};
use crate::maps::Maps;
use crate::pagemap::Pagemap;
pub use crate::process::{AREA_TRIES, MmFeatures, MmStats, ProcessMm};
pub use crate::register::Unregistrable;
pub use crate::svm::{Advice, Protection};
pub use crate::uffd::{UffdAccess, feature as uffd_feature};
pub use crate::zap::{ZAP_SUSPECT_WAIT, ZAP_WAIT};

/// Which kernel interfaces a [`ProcessPageSource`] uses. As an argument to
/// [`ProcessPageSource::restricted`], which ones it may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageSourceFeatures {
    /// VMAs are looked up with the PROCMAP_QUERY ioctl (else by parsing /proc/self/maps).
    pub procmap_query: bool,
    /// Zero and huge pages are recognised with the PAGEMAP_SCAN ioctl.
    pub pagemap_scan: bool,
    /// Snapshots carry real frame numbers (the process has `CAP_SYS_ADMIN`); else they are 0.
    pub pfn_visible: bool,
}

impl PageSourceFeatures {
    /// Everything the kernel offers.
    pub const ALL: PageSourceFeatures = PageSourceFeatures {
        procmap_query: true,
        pagemap_scan: true,
        pfn_visible: true,
    };
}

/// One mapping (VMA) of the process, as [`ProcessPageSource::mapping`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Its extent.
    pub range: Range,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Shared (writes reach the backing object; no copy-on-write).
    pub shared: bool,
    /// An I/O or PFN-map area (judged by name).
    pub io: bool,
    /// The kernel's page size for it: larger than 4 KiB for hugetlb (whose ranges userfaultfd
    /// registers only in whole huge pages).
    pub page_size: u64,
}

/// The calling process's own page table as a [`PageSource`].
///
/// Holds open file descriptors of /proc/self/maps and /proc/self/pagemap (and /proc/self/smaps
/// when PROCMAP_QUERY is missing); every call is a few system calls on them, no state is
/// cached between calls, and it may be shared between threads.
pub struct ProcessPageSource {
    maps: Maps,
    pagemap: Pagemap,
    /// /proc/self/mem, read to map the zero page at absent pages (`mark_absent`); `None` if it
    /// could not be opened.
    mem: Option<std::fs::File>,
}

impl std::fmt::Debug for ProcessPageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPageSource")
            .field("maps", &self.maps)
            .field("pagemap", &self.pagemap)
            .field("mem", &self.mem.is_some())
            .finish()
    }
}

impl ProcessPageSource {
    /// The present pages of `r` and their frame numbers (0 when hidden).
    pub(crate) fn present_frames(&self, r: Range) -> std::io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        self.each_present(r, |a, f| out.push((a, f)))?;
        Ok(out)
    }

    /// Calls `each(address, frame)` for the present pages of `r`, allocating nothing.
    pub(crate) fn each_present(&self, r: Range, each: impl FnMut(u64, u64)) -> std::io::Result<()> {
        self.pagemap.each_present(r.start(), r.end(), each)
    }

    /// Maps the zero page at the absent pages of `r` by reading them through /proc/self/mem,
    /// where `r` lies in one private anonymous VMA of 4 KiB pages; anything else is left
    /// alone. Returns whether it read them all. No allocation: the monitor's reader calls it.
    ///
    /// A read through /proc/self/mem faults pages in with `get_user_pages_remote` and no
    /// `locked` argument (mm/memory.c `__access_remote_vm`), so without FAULT_FLAG_ALLOW_RETRY:
    /// on a range registered for MISSING faults `handle_userfault` (fs/userfaultfd.c) answers
    /// VM_FAULT_SIGBUS at once and the read fails with EIO, instead of waiting for a
    /// userfaultfd reader (which would be the caller itself). Elsewhere a read fault of an
    /// absent anonymous page maps the shared zero page (mm/memory.c `do_anonymous_page`),
    /// which changes no byte the process can see and allocates no memory.
    pub(crate) fn mark_absent(&self, r: Range) -> bool {
        let Some(mem) = &self.mem else {
            return false;
        };
        match self.maps.private_anon_at(r.start()) {
            Some((s, e)) if s <= r.start() && r.end() <= e => {}
            _ => return false,
        }
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 4 * svmirror_core::PAGE_SIZE as usize];
        let mut at = r.start();
        while at < r.end() {
            let n = (r.end() - at).min(buf.len() as u64) as usize;
            match mem.read_at(&mut buf[..n], at) {
                Ok(0) | Err(_) => return false,
                Ok(k) => at += k as u64,
            }
        }
        true
    }

    /// Whether frame numbers are visible to this process.
    pub(crate) fn frames_visible(&self) -> bool {
        self.pagemap.pfn_visible()
    }

    /// Opens the /proc files and probes which mechanisms the kernel offers.
    pub fn new() -> Result<Self, MmError> {
        Self::restricted(PageSourceFeatures::ALL)
    }

    /// As [`new`](Self::new), but uses only the mechanisms `allow` permits (each still only if
    /// the kernel has it), and reports frame numbers as 0 unless `allow.pfn_visible`. Useful to
    /// exercise the fallbacks on a new kernel.
    pub fn restricted(allow: PageSourceFeatures) -> Result<Self, MmError> {
        let maps = Maps::open(allow.procmap_query)?;
        let pagemap = Pagemap::open(allow.pagemap_scan, allow.pfn_visible)?;
        let mem = std::fs::File::open("/proc/self/mem").ok();
        let this = ProcessPageSource { maps, pagemap, mem };
        tracing::debug!(features = ?this.features(), "process page source ready");
        Ok(this)
    }

    /// The mapping (VMA) containing `addr`, or the next one above it, or `None` above the last.
    pub fn mapping(&self, addr: u64) -> Result<Option<Mapping>, MmError> {
        let Some(v) = self.maps.find(addr)? else {
            return Ok(None);
        };
        let page_size = self.maps.page_size(&v)?;
        Ok(Range::new(v.start, v.end).ok().map(|range| Mapping {
            range,
            read: v.read,
            write: v.write,
            shared: v.shared,
            io: v.io,
            page_size,
        }))
    }

    /// The mechanisms in use.
    pub fn features(&self) -> PageSourceFeatures {
        PageSourceFeatures {
            procmap_query: self.maps.uses_query(),
            pagemap_scan: self.pagemap.uses_scan(),
            pfn_visible: self.pagemap.pfn_visible(),
        }
    }
}

impl PageSource for ProcessPageSource {
    /// The VMA at `addr`, or the hole up to the next one, clamped to `limit`. `addr` and `limit`
    /// must be page aligned with `addr < limit`; anything else is an error, never a panic.
    ///
    /// ```
    /// use svmirror_core::{AreaKind, Error, PageSource};
    /// use svmirror_mm::ProcessPageSource;
    ///
    /// let source = ProcessPageSource::new()?;
    /// // Nothing is ever mapped at address 0.
    /// assert_eq!(source.area(0, 0x1000)?.kind, AreaKind::Hole);
    /// assert!(matches!(source.area(0x2000, 0x1000), Err(Error::ReversedRange { .. })));
    /// assert!(matches!(source.area(0x1001, 0x3000), Err(Error::UnalignedRange { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn area(&self, addr: u64, limit: u64) -> Result<Area, Error> {
        let range = Range::new(addr, limit)?;
        let _span = tracing::trace_span!("mm.area", start = addr, limit).entered();
        let vma = self.maps.find(addr).map_err(|e| Error::Source {
            range,
            source: Box::new(e),
        })?;
        Ok(match vma {
            Some(vma) if vma.start <= addr => Area {
                end: vma.end.min(limit),
                kind: if vma.io {
                    AreaKind::Io
                } else {
                    AreaKind::Mapped {
                        read: vma.read,
                        write: vma.write,
                    }
                },
            },
            Some(next) => Area {
                end: next.start.min(limit),
                kind: AreaKind::Hole,
            },
            None => Area {
                end: limit,
                kind: AreaKind::Hole,
            },
        })
    }

    /// The state of each page from `addr` on. Pages outside any mapping, and pages of I/O
    /// areas, read as [`CpuPte::None`]. An empty `out` is a no-op; a misaligned `addr` or a
    /// range past the end of the address space is an error.
    ///
    /// ```
    /// use svmirror_core::{CpuPte, Error, PageSource};
    /// use svmirror_mm::ProcessPageSource;
    ///
    /// let source = ProcessPageSource::new()?;
    /// let mut out = [CpuPte::Present { pfn: 1, write: true, zero: false, order: 0 }; 2];
    /// source.snapshot(0, &mut out)?;
    /// assert_eq!(out, [CpuPte::None; 2]);
    /// assert!(matches!(source.snapshot(0x10, &mut out), Err(Error::UnalignedRange { .. })));
    /// assert!(matches!(source.snapshot(u64::MAX & !0xfff, &mut out), Err(Error::RangeOverflow { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn snapshot(&self, addr: u64, out: &mut [CpuPte]) -> Result<(), Error> {
        if out.is_empty() {
            return Ok(());
        }
        let len = (out.len() as u64)
            .checked_mul(PAGE_SIZE)
            .ok_or(Error::RangeOverflow {
                start: addr,
                len: u64::MAX,
            })?;
        let range = Range::with_len(addr, len)?;
        let _span =
            tracing::trace_span!("mm.snapshot", start = range.start(), end = range.end()).entered();
        let source = |e: MmError| Error::Source {
            range,
            source: Box::new(e),
        };
        let mut at = range.start();
        let mut done = 0;
        while at < range.end() {
            let vma = self.maps.find(at).map_err(source)?;
            let (stop, vma) = match vma {
                Some(vma) if vma.start <= at => (vma.end.min(range.end()), Some(vma)),
                Some(next) => (next.start.min(range.end()), None),
                None => (range.end(), None),
            };
            if stop <= at || stop % PAGE_SIZE != 0 {
                return Err(Error::Source {
                    range,
                    source: format!("mapping lookup at {at:#x} returned end {stop:#x}").into(),
                });
            }
            let n = ((stop - at) >> PAGE_SHIFT) as usize;
            let part = &mut out[done..done + n];
            match vma {
                Some(vma) if !vma.io => self
                    .pagemap
                    .snapshot(&self.maps, &vma, at, part)
                    .map_err(source)?,
                _ => part.fill(CpuPte::None),
            }
            at = stop;
            done += n;
        }
        Ok(())
    }

    /// Faults `range` in with `MADV_POPULATE_WRITE` if `write`, else `MADV_POPULATE_READ`.
    /// Errors follow the core's table: [`Error::BadAddress`] for a hole, PROT_NONE or I/O area,
    /// [`Error::WriteToReadOnly`] for a write to a read-only mapping, each at the first page that
    /// explains the failure; [`Error::Source`] with the `io::Error` otherwise.
    ///
    /// ```
    /// use svmirror_core::{Error, PageSource, Range};
    /// use svmirror_mm::ProcessPageSource;
    ///
    /// let source = ProcessPageSource::new()?;
    /// let low = Range::new(0, 0x2000)?;
    /// assert!(matches!(source.fault(low, false), Err(Error::BadAddress { addr: 0 })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn fault(&self, range: Range, write: bool) -> Result<(), Error> {
        let _span =
            tracing::trace_span!("mm.fault", start = range.start(), end = range.end(), write)
                .entered();
        populate::populate(&self.maps, range, write)
    }
}
