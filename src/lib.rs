//! svmirror: userspace shared virtual memory.
//!
//! A device works directly on a process's ordinary memory, at the process's own virtual
//! addresses, while the process keeps mapping, unmapping, protecting and freeing it; svmirror keeps
//! the device's page table an exact mirror of the CPU's. This facade re-exports the crates that
//! make it up:
//!
//! - [`core`]: the shared invalidation core (interval notifier, seq/retry protocol, `range_fault`).
//! - [`mm`]: the CPU side: so far the real process's page table as a `PageSource`.
//!
//! The rest of the CPU side (userfaultfd monitor, SVM API) and the device backends (simulated
//! IOMMU, VFIO, Vulkan) join here as they land.

pub use svmirror_core as core;
pub use svmirror_mm as mm;
