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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use svmirror_core::{Mirror, PAGE_SIZE};
use svmirror_mm::ProcessMm;
use svmirror_nvme::{Nvme, NvmeConfig, NvmeDevice, NvmeError};
use svmirror_vfio::{VfioContainer, VfioMapper};

use super::{is_vfio_refusal, mirror_address_space, open_container, unavailable};
use crate::app::report::Figure;
use crate::app::{
    AppError, Backend, BackendKind, DeviceWork, Node, Progress, Result, SlotRef, SlotResult,
};

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

fn dev_err(app: &'static str, what: &'static str) -> impl FnOnce(NvmeError) -> AppError {
    move |e| AppError::device(app, BackendKind::Vfio, what, e)
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

    /// Stores `bytes` at `addr` by CPU under a device write access held through the mirror:
    /// an address the device may not write is refused (`Ok(false)`).
    ///
    /// # Safety
    ///
    /// `[addr, addr + bytes.len())` is memory nothing else accesses during the call, valid
    /// for any bytes, and no Rust reference to it is alive.
    unsafe fn store(&self, addr: u64, bytes: &[u8]) -> std::result::Result<bool, NvmeError> {
        let len = bytes.len() as u64;
        let Some(mapper) = self.mappers.iter().find(|m| {
            let r = m.range();
            r.start() <= addr && addr.saturating_add(len) <= r.end()
        }) else {
            return Ok(false);
        };
        let _held = match mapper.access(addr, len, true) {
            Ok(a) => a,
            Err(e) if is_vfio_refusal(&e) => return Ok(false),
            Err(source) => return Err(NvmeError::Access { addr, len, source }),
        };
        // SAFETY: the mirror just granted write access to the range, so it is mapped and
        // writable; the caller guarantees nothing else accesses it and no reference to it
        // exists; a raw copy, no reference made.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(true)
    }
}

/// One backend call's use of the drive: round trips through the scratch blocks, and the
/// counts at the start.
struct Trip<'a> {
    nvme: &'a mut Nvme,
    lba_size: u64,
    started: Instant,
    stats: svmirror_nvme::NvmeStats,
    faults_before: u64,
}

impl Trip<'_> {
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
}

/// The BFS's read cache: whole pages fetched through the drive (a page is readable whenever
/// any byte of it is).
#[derive(Default)]
struct Pages(HashMap<u64, Vec<u8>>);

