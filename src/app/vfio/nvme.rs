//! The VFIO backend on an NVMe controller (QEMU's `nvme` in the guest of `cargo xtask
//! vfio-vm`, or a spare drive bound to vfio-pci): the apps' inputs go through the drive.
//!
//! # What the device does, and what it does not
//!
//! An NVMe controller is a **storage device**: it moves whole logical blocks between its
//! namespace and memory, by DMA at the process's own addresses (IOVA = virtual address where
//! the IOMMU allows), through the real IOMMU, after the [`VfioMapper`] faulted the memory in
//! through the core. Every byte the apps compute on makes the round trip through the drive:
//!
//! - the device **writes the app's memory to the namespace** (a Write command whose data is
//!   the app's graph node, vector or slot, read by the device at its CPU address: the span
//!   rounded out to whole blocks, which never leaves the pages of the bytes asked for), then
//! - **reads it back into a fresh `Vec`** (a Read command: the device writes ordinary heap
//!   memory that was never registered), and the CPU computes on that copy.
//!
//! A stale translation therefore hands the CPU old data, and the app's check against the CPU
//! reference fails. Results are **stored by the CPU**, under a device write access held on the
//! result's address through the mirror (so memory the device may not write, such as a churn
//! slot made read-only through the SVM API, is refused exactly as on the other backends): a
//! block device cannot store one 8-byte result without rewriting the whole block around it.
//!
//! The namespace's first blocks are scratch: **the apps overwrite them**. On anything but
//! QEMU's emulated controller, writes need `--nvme-allow-write`
//! ([`NvmeConfig::allow_write`]), and are refused with a typed error otherwise.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use svmirror_core::{Mirror, PAGE_SIZE};
use svmirror_mm::ProcessMm;
use svmirror_nvme::{Nvme, NvmeConfig, NvmeDevice, NvmeError};
use svmirror_vfio::{VfioContainer, VfioMapper};

use super::apps::{self, Mover, dev_err};
use super::{is_vfio_refusal, mirror_address_space, open_container, unavailable};
use crate::app::report::Figure;
use crate::app::{Backend, BackendKind, DeviceWork, Node, Progress, Result, SlotRef, SlotResult};

/// The most bytes one round trip through the namespace moves.
const MAX_TRIP: u64 = 128 << 10;
/// The first logical block of the scratch area the round trips use.
const SCRATCH_LBA: u64 = 0;

/// The VFIO backend on an NVMe controller: every input the apps compute on makes a round trip
/// through the namespace's first blocks (the device writes it from the app's memory, then
/// reads it back into a fresh `Vec`); the CPU computes, and stores results under a device
/// write access held through the mirror. It overwrites those blocks: on anything but QEMU's
/// emulated controller only with `--nvme-allow-write`.
pub struct NvmeBackend {
    // Field order is drop order: the controller (reset) before the mappers it holds, then the
    // container, then the address space.
    nvme: Mutex<Nvme>,
    mappers: Vec<Arc<VfioMapper>>,
    identity: bool,
    path: PathBuf,
    _container: Arc<VfioContainer>,
    pub(super) mm: Arc<ProcessMm>,
}

impl std::fmt::Debug for NvmeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeBackend")
            .field("path", &self.path)
            .field("mappers", &self.mappers)
            .finish()
    }
}

impl Drop for NvmeBackend {
    fn drop(&mut self) {
        // The controller goes first and takes its device with it, which detaches the group
        // from the container and so removes every IOMMU mapping: the mappers' own unmaps after
        // that would be refused (EINVAL). Unmap now, while the group still holds the IOMMU. No
        // command is outstanding (every call waits for its own), so the controller touches no
        // memory until its shutdown, which is register writes only.
        for m in &self.mappers {
            m.unmap_all();
        }
    }
}

/// Whether an NVMe error means the device may not use that memory (nothing mapped, a write
/// to read-only memory, outside every mirror), rather than a failure of the device.
pub(super) fn is_nvme_refusal(e: &NvmeError) -> bool {
    match e {
        NvmeError::Access { source, .. } => is_vfio_refusal(source),
        NvmeError::NoMapper { .. } => true,
        _ => false,
    }
}

