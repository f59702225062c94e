//! Migration hooks: pages of a range move into a backend's device memory and come back when the
//! CPU touches them (the kernel's device-private pages and `migrate_to_ram`, in userspace).
//!
//! Out: fault the range in, register it for MISSING faults, invalidate with
//! `Migrate { owner }` (every other device drops it; the owner skips its own event), let the
//! owner copy each page out, and drop the CPU pages with MADV_DONTNEED. From then on the page
//! source reports the pages as device-private to their owner, and absent to everyone else.
//!
//! Back: a CPU access raises a missing fault; the monitor invalidates the page with
//! `Migrate { owner }`, asks the owner for the contents and maps them with UFFDIO_COPY. Another
//! device's fault and [`ProcessMm::migrate_to_ram`] do the same from the calling thread (UFFDIO_COPY
//! needs no pending fault), so they work with a user-mode-only userfaultfd too, where the kernel's
//! own accesses (a `read(2)` into the page) cannot be served.
//!
//! Userspace cannot stop the CPU from writing a page while it is copied out (the kernel does,
//! with migration entries): the caller must not write a range while it migrates to a device.
//! Only private anonymous memory migrates.

use std::sync::Arc;

use svmirror_core::{CpuPte, PAGE_SHIFT, PageSource, Range};

use crate::book::{BackCause, DevicePages};
use crate::error::MmError;
use crate::process::ProcessMm;
use crate::uffd::{self, MODE_MISSING, MODE_WP};

