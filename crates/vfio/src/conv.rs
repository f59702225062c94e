//! Translation of kernel and vfio-ioctls errors into [`VfioError`] at the boundary.

use std::io;

use crate::error::VfioError;

/// The typed error for a VFIO_IOMMU_MAP_DMA that failed with `err`.
pub(crate) fn map_error(err: io::Error, iova: u64, len: u64, vaddr: u64) -> VfioError {
    match err.raw_os_error() {
        Some(libc::EEXIST) => VfioError::AlreadyMapped { iova, len },
        Some(libc::ENOSPC) => VfioError::NoMappingEntries { iova, len },
        Some(libc::EINVAL) => VfioError::InvalidMapping { iova, len, vaddr },
        Some(libc::EFAULT) => VfioError::BadAddress { vaddr, len },
        Some(libc::ENOMEM) => VfioError::OutOfMemory { vaddr, len },
        _ => VfioError::Map {
            iova,
            len,
            vaddr,
            source: err,
        },
    }
}

/// The OS error inside a vfio-ioctls map error.
pub(crate) fn ioctls_errno(err: &vfio_ioctls::VfioError) -> io::Error {
    match err {
        vfio_ioctls::VfioError::IommuDmaMap(e) | vfio_ioctls::VfioError::IommuDmaUnmap(e) => {
            io::Error::from_raw_os_error(e.errno())
        }
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(e: i32) -> VfioError {
        map_error(
            io::Error::from_raw_os_error(e),
            0x20_0000,
            0x1000,
            0x7f00_0000,
        )
    }

    #[test]
    fn each_documented_map_errno_has_its_variant() {
        assert!(matches!(
            errno(libc::EEXIST),
            VfioError::AlreadyMapped {
                iova: 0x20_0000,
                len: 0x1000
            }
        ));
        assert!(matches!(
            errno(libc::ENOSPC),
            VfioError::NoMappingEntries { .. }
        ));
        assert!(matches!(
            errno(libc::EINVAL),
            VfioError::InvalidMapping {
                vaddr: 0x7f00_0000,
                ..
            }
        ));
        assert!(matches!(errno(libc::EFAULT), VfioError::BadAddress { .. }));
        assert!(matches!(errno(libc::ENOMEM), VfioError::OutOfMemory { .. }));
    }

    #[test]
    fn other_errnos_keep_the_os_error() {
        match errno(libc::EPERM) {
            VfioError::Map { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::EPERM)),
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn ioctls_error_keeps_its_errno() {
        let e = vfio_ioctls::VfioError::IommuDmaMap(vmm_errno(libc::ENOSPC));
        assert_eq!(ioctls_errno(&e).raw_os_error(), Some(libc::ENOSPC));
    }

    fn vmm_errno(e: i32) -> vmm_sys_util::errno::Error {
        vmm_sys_util::errno::Error::new(e)
    }
}
