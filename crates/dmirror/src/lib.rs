//! svmirror-dmirror: [`Dmirror`], the userspace counterpart of the kernel's test device
//! (`lib/test_hmm.c`), built on an [`IommuMirror`] of svmirror-iommu and a [`ProcessMm`] of
//! svmirror-mm, so that the kernel's hmm selftests can be ported (this crate's `tests/`).
//!
//! # What it is made of
//!
//! - **One IOMMU mirror over the whole user address space** (`[4 KiB, 128 TiB)`), as the kernel's
//!   dmirror subscribes one range over everything. Its page source is the [`ProcessMm`], so
//!   userfaultfd events and the SVM API invalidate the device. The mirror resolves faults on
//!   demand ([`Prefetch::Demand`](svmirror_iommu::Prefetch)): the pages a fault pass asks for,
//!   at most a [`FAULT_CHUNK_PAGES`]-page aligned window at a time (or the whole huge page
//!   where the CPU maps one), clamped to the mapping; nothing the command did not ask for is
//!   registered or pinned.
//! - **A snapshot subscription** on the same notifier, used only to run `range_fault` in
//!   snapshot mode for [`Dmirror::snapshot`].
//! - **Device memory**: a map of page address → boxed page, the [`DevicePages`] that
//!   [`ProcessMm::migrate_to_device`] moves pages into. Its owner is not the mirror's, so the
//!   mirror drops its mappings of pages that migrate here; READ and WRITE use device-resident
//!   pages directly, found by the frame number the address space reports for each address (so
//!   a page that a mremap moved is still found).
//! - **Exclusive memory**: the same for pages the device holds for exclusive (atomic) access,
//!   with its own owner and `Exclusive` events, and an ATOMIC tag per page that any
//!   invalidation of the page clears (the device subscription's callback).
//!
//! # Commands
//!
//! Every command takes `(addr, npages)` and returns [`DmirrorCmd`] `{cpages, faults}` like the
//! kernel's `struct hmm_dmirror_cmd`; errors carry the kernel's errno
//! ([`DmirrorError::errno`]).
//!
//! - [`read`](Dmirror::read) / [`write`](Dmirror::write): copy between the pages and a host
//!   buffer by DMA through the IOMMU. Where a page is not mapped (or not writable, for a write),
//!   the rest of the range is faulted in [`FAULT_CHUNK_PAGES`]-page chunks and one fault pass
//!   is counted, then the copy goes on. The buffer is written only when a read succeeds.
//! - [`snapshot`](Dmirror::snapshot): one `HMM_DMIRROR_PROT_*` byte per page ([`prot`]),
//!   without faulting.
//! - [`exclusive`](Dmirror::exclusive) / [`check_exclusive`](Dmirror::check_exclusive): the
//!   kernel's `make_device_exclusive` in userspace (see [`Dmirror::exclusive`]); CHECK is EPERM
//!   while a page of the range is still exclusive.
//! - [`flags`](Dmirror::flags) with [`FLAG_FAIL_ALLOC`]: the next device-memory allocation
//!   fails once (ENOMEM for a 4 KiB page; a huge page falls back to 4 KiB pages).
//! - [`migrate_to_dev`](Dmirror::migrate_to_dev) / [`migrate_to_sys`](Dmirror::migrate_to_sys);
//!   [`release`](Dmirror::release) evicts all device memory. As in the kernel, migrating a
//!   range that is not all readable memory is EINVAL, and shared memory or a page in another
//!   device's memory is ENOENT. The range migrates one mapping at a time; pages already in this
//!   device's memory are brought back first and migrate again (they count in `cpages`).
//!
//! # Limits of this backend
//!
//! - Pins are taken for writing, so a READ of a read-only mapping fails with EOPNOTSUPP
//!   ([`IommuError::ReadOnlyMemory`]) where the kernel device succeeds, and file mappings whose
//!   filesystem tracks dirty pages cannot be read or written.
//! - A fault of a page in RAM brings back to RAM the device pages inside the CPU huge page
//!   around it, if any (the IOMMU pins every page it maps, and maps a CPU huge page whole).
//!   The fault passes skip this device's pages, so otherwise they stay where they are.
//! - As with [`ProcessMm`], the caller must not write a range while it migrates.
//! - Device memory holds 4 KiB pages: a THP migrates as 512 of them, and a snapshot of it shows
//!   no PMD bit.
//! - [`release`](Dmirror::release) finds pages by the address they left from: a page that a
//!   mremap moved stays on the device until the CPU touches it.
//!
//! Dropping the device brings its pages back to RAM, then tears the mirror down (every pin
//! released).
//!
//! # What is the caller's job
//!
//! - Touch memory the device may write through raw pointers only ([`Dmirror::open`] is
//!   `unsafe` for this), and do not write a range while it migrates.
//! - Run as root, or with what [`ProcessMm::new`] needs (userfaultfd) and what the simulated
//!   IOMMU needs (io_uring, locked memory for the pins).
#![cfg(target_os = "linux")]

