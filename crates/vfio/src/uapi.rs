//! The few VFIO type1 ioctls that `vfio-ioctls` does not wrap, issued directly.
//!
//! - `VFIO_IOMMU_GET_INFO` with its capability chain (usable IOVA ranges, `dma_avail`):
//!   `vfio-ioctls` 0.10 has no wrapper for it.
//! - `VFIO_IOMMU_MAP_DMA` without `VFIO_DMA_MAP_FLAG_WRITE`: `VfioContainer::vfio_dma_map`
//!   always asks for read and write, and pinning read-only memory for write fails (EFAULT).
//!
//! Layouts follow `include/uapi/linux/vfio.h`; offsets in the capability chain are from the
//! start of the info structure.

use std::io;
use std::os::fd::RawFd;

/// `_IO(VFIO_TYPE, VFIO_BASE + 12)`.
const VFIO_IOMMU_GET_INFO: libc::c_ulong = 0x3b70;
/// `_IO(VFIO_TYPE, VFIO_BASE + 13)`.
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = 0x3b71;

const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
const CAP_IOVA_RANGE: u16 = 1;
const CAP_DMA_AVAIL: u16 = 3;

const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;

/// `struct vfio_iommu_type1_info`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Type1Info {
    argsz: u32,
    flags: u32,
    iova_pgsizes: u64,
    cap_offset: u32,
    pad: u32,
}

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

/// What `VFIO_IOMMU_GET_INFO` reports for a type1 container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuInfo {
    /// Bitmap of the IOMMU's page sizes (bit n set: 2^n bytes).
    pub page_sizes: u64,
    /// Usable IOVA ranges as `(first, last)` byte addresses, both inclusive, ascending. Empty
    /// when the kernel does not report them (then the whole 64-bit space is assumed).
    pub iova_ranges: Vec<(u64, u64)>,
    /// Mappings the container may still create (`dma_avail`), when the kernel reports it.
    pub dma_avail: Option<u32>,
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// Parses the info structure and its capability chain out of `buf` (what the kernel wrote).
pub(crate) fn parse_info(buf: &[u8]) -> Option<IommuInfo> {
    let flags = read_u32(buf, 4)?;
    let mut info = IommuInfo::default();
    if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        info.page_sizes = read_u64(buf, 8)?;
    }
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Some(info);
    }
    let mut at = read_u32(buf, 16)? as usize;
    let mut hops = 0;
    while at != 0 && hops < 64 {
        hops += 1;
        let id = read_u16(buf, at)?;
        let next = read_u32(buf, at + 4)? as usize;
        match id {
            CAP_IOVA_RANGE => {
                let n = read_u32(buf, at + 8)? as usize;
                for i in 0..n {
                    let base = at + 16 + i * 16;
                    info.iova_ranges
                        .push((read_u64(buf, base)?, read_u64(buf, base + 8)?));
                }
            }
            CAP_DMA_AVAIL => info.dma_avail = Some(read_u32(buf, at + 8)?),
            _ => {}
        }
        at = next;
    }
    info.iova_ranges.sort_unstable();
    Some(info)
}

/// `VFIO_IOMMU_GET_INFO` on a container fd whose IOMMU is set (a group is attached).
pub(crate) fn iommu_info(fd: RawFd) -> io::Result<IommuInfo> {
    let head = std::mem::size_of::<Type1Info>();
    let mut buf = vec![0u8; head];
    for _ in 0..4 {
        let argsz =
            u32::try_from(buf.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        buf[..4].copy_from_slice(&argsz.to_ne_bytes());
        // SAFETY: `buf` is a writable buffer of `argsz` bytes, at least the size of the info
        // structure, and the kernel writes at most `argsz` bytes into it.
        let rc = unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let want = read_u32(&buf, 0).unwrap_or(argsz) as usize;
        if want <= buf.len() {
            return parse_info(&buf).ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO));
        }
        buf.resize(want, 0);
    }
    Err(io::Error::from_raw_os_error(libc::EPROTO))
}

/// `VFIO_IOMMU_MAP_DMA` for device reads only.
///
/// # Safety
///
/// `[vaddr, vaddr + size)` must be memory of this process that stays valid for the kernel to
/// pin; the device may read it until it is unmapped.
pub(crate) unsafe fn map_dma_read_only(
    fd: RawFd,
    iova: u64,
    size: u64,
    vaddr: u64,
) -> io::Result<()> {
    let map = DmaMap {
        argsz: std::mem::size_of::<DmaMap>() as u32,
        flags: VFIO_DMA_MAP_FLAG_READ,
        vaddr,
        iova,
        size,
    };
    // SAFETY: `map` is a valid `vfio_iommu_type1_dma_map`; the caller vouches for the memory.
    let rc = unsafe { libc::ioctl(fd, VFIO_IOMMU_MAP_DMA, &map as *const DmaMap) };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put32(b: &mut Vec<u8>, v: u32) {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    fn put64(b: &mut Vec<u8>, v: u64) {
        b.extend_from_slice(&v.to_ne_bytes());
    }

    #[test]
    fn parses_page_sizes_iova_ranges_and_dma_avail() {
        let mut b = Vec::new();
        put32(&mut b, 0); // argsz
        put32(&mut b, VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS);
        put64(&mut b, 0x4020_1000);
        put32(&mut b, 24); // cap_offset
        put32(&mut b, 0);
        // IOVA range cap at 24, next at 24 + 16 + 2 * 16 = 72.
        b.extend_from_slice(&CAP_IOVA_RANGE.to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes());
        put32(&mut b, 72);
        put32(&mut b, 2);
        put32(&mut b, 0);
        put64(&mut b, 0xfef0_0000);
        put64(&mut b, 0x7f_ffff_ffff);
        put64(&mut b, 0);
        put64(&mut b, 0xfedf_ffff);
        // dma_avail cap at 72, last.
        b.extend_from_slice(&CAP_DMA_AVAIL.to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes());
        put32(&mut b, 0);
        put32(&mut b, 65535);
        let info = parse_info(&b).unwrap();
        assert_eq!(info.page_sizes, 0x4020_1000);
        assert_eq!(
            info.iova_ranges,
            vec![(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]
        );
        assert_eq!(info.dma_avail, Some(65535));
    }

    #[test]
    fn truncated_capability_chain_is_rejected() {
        let mut b = Vec::new();
        put32(&mut b, 0);
        put32(&mut b, VFIO_IOMMU_INFO_CAPS);
        put64(&mut b, 0);
        put32(&mut b, 24);
        put32(&mut b, 0);
        b.extend_from_slice(&CAP_IOVA_RANGE.to_ne_bytes());
        assert_eq!(parse_info(&b), None);
    }
}
