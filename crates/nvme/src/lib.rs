//! svmirror-nvme: a small userspace NVMe driver over svmirror's VFIO backend, doing DMA
//! straight into ordinary process memory: a `Vec<u8>`, a slice of a larger heap object, an
//! mmap. No buffer is registered or pinned up front: each command's memory is faulted in and
//! mapped on demand by a [`VfioMapper`](svmirror_vfio::VfioMapper) (IOVA = the process
//! address where the IOMMU allows), held mapped while the command runs, and taken away from
//! the IOMMU when the process unmaps or madvises it.
//!
//! - [`NvmeDevice`]: a controller opened through VFIO (vfio-pci, BAR0 registers and
//!   doorbells mapped), disabled.
//! - [`Nvme`] ([`NvmeDevice::start`]): the running controller: admin queue pair, Identify
//!   Controller and Namespace, one I/O queue pair, [`Nvme::read`] and [`Nvme::write`] with
//!   PRP1/PRP2 and PRP lists, completion polling, a command timeout that resets the
//!   controller and returns a typed error, and a controller reset on drop.
//!
//! Its own queues and PRP list are ordinary heap memory too, mirrored like any other.
//!
//! # What is the caller's job
//!
//! - **An NVMe controller bound to vfio-pci** behind an IOMMU, with access to its group
//!   (in practice: the guest of `cargo xtask vfio-vm`, which adds QEMU's `nvme` device backed
//!   by a scratch image). A drive bound to vfio-pci is gone from the kernel's block layer;
//!   [`Nvme::write`] overwrites its blocks.
//! - **Open it before making the mapper**: [`NvmeDevice::open`] attaches its group, which sets
//!   the container's IOMMU; then make [`VfioMapper`](svmirror_vfio::VfioMapper)s whose ranges
//!   hold the heap and every buffer (the whole user address space, as `svmirror run` does:
//!   one identity mapper per usable IOVA range, so that IOVA = the process address), and
//!   [`NvmeDevice::start`] with them.
//! - **Feed the mapper's notifier every CPU change** (a `svmirror_mm::ProcessMm` does).

#![cfg(target_os = "linux")]
// Library code reports what can fail as an error value (STYLE.md rule 4); an unwrap or expect
// that stays names its invariant in an `#[expect(.., reason = "..")]` on the smallest item.
// Unit tests (cfg(test)) may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod controller;
mod device;
mod dma;
mod error;
mod prp;
mod regs;

pub use crate::controller::{Nvme, NvmeConfig, NvmeStats};
pub use crate::device::NvmeDevice;
pub use crate::error::{NvmeError, Result};
pub use crate::regs::{ControllerInfo, NamespaceInfo};
