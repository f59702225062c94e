//! The device-memory contract: what a backend's device memory offers the CPU side, so that pages
//! can migrate into it and come back (the kernel's device-private pages with their
//! `dev_pagemap_ops::migrate_to_ram`). It lives in the core so that a backend implements it
//! against the core alone; svmirror-mm drives it.

use crate::error::Error;
use crate::range::{Event, Owner};

/// A backend's device memory, holding pages migrated out of the process
/// (the kernel's device-private pages with their `migrate_to_ram`).
pub trait DevicePages: Send + Sync {
    /// The driver's identity: its own `Migrate` invalidations carry it, and `range_fault` with
    /// this owner reports its pages instead of faulting them back.
    fn owner(&self) -> Owner;

    /// Copies the page that lived at `addr` into the device's memory. `src` is the CPU page,
    /// readable for `PAGE_SIZE` bytes until this returns; read it with volatile or `copy`
    /// operations only.
    fn copy_out(&self, addr: u64, src: *const u8) -> Result<(), Error>;

    /// The CPU touched the page copied out from `addr`: write the page's contents to `dst`
    /// (`PAGE_SIZE` writable bytes) and keep the device copy. svmirror frees it with
    /// [`discard`](Self::discard) once the contents are in place in the CPU page (the copy into
    /// place can be refused for a while, and must never lose the only copy). It may be called
    /// again for the same page if that copy failed. `addr` here, in
    /// [`device_pfn`](Self::device_pfn) and in [`discard`](Self::discard) is always the address
    /// the page was copied out from, even after a mremap moved it.
    fn copy_back(&self, addr: u64, dst: *mut u8) -> Result<(), Error>;

    /// The device page's frame number, reported in `range_fault` entries for its owner.
    fn device_pfn(&self, addr: u64) -> u64;

    /// The CPU dropped `addr` (munmap, madvise DONTNEED) while it lived on the device: free it.
    fn discard(&self, addr: u64);

    /// The event that invalidates a page moving into this memory and back: `Migrate` with the
    /// owner for device memory (the default), `Exclusive` with the owner for memory that holds
    /// pages a device has exclusive (atomic) access to, as the kernel's
    /// `make_device_exclusive` and the CPU fault that revokes it do.
    fn event(&self) -> Event {
        Event::Migrate {
            owner: self.owner(),
        }
    }
}
