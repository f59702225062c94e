//! svmirror-vfio: svmirror's VFIO backend. Mirrored ranges of the process's address space are
//! mapped into a real IOMMU through a VFIO type1 container (rust-vmm `vfio-ioctls`), and kept
//! an exact mirror of the CPU's page table through the core's interval notifier.
//!
//! - [`VfioMapper`]: the backend. Maps in fixed, aligned chunks (2 MiB where the range allows),
//!   each run of one VMA in a chunk one type1 mapping, unmapped whole by an invalidation that
//!   touches it (type1 cannot unmap part of a mapping), once the device is done with it;
//!   IOVA = virtual address where the IOMMU's IOVA ranges allow it, an [`IovaAllocator`]
//!   otherwise; tracks the container's mapping budget (`dma_avail`); turns kernel errors into
//!   typed [`VfioError`]s and rolls back a partial map.
//!
//! The crate knows no device: a device's driver opens it in the container (which attaches its
//! group and sets the IOMMU) and programs it with the IOVAs of [`DeviceAccess`] guards.
//! `svmirror-edu` is one, for QEMU's `edu` DMA device, the real device the tests run against
//! (`cargo xtask vfio-vm` boots a guest with an emulated Intel IOMMU for it).
//!
//! # What is the caller's job
//!
//! - **The host**: an IOMMU enabled (`intel_iommu=on` / `amd_iommu=on`), the device bound to
//!   `vfio-pci`, read-write access to `/dev/vfio/vfio` and the group's `/dev/vfio/N`, and an
//!   RLIMIT_MEMLOCK that covers everything mapped at once (type1 charges pinned pages to locked
//!   memory), or CAP_IPC_LOCK. See the crate's README.
//! - **Feed the notifier every CPU change** (a `svmirror_mm::ProcessMm` does, and is the page
//!   source); change memory through its SVM API to be coherent before the call returns.
//! - **Touch DMA memory through raw pointers only** while it is mapped ([`VfioMapper::new`] is
//!   `unsafe` for this reason).
//! - **Hold a [`DeviceAccess`]** ([`VfioMapper::access`]; svmirror-edu's copies do) for the
//!   duration of a DMA: an invalidation waits for it; without one, a DMA racing an
//!   invalidation is blocked by the IOMMU.
//!
//! # Locks
//!
//! The order is the one in `svmirror_core::context` ("Lock order"): the mapper's update lock,
//! then its in-flight list as an inner lock; `read_begin` is never called under either.
//! VFIO_IOMMU_MAP_DMA pins, and a pin can fault into the userfaultfd monitor, so a fault maps
//! with no such lock held (`svmirror_core::fault_prepare_and_program`: planned under the
//! update lock, mapped outside it, published under it or unmapped if an invalidation raced
//! it), checked with `might_fault`. A mapper's faults are serialized by a lock of their own
//! that no invalidation takes.

#![cfg(target_os = "linux")]
// Library code reports what can fail as an error value (STYLE.md rule 4); an unwrap or expect
// that stays names its invariant in an `#[expect(.., reason = "..")]` on the smallest item.
// Unit tests (cfg(test)) and the integration tests in tests/, crates of their own, may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod chunk;
mod conv;
mod error;
mod mapper;
mod uapi;

pub use crate::chunk::{Budget, IovaAllocator, MAX_GRANULE, chunk_granule, identity_fits};
pub use crate::error::{Result, VfioError};
pub use crate::mapper::{DeviceAccess, IovaMode, MapperConfig, MapperStats, VfioMapper};
pub use crate::uapi::IommuInfo;
pub use vfio_ioctls::VfioContainer;
