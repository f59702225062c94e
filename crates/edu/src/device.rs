//! [`EduDevice`]: a userspace driver for QEMU's `edu` PCI device (1234:11e8) through VFIO, the
//! real DMA device the tests and the example app use. The device, and the quirks the driver
//! works within, are described in the crate documentation.

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

use svmirror_vfio::VfioMapper;

use crate::error::{EduError, Result};

const VENDOR: u16 = 0x1234;
const DEVICE: u16 = 0x11e8;
const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const REG_ID: u64 = 0x00;
const REG_LIVENESS: u64 = 0x04;
const REG_SRC: u64 = 0x80;
const REG_DST: u64 = 0x88;
const REG_COUNT: u64 = 0x90;
const REG_CMD: u64 = 0x98;
const CMD_RUN: u64 = 1;
const CMD_TO_MEMORY: u64 = 2;
/// The buffer's address on the device side.
const BUFFER_BUS: u64 = 0x40000;

/// Which way a transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The device reads memory into its buffer.
    ToDevice,
    /// The device writes its buffer to memory.
    FromDevice,
}

/// The first page of BAR0, mapped into the process: edu's registers.
struct Bar {
    ptr: NonNull<u8>,
}

/// Bytes of BAR0 mapped: every register lies in the first page.
const BAR_MAP_LEN: usize = 4096;

// SAFETY: the pointer is to device registers mapped for the life of `Bar`, accessed only with
// volatile loads and stores of the registers' own width; the device serializes them, and
// `EduDevice` adds no state that these accesses could tear.
unsafe impl Send for Bar {}
// SAFETY: as for `Send`.
unsafe impl Sync for Bar {}

impl Bar {
    fn map(fd: RawFd, offset: u64) -> std::io::Result<Bar> {
        // SAFETY: a new shared mapping of the device's BAR0 at a kernel-chosen address; no
        // existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BAR_MAP_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Bar { ptr })
    }

    fn reg<T>(&self, reg: u64) -> *mut T {
        debug_assert!(reg as usize + std::mem::size_of::<T>() <= BAR_MAP_LEN);
        debug_assert_eq!(reg as usize % std::mem::size_of::<T>(), 0);
        self.ptr.as_ptr().wrapping_add(reg as usize).cast()
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), BAR_MAP_LEN) };
    }
}

/// QEMU's edu device, opened through VFIO. See the [crate documentation](crate).
pub struct EduDevice {
    // Field order is drop order: the BAR mapping goes before the device fd.
    bar: Bar,
    device: VfioDevice,
    fd: RawFd,
    path: PathBuf,
    timeout: Duration,
}

impl std::fmt::Debug for EduDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EduDevice")
            .field("path", &self.path)
            .finish()
    }
}

