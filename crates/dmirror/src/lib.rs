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
//! One module per command family: `copy` (READ, WRITE), `snapshot`, `migrate` (MIGRATE_TO_DEV,
//! MIGRATE_TO_SYS, RELEASE, FLAGS) and `exclusive` (EXCLUSIVE, CHECK_EXCLUSIVE); this one opens
//! and closes the device.
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
//!
//! [`IommuError::ReadOnlyMemory`]: svmirror_iommu::IommuError::ReadOnlyMemory
#![cfg(target_os = "linux")]
// Library code reports what can fail as an error value (STYLE.md rule 4); an unwrap or expect
// that stays names its invariant in an `#[expect(.., reason = "..")]` on the smallest item.
// Unit tests (cfg(test)) and the integration tests in tests/, crates of their own, may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod copy;
mod error;
mod exclusive;
mod memory;
mod migrate;
mod snapshot;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use svmirror_core::MirrorError;
use svmirror_core::{
    DevicePages, IntervalNotifierOps, InvalidateCtx, NotifierRange, PAGE_SIZE, Pass, Range,
    Subscription, UpdateLock, WouldBlock,
};
use svmirror_iommu::{IommuMirror, MirrorConfig};
use svmirror_mm::{ProcessMm, ProcessPageSource};

pub use self::error::{DmirrorError, ExclusiveRefusal};
use self::memory::{DeviceMemory, Kind};
pub use self::snapshot::{prot, prot_of};

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
        let (start, end) = USER_SPACE;
        let range = MirrorError::range(start, end - start)?;
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
        let snap = mm
            .notifier()
            .insert(range, ops.clone())
            .map_err(MirrorError::refused("open", range))?;
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
    fn owner(&self) -> svmirror_core::Owner {
        self.memory.owner()
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