impl Pages {
    fn read(
        &mut self,
        t: &mut Trip<'_>,
        addr: u64,
        out: &mut [u8],
    ) -> std::result::Result<(), NvmeError> {
        let mut done = 0usize;
        while done < out.len() {
            let at = addr + done as u64;
            let page = at & !(PAGE_SIZE - 1);
            let off = (at - page) as usize;
            let n = (PAGE_SIZE as usize - off).min(out.len() - done);
            let cached = match self.0.entry(page) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let mut p = vec![0u8; PAGE_SIZE as usize];
                    t.fetch(page, &mut p)?;
                    v.insert(p)
                }
            };
            out[done..done + n].copy_from_slice(&cached[off..off + n]);
            done += n;
        }
        Ok(())
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    super::u64_at(b, at)
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
        const LEVEL: u64 = std::mem::offset_of!(Node, level) as u64;
        const DEGREE: u64 = std::mem::offset_of!(Node, degree) as u64;
        const EDGES: u64 = std::mem::offset_of!(Node, edges) as u64;
        const _: () = assert!(EDGES == DEGREE + 8, "degree and edges load as one block");
        let mut nvme = self.lock();
        let mut t = self.trip(&mut nvme).map_err(dev_err("bfs", "namespace"))?;
        let root = root as u64;
        let mut pages = Pages::default();
        let mut level: HashMap<u64, u64> = HashMap::new();
        let mut order = Vec::new();
        let mut queue = std::collections::VecDeque::new();
        level.insert(root, 0);
        order.push(root);
        queue.push_back(root);
        let mut done = 0u64;
        let mut header = [0u8; 16];
        let mut adj = Vec::new();
        while let Some(node) = queue.pop_front() {
            let next = level[&node] + 1;
            pages
                .read(&mut t, node + DEGREE, &mut header)
                .map_err(dev_err("bfs", "reading a node"))?;
            let degree = u64_at(&header, 0);
            let edges = u64_at(&header, 8);
            adj.resize(degree as usize * 8, 0);
            pages
                .read(&mut t, edges, &mut adj)
                .map_err(dev_err("bfs", "reading an adjacency list"))?;
            for k in 0..degree as usize {
                let to = u64_at(&adj, k * 8);
                if let std::collections::hash_map::Entry::Vacant(v) = level.entry(to) {
                    v.insert(next);
                    order.push(to);
                    queue.push_back(to);
                }
            }
            done += 1;
            if done % 16 == 0 {
                progress(done, level.len() as u64);
            }
        }
        let work = self.finish(t);
        drop(nvme);
        for node in order {
            // SAFETY: a node reachable from `root`, which nothing else accesses during the
            // call (the caller's contract); its `level` field is a u64.
            let stored = unsafe { self.store(node + LEVEL, &level[&node].to_ne_bytes()) }
                .map_err(dev_err("bfs", "storing a level"))?;
            if !stored {
                return Err(AppError::device(
                    "bfs",
                    BackendKind::Vfio,
                    "storing a level",
                    NvmeError::NoMapper {
                        addr: node + LEVEL,
                        len: 8,
                    },
                ));
            }
        }
        progress(done, level.len() as u64);
        Ok((level.len() as u64, work))
    }

    unsafe fn saxpy(
        &self,
        a: f32,
        x: *const f32,
        y: *mut f32,
        n: usize,
        progress: Progress<'_>,
    ) -> Result<DeviceWork> {
        const BLOCK: usize = (MAX_TRIP / 4) as usize;
        let (x, y) = (x as u64, y as u64);
        let mut xs = Vec::with_capacity(BLOCK * 4);
        let mut ys = Vec::with_capacity(BLOCK * 4);
        let mut work = DeviceWork::default();
        let mut i = 0;
        while i < n {
            let len = BLOCK.min(n - i);
            let off = (i * 4) as u64;
            xs.resize(len * 4, 0);
            ys.resize(len * 4, 0);
            {
                let mut nvme = self.lock();
                let mut t = self
                    .trip(&mut nvme)
                    .map_err(dev_err("saxpy", "namespace"))?;
                t.fetch(x + off, &mut xs)
                    .map_err(dev_err("saxpy", "reading x"))?;
                t.fetch(y + off, &mut ys)
                    .map_err(dev_err("saxpy", "reading y"))?;
                work.add(&self.finish(t));
            }
            crate::app::saxpy::saxpy_bytes(a, &mut ys, &xs);
            // SAFETY: elements `i..i + len` of `y`, which nothing else accesses during the
            // call (the caller's contract).
            let stored =
                unsafe { self.store(y + off, &ys) }.map_err(dev_err("saxpy", "storing y"))?;
            if !stored {
                return Err(AppError::device(
                    "saxpy",
                    BackendKind::Vfio,
                    "storing y",
                    NvmeError::NoMapper {
                        addr: y + off,
                        len: ys.len() as u64,
                    },
                ));
            }
            i += len;
            progress(i as u64, n as u64);
        }
        Ok(work)
    }

    unsafe fn sum_slots(
        &self,
        table: *const SlotRef,
        n: usize,
    ) -> Result<(Vec<SlotResult>, DeviceWork)> {
        let mut entries = vec![0u8; n * std::mem::size_of::<SlotRef>()];
        let mut nvme = self.lock();
        let mut t = self
            .trip(&mut nvme)
            .map_err(dev_err("churn", "namespace"))?;
        if n > 0 {
            t.fetch(table as u64, &mut entries)
                .map_err(dev_err("churn", "reading the slot table"))?;
        }
        // Per slot: the sum and where it goes, or the address the device was refused at.
        let mut sums: Vec<std::result::Result<(u64, u64), u64>> = Vec::with_capacity(n);
        let mut data = Vec::new();
        for i in 0..n {
            let addr = u64_at(&entries, i * 16);
            let words = u64_at(&entries, i * 16 + 8);
            if addr == 0 || words == 0 {
                sums.push(Err(addr));
                continue;
            }
            data.resize((words - 1) as usize * 8, 0);
            if !data.is_empty() {
                match t.fetch(addr, &mut data) {
                    Ok(()) => {}
                    Err(err) if is_nvme_refusal(&err) => {
                        sums.push(Err(addr));
                        continue;
                    }
                    Err(err) => return Err(dev_err("churn", "reading a slot")(err)),
                }
            }
            let sum = data
                .chunks_exact(8)
                .fold(0u64, |s, w| s.wrapping_add(u64_at(w, 0)));
            sums.push(Ok((sum, addr + (words - 1) * 8)));
        }
        let work = self.finish(t);
        drop(nvme);
        let mut results = Vec::with_capacity(n);
        for s in sums {
            results.push(match s {
                Ok((sum, last)) => {
                    // SAFETY: the slot's last word, which nothing writes during the call (the
                    // caller's contract); a u64.
                    match unsafe { self.store(last, &sum.to_ne_bytes()) } {
                        Ok(true) => SlotResult::Stored(sum),
                        Ok(false) => SlotResult::Refused { addr: last },
                        Err(e) => return Err(dev_err("churn", "storing a sum")(e)),
                    }
                }
                Err(addr) => SlotResult::Refused { addr },
            });
        }
        Ok((results, work))
    }

    fn mirrors(&self) -> Vec<&dyn Mirror> {
        self.mappers.iter().map(|m| &**m as &dyn Mirror).collect()
    }

    fn micro_benchmarks(&self, quick: bool) -> Result<Vec<Figure>> {
        super::nvme_bench::bench(self, quick)
    }
}