/// Checks a transfer of `len` bytes at `offset` in the device's buffer: at least one byte, at
/// most [`EduDevice::MAX_TRANSFER`], inside the buffer (an offset near `u64::MAX` included).
fn check_transfer(offset: u64, len: u64) -> Result<()> {
    let inside = offset
        .checked_add(len)
        .is_some_and(|end| end <= EduDevice::BUFFER_LEN);
    if len == 0 || len > EduDevice::MAX_TRANSFER || !inside {
        return Err(EduError::DmaOutOfBounds {
            offset,
            len,
            limit: EduDevice::MAX_TRANSFER,
        });
    }
    Ok(())
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> EduError {
    move |source| EduError::Io { op, source }
}

impl EduDevice {
    /// Size of the device's buffer.
    pub const BUFFER_LEN: u64 = 4096;
    /// Most bytes one transfer moves (QEMU 7.2 aborts on exactly 4096).
    pub const MAX_TRANSFER: u64 = 4095;

    /// The sysfs path of the first edu device bound to vfio-pci.
    pub fn find() -> Result<PathBuf> {
        let dir = Path::new("/sys/bus/pci/devices");
        let entries = fs::read_dir(dir).map_err(io_err("listing /sys/bus/pci/devices"))?;
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        let id = |p: &Path, f: &str| {
            fs::read_to_string(p.join(f))
                .ok()
                .and_then(|s| u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        };
        paths
            .into_iter()
            .find(|p| id(p, "vendor") == Some(VENDOR) && id(p, "device") == Some(DEVICE))
            .ok_or(EduError::WrongDevice {
                path: dir.to_path_buf(),
                expected: "edu (1234:11e8)",
            })
    }

    /// Opens the edu device at sysfs path `path` (bound to vfio-pci) in `container`, attaching
    /// its group (which sets the container's IOMMU), checks its identity, and enables memory
    /// space and bus mastering.
    pub fn open(path: &Path, container: Arc<VfioContainer>) -> Result<Self> {
        let device =
            VfioDevice::new(path, container, false).map_err(|source| EduError::Open { source })?;
        let fd = device.as_raw_fd();
        if device.get_region_flags(BAR0) & VFIO_REGION_INFO_FLAG_MMAP == 0
            || device.get_region_size(BAR0) < BAR_MAP_LEN as u64
        {
            return Err(EduError::WrongDevice {
                path: path.to_path_buf(),
                expected: "edu (BAR0 mappable, at least 4 KiB)",
            });
        }
        let bar = Bar::map(fd, device.get_region_offset(BAR0)).map_err(io_err("mapping BAR0"))?;
        let edu = EduDevice {
            fd,
            bar,
            path: path.to_path_buf(),
            device,
            timeout: Duration::from_secs(5),
        };
        let cfg = edu.device.get_region_offset(CONFIG);
        let mut id = [0u8; 4];
        edu.pread(cfg, &mut id)?;
        let vendor = u16::from_le_bytes([id[0], id[1]]);
        let dev = u16::from_le_bytes([id[2], id[3]]);
        if (vendor, dev) != (VENDOR, DEVICE) {
            return Err(EduError::WrongDevice {
                path: path.to_path_buf(),
                expected: "edu (1234:11e8)",
            });
        }
        let mut cmd = [0u8; 2];
        edu.pread(cfg + PCI_COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        edu.pwrite(cfg + PCI_COMMAND, &cmd.to_le_bytes())?;
        if edu.read32(REG_ID)? & 0xff != 0xed {
            return Err(EduError::WrongDevice {
                path: path.to_path_buf(),
                expected: "edu (ID register 0x..ed)",
            });
        }
        edu.write32(REG_LIVENESS, 0x1234_5678)?;
        if edu.read32(REG_LIVENESS)? != !0x1234_5678 {
            return Err(EduError::WrongDevice {
                path: path.to_path_buf(),
                expected: "edu (liveness register inverts)",
            });
        }
        Ok(edu)
    }

    /// The sysfs path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn pread(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        // SAFETY: `buf` is a writable buffer of `buf.len()` bytes; the fd is the device's.
        let n = unsafe {
            libc::pread(
                self.fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                at as libc::off_t,
            )
        };
        if n != buf.len() as isize {
            return Err(EduError::Io {
                op: "edu register read",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn pwrite(&self, at: u64, buf: &[u8]) -> Result<()> {
        // SAFETY: `buf` is a readable buffer of `buf.len()` bytes; the fd is the device's.
        let n = unsafe { libc::pwrite(self.fd, buf.as_ptr().cast(), buf.len(), at as libc::off_t) };
        if n != buf.len() as isize {
            return Err(EduError::Io {
                op: "edu register write",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn read32(&self, reg: u64) -> Result<u32> {
        // SAFETY: a 4-byte register inside the mapped page, aligned (checked in `reg`).
        Ok(unsafe { self.bar.reg::<u32>(reg).read_volatile() })
    }

    fn write32(&self, reg: u64, v: u32) -> Result<()> {
        // SAFETY: as in `read32`.
        unsafe { self.bar.reg::<u32>(reg).write_volatile(v) };
        Ok(())
    }

    fn read64(&self, reg: u64) -> Result<u64> {
        // SAFETY: an 8-byte register inside the mapped page, aligned.
        Ok(unsafe { self.bar.reg::<u64>(reg).read_volatile() })
    }

    fn write64(&self, reg: u64, v: u64) -> Result<()> {
        // SAFETY: as in `read64`.
        unsafe { self.bar.reg::<u64>(reg).write_volatile(v) };
        Ok(())
    }

    /// Runs one transfer between the device's buffer at `offset` and bus address `iova`, and
    /// waits for it. An IOVA the IOMMU does not map is blocked there: nothing is written, and
    /// the transfer still completes.
    ///
    /// # Safety
    ///
    /// A [`Direction::FromDevice`] transfer writes whatever memory the IOMMU maps at `iova`:
    /// the caller must ensure no Rust reference covers it.
    pub unsafe fn transfer_iova(
        &self,
        dir: Direction,
        iova: u64,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        check_transfer(offset, len)?;
        let _span = tracing::trace_span!("edu.dma", iova, len, ?dir).entered();
        let (src, dst, cmd) = match dir {
            Direction::ToDevice => (iova, BUFFER_BUS + offset, CMD_RUN),
            Direction::FromDevice => (BUFFER_BUS + offset, iova, CMD_RUN | CMD_TO_MEMORY),
        };
        self.wait_idle(iova, len)?;
        self.write64(REG_SRC, src)?;
        self.write64(REG_DST, dst)?;
        self.write64(REG_COUNT, len)?;
        self.write64(REG_CMD, cmd)?;
        self.wait_idle(iova, len)
    }

    fn wait_idle(&self, iova: u64, len: u64) -> Result<()> {
        let started = Instant::now();
        while self.read64(REG_CMD)? & CMD_RUN != 0 {
            if started.elapsed() > self.timeout {
                return Err(EduError::DmaTimeout {
                    iova,
                    len,
                    millis: self.timeout.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// The device reads `len` bytes of this process's memory at `addr` (a CPU virtual address
    /// in `mapper`'s range) into its buffer at `offset`, faulting the memory in and holding it
    /// mapped for the transfer.
    pub fn copy_to_device(
        &self,
        mapper: &VfioMapper,
        addr: u64,
        len: u64,
        offset: u64,
    ) -> Result<()> {
        self.copy(mapper, Direction::ToDevice, addr, len, offset)
    }

    /// The device writes `len` bytes of its buffer at `offset` to this process's memory at
    /// `addr` (a CPU virtual address in `mapper`'s range), faulting it in writable and holding
    /// it mapped for the transfer. The CPU must read the memory through raw pointers.
    pub fn copy_from_device(
        &self,
        mapper: &VfioMapper,
        offset: u64,
        addr: u64,
        len: u64,
    ) -> Result<()> {
        self.copy(mapper, Direction::FromDevice, addr, len, offset)
    }

    fn copy(
        &self,
        mapper: &VfioMapper,
        dir: Direction,
        addr: u64,
        len: u64,
        offset: u64,
    ) -> Result<()> {
        check_transfer(offset, len)?;
        // One transfer per chunk piece: allocated IOVAs are contiguous only within a chunk.
        let g = mapper.granule();
        let mut done = 0;
        while done < len {
            let at = addr + done;
            let n = (len - done).min(g - (at & (g - 1)));
            let access = mapper
                .access(at, n, dir == Direction::FromDevice)
                .map_err(|source| EduError::Access {
                    addr: at,
                    len: n,
                    source,
                })?;
            // SAFETY: the memory lies in the mapper's range, which its creator opened to
            // device writes (`VfioMapper::new`'s contract), and stays mapped while `access`
            // lives.
            unsafe { self.transfer_iova(dir, access.iova(), offset + done, n) }?;
            drop(access);
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_inside_the_buffer_are_accepted() {
        assert!(check_transfer(0, EduDevice::MAX_TRANSFER).is_ok());
        assert!(check_transfer(EduDevice::BUFFER_LEN - 1, 1).is_ok());
    }

    #[test]
    fn empty_oversized_and_outside_transfers_are_typed_errors() {
        for (offset, len) in [
            (0, 0),
            (0, EduDevice::BUFFER_LEN),
            (2, EduDevice::MAX_TRANSFER),
            (EduDevice::BUFFER_LEN, 1),
            (u64::MAX, 1),
            (u64::MAX - 1, u64::MAX),
        ] {
            assert!(
                matches!(
                    check_transfer(offset, len),
                    Err(EduError::DmaOutOfBounds { limit: 4095, .. })
                ),
                "{offset:#x}+{len:#x}"
            );
        }
    }
}
