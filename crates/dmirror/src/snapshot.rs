//! SNAPSHOT: one `HMM_DMIRROR_PROT_*` byte per page, taken through the core's loop without
//! faulting.

use svmirror_core::MirrorError;
use svmirror_core::{DEFAULT_FAULT_TIMEOUT, FaultRequest, entry, fault_and_program};

use crate::{Dmirror, DmirrorCmd, DmirrorError, check};

/// The `HMM_DMIRROR_PROT_*` bytes of [`Dmirror::snapshot`].
pub mod prot {
    /// No device may use the page (hole, PROT_NONE).
    pub const ERROR: u8 = 0xff;
    /// No page.
    pub const NONE: u8 = 0x00;
    /// Readable.
    pub const READ: u8 = 0x01;
    /// Writable.
    pub const WRITE: u8 = 0x02;
    /// Mapped by a 2 MiB page.
    pub const PMD: u8 = 0x04;
    /// Mapped by a 1 GiB page.
    pub const PUD: u8 = 0x08;
    /// The shared zero page.
    pub const ZERO: u8 = 0x10;
    /// In this device's private memory.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
}

/// The byte [`Dmirror::snapshot`] reports for one `range_fault` output entry.
pub fn prot_of(e: u64) -> u8 {
    if e & entry::ERROR != 0 {
        return prot::ERROR;
    }
    if !entry::is_valid(e) {
        return prot::NONE;
    }
    let mut p = if e & entry::DEVICE_PRIVATE != 0 {
        prot::DEV_PRIVATE_LOCAL
    } else if e & entry::ZERO != 0 {
        prot::ZERO
    } else {
        0
    };
    p |= if e & entry::WRITE != 0 {
        prot::WRITE
    } else {
        prot::READ
    };
    match entry::order(e) {
        9 => p | prot::PMD,
        18 => p | prot::PUD,
        _ => p,
    }
}
impl Dmirror {
    /// One `HMM_DMIRROR_PROT_*` byte per page of `npages` at `addr` into `out`, faulting
    /// nothing.
    pub fn snapshot(
        &self,
        addr: u64,
        npages: u64,
        out: &mut [u8],
    ) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.snapshot", addr, npages).entered();
        let range = check(addr, npages, out.len() as u64, 1)?;
        let core = |source| {
            DmirrorError::Mirror(MirrorError::Core {
                op: "snapshot",
                range,
                source,
            })
        };
        let mut entries = vec![0u64; npages as usize];
        let mut req = FaultRequest::snapshot(range, &mut entries).with_owner(self.owner());
        // The core's loop, with nothing to program: the snapshot is taken again until no
        // invalidation raced it (the kernel's dmirror checks `mmu_interval_read_retry` under
        // its mutex the same way).
        fault_and_program(
            &self.snap,
            &self.ops.lock,
            &*self.mm,
            &mut req,
            DEFAULT_FAULT_TIMEOUT,
            |_, _| (),
        )
        .map_err(core)?;
        for (o, &e) in out.iter_mut().zip(&entries) {
            *o = prot_of(e);
        }
        Ok(DmirrorCmd {
            cpages: npages,
            faults: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prot_bytes_match_the_kernel() {
        assert_eq!(prot_of(entry::ERROR), prot::ERROR);
        assert_eq!(prot_of(0), prot::NONE);
        assert_eq!(prot_of(entry::VALID), prot::READ);
        assert_eq!(prot_of(entry::VALID | entry::WRITE), prot::WRITE);
        assert_eq!(prot_of(entry::VALID | entry::ZERO), prot::ZERO | prot::READ);
        assert_eq!(
            prot_of(entry::VALID | entry::WRITE | (9 << entry::ORDER_SHIFT)),
            prot::WRITE | prot::PMD
        );
        assert_eq!(
            prot_of(entry::VALID | (18 << entry::ORDER_SHIFT)),
            prot::READ | prot::PUD
        );
        assert_eq!(
            prot_of(entry::VALID | entry::WRITE | entry::DEVICE_PRIVATE),
            prot::DEV_PRIVATE_LOCAL | prot::WRITE
        );
    }
}
