//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong driving the edu device.
#[derive(Debug, thiserror::Error)]
pub enum EduError {
    /// Opening the device through VFIO (its group, then the device) failed.
    #[error("cannot open the device through VFIO")]
    Open {
        /// What vfio-ioctls reported.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A system call on the device or sysfs failed.
    #[error("{op} failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No PCI device at this sysfs path, or it is not the device expected.
    #[error("{path} is not a usable {expected} device")]
    WrongDevice {
        /// The sysfs path.
        path: PathBuf,
        /// The device expected.
        expected: &'static str,
    },
    /// A device DMA parameter is out of bounds.
    #[error(
        "device DMA of {len} bytes at buffer offset {offset:#x} is out of bounds ({limit} bytes max)"
    )]
    DmaOutOfBounds {
        /// Offset into the device's buffer.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The most the device allows.
        limit: u64,
    },
    /// The device did not finish a DMA in time.
    #[error("device DMA at IOVA {iova:#x}+{len:#x} did not finish within {millis} ms")]
    DmaTimeout {
        /// IOVA of the transfer.
        iova: u64,
        /// Its length.
        len: u64,
        /// How long it was given.
        millis: u64,
    },
    /// The mapper could not map the memory of a transfer for the device.
    #[error("no device access to {addr:#x}+{len:#x}")]
    Access {
        /// The CPU address of the memory.
        addr: u64,
        /// Its length.
        len: u64,
        /// What the mapper reported.
        #[source]
        source: svmirror_vfio::VfioError,
    },
}

/// The crate's result type.
pub type Result<T, E = EduError> = std::result::Result<T, E>;
