//! The VFIO backend for the app: QEMU's `edu` PCI device behind a real IOMMU (an emulated
//! Intel VT-d in the guest that `cargo xtask vfio-vm` boots), through `svmirror-vfio` and the
//! edu driver of `svmirror-edu`.
//!
//! # What the device does, and what it does not
//!
//! edu is a **DMA engine, not a compute device**: a 4 KiB buffer and a DMA engine that copies
//! up to 4095 bytes at a time between that buffer and a bus address. So the apps run here as a
//! DMA device with a CPU beside it:
//!
//! - **every byte the apps compute on is fetched by the device**, by DMA at the process's own
//!   virtual addresses (IOVA = virtual address where the IOMMU's IOVA ranges allow it), through
//!   the real IOMMU, after the [`VfioMapper`] faulted the chunk in through the core; the CPU
//!   never reads the apps' data directly;
//! - the device's buffer cannot be read by the CPU (edu exposes only registers), so the device
//!   writes what it fetched into a one-page **staging** area of this process, and the "compute"
//!   part (the BFS step, `a·x + y`, the slot sum) runs on the CPU over that copy;
//! - **every result goes back by device DMA** to its CPU address (staging → the device's
//!   buffer → the destination), never by a CPU store: a stale or wrong translation writes
//!   somewhere else, and the app's CPU check sees the old value.
//!
//! Each edu transfer takes about 100 ms of virtual time in QEMU, so this backend is for
//! showing that the mirror is right, with small sizes (`--nodes 200 --size 4K --slots 2`), not
//! for throughput. The BFS reads through a per-call cache of aligned 2 KiB lines (a line lies
//! in one page, so it is readable whenever the bytes asked for are); stores are batched: one
//! transfer moves up to 4095 bytes of results into the device's buffer, then one transfer per
//! result writes it to its own address (results are never merged into wider writes, which
//! would overwrite bytes the CPU may be changing).
//!
//! # On an NVMe controller
//!
//! When an NVMe controller is bound to vfio-pci (QEMU's `nvme` in the same guest, or a spare
//! drive), [`open`] picks it unless `--vfio-device` names the edu device: [`NvmeBackend`]. A
//! storage device, not a DMA engine: every input the apps compute on makes a round trip
//! through the namespace's first blocks, written by the device from the app's memory at its
//! own address and read back into a fresh `Vec`; results are stored by the CPU under a device
//! write access held through the mirror. Those blocks are overwritten: on anything but QEMU's
//! emulated controller only with `--nvme-allow-write`.
//!
//! # Mirrors
//!
//! One [`VfioMapper`] per usable IOVA range of the IOMMU (intersected with the user address
//! space and cut to 2 MiB), each with IOVA = virtual address, all on the [`ProcessMm`]'s
//! notifier: every SVM API call and every userfaultfd event reaches them. Where no identity
//! mapping is possible, one mapper over the whole user address space with allocated IOVAs.
//!
//! # Layout
//!
//! This file opens the device and the mirrors; `apps` runs the apps on a device that only
//! moves bytes, for edu and NVMe alike; `engine` does edu's device work of one call
//! (transfers, staging, write-back), `nvme` the drive's, and `bench`, `nvme_bench` the
//! micro-benchmarks.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use svmirror_core::MirrorError;
use svmirror_core::{Mirror, PAGE_SIZE, Range};
use svmirror_edu::{EduDevice, EduError};
use svmirror_mm::{ProcessMm, Protection};
use svmirror_nvme::NvmeDevice;
use svmirror_vfio::{IovaMode, MapperConfig, VfioContainer, VfioError, VfioMapper};

use super::report::Figure;
use super::{
    AppError, Backend, BackendKind, DeviceWork, Node, Progress, Result, SlotRef, SlotResult,
    error_chain,
};

mod apps;
mod bench;
mod engine;
mod nvme;
mod nvme_bench;

pub use nvme::NvmeBackend;

use bench::bench;