impl ProcessMm {
    /// Moves the pages of `range` into `device`'s memory; returns how many moved.
    pub fn migrate_to_device(
        &self,
        range: Range,
        device: Arc<dyn DevicePages>,
    ) -> Result<u64, MmError> {
        // Events already read (a munmap of an earlier mapping here, say) are handled before we
        // book pages that their handling would otherwise discard.
        self.shared.wait_handled();
        let mut addr = range.start();
        // The writable mappings of the range: a zero page migrates writable where its mapping
        // is (mm/migrate_device.c `migrate_vma_insert_page` checks VM_WRITE).
        let mut writable = Vec::new();
        while addr < range.end() {
            let m = self.mapping_at(addr)?;
            if m.shared || m.io || !m.read {
                return Err(MmError::CannotMigrate { range });
            }
            if m.write {
                writable.push(m.range);
            }
            addr = m.range.end();
        }
        // Every page must exist on the CPU to be copied out; pages already on a device come
        // back first, from this thread.
        self.shared
            .bring_back_range(range, BackCause::Requested)
            .map_err(MmError::Core)?;
        self.shared
            .source
            .fault(range, false)
            .map_err(MmError::Core)?;
        self.shared
            .uffd
            .register(range, MODE_MISSING | MODE_WP)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EINVAL) => MmError::CannotMigrate { range },
                _ => MmError::Register { range, source },
            })?;
        self.record_registered(range);
        let inv = self.invalidate(range, device.event())?;
        let mut ptes = vec![CpuPte::None; range.pages() as usize];
        self.shared
            .source
            .snapshot(range.start(), &mut ptes)
            .map_err(MmError::Core)?;
        let mut moved = 0;
        for (i, pte) in ptes.iter().enumerate() {
            let page = range.start() + ((i as u64) << PAGE_SHIFT);
            if let CpuPte::Present { write, zero, .. } = *pte
                && self.migrated_owner(page).is_none()
            {
                device
                    .copy_out(page, page as usize as *const u8)
                    .map_err(MmError::Core)?;
                // The device-private entry is as writable as the PTE it replaces (a page the
                // mapping or copy-on-write keeps read-only stays so on the device).
                let write = if zero {
                    writable.iter().any(|r| r.contains(page))
                } else {
                    write
                };
                self.book_migrate(page, device.clone(), write);
                moved += 1;
            }
        }
        let expected = self.expect(uffd::EVENT_REMOVE, range.start(), range.end());
        // SAFETY: the pages' contents now live on the device and come back on the next touch
        // through the missing-fault handler; dropping them changes nothing a reader can see.
        let rc = unsafe {
            libc::madvise(
                range.start() as usize as *mut libc::c_void,
                range.len() as usize,
                libc::MADV_DONTNEED,
            )
        };
        drop(expected);
        drop(inv);
        if rc != 0 {
            return Err(MmError::Syscall {
                op: "madvise",
                range,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(moved)
    }

    /// Brings every page of `range` that lives on a device back into RAM; returns how many came
    /// back. The range stops taking MISSING faults afterwards.
    pub fn migrate_to_ram(&self, range: Range) -> Result<u64, MmError> {
        let back = self
            .shared
            .bring_back_range(range, BackCause::Requested)
            .map_err(MmError::Core)?;
        if let Err(source) = self.uffd().register(range, self.shared.mode_for(range)) {
            tracing::debug!(%range, %source, "could not drop MISSING mode after migrating back");
        }
        Ok(back)
    }

    /// Makes the address space ready for `fork(2)`, which svmirror does not see (no FORK
    /// event): brings every page that lives on a device back into RAM, so that the child, which
    /// gets the parent's pages but neither its userfaultfd registration nor its devices, finds
    /// the data rather than zeros. The kernel does the like at fork for device-exclusive pages
    /// (it restores them); device-private pages it shares with the child, which userspace
    /// cannot. Call it right before `fork`, with no migration running; returns how many pages
    /// came back.
    pub fn prepare_fork(&self) -> Result<u64, MmError> {
        self.shared.wait_handled();
        self.shared
            .bring_back_range(Range::FULL, BackCause::Requested)
            .map_err(MmError::Core)
    }

    /// Drops device copies of pages in `range` (the CPU discarded them).
    pub(crate) fn discard_migrated(&self, range: Range) {
        self.shared.discard_migrated(range.start(), range.end());
    }
}

/// The address space a backend takes (`svmirror_core::AddressSpace`): the notifier, the page
/// table and the migration hooks of this process.
impl svmirror_core::AddressSpace for ProcessMm {
    fn notifier(&self) -> &svmirror_core::Notifier {
        ProcessMm::notifier(self)
    }

    fn migrate_to_device(
        &self,
        range: Range,
        device: Arc<dyn DevicePages>,
    ) -> Result<u64, svmirror_core::Error> {
        ProcessMm::migrate_to_device(self, range, device).map_err(|e| e.into_core(range))
    }

    fn migrate_to_ram(&self, range: Range) -> Result<u64, svmirror_core::Error> {
        ProcessMm::migrate_to_ram(self, range).map_err(|e| e.into_core(range))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use svmirror_core::testing::TestMirror;
    use svmirror_core::{Error, Event, Owner, PAGE_SIZE, Range};

    use crate::book::DevicePages;
    use crate::process::ProcessMm;
    use crate::svm::Protection;

    /// Test double for a backend's device memory: pages by the address they left from, and
    /// the kind of event it asks for.
    struct Pages {
        exclusive: bool,
        pages: Mutex<BTreeMap<u64, Vec<u8>>>,
        /// Addresses `copy_back` was called with.
        backs: Mutex<Vec<u64>>,
    }

    impl Pages {
        fn new(exclusive: bool) -> Arc<Pages> {
            Arc::new(Pages {
                exclusive,
                pages: Mutex::default(),
                backs: Mutex::default(),
            })
        }
    }

    impl DevicePages for Pages {
        fn owner(&self) -> Owner {
            Owner(0x5eed)
        }
        fn copy_out(&self, addr: u64, src: *const u8) -> Result<(), Error> {
            let mut v = vec![0u8; PAGE_SIZE as usize];
            // SAFETY: `src` is readable for a page while this runs (trait contract).
            unsafe { std::ptr::copy_nonoverlapping(src, v.as_mut_ptr(), v.len()) };
            self.pages.lock().unwrap().insert(addr, v);
            Ok(())
        }
        fn copy_back(&self, addr: u64, dst: *mut u8) -> Result<(), Error> {
            self.backs.lock().unwrap().push(addr);
            let pages = self.pages.lock().unwrap();
            let v = pages.get(&addr).ok_or(Error::BadAddress { addr })?;
            // SAFETY: `dst` is writable for a page (trait contract); kept until discard.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), dst, v.len()) };
            Ok(())
        }
        fn device_pfn(&self, addr: u64) -> u64 {
            addr >> 12
        }
        fn discard(&self, addr: u64) {
            self.pages.lock().unwrap().remove(&addr);
        }
        fn event(&self) -> Event {
            let owner = self.owner();
            if self.exclusive {
                Event::Exclusive { owner }
            } else {
                Event::Migrate { owner }
            }
        }
    }

    fn poke(addr: u64, v: u8) {
        // SAFETY: `addr` is a byte of a test mapping that Rust code touches only through raw
        // pointers.
        unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
    }

    fn peek(addr: u64) -> u8 {
        // SAFETY: as for `poke`.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    /// The device's own event kind is what other subscribers see, both when the pages leave
    /// and when a CPU touch brings one back.
    #[test]
    fn migrations_carry_the_device_event() {
        let mm = ProcessMm::new().expect("userfaultfd available");
        let r = mm
            .mmap_anonymous(2 * PAGE_SIZE, Protection::READ_WRITE)
            .unwrap();
        poke(r.start(), 7);
        poke(r.start() + PAGE_SIZE, 8);
        let watcher = Arc::new(TestMirror::new(Owner(1)));
        let sub = mm.notifier().insert(r, watcher.clone()).unwrap();
        let dev = Pages::new(true);
        assert_eq!(mm.migrate_to_device(r, dev.clone()).unwrap(), 2);
        assert_eq!(peek(r.start()), 7, "a CPU read brings the page back");
        let events: Vec<Event> = watcher
            .table
            .lock()
            .invalidations
            .iter()
            .map(|(_, e)| *e)
            .collect();
        let exclusive = Event::Exclusive {
            owner: Owner(0x5eed),
        };
        assert_eq!(
            events.iter().filter(|e| **e == exclusive).count(),
            2,
            "{events:?}"
        );
        assert!(!events.iter().any(|e| matches!(e, Event::Migrate { .. })));
        // prepare_fork brings back what is left.
        assert_eq!(mm.prepare_fork().unwrap(), 1);
        assert_eq!(peek(r.start() + PAGE_SIZE), 8);
        sub.remove().unwrap();
        // SAFETY: nothing refers into the mapping.
        unsafe { mm.munmap(r) }.unwrap();
    }

    /// A page moved by mremap while on the device comes back at its new address, the device
    /// asked for it by the address it left from.
    #[test]
    fn a_moved_page_comes_back_by_its_old_key() {
        let mm = ProcessMm::new().expect("userfaultfd available");
        let r = mm
            .mmap_anonymous(PAGE_SIZE, Protection::READ_WRITE)
            .unwrap();
        poke(r.start(), 42);
        let dev = Pages::new(false);
        assert_eq!(mm.migrate_to_device(r, dev.clone()).unwrap(), 1);
        // SAFETY: moves a test mapping nothing in Rust refers to.
        let moved = unsafe { mm.mremap(r, 2 * PAGE_SIZE, true) }.unwrap();
        let moved = Range::with_len(moved.start(), PAGE_SIZE).unwrap();
        assert_ne!(moved.start(), r.start(), "the mapping moved");
        assert_eq!(peek(moved.start()), 42);
        assert_eq!(*dev.backs.lock().unwrap(), vec![r.start()]);
        // SAFETY: nothing refers into the mapping.
        unsafe { mm.munmap(Range::with_len(moved.start(), 2 * PAGE_SIZE).unwrap()) }.unwrap();
    }
}