impl NvmeBackend {
    /// Opens the NVMe controller at sysfs path `path` (bound to vfio-pci), mirrors all of
    /// `mm`'s user address space into its IOMMU and starts it on namespace 1; `allow_write`
    /// as [`NvmeConfig::allow_write`].
    pub fn open(mm: Arc<ProcessMm>, path: PathBuf, allow_write: bool) -> Result<NvmeBackend> {
        let container = open_container()?;
        let dev = NvmeDevice::open(&path, container.clone()).map_err(|e| {
            unavailable(format!(
                "the NVMe controller {} cannot be opened through VFIO ({}; is it bound to vfio-pci, and is /dev/vfio/N writable?)",
                path.display(),
                crate::app::error_chain(&e)
            ))
        })?;
        let (mappers, identity) = mirror_address_space(&mm, &container)?;
        let mappers: Vec<Arc<VfioMapper>> = mappers.into_iter().map(Arc::new).collect();
        let config = NvmeConfig {
            allow_write,
            ..NvmeConfig::default()
        };
        let nvme = dev.start(mappers.clone(), config).map_err(|e| {
            unavailable(format!(
                "the NVMe controller {} did not start ({})",
                path.display(),
                crate::app::error_chain(&e)
            ))
        })?;
        tracing::debug!(path = %path.display(), mirrors = mappers.len(), identity, "vfio nvme backend ready");
        Ok(NvmeBackend {
            nvme: Mutex::new(nvme),
            mappers,
            identity,
            path,
            _container: container,
            mm,
        })
    }

    pub(super) fn lock_nvme(&self) -> MutexGuard<'_, Nvme> {
        self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, Nvme> {
        self.nvme.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn trip<'a>(&'a self, nvme: &'a mut Nvme) -> std::result::Result<Trip<'a>, NvmeError> {
        let lba_size = nvme.namespace()?.lba_size;
        if lba_size > PAGE_SIZE || !lba_size.is_power_of_two() {
            return Err(NvmeError::Unsupported {
                what: "logical blocks of at most 4 KiB",
            });
        }
        let stats = nvme.stats();
        Ok(Trip {
            mappers: &self.mappers,
            nvme,
            lba_size,
            started: Instant::now(),
            stats,
            faults_before: self.counters().total_faults(),
        })
    }

    fn finish(&self, t: Trip<'_>) -> DeviceWork {
        let now = t.nvme.stats();
        DeviceWork {
            elapsed: t.started.elapsed(),
            commands: now.commands - t.stats.commands,
            bytes_read: now.bytes_written - t.stats.bytes_written,
            bytes_written: now.bytes_read - t.stats.bytes_read,
            page_requests: self
                .counters()
                .total_faults()
                .saturating_sub(t.faults_before),
        }
    }
}

/// One backend call's use of the drive: round trips through the scratch blocks, and the
/// counts at the start.
struct Trip<'a> {
    mappers: &'a [Arc<VfioMapper>],
    nvme: &'a mut Nvme,
    lba_size: u64,
    started: Instant,
    stats: svmirror_nvme::NvmeStats,
    faults_before: u64,
}