/// The lowest address mirrored (page 0 is never mapped).
const USER_START: u64 = PAGE_SIZE;
/// The end of the user address space on x86-64 with 4-level tables.
const USER_END: u64 = 1 << 47;
/// Identity mirrors are cut to this alignment (the largest chunk).
const MIRROR_ALIGN: u64 = 2 << 20;
/// Most bytes one edu transfer moves.
const MAX_TRANSFER: u64 = EduDevice::MAX_TRANSFER;

/// The fix printed when no edu device is usable here.
const FIX: &str = "the VFIO backend drives QEMU's edu DMA device bound to vfio-pci behind an IOMMU: run it in the guest that `cargo xtask vfio-vm` boots (it runs `svmirror run --backend vfio` there; `cargo xtask vfio-vm --also BINARY ARGS` runs another static build), or use --backend sim";

/// The VFIO backend. See the [module documentation](self).
pub struct VfioBackend {
    // Field order is drop order: the mappers unmap while the device's group still holds the
    // container's IOMMU; the staging page goes in `Drop` before any of them.
    mappers: Vec<VfioMapper>,
    device: Mutex<Device>,
    path: PathBuf,
    identity: bool,
    _container: Arc<VfioContainer>,
    mm: Arc<ProcessMm>,
}

/// The device and its staging page, used by one call at a time.
struct Device {
    edu: EduDevice,
    /// A region of this process's memory whose first page the device writes what it fetched
    /// into and reads results from ([`staging_region`]). Touched by the CPU through raw
    /// pointers only.
    staging: Range,
}

impl std::fmt::Debug for VfioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioBackend")
            .field("path", &self.path)
            .field("mappers", &self.mappers)
            .finish()
    }
}

fn unavailable(missing: String) -> AppError {
    AppError::BackendUnavailable {
        backend: BackendKind::Vfio,
        missing,
        fix: FIX.into(),
    }
}

/// Whether a device error means the device may not use that memory (nothing mapped there, a
/// write to read-only memory, outside every mirror), rather than a failure of the device.
fn is_refusal(e: &EduError) -> bool {
    match e {
        EduError::Access { source, .. } => is_vfio_refusal(source),
        _ => false,
    }
}

/// [`is_refusal`] for what the mapper reported.
fn is_vfio_refusal(e: &VfioError) -> bool {
    match e {
        VfioError::NotMapped { .. }
        | VfioError::Mirror(MirrorError::OutsideMirror { .. })
        | VfioError::BadAddress { .. } => true,
        VfioError::Mirror(MirrorError::Core { source, .. }) => matches!(
            source,
            svmirror_core::Error::WriteToReadOnly { .. } | svmirror_core::Error::BadAddress { .. }
        ),
        _ => false,
    }
}

/// The identity mirrors for the IOMMU's usable IOVA ranges (inclusive bounds): each range
/// intersected with the user address space and cut to [`MIRROR_ALIGN`].
fn identity_ranges(iova_ranges: &[(u64, u64)]) -> Vec<Range> {
    iova_ranges
        .iter()
        .filter_map(|&(first, last)| {
            let start = first
                .checked_next_multiple_of(MIRROR_ALIGN)?
                .max(USER_START);
            let end = last.saturating_add(1).min(USER_END) & !(MIRROR_ALIGN - 1);
            Range::new(start, end).ok()
        })
        .collect()
}

/// A 2 MiB-aligned region of its own for the staging page (its first page). A fault walks
/// every mapping in the chunk (ProcessMm registers each with the userfaultfd as it goes): a
/// staging page placed among other mappings (thread stacks, the BAR mapping) would drag them
/// in. Alone in its chunk, it takes nothing else along.
fn staging_region(mm: &ProcessMm) -> std::result::Result<Range, svmirror_mm::MmError> {
    let r = mm.mmap_anonymous(2 * MIRROR_ALIGN, Protection::READ_WRITE)?;
    let start = r.start().next_multiple_of(MIRROR_ALIGN);
    let keep = Range::with_len(start, MIRROR_ALIGN).expect("inside the mapping");
    for slack in [
        Range::new(r.start(), start),
        Range::new(keep.end(), r.end()),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: the slack around the aligned region is ours, fresh, and never used.
        unsafe { mm.munmap(slack) }?;
    }
    Ok(keep)
}

