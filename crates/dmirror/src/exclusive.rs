//! EXCLUSIVE and CHECK_EXCLUSIVE: the kernel's `make_device_exclusive` in userspace.

use std::sync::Arc;

use svmirror_core::MirrorError;
use svmirror_core::{DevicePages, PAGE_SIZE, Range};

use crate::{Dmirror, DmirrorCmd, DmirrorError, ExclusiveRefusal, check};

impl Dmirror {
    /// Gives the device exclusive (atomic) access to `npages` at `addr` (the kernel's
    /// EXCLUSIVE, `make_device_exclusive`), then reads them into `buf` (at least `npages` pages
    /// long) as the kernel's does; `cpages` is the pages read.
    ///
    /// Userspace cannot turn a CPU page-table entry into a device-exclusive one, so the pages
    /// move into the device's exclusive memory through the migration hooks: every other
    /// subscriber (this device's IOMMU mirror included) gets an `Exclusive` invalidation, the
    /// CPU pages are dropped, and the next CPU access, read or write, raises a missing fault
    /// that revokes the access: another `Exclusive` invalidation, then the contents come back
    /// into a CPU page. Any other invalidation of the range (a munmap, an mprotect through the
    /// SVM API) drops the device's ATOMIC tags, as the kernel's dmirror drops its entries: the
    /// device then faults the pages back before it uses them. Only private anonymous writable
    /// memory can be made exclusive (EOPNOTSUPP for shared memory, EFAULT for a read-only or
    /// missing mapping).
    pub fn exclusive(
        &self,
        addr: u64,
        npages: u64,
        buf: &mut [u8],
    ) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.exclusive", addr, npages).entered();
        let range = check(addr, npages, buf.len() as u64, PAGE_SIZE)?;
        let pieces = self.check_exclusive_able(range)?;
        let mm_err = |range, source| DmirrorError::Mm {
            op: "exclusive",
            range,
            source,
        };
        // Pages on a device (this one's included) come back first, from this thread.
        self.mm
            .migrate_to_ram(range)
            .map_err(|e| mm_err(range, e))?;
        for piece in pieces {
            let device: Arc<dyn DevicePages> = self.exclusive.clone();
            self.mm
                .migrate_to_device(piece, device)
                .map_err(|e| mm_err(piece, e))?;
        }
        self.exclusive.tag(range);
        self.read(addr, npages, buf)
    }

    /// Fails with EPERM ([`DmirrorError::StillExclusive`]) if the device still has exclusive
    /// access to a page of `npages` at `addr` (the kernel's CHECK_EXCLUSIVE). The kernel's
    /// selftests pass no pages, which checks nothing; here at least one page is needed.
    pub fn check_exclusive(&self, addr: u64, npages: u64) -> Result<DmirrorCmd, DmirrorError> {
        let range = check(addr, npages, u64::MAX, 1)?;
        match self.exclusive.first_tagged(range) {
            Some(addr) => Err(DmirrorError::StillExclusive { addr }),
            None => Ok(DmirrorCmd::default()),
        }
    }

    /// Checks `range` for EXCLUSIVE: private, writable, readable mappings only. Returns the
    /// pieces of `range` in each mapping.
    fn check_exclusive_able(&self, range: Range) -> Result<Vec<Range>, DmirrorError> {
        let core = |source| {
            DmirrorError::Mirror(MirrorError::Core {
                op: "exclusive",
                range,
                source,
            })
        };
        let mut pieces = Vec::new();
        let mut at = range.start();
        while at < range.end() {
            let m = match self.maps.mapping(at) {
                Ok(Some(m)) if m.range.start() <= at => m,
                Ok(_) => {
                    return Err(DmirrorError::NotExclusive {
                        addr: at,
                        reason: ExclusiveRefusal::NotMapped,
                    });
                }
                Err(source) => {
                    return Err(DmirrorError::Mm {
                        op: "exclusive",
                        range,
                        source,
                    });
                }
            };
            if m.shared || m.io {
                return Err(DmirrorError::NotExclusive {
                    addr: at,
                    reason: ExclusiveRefusal::Shared,
                });
            }
            if !m.read || !m.write {
                return Err(DmirrorError::NotExclusive {
                    addr: at,
                    reason: ExclusiveRefusal::ReadOnly,
                });
            }
            let end = m.range.end().min(range.end());
            pieces.push(Range::new(at, end).map_err(core)?);
            at = end;
        }
        Ok(pieces)
    }
}
