//! The address space a backend mirrors, as a device driver sees the kernel's `mm_struct`: the
//! notifier its invalidations arrive through (`mmu_interval_notifier_insert` on the mm), the
//! CPU page table its faults walk (`hmm_range_fault`), and page migration into device memory
//! and back (`migrate_vma_*`, `dev_pagemap_ops::migrate_to_ram`).
//!
//! It lives in the core so that a backend depends on the core alone: svmirror-mm implements it
//! for the real process (`ProcessMm`), and a backend takes an `Arc<dyn AddressSpace>`.

use std::sync::Arc;

use crate::device_pages::DevicePages;
use crate::error::Result;
use crate::fault::PageSource;
use crate::notifier::Notifier;
use crate::range::Range;

/// One process's address space, as a backend needs it.
pub trait AddressSpace: PageSource + Send + Sync {
    /// The notifier every change to this address space is reported through; a backend
    /// subscribes its range here.
    fn notifier(&self) -> &Notifier;

    /// Moves the pages of `range` into `device`'s memory; returns how many moved. An address
    /// space that cannot migrate refuses with [`Error::Source`](crate::Error::Source).
    fn migrate_to_device(&self, range: Range, device: Arc<dyn DevicePages>) -> Result<u64>;

    /// Brings every page of `range` that lives in device memory back into RAM; returns how many
    /// came back. Nothing to bring back is not an error.
    fn migrate_to_ram(&self, range: Range) -> Result<u64>;
}
