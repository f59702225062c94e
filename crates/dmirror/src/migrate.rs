//! MIGRATE_TO_DEV, MIGRATE_TO_SYS, RELEASE and FLAGS: pages into the device's memory and back,
//! through the address space's migration hooks, and the injected allocation failure.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use svmirror_core::MirrorError;
use svmirror_core::{AreaKind, CpuPte, DevicePages, PAGE_SIZE, PageSource, Range};

use crate::{Dmirror, DmirrorCmd, DmirrorError, FLAG_FAIL_ALLOC, PMD_PAGES, check};

impl Dmirror {
    /// Migrates `npages` at `addr` into device memory; `cpages` is how many moved. As the
    /// kernel's, the device then reads the range into `buf` (at least `npages` pages long) for
    /// the caller to check.
    pub fn migrate_to_dev(
        &self,
        addr: u64,
        npages: u64,
        buf: &mut [u8],
    ) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.migrate_to_dev", addr, npages).entered();
        let range = check(addr, npages, buf.len() as u64, PAGE_SIZE)?;
        let mm_err = |source| DmirrorError::Mm {
            op: "migrate to device",
            range,
            source,
        };
        let (pieces, own) = self.check_migratable(range)?;
        if self.fail_alloc.swap(false, Ordering::AcqRel) {
            self.injected_alloc_failure(range)?;
        }
        // Pages already in this device's memory come back first, from this thread.
        // `migrate_to_device` would bring them back through kernel faults that the monitor
        // serves, and the monitor unbooks a page only after mapping it: the populate can return
        // while the page still looks migrated, and the page is then skipped and dropped.
        if own {
            self.mm.migrate_to_ram(range).map_err(mm_err)?;
        }
        // One mapping at a time, as the kernel's dmirror walks VMAs: over several mappings,
        // `migrate_to_device` reports every page moved but the device copies are discarded
        // right away and the CPU then reads zeros (seemingly the MADV_DONTNEED's one REMOVE
        // event per mapping, which the monitor does not match with the one it expects).
        let mut moved = 0;
        for piece in pieces {
            let device: Arc<dyn DevicePages> = self.memory.clone();
            moved +=
                self.mm
                    .migrate_to_device(piece, device)
                    .map_err(|source| DmirrorError::Mm {
                        op: "migrate to device",
                        range: piece,
                        source,
                    })?;
        }
        self.read(addr, npages, buf)?;
        Ok(DmirrorCmd {
            cpages: moved,
            faults: 0,
        })
    }

    /// The allocation [`FLAG_FAIL_ALLOC`] made fail, at the start of a migration of `range`.
    /// As in the kernel, a failed huge-page allocation falls back to 4 KiB pages and the
    /// migration goes on; a failed 4 KiB allocation fails the command with ENOMEM, nothing
    /// migrated. The first page is part of a huge page when `range` covers a whole 2 MiB
    /// window from its start and, once faulted in for reading, that window is one PMD mapping
    /// (a THP, or the huge zero page of an untouched THP area).
    fn injected_alloc_failure(&self, range: Range) -> Result<(), DmirrorError> {
        let core = |source| {
            DmirrorError::Mirror(MirrorError::Core {
                op: "migrate to device",
                range,
                source,
            })
        };
        let huge_window =
            range.start() % (PMD_PAGES * PAGE_SIZE) == 0 && range.pages() >= PMD_PAGES;
        if huge_window {
            let first = Range::with_len(range.start(), PAGE_SIZE).map_err(core)?;
            self.mm.fault(first, false).map_err(core)?;
            let mut pte = [CpuPte::None];
            self.mm.snapshot(range.start(), &mut pte).map_err(core)?;
            if matches!(pte[0], CpuPte::Present { order: 9, .. }) {
                tracing::debug!(%range, "injected huge-page allocation failure: 4 KiB fallback");
                return Ok(());
            }
        }
        Err(DmirrorError::OutOfMemory {
            addr: range.start(),
        })
    }

    /// Sets the command flags (the kernel's FLAGS command): [`FLAG_FAIL_ALLOC`] makes the next
    /// device-memory allocation fail, once. Unknown bits are EINVAL.
    pub fn flags(&self, flags: u64) -> Result<DmirrorCmd, DmirrorError> {
        if flags & !FLAG_FAIL_ALLOC != 0 {
            return Err(DmirrorError::InvalidCommand {
                addr: 0,
                npages: 0,
                reason: "unknown flags",
            });
        }
        self.fail_alloc
            .store(flags & FLAG_FAIL_ALLOC != 0, Ordering::Release);
        Ok(DmirrorCmd::default())
    }
    /// Brings the pages of `npages` at `addr` that live in device memory back to RAM; `cpages`
    /// is how many came back.
    pub fn migrate_to_sys(&self, addr: u64, npages: u64) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.migrate_to_sys", addr, npages).entered();
        let range = check(addr, npages, u64::MAX, 1)?;
        // An injected failure of the RAM page allocation: device pages are 4 KiB here, which is
        // what the kernel falls back to when a huge page cannot be allocated.
        if self.fail_alloc.swap(false, Ordering::AcqRel) {
            tracing::debug!(%range, "injected allocation failure: 4 KiB fallback");
        }
        let back = self
            .mm
            .migrate_to_ram(range)
            .map_err(|source| DmirrorError::Mm {
                op: "migrate to system",
                range,
                source,
            })?;
        Ok(DmirrorCmd {
            cpages: back,
            faults: 0,
        })
    }

    /// Evicts everything from device memory back to RAM (the kernel's RELEASE); `cpages` is how
    /// many pages came back.
    pub fn release(&self) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.release").entered();
        let mut cmd = DmirrorCmd::default();
        let mut first_error = None;
        // Every run is tried; the first failure is reported.
        let runs = self.memory.runs().into_iter().chain(self.exclusive.runs());
        for run in runs {
            match self.mm.migrate_to_ram(run) {
                Ok(n) => cmd.cpages += n,
                Err(source) => {
                    first_error.get_or_insert(DmirrorError::Mm {
                        op: "release",
                        range: run,
                        source,
                    });
                }
            }
        }
        first_error.map_or(Ok(cmd), Err)
    }

    /// Checks `range` for migration as the kernel's dmirror does: every page must be in a
    /// readable mapping (else EINVAL), and none may live in another device's memory (ENOENT:
    /// the kernel migrates system memory only). Returns the pieces of `range` in each mapping,
    /// and whether a page lives in this device's memory already.
    fn check_migratable(&self, range: Range) -> Result<(Vec<Range>, bool), DmirrorError> {
        let core = |source| {
            DmirrorError::Mirror(MirrorError::Core {
                op: "migrate to device",
                range,
                source,
            })
        };
        let mine = [self.owner(), self.exclusive.owner()];
        let mut own = false;
        let mut pieces = Vec::new();
        let mut at = range.start();
        let mut ptes = Vec::new();
        while at < range.end() {
            let area = self.mm.area(at, range.end()).map_err(core)?;
            let end = area.end.min(range.end());
            let AreaKind::Mapped { read: true, .. } = area.kind else {
                return Err(DmirrorError::InvalidCommand {
                    addr: range.start(),
                    npages: range.pages(),
                    reason: "range is not all readable memory",
                });
            };
            // Split at mapping (VMA) boundaries: areas of one kind may span several.
            let mut a = at;
            while a < end {
                let vma_end = match self.maps.mapping(a) {
                    Ok(Some(m)) if m.range.start() <= a => m.range.end().min(end),
                    Ok(_) => end,
                    Err(source) => {
                        return Err(DmirrorError::Mm {
                            op: "migrate to device",
                            range,
                            source,
                        });
                    }
                };
                pieces.push(Range::new(a, vma_end).map_err(core)?);
                a = vma_end;
            }
            ptes.clear();
            ptes.resize(((end - at) / PAGE_SIZE) as usize, CpuPte::None);
            self.mm.snapshot(at, &mut ptes).map_err(core)?;
            for (i, p) in ptes.iter().enumerate() {
                match p {
                    CpuPte::DevicePrivate { owner, .. } if mine.contains(owner) => own = true,
                    CpuPte::DevicePrivate { .. } => {
                        return Err(DmirrorError::OnOtherDevice {
                            addr: at + i as u64 * PAGE_SIZE,
                        });
                    }
                    _ => {}
                }
            }
            at = end;
        }
        Ok((pieces, own))
    }
}
