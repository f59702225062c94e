//! [`NvmeDevice`]: an NVMe controller opened through VFIO, its BAR0 registers mapped into the
//! process, and the controller's enable and disable sequences (Base spec, "Controller
//! Initialization" and "Controller Shutdown").

use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice};

use crate::error::{NvmeError, Result};
use crate::regs::{Cap, cc, csts, reg};

const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
const PCI_COMMAND: u64 = 0x04;
const PCI_CLASS_REVISION: u64 = 0x08;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// PCI class code of an NVMe controller: mass storage (01h), non-volatile memory (08h),
/// NVM Express programming interface (02h).
pub(crate) const NVME_CLASS: u32 = 0x01_08_02;
/// Queue identifiers the driver uses: the admin queue and one I/O queue pair.
pub(crate) const QUEUES: u64 = 2;

/// The start of BAR0, mapped into the process: the controller registers and the doorbells of
/// the queues the driver uses (not the MSI-X table, which may lie further in the BAR and
/// which VFIO may refuse to map).
///
/// The mapping sits alone in a 2 MiB-aligned window of address space reserved for it
/// (`PROT_NONE` around it): a mapper fault walks every mapping in the chunk it faults, and a
/// device mapping (VM_IO/VM_PFNMAP) cannot be registered with userfaultfd, so a BAR next to
/// a buffer would make every fault in that chunk fail (`EINVAL`).
struct Bar {
    ptr: NonNull<u8>,
    len: usize,
    /// The reserved window, unmapped whole on drop.
    window: (NonNull<u8>, usize),
}

/// The window a BAR mapping is placed alone in: one 2 MiB chunk.
const BAR_WINDOW: usize = 2 << 20;

// SAFETY: the pointer is to device registers mapped for the life of `Bar`, accessed only with
// volatile 4-byte loads and stores; the controller serializes register accesses.
unsafe impl Send for Bar {}
// SAFETY: as for `Send`: no state of `Bar` besides the registers, which the device owns.
unsafe impl Sync for Bar {}

impl Bar {
    fn map(fd: RawFd, offset: u64, len: usize) -> std::io::Result<Bar> {
        if len > BAR_WINDOW {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new private reservation at a kernel-chosen address; no existing memory
        // is affected.
        let r = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * BAR_WINDOW,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = r as usize;
        let aligned = start.next_multiple_of(BAR_WINDOW);
        for (at, n) in [
            (start, aligned - start),
            (
                aligned + BAR_WINDOW,
                start + 2 * BAR_WINDOW - aligned - BAR_WINDOW,
            ),
        ] {
            if n > 0 {
                // SAFETY: slack of the reservation just made, which nothing else uses.
                unsafe { libc::munmap(at as *mut libc::c_void, n) };
            }
        }
        // SAFETY: replaces the start of our own reservation with a shared mapping of the
        // device's BAR0 (MAP_FIXED inside memory this function owns).
        let p = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                offset as libc::off_t,
            )
        };
        let window = (
            NonNull::new(aligned as *mut u8).ok_or_else(std::io::Error::last_os_error)?,
            BAR_WINDOW,
        );
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: the reservation made above, unmapped once.
            unsafe { libc::munmap(aligned as *mut libc::c_void, BAR_WINDOW) };
            return Err(e);
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Bar { ptr, len, window })
    }

    fn reg32(&self, off: u64) -> *mut u32 {
        debug_assert!(off as usize + 4 <= self.len && off % 4 == 0);
        self.ptr.as_ptr().wrapping_add(off as usize).cast()
    }

    fn read32(&self, off: u64) -> u32 {
        // SAFETY: a 4-byte register inside the mapping, aligned (checked in `reg32`).
        unsafe { self.reg32(off).read_volatile() }
    }

    fn write32(&self, off: u64, v: u32) {
        // SAFETY: as in `read32`.
        unsafe { self.reg32(off).write_volatile(v) }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: the window reserved in `map` (the BAR mapping and the reservation around
        // it), unmapped once.
        unsafe { libc::munmap(self.window.0.as_ptr().cast(), self.window.1) };
    }
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> NvmeError {
    move |source| NvmeError::Io { op, source }
}

/// An NVMe controller opened through VFIO and disabled, ready to be started with
/// [`NvmeDevice::start`](crate::NvmeDevice::start).
pub struct NvmeDevice {
    // Field order is drop order: the BAR mapping goes before the device fd.
    bar: Bar,
    device: VfioDevice,
    path: PathBuf,
    pub(crate) cap: Cap,
    version: u32,
}

impl std::fmt::Debug for NvmeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeDevice")
            .field("path", &self.path)
            .field("cap", &self.cap)
            .finish()
    }
}

