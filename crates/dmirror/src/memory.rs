//! The dmirror device's own memory: pages migrated out of the process, keyed by the virtual
//! address they came from (the kernel's device-private pages of `lib/test_hmm.c`), and the
//! pages it holds for exclusive (atomic) access (the kernel's device-exclusive entries).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use svmirror_core::DevicePages;
use svmirror_core::{Error, Event, Owner, PAGE_SIZE, Range};

/// One device page: a frame number for `range_fault` and the contents.
struct DevicePage {
    pfn: u64,
    data: Box<[u8]>,
    /// For exclusive memory: the device's page table holds the page with the ATOMIC tag. Set
    /// once the page is in, cleared by any invalidation of its address (the kernel's dmirror
    /// drops its entries on every event but its own migration), so a page whose tag is gone
    /// must be faulted back through the CPU before the device uses it again.
    tagged: bool,
}

/// What a [`DeviceMemory`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Pages migrated to the device (MIGRATE_TO_DEV): `Migrate` events.
    Private,
    /// Pages the device has exclusive access to (EXCLUSIVE): `Exclusive` events.
    Exclusive,
}

/// What the lock guards: the pages by the address they were copied out from, their frame
/// numbers, and the next frame number. After a mremap a page's address differs from its key:
/// commands find pages by the frame number the address space reports for the address.
#[derive(Default)]
struct Pages {
    by_addr: HashMap<u64, DevicePage>,
    by_pfn: HashMap<u64, u64>,
    next_pfn: u64,
}

/// Device memory. Its owner identity is its own address, distinct from the IOMMU mirror's, so
/// the mirror drops its CPU-page mappings when pages migrate here.
pub(crate) struct DeviceMemory {
    kind: Kind,
    pages: Mutex<Pages>,
}

