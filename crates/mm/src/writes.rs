//! Write tracking: which pages the CPU wrote, through userfaultfd's asynchronous write-protect
//! mode (WP_ASYNC) and PAGEMAP_SCAN, which reports the pages written (`PAGE_IS_WRITTEN`: their
//! protection is gone) and protects them again in the same call. Not through soft-dirty bits:
//! nothing here reads or clears them (pagemap bit 55, /proc/self/clear_refs); they exist only
//! with CONFIG_MEM_SOFT_DIRTY (not set on the 6.18 test kernel) and are cleared for the whole
//! process at once. The written ranges are reported as `SoftDirty` invalidations (as the
//! kernel's soft-dirty reset notifies `MMU_NOTIFY_SOFT_DIRTY`), which backends ignore and
//! dirty-tracking users consume.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use svmirror_core::{Event, Range};

use crate::error::MmError;
use crate::process::ProcessMm;
use crate::uapi::{PAGEMAP_SCAN, PageRegion, PmScanArg};
use crate::uffd::feature;

/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail unless the range is registered in WP_ASYNC mode.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since it was last write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;

impl ProcessMm {
    /// Starts tracking CPU writes to `range`: registers it (if needed) and write-protects it.
    /// Needs the WP_ASYNC feature.
    pub fn track_writes(&self, range: Range) -> Result<(), MmError> {
        if self.shared.uffd.features & feature::WP_ASYNC == 0 {
            return Err(MmError::MissingFeatures {
                missing: vec!["WP_ASYNC"],
            });
        }
        self.check_mapped(range)?;
        match self.register(range) {
            Ok(()) | Err(MmError::AlreadyRegistered { .. }) => {}
            Err(e) => return Err(e),
        }
        self.shared.tracking.store(true, Ordering::Relaxed);
        // Protecting part of a huge page splits it: userfaultfd tracks 4 KiB pages
        // (mm/mprotect.c `change_pmd_range` calls `__split_huge_pmd` for a range that does not
        // cover the whole PMD). Unavoidable for the range asked for; counted.
        let cut = self.shared.huge_pages_cut_by(range);
        let res = self
            .shared
            .uffd
            .write_protect(range)
            .map_err(|source| MmError::Syscall {
                op: "UFFDIO_WRITEPROTECT",
                range,
                source,
            });
        self.shared.count_splits(&cut, "partial write-protect");
        res
    }

    /// The ranges of `range` written since tracking started or since the last call, which are
    /// write-protected again; each is announced with a `SoftDirty` invalidation.
    pub fn collect_writes(&self, range: Range) -> Result<Vec<Range>, MmError> {
        let pagemap = File::open("/proc/self/pagemap").map_err(|source| MmError::Open {
            path: "/proc/self/pagemap",
            source,
        })?;
        // As in `track_writes`: write-protecting the written part of a huge page that `range`
        // cuts splits it (fs/proc/task_mmu.c `pagemap_scan_thp_entry` calls `split_huge_pmd`
        // when the range does not cover the whole huge page). Counted.
        let cut = self.shared.huge_pages_cut_by(range);
        let mut regions = vec![PageRegion::default(); 256];
        let mut out: Vec<Range> = Vec::new();
        let mut start = range.start();
        while start < range.end() {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end: range.end(),
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` regions into
            // `regions`, which is that long and outlives the call; write-protecting pages
            // changes no memory contents.
            let n = unsafe {
                libc::ioctl(
                    pagemap.as_raw_fd(),
                    PAGEMAP_SCAN as _,
                    &mut arg as *mut PmScanArg,
                )
            };
            if n < 0 {
                return Err(MmError::Syscall {
                    op: "PAGEMAP_SCAN",
                    range,
                    source: io::Error::last_os_error(),
                });
            }
            for r in &regions[..n as usize] {
                if let Ok(r) = Range::new(r.start, r.end) {
                    match out.last_mut() {
                        Some(last) if last.end() == r.start() => {
                            *last = Range::new(last.start(), r.end()).map_err(MmError::Core)?;
                        }
                        _ => out.push(r),
                    }
                }
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        self.shared.count_splits(&cut, "partial write-protect");
        for r in &out {
            self.invalidate(*r, Event::SoftDirty)?.end();
        }
        Ok(out)
    }
}
