//! svmirror-iommu's one error type.

use std::io;
use std::time::Duration;

use svmirror_core::{MirrorError, Range};

use crate::command::{Access, FaultReason};
use crate::pin::PinId;

/// Result with the crate's [`IommuError`].
pub type Result<T, E = IommuError> = std::result::Result<T, E>;

/// Everything the simulated IOMMU, its pins, its DMA engine and its mirror can refuse or fail
/// with. Variants carry the addresses involved as fields; causes are `#[source]`s and are not
/// repeated in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IommuError {
    /// What every backend can say (an invalid range or configuration, an address outside the
    /// mirror, the core refusing): the shared vocabulary, [`MirrorError`].
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// An IOVA range reaches past the 48-bit IOVA space.
    #[error("IOVA range {range} is outside the 48-bit IOVA space")]
    OutsideIovaSpace {
        /// The range.
        range: Range,
    },
    /// `map` over an existing mapping.
    #[error("IOVA {iova:#x} is already mapped")]
    AlreadyMapped {
        /// First mapped page of the requested range.
        iova: u64,
    },
    /// `unmap` or `protect` of something that is not mapped (a double unmap, say).
    #[error("IOVA {iova:#x} is not mapped")]
    NotMapped {
        /// First unmapped page of the requested range.
        iova: u64,
    },
    /// A mapping's target does not lie inside its pin.
    #[error("target {offset:#x}..+{len:#x} is outside pin {pin} of {pin_len:#x} bytes")]
    OutsidePin {
        /// The pin.
        pin: PinId,
        /// Offset into the pin.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Length of the pin.
        pin_len: u64,
    },
    /// The io_uring instance that holds the pins could not be created (io_uring disabled by the
    /// `kernel.io_uring_disabled` sysctl, or a seccomp filter, or an old kernel).
    #[error("cannot set up the io_uring pin table")]
    RingSetup {
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// The staging memfd between pinned pages and device memory could not be created.
    #[error("cannot set up the staging memory")]
    Staging {
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// A pin was asked for a length that is not whole pages between one page and 1 GiB, or an
    /// unaligned address.
    #[error("cannot pin {len:#x} bytes at {addr:#x}: pins are page-aligned, 4 KiB to 1 GiB")]
    PinSize {
        /// Requested address.
        addr: u64,
        /// Requested length.
        len: u64,
    },
    /// Every slot of the registered-buffer table is taken.
    #[error("all {slots} pin slots are in use")]
    PinSlotsExhausted {
        /// Size of the table.
        slots: u32,
    },
    /// The kernel refused to pin the pages: a hole, a read-only or PROT_NONE mapping (pins are
    /// taken for writing), an I/O mapping.
    #[error("cannot pin {addr:#x}..+{len:#x}")]
    PinFailed {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// Pinning would exceed RLIMIT_MEMLOCK (a process without `CAP_IPC_LOCK`).
    #[error("pinning {len:#x} bytes at {addr:#x} exceeds RLIMIT_MEMLOCK of {limit} bytes")]
    MemlockLimit {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The soft limit in bytes when the pin failed.
        limit: u64,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// A pin id whose pin was released (its slot may hold another pin now).
    #[error("pin {pin} is not registered")]
    StalePin {
        /// The stale id.
        pin: PinId,
    },
    /// Releasing a pin failed; the pin stays registered.
    #[error("cannot release pin {pin}")]
    Unpin {
        /// The pin.
        pin: PinId,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// A transfer through a pin failed in the kernel.
    #[error("{op} through pin {pin} failed")]
    Transfer {
        /// The operation (`read`, `write`, `copy`).
        op: &'static str,
        /// The pin.
        pin: PinId,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// A transfer through a pin moved fewer bytes than asked.
    #[error("{op} through pin {pin} moved {done} of {len} bytes")]
    ShortTransfer {
        /// The operation.
        op: &'static str,
        /// The pin.
        pin: PinId,
        /// Bytes moved.
        done: u64,
        /// Bytes asked for.
        len: u64,
    },
    /// A DMA command is malformed (zero length, address overflow, a misaligned atomic).
    #[error("invalid DMA command at {iova:#x}: {reason}")]
    InvalidCommand {
        /// The address concerned.
        iova: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A device access faulted and was not (or could not be) resolved.
    #[error("device {access} at {iova:#x} faulted: {reason}")]
    DeviceFault {
        /// The address accessed.
        iova: u64,
        /// Read or write.
        access: Access,
        /// Why.
        reason: FaultReason,
        /// Why the driver could not resolve the page request, if it tried.
        #[source]
        source: Option<Box<IommuError>>,
    },
    /// The device thread panicked: the engine failed closed.
    #[error("DMA device thread died")]
    DeviceDied,
    /// The device thread made no progress for too long: the engine failed closed.
    #[error("DMA device made no progress for {stalled:?}")]
    DeviceHung {
        /// How long it had been stalled when declared hung.
        stalled: Duration,
    },
    /// The DMA engine was shut down.
    #[error("DMA engine is shut down")]
    EngineStopped,
    /// The device thread could not be started.
    #[error("cannot start the DMA device thread")]
    Spawn {
        /// What the OS answered.
        #[source]
        source: io::Error,
    },
    /// A read of read-only memory: io_uring pins pages for writing, so this backend cannot
    /// mirror a mapping without write permission.
    #[error("cannot pin read-only memory at {iova:#x}")]
    ReadOnlyMemory {
        /// The address.
        iova: u64,
    },
}