mod error;
mod memory;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use svmirror_core::DevicePages;
use svmirror_core::{
    AreaKind, CpuPte, DEFAULT_FAULT_TIMEOUT, FaultRequest, IntervalNotifierOps, InvalidateCtx,
    NotifierRange, PAGE_SIZE, PageSource, Pass, Range, Subscription, UpdateLock, WouldBlock, entry,
    fault_and_program,
};
use svmirror_mm::{ProcessMm, ProcessPageSource};

use svmirror_iommu::{DmaCommand, IommuError, IommuMirror, MirrorConfig};

pub use self::error::{DmirrorError, ExclusiveRefusal};
use self::memory::{DeviceMemory, Kind};

/// Pages faulted at a time, as the kernel's dmirror does.
pub const FAULT_CHUNK_PAGES: u64 = 32;

/// [`Dmirror::flags`]: make the next device-memory allocation fail (the kernel's
/// `HMM_DMIRROR_FLAG_FAIL_ALLOC`).
pub const FLAG_FAIL_ALLOC: u64 = 1 << 0;

/// Pages in a 2 MiB transparent huge page.
const PMD_PAGES: u64 = 512;

/// The user address space the device mirrors: everything a 4-level page table maps but page 0.
const USER_SPACE: (u64, u64) = (PAGE_SIZE, 1 << 47);

/// What a command did (the kernel's `struct hmm_dmirror_cmd` outputs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmirrorCmd {
    /// Pages copied, migrated or snapshotted.
    pub cpages: u64,
    /// Fault passes the device made.
    pub faults: u64,
}

/// The `HMM_DMIRROR_PROT_*` bytes of [`Dmirror::snapshot`].
pub mod prot {
    /// No device may use the page (hole, PROT_NONE).
    pub const ERROR: u8 = 0xff;
    /// No page.
    pub const NONE: u8 = 0x00;
    /// Readable.
    pub const READ: u8 = 0x01;
    /// Writable.
    pub const WRITE: u8 = 0x02;
    /// Mapped by a 2 MiB page.
    pub const PMD: u8 = 0x04;
    /// Mapped by a 1 GiB page.
    pub const PUD: u8 = 0x08;
    /// The shared zero page.
    pub const ZERO: u8 = 0x10;
    /// In this device's private memory.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
}

/// The byte [`Dmirror::snapshot`] reports for one `range_fault` output entry.
pub fn prot_of(e: u64) -> u8 {
    if e & entry::ERROR != 0 {
        return prot::ERROR;
    }
    if !entry::is_valid(e) {
        return prot::NONE;
    }
    let mut p = if e & entry::DEVICE_PRIVATE != 0 {
        prot::DEV_PRIVATE_LOCAL
    } else if e & entry::ZERO != 0 {
        prot::ZERO
    } else {
        0
    };
    p |= if e & entry::WRITE != 0 {
        prot::WRITE
    } else {
        prot::READ
    };
    match entry::order(e) {
        9 => p | prot::PMD,
        18 => p | prot::PUD,
        _ => p,
    }
}

