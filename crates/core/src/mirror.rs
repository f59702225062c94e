//! The one contract every backend's mirror keeps, object safe, so that an accelerator runtime
//! (and the scenario suite every backend passes) can hold any of them as `dyn Mirror`.
//!
//! A mirror covers one range of the process's address space, subscribed to the process's
//! notifier under its own [`Owner`]; it maps pages for its device through the core's fault loop
//! ([`fault_prepare_and_program`](crate::fault_prepare_and_program)) and tears them down
//! through the core's invalidation skeleton ([`teardown`](crate::teardown)). What is specific
//! to a device (how it runs work, how it reads and writes) stays on the backend's own type.

use crate::counters::CounterSnapshot;
use crate::error::Error;
use crate::range::{Owner, Range};

/// The errors every backend shares: the one vocabulary for what is not specific to a device.
/// Each backend's own error type embeds it (a `Mirror` variant) rather than repeating these
/// cases, and converts into it, so a caller holding a `dyn Mirror` matches the same variants
/// whatever the backend; what is specific to a device arrives as [`Device`](Self::Device).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// The address is outside the mirrored range.
    #[error("{addr:#x} is outside the mirrored range {range}")]
    OutsideMirror {
        /// The address asked for.
        addr: u64,
        /// The mirrored range.
        range: Range,
    },
    /// A range asked for is empty, unaligned or overflows.
    #[error("address range at {addr:#x} with length {len:#x} is invalid")]
    InvalidRange {
        /// Requested start.
        addr: u64,
        /// Requested length.
        len: u64,
        /// What the range check said.
        #[source]
        source: Error,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// The core refused: the page cannot be mapped that way (a hole, a write to a read-only
    /// mapping), the fault kept racing invalidations past its time limit, the address space
    /// is gone.
    #[error("{op} of {range} failed in the core")]
    Core {
        /// What was being done.
        op: &'static str,
        /// The range concerned.
        range: Range,
        /// What the core said.
        #[source]
        source: Error,
    },
    /// The device or its driver failed (its own error inside).
    #[error("the {backend} device failed")]
    Device {
        /// The backend ("iommu", "vulkan", "vfio").
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl MirrorError {
    /// A [`Core`](Self::Core) error maker for `op` on `range`, for `map_err`.
    pub fn refused(op: &'static str, range: Range) -> impl FnOnce(Error) -> MirrorError {
        move |source| MirrorError::Core { op, range, source }
    }

    /// Checks `[addr, addr + len)` as a range: an [`InvalidRange`](Self::InvalidRange) error
    /// if it is empty, unaligned or overflows.
    pub fn range(addr: u64, len: u64) -> Result<Range, MirrorError> {
        Range::with_len(addr, len).map_err(|source| MirrorError::InvalidRange { addr, len, source })
    }

    /// The core's error underneath, if the core refused.
    pub fn core(&self) -> Option<&Error> {
        match self {
            MirrorError::Core { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Device work in flight on a range ([`Mirror::begin_work`]): the device may use the range's
/// translations until this drops. What it holds is the backend's (a claim on the IOMMU, a
/// submitted command buffer, a VFIO access); dropping it ends the work and wakes an
/// invalidation that waits for it.
#[must_use = "the work ends when this drops"]
pub struct InFlight<'a> {
    _token: Box<dyn Send + 'a>,
}

impl<'a> InFlight<'a> {
    /// Wraps the backend's token for work in flight; the work ends when `token` drops.
    pub fn new(token: impl Send + 'a) -> Self {
        InFlight {
            _token: Box::new(token),
        }
    }
}

impl std::fmt::Debug for InFlight<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// The loop of a [`Mirror::begin_work`]: `attempt` faults the range in and starts the device
/// work, returning `None` when an invalidation took part of the range before the work was in
/// flight (it dropped the work); it is tried again until `timeout` has passed, then the
/// result is a [`Timeout`](Error::Timeout) refusal.
pub fn begin_work_retrying<'a>(
    range: Range,
    timeout: std::time::Duration,
    mut attempt: impl FnMut() -> Result<Option<InFlight<'a>>, MirrorError>,
) -> Result<InFlight<'a>, MirrorError> {
    let started = std::time::Instant::now();
    let mut retries = 0;
    loop {
        if let Some(work) = attempt()? {
            return Ok(work);
        }
        retries += 1;
        if started.elapsed() > timeout {
            return Err(MirrorError::Core {
                op: "begin work",
                range,
                source: Error::Timeout {
                    range,
                    retries,
                    elapsed: started.elapsed(),
                },
            });
        }
    }
}

/// A device's mirror of a range of the process's address space: one range, subscribed under
/// one owner, mapped through the core's fault loop and torn down through its invalidation
/// skeleton; device work stays on the backend's own type.
pub trait Mirror: Send + Sync {
    /// The backend's name ("iommu", "vulkan", "vfio").
    fn backend(&self) -> &'static str;

    /// The mirrored range.
    fn range(&self) -> Range;

    /// The owner its invalidations, migrations and exclusive accesses carry.
    fn owner(&self) -> Owner;

    /// Maps `range` for the device (writable if `write`) as the device's own faults would:
    /// faulting the CPU pages in, and refusing what the CPU's mappings refuse.
    fn fault(&self, range: Range, write: bool) -> Result<(), MirrorError>;

    /// Maps `range` as [`fault`](Self::fault) does and starts device work on it that stays in
    /// flight until the returned [`InFlight`] drops: the device's own unit of work (a DMA
    /// access, a submitted command buffer). Until then an invalidation of any part of `range`
    /// that may sleep waits for the work before the CPU's change returns, and one that may not
    /// is refused (the kernel's `mmu_interval_notifier` contract: a driver's `invalidate`
    /// returns only once the device can no longer reach the old pages).
    fn begin_work(&self, range: Range, write: bool) -> Result<InFlight<'_>, MirrorError>;

    /// Drops every device translation (the device faults again on its next access); the
    /// subscription stays.
    fn evict_all(&self);

    /// What the device can reach at `addr` now: `Some(writable)` when it holds a translation,
    /// `None` when it would fault.
    fn translation(&self, addr: u64) -> Option<bool>;

    /// The shared counters: faults by size and latency, retries, invalidations by reason,
    /// bytes mapped and torn down.
    fn counters(&self) -> CounterSnapshot;
}