/// The apps through the drive: a fetch is a round trip through the scratch blocks; a store is
/// a CPU store under a device write access held through the mirror (a block device cannot
/// store 8 bytes without rewriting the block around them).
impl Mover for Trip<'_> {
    type Error = NvmeError;
    const BLOCK: u64 = PAGE_SIZE;
    const SAXPY_BYTES: u64 = MAX_TRIP;

    /// Fetches `out.len()` bytes at `addr` through the drive: the device writes the span,
    /// rounded out to whole blocks, from the process's memory to the scratch blocks, then
    /// reads them back into a fresh `Vec`, which `out` is filled from.
    fn fetch(&mut self, addr: u64, out: &mut [u8]) -> std::result::Result<(), NvmeError> {
        let end = addr
            .checked_add(out.len() as u64)
            .ok_or(NvmeError::BufferWraps {
                addr,
                len: out.len() as u64,
            })?;
        let mut at = addr;
        while at < end {
            let start = at & !(self.lba_size - 1);
            let stop = (start + MAX_TRIP).min(end.next_multiple_of(self.lba_size));
            let n = (stop - start) as usize;
            // The device reads the app's memory at its own address: no reference is made.
            self.nvme.write_raw(SCRATCH_LBA, start as *const u8, n)?;
            let mut fresh = vec![0u8; n];
            self.nvme.read(SCRATCH_LBA, &mut fresh)?;
            let to = stop.min(end);
            let o = (at - addr) as usize;
            out[o..o + (to - at) as usize]
                .copy_from_slice(&fresh[(at - start) as usize..(to - start) as usize]);
            at = to;
        }
        Ok(())
    }

    unsafe fn store(
        &mut self,
        stores: &[(u64, &[u8])],
    ) -> std::result::Result<Vec<std::result::Result<(), NvmeError>>, NvmeError> {
        Ok(stores
            .iter()
            .map(|&(addr, bytes)| {
                let len = bytes.len() as u64;
                let mapper = self
                    .mappers
                    .iter()
                    .find(|m| {
                        let r = m.range();
                        r.start() <= addr && addr.saturating_add(len) <= r.end()
                    })
                    .ok_or(NvmeError::NoMapper { addr, len })?;
                let _held = mapper
                    .access(addr, len, true)
                    .map_err(|source| NvmeError::Access { addr, len, source })?;
                // SAFETY: the mirror just granted write access to the range, so it is mapped
                // and writable; the caller guarantees nothing else accesses it and no
                // reference to it exists; a raw copy, no reference made.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len())
                };
                Ok(())
            })
            .collect())
    }

    fn refused(e: &NvmeError) -> bool {
        is_nvme_refusal(e)
    }
}

impl Backend for NvmeBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vfio
    }

    fn device(&self) -> String {
        let nvme = self.lock();
        let (model, serial) = nvme
            .controller()
            .map(|c| (c.model.clone(), c.serial.clone()))
            .unwrap_or_default();
        format!(
            "NVMe controller {model} (serial {serial}) at {} through VFIO type1 and the IOMMU: a storage device (inputs make a round trip through the namespace into fresh Vecs; the CPU computes and stores results under a held device write access); {}",
            super::device_name(&self.path),
            super::mirrors_text(
                self.mappers.len(),
                self.mappers.first().map_or(0, |m| m.granule()),
                self.identity
            ),
        )
    }

    unsafe fn bfs(&self, root: *const Node, progress: Progress<'_>) -> Result<(u64, DeviceWork)> {
        let mut nvme = self.lock();
        let mut t = self.trip(&mut nvme).map_err(dev_err("bfs", "namespace"))?;
        // SAFETY: the caller's contract.
        let reached = unsafe { apps::bfs(&mut t, root, progress) }?;
        Ok((reached, self.finish(t)))
    }

    unsafe fn saxpy(
        &self,
        a: f32,
        x: *const f32,
        y: *mut f32,
        n: usize,
        progress: Progress<'_>,
    ) -> Result<DeviceWork> {
        let mut nvme = self.lock();
        let mut t = self
            .trip(&mut nvme)
            .map_err(dev_err("saxpy", "namespace"))?;
        // SAFETY: the caller's contract.
        unsafe { apps::saxpy(&mut t, a, x, y, n, progress) }?;
        Ok(self.finish(t))
    }

    unsafe fn sum_slots(
        &self,
        table: *const SlotRef,
        n: usize,
    ) -> Result<(Vec<SlotResult>, DeviceWork)> {
        let mut nvme = self.lock();
        let mut t = self
            .trip(&mut nvme)
            .map_err(dev_err("churn", "namespace"))?;
        // SAFETY: the caller's contract.
        let results = unsafe { apps::sum_slots(&mut t, table, n) }?;
        Ok((results, self.finish(t)))
    }

    fn mirrors(&self) -> Vec<&dyn Mirror> {
        self.mappers.iter().map(|m| &**m as &dyn Mirror).collect()
    }

    fn micro_benchmarks(&self, quick: bool) -> Result<Vec<Figure>> {
        super::nvme_bench::bench(self, quick)
    }
}