/// The device subscription's callbacks: the snapshot's sequence moves, and the ATOMIC tags of
/// exclusive pages in the range are dropped (the kernel's dmirror clears its page-table entries
/// on every event but its own migration), so the device faults before it uses them again.
struct DeviceOps {
    lock: UpdateLock<()>,
    exclusive: Arc<DeviceMemory>,
}

impl IntervalNotifierOps for DeviceOps {
    fn invalidate(
        &self,
        ctx: &InvalidateCtx<'_>,
        range: &NotifierRange,
    ) -> Result<Pass, WouldBlock> {
        let g = if ctx.may_block() {
            self.lock.lock()
        } else {
            self.lock.try_lock().ok_or(WouldBlock)?
        };
        if !self.exclusive.untag(range.range, ctx.may_block()) {
            return Err(WouldBlock);
        }
        ctx.set_seq(&g);
        Ok(Pass::Done)
    }
}

/// Read or write, for the copy loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl Dir {
    const fn op(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}

/// The test device. See the [module documentation](self).
pub struct Dmirror {
    mm: Arc<ProcessMm>,
    /// The process's mappings, to migrate one at a time.
    maps: ProcessPageSource,
    mirror: IommuMirror,
    snap: Subscription,
    /// The snapshot subscription's callbacks, and its update lock.
    ops: Arc<DeviceOps>,
    memory: Arc<DeviceMemory>,
    /// Pages the device has exclusive access to (EXCLUSIVE).
    exclusive: Arc<DeviceMemory>,
    /// FLAGS asked for the next allocation to fail.
    fail_alloc: AtomicBool,
}

impl std::fmt::Debug for Dmirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dmirror")
            .field("mirror", &self.mirror)
            .field("device_pages", &self.memory.len())
            .field("exclusive_pages", &self.exclusive.len())
            .finish()
    }
}

impl Dmirror {
    /// Opens the device on `mm`'s address space (the kernel's `open("/dev/hmm_dmirror0")`).
    ///
    /// # Safety
    ///
    /// As [`IommuMirror::new`]: commands make the device write process memory behind Rust's
    /// back, so memory a WRITE targets must not be accessed through Rust references while the
    /// command runs (touch it through raw pointers only).
    pub unsafe fn open(mm: Arc<ProcessMm>) -> Result<Self, DmirrorError> {
        let range = Range::new(USER_SPACE.0, USER_SPACE.1).expect("user space is a valid range");
        let config = MirrorConfig {
            fault_window: FAULT_CHUNK_PAGES * PAGE_SIZE,
            ..MirrorConfig::checked()
        };
        // SAFETY: this function's contract is the same as `IommuMirror::new`'s.
        let mirror = unsafe { IommuMirror::new(mm.clone(), range, config) }.map_err(|source| {
            DmirrorError::Iommu {
                op: "open",
                range,
                source,
            }
        })?;
        let exclusive = DeviceMemory::new(Kind::Exclusive);
        let ops = Arc::new(DeviceOps {
            lock: UpdateLock::new(()),
            exclusive: exclusive.clone(),
        });
        let snap =
            mm.notifier()
                .insert(range, ops.clone())
                .map_err(|source| DmirrorError::Core {
                    op: "open",
                    range,
                    source,
                })?;
        let maps = ProcessPageSource::new().map_err(|source| DmirrorError::Mm {
            op: "open",
            range,
            source,
        })?;
        Ok(Dmirror {
            mm,
            maps,
            mirror,
            snap,
            ops,
            memory: DeviceMemory::new(Kind::Private),
            exclusive,
            fail_alloc: AtomicBool::new(false),
        })
    }

    /// The IOMMU mirror underneath (for its counters and pins).
    pub fn mirror(&self) -> &IommuMirror {
        &self.mirror
    }

    /// How many pages live in the device's memory.
    pub fn device_pages(&self) -> usize {
        self.memory.len()
    }

