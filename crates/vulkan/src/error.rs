//! svmirror-vulkan's one error type.

use ash::vk;
use svmirror_core::{MirrorError, Range};

/// Result with the crate's [`VulkanError`].
pub type Result<T, E = VulkanError> = std::result::Result<T, E>;

/// Everything the Vulkan backend can refuse or fail with. Addresses are fields; causes are
/// `#[source]`s and are not repeated in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VulkanError {
    /// The Vulkan loader (libvulkan.so.1) could not be loaded.
    #[error("cannot load the Vulkan loader (install libvulkan1)")]
    Loader {
        /// What the dynamic loader said.
        #[source]
        source: ash::LoadingError,
    },
    /// The validation layer was asked for but is not installed.
    #[error("the Khronos validation layer is not installed (install vulkan-validationlayers)")]
    NoValidationLayer,
    /// No Vulkan device at all.
    #[error("no Vulkan device found (install mesa-vulkan-drivers for lavapipe)")]
    NoDevice,
    /// No device matches the override (`SVMIRROR_VK_DEVICE` or the configuration).
    #[error("no Vulkan device matches {wanted:?}; found: {found:?}")]
    NoMatchingDevice {
        /// The name or index asked for.
        wanted: String,
        /// The devices present.
        found: Vec<String>,
    },
    /// The chosen device lacks what svmirror needs.
    #[error("Vulkan device {device:?} cannot mirror host memory: missing {missing:?}")]
    MissingFeatures {
        /// The device.
        device: String,
        /// What it lacks (extensions, features).
        missing: Vec<&'static str>,
    },
    /// What every backend can say (an invalid range or configuration, an address outside the
    /// mirror, the core refusing): the shared vocabulary, [`MirrorError`].
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// The device faulted on an address no mapping backs, or one it may not access that way.
    #[error("device fault at {addr:#x} (write: {write}) cannot be resolved")]
    Fault {
        /// The faulting page.
        addr: u64,
        /// Whether it was a write.
        write: bool,
        /// What the core said.
        #[source]
        source: svmirror_core::Error,
    },
    /// The driver refused to import host memory.
    #[error("driver refused to import host memory {range}")]
    ImportRefused {
        /// The chunk.
        range: Range,
        /// The driver's answer.
        #[source]
        source: vk::Result,
    },
    /// No chunk size the driver accepts fits the mapping around the address.
    #[error("no importable chunk around {addr:#x} (import alignment {alignment:#x})")]
    NoChunk {
        /// The faulting page.
        addr: u64,
        /// The driver's `minImportedHostPointerAlignment`.
        alignment: u64,
    },
    /// The driver's memory allocation count limit is reached.
    #[error("too many device memory allocations ({count} of at most {limit})")]
    TooManyAllocations {
        /// Allocations live.
        count: u32,
        /// `maxMemoryAllocationCount`.
        limit: u32,
    },
    /// Memory the host reads or writes came without a host mapping (a location the host does
    /// not see).
    #[error("device memory of {bytes:#x} bytes has no host mapping")]
    NoHostMapping {
        /// The buffer's size.
        bytes: u64,
    },
    /// Device memory is exhausted.
    #[error("out of device memory allocating {bytes:#x} bytes")]
    OutOfDeviceMemory {
        /// What was asked for.
        bytes: u64,
    },
    /// Host memory is exhausted (the driver's own allocations).
    #[error("out of host memory")]
    OutOfHostMemory,
    /// The device was lost: every mapping is gone and the mirror refuses further work.
    #[error("the Vulkan device was lost")]
    DeviceLost,
    /// The GPU page table has no free leaf or directory slot.
    #[error("GPU page table is full ({leaves} leaves of 2 MiB)")]
    PageTableFull {
        /// Leaves it holds.
        leaves: u32,
    },
    /// A dispatch's arguments are out of range.
    #[error("invalid dispatch: {reason}")]
    InvalidDispatch {
        /// What is wrong.
        reason: &'static str,
    },
    /// A host access to a [`ScratchBuffer`](crate::ScratchBuffer) is out of bounds or
    /// misaligned.
    #[error(
        "scratch buffer access of {len} bytes at offset {offset:#x} is out of bounds or misaligned (buffer of {size:#x} bytes)"
    )]
    ScratchBounds {
        /// Byte offset asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The buffer's size.
        size: u64,
    },
    /// Fault and replay passes did not converge.
    #[error("dispatch still faulting after {passes} passes")]
    TooManyPasses {
        /// Passes run.
        passes: u32,
    },
    /// Any other Vulkan call failed.
    #[error("{call} failed")]
    Vk {
        /// The Vulkan function.
        call: &'static str,
        /// Its result.
        #[source]
        source: vk::Result,
    },
    /// gpu-allocator failed for a reason other than exhaustion.
    #[error("device memory allocation failed")]
    Allocator {
        /// What gpu-allocator said.
        #[source]
        source: gpu_allocator::AllocationError,
    },
}
