//! The dmirror device's error, with the errno the kernel's `lib/test_hmm.c` would return.

use svmirror_core::MirrorError;
use svmirror_core::Range;
use svmirror_iommu::{FaultReason, IommuError};
use svmirror_mm::MmError;

/// Why a [`Dmirror`](crate::Dmirror) command failed. [`errno`](Self::errno) gives the code the
/// kernel's test device returns for the same condition, so tests can assert as the selftests do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DmirrorError {
    /// The command's arguments are wrong (EINVAL).
    #[error("invalid command at {addr:#x} for {npages} pages: {reason}")]
    InvalidCommand {
        /// The command's address.
        addr: u64,
        /// The command's page count.
        npages: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The simulated IOMMU or its DMA engine failed.
    #[error("device {op} of {range} failed")]
    Iommu {
        /// The command.
        op: &'static str,
        /// The pages it worked on.
        range: Range,
        /// The backend's error.
        #[source]
        source: IommuError,
    },
    /// The process address space (migration, page source) failed.
    #[error("{op} of {range} failed")]
    Mm {
        /// The command.
        op: &'static str,
        /// The pages it worked on.
        range: Range,
        /// The address space's error.
        #[source]
        source: MmError,
    },
    /// The core refused (subscription, `range_fault`), in the vocabulary every backend
    /// shares.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// A page to migrate lives in another device's memory (ENOENT).
    #[error("page {addr:#x} lives in another device's memory")]
    OnOtherDevice {
        /// The page.
        addr: u64,
    },
    /// The device still has exclusive access to a page (CHECK_EXCLUSIVE: EPERM).
    #[error("device still has exclusive access to page {addr:#x}")]
    StillExclusive {
        /// The first such page.
        addr: u64,
    },
    /// A page cannot be made exclusive to the device: EFAULT where it is not mapped or not
    /// writable, EOPNOTSUPP where it is not private anonymous memory.
    #[error("page {addr:#x} cannot be made exclusive: {reason}")]
    NotExclusive {
        /// The page.
        addr: u64,
        /// Why.
        reason: ExclusiveRefusal,
    },
    /// A device-memory allocation failed (injected with FLAGS; ENOMEM).
    #[error("device memory allocation failed at {addr:#x}")]
    OutOfMemory {
        /// The first page of the migration.
        addr: u64,
    },
    /// Fault passes kept racing invalidations (EBUSY).
    #[error("device {op} at {addr:#x} made no progress after {passes} fault passes")]
    NoProgress {
        /// The command.
        op: &'static str,
        /// The page it was stuck at.
        addr: u64,
        /// Fault passes made.
        passes: u64,
    },
}

/// Why a page cannot be made exclusive to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExclusiveRefusal {
    /// No mapping there.
    #[error("not mapped")]
    NotMapped,
    /// The mapping is not readable and writable.
    #[error("not writable")]
    ReadOnly,
    /// Shared or I/O memory: only private anonymous memory can be.
    #[error("not private anonymous memory")]
    Shared,
}

impl DmirrorError {
    /// The errno the kernel's dmirror would return: EPERM for a write to a read-only mapping,
    /// EFAULT for an address with no usable mapping, ENOENT for memory that cannot migrate
    /// (shared, or in another device's memory), EINVAL for bad arguments (a migration of a
    /// range that is not all readable memory included), EBUSY when invalidations kept winning, EIO otherwise.
    /// A read-only mapping, which this backend cannot pin ([`IommuError::ReadOnlyMemory`]),
    /// is EOPNOTSUPP: the kernel device would succeed there.
    pub fn errno(&self) -> i32 {
        match self {
            DmirrorError::InvalidCommand { .. } => libc::EINVAL,
            DmirrorError::Iommu { source, .. } => iommu_errno(source),
            DmirrorError::Mm { source, .. } => mm_errno(source),
            DmirrorError::Mirror(m) => mirror_errno(m),
            DmirrorError::OnOtherDevice { .. } => libc::ENOENT,
            DmirrorError::NoProgress { .. } => libc::EBUSY,
            DmirrorError::StillExclusive { .. } => libc::EPERM,
            DmirrorError::NotExclusive { reason, .. } => match reason {
                ExclusiveRefusal::Shared => libc::EOPNOTSUPP,
                ExclusiveRefusal::NotMapped | ExclusiveRefusal::ReadOnly => libc::EFAULT,
            },
            DmirrorError::OutOfMemory { .. } => libc::ENOMEM,
        }
    }
}

/// The errno of an error every backend shares.
fn mirror_errno(e: &MirrorError) -> i32 {
    match e {
        MirrorError::Core { source, .. } => source.errno(),
        MirrorError::OutsideMirror { .. } => libc::EFAULT,
        _ => libc::EINVAL,
    }
}

/// The errno of a backend error.
pub(crate) fn iommu_errno(e: &IommuError) -> i32 {
    match e {
        IommuError::Mirror(m) => mirror_errno(m),
        IommuError::DeviceFault {
            source: Some(s), ..
        } => iommu_errno(s),
        IommuError::DeviceFault { reason, .. } => match reason {
            FaultReason::ReadOnly => libc::EPERM,
            FaultReason::NotMapped | FaultReason::OutsideIovaSpace => libc::EFAULT,
        },
        IommuError::OutsideIovaSpace { .. } | IommuError::NotMapped { .. } => libc::EFAULT,
        IommuError::ReadOnlyMemory { .. } => libc::EOPNOTSUPP,
        IommuError::InvalidCommand { .. } | IommuError::PinSize { .. } => libc::EINVAL,
        IommuError::MemlockLimit { .. } | IommuError::PinSlotsExhausted { .. } => libc::ENOMEM,
        IommuError::PinFailed { source, .. } => source.raw_os_error().unwrap_or(libc::EFAULT),
        _ => libc::EIO,
    }
}

/// The errno of an address-space error.
pub(crate) fn mm_errno(e: &MmError) -> i32 {
    match e {
        MmError::Core(source) => source.errno(),
        MmError::CannotMigrate { .. } | MmError::NotMigrated { .. } => libc::ENOENT,
        MmError::NotMapped { .. } => libc::EFAULT,
        MmError::Syscall { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    }
}