    /// How many pages the device holds for exclusive access (tagged or not).
    pub fn exclusive_pages(&self) -> usize {
        self.exclusive.len()
    }

    /// The device reads `npages` at `addr` into `buf` (at least `npages` pages long).
    /// `buf` is left untouched on error.
    pub fn read(&self, addr: u64, npages: u64, buf: &mut [u8]) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.read", addr, npages).entered();
        let range = check(addr, npages, buf.len() as u64, PAGE_SIZE)?;
        let mut bounce = vec![0u8; range.len() as usize];
        let faults = self.copy(range, Dir::Read, &mut bounce)?;
        buf[..bounce.len()].copy_from_slice(&bounce);
        Ok(DmirrorCmd {
            cpages: npages,
            faults,
        })
    }

    /// The device writes the first `npages` pages of `buf` to `npages` at `addr`. Needs write
    /// permission: a read-only mapping is EPERM.
    pub fn write(&self, addr: u64, npages: u64, buf: &[u8]) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.write", addr, npages).entered();
        let range = check(addr, npages, buf.len() as u64, PAGE_SIZE)?;
        let mut data = buf[..range.len() as usize].to_vec();
        let faults = self.copy(range, Dir::Write, &mut data)?;
        Ok(DmirrorCmd {
            cpages: npages,
            faults,
        })
    }

    /// One `HMM_DMIRROR_PROT_*` byte per page of `npages` at `addr` into `out`, faulting
    /// nothing.
    pub fn snapshot(
        &self,
        addr: u64,
        npages: u64,
        out: &mut [u8],
    ) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.snapshot", addr, npages).entered();
        let range = check(addr, npages, out.len() as u64, 1)?;
        let core = |source| DmirrorError::Core {
            op: "snapshot",
            range,
            source,
        };
        let mut entries = vec![0u64; npages as usize];
        let mut req = FaultRequest::snapshot(range, &mut entries).with_owner(self.owner());
        // The core's loop, with nothing to program: the snapshot is taken again until no
        // invalidation raced it (the kernel's dmirror checks `mmu_interval_read_retry` under
        // its mutex the same way).
        fault_and_program(
            &self.snap,
            &self.ops.lock,
            &*self.mm,
            &mut req,
            DEFAULT_FAULT_TIMEOUT,
            |_, _| (),
        )
        .map_err(core)?;
        for (o, &e) in out.iter_mut().zip(&entries) {
            *o = prot_of(e);
        }
        Ok(DmirrorCmd {
            cpages: npages,
            faults: 0,
        })
    }

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
        let core = |source| DmirrorError::Core {
            op: "migrate to device",
            range,
            source,
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

    /// Gives the device exclusive (atomic) access to `npages` at `addr` (the kernel's
    /// EXCLUSIVE, `make_device_exclusive`), then reads them into `buf` (at least `npages` pages
    /// long) as the kernel's does; `cpages` is the pages read.
    ///
    /// Userspace cannot turn a CPU page-table entry into a device-exclusive one, so the pages
    /// move into the device's exclusive memory through the migration hooks: every other
    /// subscriber (this device's IOMMU mirror included) gets an `Exclusive` invalidation, the
    /// CPU pages are dropped, and the next CPU access, read or write, raises a missing fault
    /// that revokes the access: another `Exclusive` invalidation, then the contents come back
    /// into a CPU page. Any other invalidation of the range (a munmap, an mprotect through the
    /// SVM API) drops the device's ATOMIC tags, as the kernel's dmirror drops its entries: the
    /// device then faults the pages back before it uses them. Only private anonymous writable
    /// memory can be made exclusive (EOPNOTSUPP for shared memory, EFAULT for a read-only or
    /// missing mapping).
    pub fn exclusive(
        &self,
        addr: u64,
        npages: u64,
        buf: &mut [u8],
    ) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.exclusive", addr, npages).entered();
        let range = check(addr, npages, buf.len() as u64, PAGE_SIZE)?;
        let pieces = self.check_exclusive_able(range)?;
        let mm_err = |range, source| DmirrorError::Mm {
            op: "exclusive",
            range,
            source,
        };
        // Pages on a device (this one's included) come back first, from this thread.
        self.mm
            .migrate_to_ram(range)
            .map_err(|e| mm_err(range, e))?;
        for piece in pieces {
            let device: Arc<dyn DevicePages> = self.exclusive.clone();
            self.mm
                .migrate_to_device(piece, device)
                .map_err(|e| mm_err(piece, e))?;
        }
        self.exclusive.tag(range);
        self.read(addr, npages, buf)
    }

    /// Fails with EPERM ([`DmirrorError::StillExclusive`]) if the device still has exclusive
    /// access to a page of `npages` at `addr` (the kernel's CHECK_EXCLUSIVE). The kernel's
    /// selftests pass no pages, which checks nothing; here at least one page is needed.
    pub fn check_exclusive(&self, addr: u64, npages: u64) -> Result<DmirrorCmd, DmirrorError> {
        let range = check(addr, npages, u64::MAX, 1)?;
        match self.exclusive.first_tagged(range) {
            Some(addr) => Err(DmirrorError::StillExclusive { addr }),
            None => Ok(DmirrorCmd::default()),
        }
    }

    /// Checks `range` for EXCLUSIVE: private, writable, readable mappings only. Returns the
    /// pieces of `range` in each mapping.
    fn check_exclusive_able(&self, range: Range) -> Result<Vec<Range>, DmirrorError> {
        let core = |source| DmirrorError::Core {
            op: "exclusive",
            range,
            source,
        };
        let mut pieces = Vec::new();
        let mut at = range.start();
        while at < range.end() {
            let m = match self.maps.mapping(at) {
                Ok(Some(m)) if m.range.start() <= at => m,
                Ok(_) => {
                    return Err(DmirrorError::NotExclusive {
                        addr: at,
                        reason: ExclusiveRefusal::NotMapped,
                    });
                }
                Err(source) => {
                    return Err(DmirrorError::Mm {
                        op: "exclusive",
                        range,
                        source,
                    });
                }
            };
            if m.shared || m.io {
                return Err(DmirrorError::NotExclusive {
                    addr: at,
                    reason: ExclusiveRefusal::Shared,
                });
            }
            if !m.read || !m.write {
                return Err(DmirrorError::NotExclusive {
                    addr: at,
                    reason: ExclusiveRefusal::ReadOnly,
                });
            }
            let end = m.range.end().min(range.end());
            pieces.push(Range::new(at, end).map_err(core)?);
            at = end;
        }
        Ok(pieces)
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
        let core = |source| DmirrorError::Core {
            op: "migrate to device",
            range,
            source,
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

    fn owner(&self) -> svmirror_core::Owner {
        self.memory.owner()
    }

    /// The copy loop of READ and WRITE: copy from the start; where a page is missing, fault the
    /// rest of the range in chunks (one fault pass) and go on from there. Returns the fault
    /// passes, plus any page requests the device raised because an invalidation overtook a pass.
    fn copy(&self, range: Range, dir: Dir, data: &mut [u8]) -> Result<u64, DmirrorError> {
        let mut faults = 0;
        let mut at = range.start();
        let max_passes = 16 + 4 * range.pages().div_ceil(FAULT_CHUNK_PAGES);
        loop {
            let own = self.own_pages(range, dir == Dir::Write)?;
            let (missing, requests) = self.copy_present(range, at, dir, data, &own)?;
            faults += requests;
            let Some(page) = missing else {
                return Ok(faults);
            };
            if faults >= max_passes {
                return Err(DmirrorError::NoProgress {
                    op: dir.op(),
                    addr: page,
                    passes: faults,
                });
            }
            self.fault(range, page, dir == Dir::Write, &own)
                .map_err(|source| DmirrorError::Iommu {
                    op: dir.op(),
                    range,
                    source,
                })?;
            faults += 1;
            at = page;
        }
    }

    /// For each page of `range`, the frame number of this device's copy of it (migrated or
    /// exclusive) where the device may use that copy, as the address space reports it (a page
    /// moved by mremap keeps its copy). Reads no page table when the device holds no page.
    ///
    /// For a `write`, a copy whose device-private entry is read-only (migrated from a read-only
    /// page, or write-protected since) is not usable: the write faults, which a read-only
    /// mapping refuses (EPERM) and a writable one answers by bringing the page home.
    fn own_pages(&self, range: Range, write: bool) -> Result<Vec<Option<u64>>, DmirrorError> {
        let n = range.pages() as usize;
        if self.memory.len() == 0 && self.exclusive.len() == 0 {
            return Ok(vec![None; n]);
        }
        let mut ptes = vec![CpuPte::None; n];
        self.mm
            .snapshot(range.start(), &mut ptes)
            .map_err(|source| DmirrorError::Core {
                op: "device access",
                range,
                source,
            })?;
        let mine = [self.owner(), self.exclusive.owner()];
        Ok(ptes
            .iter()
            .map(|p| match p {
                CpuPte::DevicePrivate {
                    owner,
                    pfn,
                    write: w,
                } if mine.contains(owner)
                    && (*w || !write)
                    && (self.memory.usable(*pfn) || self.exclusive.usable(*pfn)) =>
                {
                    Some(*pfn)
                }
                _ => None,
            })
            .collect())
    }

    /// Copies from `from` up to the first page the device cannot reach without a fault, which
    /// it returns, with the page requests the DMA raised. `own` is [`own_pages`](Self::own_pages).
    fn copy_present(
        &self,
        range: Range,
        from: u64,
        dir: Dir,
        data: &mut [u8],
        own: &[Option<u64>],
    ) -> Result<(Option<u64>, u64), DmirrorError> {
        let mmu = self.mirror.mmu();
        let write = dir == Dir::Write;
        let idx = |p: u64| ((p - range.start()) / PAGE_SIZE) as usize;
        let mapped = |p: u64| {
            own[idx(p)].is_none()
                && mmu
                    .translate(p)
                    .is_some_and(|t| !write || t.perms.writable())
        };
        let off = |p: u64| (p - range.start()) as usize;
        let mut requests = 0;
        let mut p = from;
        while p < range.end() {
            let page = &mut data[off(p)..off(p) + PAGE_SIZE as usize];
            let on_device = own[idx(p)].is_some_and(|pfn| match dir {
                Dir::Read => self.memory.read(pfn, page) || self.exclusive.read(pfn, page),
                Dir::Write => self.memory.write(pfn, page) || self.exclusive.write(pfn, page),
            });
            if on_device {
                p += PAGE_SIZE;
                continue;
            }
            let mut q = p;
            while q < range.end() && mapped(q) {
                q += PAGE_SIZE;
            }
            if q == p {
                return Ok((Some(p), requests));
            }
            let iommu = |source| DmirrorError::Iommu {
                op: dir.op(),
                range,
                source,
            };
            let cmd = match dir {
                Dir::Read => DmaCommand::Read { src: p, len: q - p },
                Dir::Write => DmaCommand::Write {
                    dst: p,
                    data: data[off(p)..off(q)].to_vec(),
                },
            };
            let done = self
                .mirror
                .submit(cmd)
                .and_then(|f| f.wait())
                .map_err(iommu)?;
            if dir == Dir::Read {
                data[off(p)..off(q)].copy_from_slice(&done.data);
            }
            requests += u64::from(done.page_requests);
            p = q;
        }
        Ok((None, requests))
    }

    /// One fault pass over `[from, range.end())`: the pages the device cannot use from its own
    /// memory (`own`, as [`own_pages`](Self::own_pages)), in chunks of [`FAULT_CHUNK_PAGES`].
    fn fault(
        &self,
        range: Range,
        from: u64,
        write: bool,
        own: &[Option<u64>],
    ) -> Result<(), IommuError> {
        let end = range.end();
        let on_device = |p: u64| own[((p - range.start()) / PAGE_SIZE) as usize].is_some();
        let mut chunk = from;
        while chunk < end {
            let chunk_end = (chunk + FAULT_CHUNK_PAGES * PAGE_SIZE).min(end);
            let mut p = chunk;
            while p < chunk_end {
                if on_device(p) {
                    p += PAGE_SIZE;
                    continue;
                }
                let mut q = p + PAGE_SIZE;
                while q < chunk_end && !on_device(q) {
                    q += PAGE_SIZE;
                }
                self.mirror.fault(p, q - p, write)?;
                p = q;
            }
            chunk = chunk_end;
        }
        Ok(())
    }
}

/// The range of a command, checked against the buffer it comes with (`unit` bytes per page).
fn check(addr: u64, npages: u64, buf_len: u64, unit: u64) -> Result<Range, DmirrorError> {
    let bad = |reason| DmirrorError::InvalidCommand {
        addr,
        npages,
        reason,
    };
    if npages == 0 {
        return Err(bad("no pages"));
    }
    if addr % PAGE_SIZE != 0 {
        return Err(bad("address not page aligned"));
    }
    let len = npages
        .checked_mul(PAGE_SIZE)
        .ok_or_else(|| bad("too many pages"))?;
    if npages.checked_mul(unit).is_none_or(|need| buf_len < need) {
        return Err(bad("buffer too small"));
    }
    let range = Range::with_len(addr, len).map_err(|_| bad("range overflows"))?;
    if range.start() < USER_SPACE.0 || range.end() > USER_SPACE.1 {
        return Err(bad("outside the user address space"));
    }
    Ok(range)
}

impl Drop for Dmirror {
    fn drop(&mut self) {
        // Device memory goes with the device: bring its pages home first.
        if let Err(e) = self.release() {
            tracing::warn!(error = %e, "dmirror: could not bring pages back to RAM");
        }
        if let Err(e) = self.snap.remove() {
            tracing::warn!(error = %e, "dmirror: could not remove the snapshot subscription");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prot_bytes_match_the_kernel() {
        assert_eq!(prot_of(entry::ERROR), prot::ERROR);
        assert_eq!(prot_of(0), prot::NONE);
        assert_eq!(prot_of(entry::VALID), prot::READ);
        assert_eq!(prot_of(entry::VALID | entry::WRITE), prot::WRITE);
        assert_eq!(prot_of(entry::VALID | entry::ZERO), prot::ZERO | prot::READ);
        assert_eq!(
            prot_of(entry::VALID | entry::WRITE | (9 << entry::ORDER_SHIFT)),
            prot::WRITE | prot::PMD
        );
        assert_eq!(
            prot_of(entry::VALID | (18 << entry::ORDER_SHIFT)),
            prot::READ | prot::PUD
        );
        assert_eq!(
            prot_of(entry::VALID | entry::WRITE | entry::DEVICE_PRIVATE),
            prot::DEV_PRIVATE_LOCAL | prot::WRITE
        );
    }

    #[test]
    fn commands_check_their_arguments() {
        let einval = |r: Result<Range, DmirrorError>| r.unwrap_err().errno();
        assert_eq!(einval(check(0x10000, 0, 0, PAGE_SIZE)), libc::EINVAL);
        assert_eq!(
            einval(check(0x10001, 1, PAGE_SIZE, PAGE_SIZE)),
            libc::EINVAL
        );
        assert_eq!(
            einval(check(0x10000, 2, PAGE_SIZE, PAGE_SIZE)),
            libc::EINVAL
        );
        assert_eq!(einval(check(0, 1, PAGE_SIZE, PAGE_SIZE)), libc::EINVAL);
        assert_eq!(
            einval(check(1 << 47, 1, PAGE_SIZE, PAGE_SIZE)),
            libc::EINVAL
        );
        assert!(check(0x10000, 2, 2 * PAGE_SIZE, PAGE_SIZE).is_ok());
        assert!(check(0x10000, 2, 2, 1).is_ok());
    }
}
