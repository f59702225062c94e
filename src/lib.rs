//! svmirror: userspace shared virtual memory.
//!
//! A device works directly on a process's ordinary memory, at the process's own virtual
//! addresses, while the process keeps mapping, unmapping, protecting and freeing it; svmirror keeps
//! the device's page table an exact mirror of the CPU's. This facade re-exports the crates that
//! make it up:
//!
//! - [`core`]: the shared invalidation core (interval notifier, seq/retry protocol, `range_fault`).
//!
//! The CPU side (svmirror-mm) and the device backends (simulated IOMMU, VFIO, Vulkan) join here
//! as they land.

pub use svmirror_core as core;
