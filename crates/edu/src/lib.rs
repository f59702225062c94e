//! svmirror-edu: a test device for svmirror's VFIO backend. [`EduDevice`] is a userspace
//! driver for QEMU's `edu` PCI device (1234:11e8), a small DMA engine, through VFIO: the real
//! device that `svmirror-vfio`'s [`VfioMapper`](svmirror_vfio::VfioMapper) is tested against,
//! and the device of the app's VFIO backend (`svmirror run --backend vfio`).
//!
//! # The device
//!
//! edu has a 4 KiB buffer and a DMA engine that copies between it and a bus address: BAR0
//! registers `0x80` source, `0x88` destination, `0x90` count, `0x98` command (bit 0 run, bit 1
//! direction: 0 = memory to the buffer, 1 = the buffer to memory). The buffer sits at bus
//! address `0x40000` on the device side. The driver sets memory-space and bus-master enable in
//! the PCI command register, programs a transfer and polls the run bit. Its accesses go through
//! the IOMMU: an IOVA that is not mapped is blocked there (a DMAR fault in the kernel log),
//! the device's buffer or memory is left unchanged, and the transfer still "completes".
//!
//! Quirks of the QEMU in Debian 12 (7.2), which the driver works within:
//!
//! - a transfer of exactly 4096 bytes aborts QEMU: transfers are at most
//!   [`EduDevice::MAX_TRANSFER`] (4095) bytes;
//! - edu masks DMA addresses to 28 bits unless its `dma_mask` property is set
//!   (`-device edu,dma_mask=0xffffffffffffffff`): virtual addresses need the full mask;
//! - each transfer completes on a 100 ms timer of virtual time.
//!
//! BAR0 is mapped into the process (`mmap` of the device fd at the region's offset) and its
//! registers are accessed with volatile loads and stores of their own width. Not through
//! vfio-ioctls' `region_read`/`region_write` (pread/pwrite): those log and drop I/O errors, and
//! the Linux 6.1 vfio-pci splits an 8-byte pwrite into two 4-byte writes, which edu takes as a
//! write of the low half only, truncating every DMA address to 32 bits. PCI config space is
//! read and written with pread/pwrite on the config region.
//!
//! # The guest tests
//!
//! The crate also holds the `vfio-guest-tests` binary (feature `guest-tests`): the VFIO
//! scenarios and the backend scenario suite of `svmirror_mm::scenarios`, then the NVMe
//! scenarios of `svmirror-nvme` (QEMU's `nvme` device on a scratch image), run inside the QEMU
//! guest that `cargo xtask vfio-vm` boots (q35, an emulated Intel IOMMU, edu and the NVMe
//! controller bound to vfio-pci).
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
// Library code reports what can fail as an error value (STYLE.md rule 4); an unwrap or expect
// that stays names its invariant in an `#[expect(.., reason = "..")]` on the smallest item.
// Unit tests (cfg(test)) and the integration tests in tests/, crates of their own, may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod device;
mod error;

pub use crate::device::{Direction, EduDevice};
pub use crate::error::{EduError, Result};
