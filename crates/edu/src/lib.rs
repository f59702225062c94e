//! svmirror-edu: a test device for svmirror's VFIO backend. [`EduDevice`] is a userspace
//! driver for QEMU's `edu` PCI device (1234:11e8), a small DMA engine, through VFIO: the real
//! device that `svmirror-vfio`'s [`VfioMapper`](svmirror_vfio::VfioMapper) is tested against,
//! and the device of the app's VFIO backend (`svmirror run --backend vfio`).
//!
//! The crate also holds the `vfio-guest-tests` binary (feature `guest-tests`): the VFIO
//! scenarios and the backend scenario suite of `svmirror_mm::scenarios`, run inside the QEMU
//! guest that `cargo xtask vfio-vm` boots (q35, an emulated Intel IOMMU, edu bound to vfio-pci).
//!
//! # What is the caller's job
//!
//! - **An edu device bound to vfio-pci** behind an IOMMU, with access to its group (in
//!   practice: the guest of `cargo xtask vfio-vm`); [`EduDevice::find`] looks for it.
//! - **Open it in the container the mappers use**: [`EduDevice::open`] attaches its group,
//!   which sets the container's IOMMU, before any [`VfioMapper`](svmirror_vfio::VfioMapper)
//!   is made on it.
//! - **Touch the memory it writes through raw pointers only**: the device writes it behind
//!   Rust's back ([`EduDevice::transfer_iova`] is `unsafe` for this reason).

#![cfg(target_os = "linux")]

mod device;
mod error;

pub use crate::device::{Direction, EduDevice};
pub use crate::error::{EduError, Result};