/// The PCI class code (24 bits) of the device at sysfs path `p`.
fn sysfs_class(p: &Path) -> Option<u32> {
    let s = fs::read_to_string(p.join("class")).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

impl NvmeDevice {
    /// The sysfs paths of the NVMe controllers (class 010802) bound to vfio-pci, sorted.
    pub fn find_all() -> Result<Vec<PathBuf>> {
        let dir = Path::new("/sys/bus/pci/devices");
        let entries = fs::read_dir(dir).map_err(io_err("listing /sys/bus/pci/devices"))?;
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| sysfs_class(p) == Some(NVME_CLASS))
            .filter(|p| {
                fs::read_link(p.join("driver"))
                    .ok()
                    .and_then(|d| d.file_name().map(|n| n == "vfio-pci"))
                    .unwrap_or(false)
            })
            .collect();
        paths.sort();
        Ok(paths)
    }

    /// The sysfs path of the first NVMe controller bound to vfio-pci.
    pub fn find() -> Result<PathBuf> {
        Self::find_all()?
            .into_iter()
            .next()
            .ok_or(NvmeError::WrongDevice {
                path: PathBuf::from("/sys/bus/pci/devices"),
                expected: "NVMe controller (class 010802) bound to vfio-pci",
            })
    }

    /// Opens the NVMe controller at sysfs path `path` (bound to vfio-pci) in `container`,
    /// attaching its group (which sets the container's IOMMU), checks its class code, enables
    /// memory space and bus mastering, maps its registers, and disables the controller (a
    /// controller reset: whatever a previous owner left queued is dropped).
    pub fn open(path: &Path, container: Arc<VfioContainer>) -> Result<Self> {
        let device =
            VfioDevice::new(path, container, false).map_err(|source| NvmeError::Open { source })?;
        let fd = device.as_raw_fd();
        let wrong = |expected| NvmeError::WrongDevice {
            path: path.to_path_buf(),
            expected,
        };
        let cfg = device.get_region_offset(CONFIG);
        let mut class = [0u8; 4];
        pread(fd, cfg + PCI_CLASS_REVISION, &mut class)?;
        if u32::from_le_bytes(class) >> 8 != NVME_CLASS {
            return Err(wrong("NVMe controller (class 010802)"));
        }
        let mut cmd = [0u8; 2];
        pread(fd, cfg + PCI_COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        pwrite(fd, cfg + PCI_COMMAND, &cmd.to_le_bytes())?;
        // Registers first; the doorbell stride is known only from CAP.
        let size = device.get_region_size(BAR0);
        if device.get_region_flags(BAR0) & VFIO_REGION_INFO_FLAG_MMAP == 0 || size < 0x2000 {
            return Err(wrong("NVMe controller (BAR0 mappable, at least 8 KiB)"));
        }
        let off = device.get_region_offset(BAR0);
        let probe = Bar::map(fd, off, 0x1000).map_err(io_err("mapping BAR0"))?;
        let cap = u64::from(probe.read32(reg::CAP)) | u64::from(probe.read32(reg::CAP + 4)) << 32;
        drop(probe);
        let cap = Cap::parse(cap);
        let end = reg::DOORBELLS + 2 * QUEUES * cap.doorbell_stride;
        let len = end.next_multiple_of(0x1000);
        if len > size {
            return Err(wrong("NVMe controller (doorbells inside BAR0)"));
        }
        let bar = Bar::map(fd, off, len as usize).map_err(io_err("mapping BAR0"))?;
        let version = bar.read32(reg::VS);
        let dev = NvmeDevice {
            bar,
            device,
            path: path.to_path_buf(),
            cap,
            version,
        };
        if !cap.nvm {
            return Err(NvmeError::Unsupported {
                what: "the NVM command set (CAP.CSS)",
            });
        }
        if !(cap.page_min..=cap.page_max).contains(&crate::regs::PAGE) {
            return Err(NvmeError::Unsupported {
                what: "4 KiB memory pages (CAP.MPSMIN/MPSMAX)",
            });
        }
        dev.disable()?;
        Ok(dev)
    }

    /// The sysfs path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The controller's NVMe version (VS: major in bits 31:16, minor in 15:8).
    pub fn version(&self) -> (u16, u8) {
        ((self.version >> 16) as u16, (self.version >> 8) as u8)
    }

    /// The VFIO device.
    pub fn vfio(&self) -> &VfioDevice {
        &self.device
    }

    pub(crate) fn read32(&self, off: u64) -> u32 {
        self.bar.read32(off)
    }

    pub(crate) fn write32(&self, off: u64, v: u32) {
        self.bar.write32(off, v)
    }

    /// Writes a 64-bit register as two dwords, low first (the spec allows 32-bit accesses to
    /// every register; some platforms split or refuse 8-byte MMIO).
    pub(crate) fn write64(&self, off: u64, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }

    /// Submission tail doorbell of queue `qid` ("Offset (1000h + ((2y) * (4 << CAP.DSTRD)))").
    pub(crate) fn sq_doorbell(&self, qid: u16, tail: u16) {
        let off = reg::DOORBELLS + 2 * u64::from(qid) * self.cap.doorbell_stride;
        self.write32(off, u32::from(tail));
    }

    /// Completion head doorbell of queue `qid`.
    pub(crate) fn cq_doorbell(&self, qid: u16, head: u16) {
        let off = reg::DOORBELLS + (2 * u64::from(qid) + 1) * self.cap.doorbell_stride;
        self.write32(off, u32::from(head));
    }

    /// Waits until `done(CSTS)`, up to CAP.TO; a fatal status fails at once.
    fn wait_csts(&self, what: &'static str, done: impl Fn(u32) -> bool) -> Result<()> {
        let limit = Duration::from_millis(self.cap.timeout_ms);
        let started = Instant::now();
        loop {
            let s = self.read32(reg::CSTS);
            if done(s) {
                return Ok(());
            }
            // An all-ones read is a device gone from the bus, not a fatal status.
            if s & csts::CFS != 0 && s != u32::MAX && what == "become ready" {
                return Err(NvmeError::ControllerFatal { csts: s });
            }
            if started.elapsed() > limit {
                return Err(NvmeError::ControllerTimeout {
                    what,
                    millis: self.cap.timeout_ms,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Enables the controller with the admin queues at bus addresses `asq`/`acq` of `entries`
    /// entries each ("Controller Initialization": AQA, ASQ, ACQ, then CC with EN set, then wait
    /// for CSTS.RDY). Interrupts are masked: the driver polls.
    pub(crate) fn enable(&self, asq: u64, acq: u64, entries: u32) -> Result<()> {
        let size = entries - 1;
        self.write32(reg::AQA, size | size << 16);
        self.write64(reg::ASQ, asq);
        self.write64(reg::ACQ, acq);
        self.write32(reg::INTMS, u32::MAX);
        self.write32(reg::CC, cc::EN | cc::IOSQES_64 | cc::IOCQES_16);
        self.wait_csts("become ready", |s| s & csts::RDY != 0)
    }

    /// Disables the controller (CC.EN = 0: a controller reset, which deletes every I/O queue
    /// and aborts every command) and waits for CSTS.RDY to clear. Once it returns Ok the
    /// controller touches no host memory.
    pub(crate) fn disable(&self) -> Result<()> {
        let c = self.read32(reg::CC);
        if c & cc::EN != 0 {
            self.write32(reg::CC, c & !cc::EN);
        }
        self.wait_csts("become disabled", |s| s & csts::RDY == 0)
    }

    /// A normal shutdown ("Controller Shutdown": CC.SHN = 01b, wait for CSTS.SHST = 10b),
    /// so a drive with a volatile write cache persists it, then a disable.
    pub(crate) fn shutdown(&self) -> Result<()> {
        let c = self.read32(reg::CC);
        if c & cc::EN != 0 {
            self.write32(reg::CC, c | cc::SHN_NORMAL);
            let r = self.wait_csts("shut down", |s| s & csts::SHST_MASK == csts::SHST_COMPLETE);
            if let Err(e) = r {
                tracing::warn!(path = %self.path.display(), error = %e, "NVMe shutdown");
            }
        }
        self.disable()
    }
}

fn pread(fd: RawFd, at: u64, buf: &mut [u8]) -> Result<()> {
    // SAFETY: `buf` is a writable buffer of `buf.len()` bytes; the fd is the device's.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), at as libc::off_t) };
    if n != buf.len() as isize {
        return Err(NvmeError::Io {
            op: "PCI config read",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn pwrite(fd: RawFd, at: u64, buf: &[u8]) -> Result<()> {
    // SAFETY: `buf` is a readable buffer of `buf.len()` bytes; the fd is the device's.
    let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), at as libc::off_t) };
    if n != buf.len() as isize {
        return Err(NvmeError::Io {
            op: "PCI config write",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