/// PCI class code of an NVMe controller (mass storage, non-volatile memory, NVM Express).
const NVME_CLASS: u32 = 0x01_08_02;

/// The sysfs path of `device`: a PCI address (`0000:00:04.0`) or a path.
fn device_path(device: &str) -> PathBuf {
    if device.contains('/') {
        PathBuf::from(device)
    } else {
        PathBuf::from("/sys/bus/pci/devices").join(device)
    }
}

/// The PCI class code (24 bits) of the device at sysfs path `p`.
fn sysfs_class(p: &std::path::Path) -> Option<u32> {
    let s = std::fs::read_to_string(p.join("class")).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// Opens the VFIO backend on `device` (a PCI address or sysfs path; an NVMe controller or an
/// edu device, told by its class code), or when `None` on the first NVMe controller bound to
/// vfio-pci, else the first edu device. `nvme_allow_write` as
/// [`NvmeConfig::allow_write`](svmirror_nvme::NvmeConfig::allow_write).
pub fn open(
    mm: Arc<ProcessMm>,
    device: Option<&str>,
    nvme_allow_write: bool,
) -> Result<Box<dyn Backend>> {
    let Some(device) = device else {
        return Ok(match NvmeDevice::find() {
            Ok(path) => Box::new(NvmeBackend::open(mm, path, nvme_allow_write)?),
            Err(_) => Box::new(VfioBackend::open(mm, None)?),
        });
    };
    let path = device_path(device);
    match sysfs_class(&path) {
        Some(NVME_CLASS) => Ok(Box::new(NvmeBackend::open(mm, path, nvme_allow_write)?)),
        Some(_) => Ok(Box::new(VfioBackend::open(mm, Some(path))?)),
        None => Err(AppError::BadParameter {
            what: format!(
                "--vfio-device {device}: no PCI device at {} (give a PCI address such as 0000:00:04.0 from lspci -D, bound to vfio-pci)",
                path.display()
            ),
        }),
    }
}

/// A new VFIO container, or what is missing.
fn open_container() -> Result<Arc<VfioContainer>> {
    VfioContainer::new(None).map(Arc::new).map_err(|e| {
        unavailable(format!(
            "/dev/vfio/vfio cannot be opened ({}; is vfio-pci loaded?)",
            error_chain(&e)
        ))
    })
}

/// Mirrors all of `mm`'s user address space into `container`'s IOMMU (set by the device
/// opened in it first): one identity mapper per usable IOVA range where the IOMMU allows
/// (IOVA = the process address), else one mapper with allocated IOVAs. Returns the mappers
/// and whether they are identity mappers.
fn mirror_address_space(
    mm: &Arc<ProcessMm>,
    container: &Arc<VfioContainer>,
) -> Result<(Vec<VfioMapper>, bool)> {
    // Type1 charges pinned pages to locked memory: take what the hard limit allows.
    let _ = svmirror_mm::raise_memlock_limit(u64::MAX);
    let mirror_err = |e: VfioError| {
        unavailable(format!(
            "the address space cannot be mirrored into the IOMMU ({})",
            error_chain(&e)
        ))
    };
    let user = Range::new(USER_START, USER_END).expect("user space is a range");
    let new_mapper = |range: Range, iova: IovaMode| {
        let config = MapperConfig {
            iova,
            ..MapperConfig::default()
        };
        // SAFETY: the apps touch memory the device writes through raw pointers only, and only
        // when no backend call on it runs (the `Backend` methods' contracts); the backends'
        // own buffers (edu's staging page, the fresh `Vec`s NVMe reads into) are lent to the
        // device only while no reference to them is used.
        unsafe { VfioMapper::new(mm.notifier(), mm.clone(), container.clone(), range, config) }
    };
    let whole = new_mapper(user, IovaMode::Auto).map_err(mirror_err)?;
    if whole.is_identity() {
        return Ok((vec![whole], true));
    }
    let ranges = identity_ranges(&whole.iommu_info().iova_ranges);
    let mut mappers = Vec::new();
    for r in &ranges {
        match new_mapper(*r, IovaMode::Identity) {
            Ok(m) => mappers.push(m),
            Err(e) => {
                tracing::debug!(%r, error = %e, "no identity mirror; allocated IOVAs");
                return Ok((vec![whole], false));
            }
        }
    }
    if mappers.is_empty() {
        return Ok((vec![whole], false));
    }
    drop(whole);
    Ok((mappers, true))
}

impl VfioBackend {
    /// Opens the edu device at sysfs path `path` (the first one when `None`) bound to
    /// vfio-pci and mirrors all of `mm`'s user address space into its IOMMU; says what is
    /// missing when there is none.
    pub fn open(mm: Arc<ProcessMm>, path: Option<PathBuf>) -> Result<VfioBackend> {
        let path = match path {
            Some(p) => p,
            None => EduDevice::find().map_err(|e| {
                unavailable(match e {
                    EduError::WrongDevice { .. } => {
                        "no QEMU edu device (1234:11e8) in /sys/bus/pci/devices".into()
                    }
                    e => format!("the PCI devices cannot be listed ({})", error_chain(&e)),
                })
            })?,
        };
        let container = open_container()?;
        let edu = EduDevice::open(&path, container.clone()).map_err(|e| {
            unavailable(format!(
                "the edu device {} cannot be opened through VFIO ({}; is it bound to vfio-pci, and is /dev/vfio/N writable?)",
                path.display(),
                error_chain(&e)
            ))
        })?;
        let (mappers, identity) = mirror_address_space(&mm, &container)?;
        let staging = staging_region(&mm)
            .map_err(|e| unavailable(format!("no staging page ({})", error_chain(&e))))?;
        tracing::debug!(path = %path.display(), mirrors = mappers.len(), identity, "vfio backend ready");
        Ok(VfioBackend {
            mappers,
            device: Mutex::new(Device { edu, staging }),
            path,
            identity,
            _container: container,
            mm,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Device> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for VfioBackend {
    fn drop(&mut self) {
        let staging = self.lock().staging;
        // SAFETY: the staging region is the backend's own; no call runs (we hold `&mut self`)
        // and nothing refers into it.
        if let Err(e) = unsafe { self.mm.munmap(staging) } {
            tracing::warn!(error = %e, "unmapping the staging region failed");
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The device's sysfs name (its PCI address), for `Backend::device`.
pub(super) fn device_name(path: &std::path::Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// How the mirrors map memory, for `Backend::device`: how many, their chunk size, the IOVAs.
pub(super) fn mirrors_text(count: usize, granule: u64, identity: bool) -> String {
    let iova = if identity {
        "IOVA = process address"
    } else {
        "allocated IOVAs"
    };
    format!("{count} mirror(s) in {} KiB chunks, {iova}", granule >> 10)
}

impl Backend for VfioBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vfio
    }

    fn device(&self) -> String {
        format!(
            "QEMU edu at {} through VFIO type1 and the IOMMU: a DMA engine with a 4 KiB buffer, not a compute device (the CPU computes on what the device fetched; results go back by device DMA); {}",
            device_name(&self.path),
            mirrors_text(
                self.mappers.len(),
                self.mappers.first().map_or(0, |m| m.granule()),
                self.identity
            ),
        )
    }

    unsafe fn bfs(&self, root: *const Node, progress: Progress<'_>) -> Result<(u64, DeviceWork)> {
        let dev = self.lock();
        let mut e = self.engine(&dev);
        // SAFETY: the caller's contract.
        let reached = unsafe { apps::bfs(&mut e, root, progress) }?;
        Ok((reached, self.finish(e)))
    }

    unsafe fn saxpy(
        &self,
        a: f32,
        x: *const f32,
        y: *mut f32,
        n: usize,
        progress: Progress<'_>,
    ) -> Result<DeviceWork> {
        let dev = self.lock();
        let mut e = self.engine(&dev);
        // SAFETY: the caller's contract.
        unsafe { apps::saxpy(&mut e, a, x, y, n, progress) }?;
        Ok(self.finish(e))
    }

    unsafe fn sum_slots(
        &self,
        table: *const SlotRef,
        n: usize,
    ) -> Result<(Vec<SlotResult>, DeviceWork)> {
        let dev = self.lock();
        let mut e = self.engine(&dev);
        // SAFETY: the caller's contract.
        let results = unsafe { apps::sum_slots(&mut e, table, n) }?;
        Ok((results, self.finish(e)))
    }

    fn mirrors(&self) -> Vec<&dyn Mirror> {
        self.mappers.iter().map(|m| m as &dyn Mirror).collect()
    }

    fn micro_benchmarks(&self, quick: bool) -> Result<Vec<Figure>> {
        let dev = self.lock();
        let len = 2 * MIRROR_ALIGN;
        let buf = self
            .mm
            .mmap_anonymous(len, Protection::READ_WRITE)
            .map_err(|e| AppError::device("bench", BackendKind::Vfio, "mmap", e))?;
        let r = bench(self, &dev, buf, quick);
        // SAFETY: the benchmark's own mapping; no transfer runs and nothing refers into it.
        let u = unsafe { self.mm.munmap(buf) };
        let figs = r?;
        u.map_err(|e| AppError::device("bench", BackendKind::Vfio, "munmap", e))?;
        Ok(figs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_mirrors_skip_the_msi_window_and_stay_in_user_space() {
        let r = identity_ranges(&[(0, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff_ffff)]);
        assert_eq!(
            r,
            vec![
                Range::new(PAGE_SIZE, 0xfee0_0000).unwrap(),
                Range::new(0xff00_0000, USER_END).unwrap(),
            ]
        );
        // A range smaller than one aligned chunk gives no mirror.
        assert!(identity_ranges(&[(0x1000, 0x1f_ffff)]).is_empty());
    }

    #[test]
    fn a_vfio_device_that_is_not_there_is_bad_input_naming_it() {
        assert_eq!(
            device_path("0000:00:04.0"),
            PathBuf::from("/sys/bus/pci/devices/0000:00:04.0")
        );
        assert_eq!(device_path("/sys/x"), PathBuf::from("/sys/x"));
        let mm = match ProcessMm::new() {
            Ok(mm) => Arc::new(mm),
            Err(e) => panic!("userfaultfd is needed for this test: {e}"),
        };
        match open(mm, Some("0000:ff:1f.7"), false) {
            Err(e @ AppError::BadParameter { .. }) => {
                assert!(e.to_string().contains("--vfio-device 0000:ff:1f.7"), "{e}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(b) => panic!("opened {}", b.device()),
        }
    }

    #[test]
    fn refusals_are_told_from_device_failures() {
        assert!(is_refusal(&EduError::Access {
            addr: 0x1000,
            len: 8,
            source: VfioError::NotMapped { addr: 0x1000 },
        }));
        assert!(!is_refusal(&EduError::Access {
            addr: 0x1000,
            len: 8,
            source: VfioError::IovaExhausted { len: 8 },
        }));
        assert!(!is_refusal(&EduError::DmaTimeout {
            iova: 0,
            len: 8,
            millis: 5
        }));
    }

    // The micro-benchmarks run against the real edu device in the guest of `cargo xtask
    // vfio-vm` (`svmirror bench --backend vfio --micro --quick`, which fails the run if they fail).

    #[test]
    fn without_an_edu_device_the_backend_says_how_to_get_one() {
        // Where there is no edu device bound to vfio-pci (this machine), opening fails with
        // what is missing and how to get it; the guest of `cargo xtask vfio-vm` runs it for real.
        let mm = match ProcessMm::new() {
            Ok(mm) => Arc::new(mm),
            Err(e) => panic!("userfaultfd is needed for this test: {e}"),
        };
        match (EduDevice::find(), VfioBackend::open(mm, None)) {
            (_, Err(e)) => {
                assert!(e.is_bad_input(), "{e}");
                let text = e.to_string();
                assert!(text.contains("backend vfio is not available"), "{text}");
                assert!(text.contains("cargo xtask vfio-vm"), "{text}");
            }
            (Ok(_), Ok(b)) => assert_eq!(b.kind(), BackendKind::Vfio),
            (Err(e), Ok(_)) => panic!("opened a VFIO backend without an edu device: {e}"),
        }
    }
}
