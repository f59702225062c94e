//! The few VFIO type1 ioctls that `vfio-ioctls` does not wrap, issued directly.
//!
//! - `VFIO_IOMMU_GET_INFO` with its capability chain (usable IOVA ranges, `dma_avail`):
//!   `vfio-ioctls` 0.10 has no wrapper for it.
//! - `VFIO_IOMMU_MAP_DMA` without `VFIO_DMA_MAP_FLAG_WRITE`: `VfioContainer::vfio_dma_map`
//!   always asks for read and write, and pinning read-only memory for write fails (EFAULT).
//!
//! The ioctl numbers come from vmm-sys-util's `ioctl_io_nr!` (VFIO's ioctls are all `_IO`: the
//! size travels in `argsz`), the structures and flags from vfio-bindings, both as vfio-ioctls
//! uses them. Offsets in the capability chain are from the start of the info structure.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::RawFd;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, VFIO_TYPE,
    vfio_info_cap_header, vfio_iommu_type1_dma_map, vfio_iommu_type1_info,
    vfio_iommu_type1_info_cap_iova_range, vfio_iommu_type1_info_dma_avail, vfio_iova_range,
};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE.into(), VFIO_BASE + 12);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE.into(), VFIO_BASE + 13);

/// Offsets of the fields read out of the kernel's answer.
const INFO_ARGSZ: usize = offset_of!(vfio_iommu_type1_info, argsz);
const INFO_FLAGS: usize = offset_of!(vfio_iommu_type1_info, flags);
const INFO_PGSIZES: usize = offset_of!(vfio_iommu_type1_info, iova_pgsizes);
const INFO_CAP_OFFSET: usize = offset_of!(vfio_iommu_type1_info, cap_offset);
const CAP_ID: usize = offset_of!(vfio_info_cap_header, id);
const CAP_NEXT: usize = offset_of!(vfio_info_cap_header, next);
const IOVA_NR: usize = offset_of!(vfio_iommu_type1_info_cap_iova_range, nr_iovas);
const IOVA_RANGES: usize = offset_of!(vfio_iommu_type1_info_cap_iova_range, iova_ranges);
const IOVA_RANGE_SIZE: usize = size_of::<vfio_iova_range>();
const RANGE_START: usize = offset_of!(vfio_iova_range, start);
const RANGE_END: usize = offset_of!(vfio_iova_range, end);
const DMA_AVAIL: usize = offset_of!(vfio_iommu_type1_info_dma_avail, avail);

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
    let flags = read_u32(buf, INFO_FLAGS)?;
    let mut info = IommuInfo::default();
    if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        info.page_sizes = read_u64(buf, INFO_PGSIZES)?;
    }
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Some(info);
    }
    let mut at = read_u32(buf, INFO_CAP_OFFSET)? as usize;
    let mut hops = 0;
    while at != 0 && hops < 64 {
        hops += 1;
        let id = u32::from(read_u16(buf, at + CAP_ID)?);
        let next = read_u32(buf, at + CAP_NEXT)? as usize;
        match id {
            VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                let n = read_u32(buf, at + IOVA_NR)? as usize;
                for i in 0..n {
                    let base = at + IOVA_RANGES + i * IOVA_RANGE_SIZE;
                    info.iova_ranges.push((
                        read_u64(buf, base + RANGE_START)?,
                        read_u64(buf, base + RANGE_END)?,
                    ));
                }
            }
            VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                info.dma_avail = Some(read_u32(buf, at + DMA_AVAIL)?)
            }
            _ => {}
        }
        at = next;
    }
    info.iova_ranges.sort_unstable();
    Some(info)
}

/// `VFIO_IOMMU_GET_INFO` on a container fd whose IOMMU is set (a group is attached).
pub(crate) fn iommu_info(fd: RawFd) -> io::Result<IommuInfo> {
    let head = size_of::<vfio_iommu_type1_info>();
    let mut buf = vec![0u8; head];
    for _ in 0..4 {
        let argsz =
            u32::try_from(buf.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        buf[INFO_ARGSZ..INFO_ARGSZ + 4].copy_from_slice(&argsz.to_ne_bytes());
        // SAFETY: `buf` is a writable buffer of `argsz` bytes, at least the size of the info
        // structure, and the kernel writes at most `argsz` bytes into it.
        let rc = unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let want = read_u32(&buf, INFO_ARGSZ).unwrap_or(argsz) as usize;
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
    let map = vfio_iommu_type1_dma_map {
        argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags: VFIO_DMA_MAP_FLAG_READ,
        vaddr,
        iova,
        size,
    };
    // SAFETY: `map` is a valid `vfio_iommu_type1_dma_map`; the caller vouches for the memory.
    let rc = unsafe {
        libc::ioctl(
            fd,
            VFIO_IOMMU_MAP_DMA(),
            &map as *const vfio_iommu_type1_dma_map,
        )
    };
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
    fn ioctl_numbers_are_the_kernels() {
        // `_IO(VFIO_TYPE, VFIO_BASE + 12)` and `+ 13` in include/uapi/linux/vfio.h.
        assert_eq!(VFIO_IOMMU_GET_INFO(), 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA(), 0x3b71);
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
        b.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes());
        put32(&mut b, 72);
        put32(&mut b, 2);
        put32(&mut b, 0);
        put64(&mut b, 0xfef0_0000);
        put64(&mut b, 0x7f_ffff_ffff);
        put64(&mut b, 0);
        put64(&mut b, 0xfedf_ffff);
        // dma_avail cap at 72, last.
        b.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL as u16).to_ne_bytes());
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
        b.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_ne_bytes());
        assert_eq!(parse_info(&b), None);
    }
}
