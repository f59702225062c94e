//! The crate's error type.

use std::io;

use svmirror_core::{MirrorError, Range};

/// Everything that can go wrong in svmirror-vfio.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// What every backend can say (an invalid range or configuration, an address outside the
    /// mirror, the core refusing): the shared vocabulary, [`MirrorError`].
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// A system call on the container failed.
    #[error("{op} failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// VFIO_IOMMU_MAP_DMA: part of the IOVA range is already mapped (EEXIST).
    #[error("IOVA range {iova:#x}+{len:#x} is already mapped")]
    AlreadyMapped {
        /// IOVA of the refused mapping.
        iova: u64,
        /// Its length.
        len: u64,
    },
    /// The kernel refused a mapping for lack of mapping entries (ENOSPC): `dma_avail` is 0.
    #[error("the container has no mapping entry left for IOVA {iova:#x}+{len:#x}")]
    NoMappingEntries {
        /// IOVA of the refused mapping.
        iova: u64,
        /// Its length.
        len: u64,
    },
    /// The mapper refused a mapping before asking the kernel: it would exceed the container's
    /// mapping budget (`dma_avail`).
    #[error("mapping budget exhausted: {needed} more mappings needed, {available} available")]
    BudgetExhausted {
        /// Mappings the chunk needs.
        needed: u32,
        /// Mappings the container has left.
        available: u32,
    },
    /// The kernel rejected the mapping's parameters (EINVAL): misaligned, or outside the
    /// IOMMU's IOVA ranges.
    #[error("invalid mapping of {vaddr:#x} at IOVA {iova:#x}+{len:#x}")]
    InvalidMapping {
        /// IOVA of the refused mapping.
        iova: u64,
        /// Its length.
        len: u64,
        /// The process address it was to map.
        vaddr: u64,
    },
    /// The kernel could not pin the memory (EFAULT): not mapped, or not writable for a
    /// writable mapping.
    #[error("cannot pin {vaddr:#x}+{len:#x} for DMA")]
    BadAddress {
        /// Start of the memory.
        vaddr: u64,
        /// Its length.
        len: u64,
    },
    /// The kernel ran out of memory or of locked-memory allowance (ENOMEM): raise
    /// RLIMIT_MEMLOCK or run with CAP_IPC_LOCK.
    #[error("out of memory or RLIMIT_MEMLOCK pinning {len:#x} bytes at {vaddr:#x}")]
    OutOfMemory {
        /// Start of the memory.
        vaddr: u64,
        /// Its length.
        len: u64,
    },
    /// Another VFIO_IOMMU_MAP_DMA failure.
    #[error("VFIO_IOMMU_MAP_DMA of {vaddr:#x} at IOVA {iova:#x}+{len:#x} failed")]
    Map {
        /// IOVA of the refused mapping.
        iova: u64,
        /// Its length.
        len: u64,
        /// The process address it was to map.
        vaddr: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// VFIO_IOMMU_UNMAP_DMA failed.
    #[error("VFIO_IOMMU_UNMAP_DMA of IOVA {iova:#x}+{len:#x} failed")]
    Unmap {
        /// IOVA of the range.
        iova: u64,
        /// Its length.
        len: u64,
        /// What vfio-ioctls reported.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// No usable IOVA range can hold an identity mapping of the range, and IOVA = virtual
    /// address was required.
    #[error("{range} lies outside the IOMMU's usable IOVA ranges")]
    OutsideIovaRanges {
        /// The range.
        range: Range,
    },
    /// The IOVA allocator has no free window of this size left.
    #[error("no free IOVA window of {len:#x} bytes")]
    IovaExhausted {
        /// The size asked for.
        len: u64,
    },
    /// Part of the range has no page a device may use (a hole, PROT_NONE, an I/O mapping).
    #[error("no memory a device may use at {addr:#x}")]
    NotMapped {
        /// The first page without one.
        addr: u64,
    },
    /// The calling thread asked the mapper for an access or a fault while it holds one of its
    /// accesses: the call could wait on an invalidation that waits for that access. A command
    /// takes everything it needs in one `VfioMapper::access_many`.
    #[error(
        "this thread already holds a device access of this mapper (at {held}): take what one \
         command needs in one access_many, or drop the access first"
    )]
    NestedAccess {
        /// The range of the access it holds.
        held: Range,
    },
}

/// The crate's result type.
pub type Result<T, E = VfioError> = std::result::Result<T, E>;