impl DeviceMemory {
    pub(crate) fn new(kind: Kind) -> Arc<Self> {
        Arc::new(DeviceMemory {
            kind,
            pages: Mutex::new(Pages {
                by_addr: HashMap::new(),
                by_pfn: HashMap::new(),
                // Frame numbers of device memory, far from RAM's (for readable logs) and apart
                // for the two kinds (commands look pages up by frame number in both).
                next_pfn: match kind {
                    Kind::Private => 1 << 40,
                    Kind::Exclusive => 1 << 41,
                },
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pages> {
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the page with frame number `pfn` lives here and the device may use it (for
    /// exclusive memory: it still carries its tag).
    pub(crate) fn usable(&self, pfn: u64) -> bool {
        let g = self.lock();
        g.by_pfn
            .get(&pfn)
            .and_then(|a| g.by_addr.get(a))
            .is_some_and(|p| self.usable_page(p))
    }

    /// Whether the device may use the page at `addr` here: it lives here and, for exclusive
    /// memory, still carries its tag.
    fn usable_page(&self, p: &DevicePage) -> bool {
        self.kind == Kind::Private || p.tagged
    }

    /// Copies the page with frame number `pfn` into `out` (a page); false if it is not usable
    /// here.
    pub(crate) fn read(&self, pfn: u64, out: &mut [u8]) -> bool {
        let g = self.lock();
        match g.by_pfn.get(&pfn).and_then(|a| g.by_addr.get(a)) {
            Some(p) if self.usable_page(p) => {
                out.copy_from_slice(&p.data);
                true
            }
            _ => false,
        }
    }

    /// Overwrites the page with frame number `pfn` with `data` (a page); false if it is not
    /// usable here.
    pub(crate) fn write(&self, pfn: u64, data: &[u8]) -> bool {
        let mut g = self.lock();
        let Some(&addr) = g.by_pfn.get(&pfn) else {
            return false;
        };
        match g.by_addr.get_mut(&addr) {
            Some(p) if self.usable_page(p) => {
                p.data.copy_from_slice(data);
                true
            }
            _ => false,
        }
    }

    /// Tags the pages of `range` that live here (exclusive memory: the device maps them
    /// ATOMIC); returns how many.
    pub(crate) fn tag(&self, range: Range) -> u64 {
        let mut g = self.lock();
        let mut n = 0;
        for a in (range.start()..range.end()).step_by(PAGE_SIZE as usize) {
            if let Some(p) = g.by_addr.get_mut(&a) {
                p.tagged = true;
                n += 1;
            }
        }
        n
    }

    /// Clears the tags in `range` (an invalidation). `blocking` false: gives up rather than
    /// wait for the lock, returning false.
    pub(crate) fn untag(&self, range: Range, blocking: bool) -> bool {
        let mut g = if blocking {
            self.lock()
        } else {
            match self.pages.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return false,
            }
        };
        if range.pages() <= g.by_addr.len() as u64 {
            for a in (range.start()..range.end()).step_by(PAGE_SIZE as usize) {
                if let Some(p) = g.by_addr.get_mut(&a) {
                    p.tagged = false;
                }
            }
        } else {
            for (a, p) in g.by_addr.iter_mut() {
                if range.contains(*a) {
                    p.tagged = false;
                }
            }
        }
        true
    }

    /// The first page of `range` that lives here with its tag.
    pub(crate) fn first_tagged(&self, range: Range) -> Option<u64> {
        let g = self.lock();
        let mut hits: Vec<u64> = g
            .by_addr
            .iter()
            .filter(|(a, p)| p.tagged && range.contains(**a))
            .map(|(a, _)| *a)
            .collect();
        hits.sort_unstable();
        hits.first().copied()
    }

    /// Pages resident here, in runs of consecutive addresses.
    pub(crate) fn runs(&self) -> Vec<Range> {
        let mut addrs: Vec<u64> = self.lock().by_addr.keys().copied().collect();
        addrs.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for a in addrs {
            match runs.last_mut() {
                Some(r) if r.1 == a => r.1 += PAGE_SIZE,
                _ => runs.push((a, a + PAGE_SIZE)),
            }
        }
        runs.into_iter()
            .filter_map(|(s, e)| Range::new(s, e).ok())
            .collect()
    }

    /// How many pages live here.
    pub(crate) fn len(&self) -> usize {
        self.lock().by_addr.len()
    }
}

impl DevicePages for DeviceMemory {
    fn owner(&self) -> Owner {
        Owner(self as *const Self as u64)
    }

    fn copy_out(&self, addr: u64, src: *const u8) -> Result<(), Error> {
        let mut data = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
        // SAFETY: `DevicePages::copy_out`'s contract: `src` is readable for a page until this
        // returns, and is read with a copy only.
        unsafe { std::ptr::copy_nonoverlapping(src, data.as_mut_ptr(), data.len()) };
        let mut g = self.lock();
        let pfn = g.next_pfn;
        g.next_pfn += 1;
        g.by_pfn.insert(pfn, addr);
        if let Some(old) = g.by_addr.get(&addr) {
            let old = old.pfn;
            g.by_pfn.remove(&old);
        }
        g.by_addr.insert(
            addr,
            DevicePage {
                pfn,
                data,
                tagged: false,
            },
        );
        Ok(())
    }

    fn copy_back(&self, addr: u64, dst: *mut u8) -> Result<(), Error> {
        let g = self.lock();
        let page = g.by_addr.get(&addr).ok_or(Error::BadAddress { addr })?;
        // SAFETY: `DevicePages::copy_back`'s contract: `dst` is writable for a page. The copy
        // stays until svmirror discards it.
        unsafe { std::ptr::copy_nonoverlapping(page.data.as_ptr(), dst, page.data.len()) };
        Ok(())
    }

    fn device_pfn(&self, addr: u64) -> u64 {
        self.lock().by_addr.get(&addr).map_or(0, |p| p.pfn)
    }

    fn discard(&self, addr: u64) {
        let mut g = self.lock();
        if let Some(p) = g.by_addr.remove(&addr) {
            g.by_pfn.remove(&p.pfn);
        }
    }

    fn event(&self) -> Event {
        let owner = self.owner();
        match self.kind {
            Kind::Private => Event::Migrate { owner },
            Kind::Exclusive => Event::Exclusive { owner },
        }
    }
}
