//! The dmirror device's own memory: pages migrated out of the process, keyed by the virtual
//! address they came from (the kernel's device-private pages of `lib/test_hmm.c`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use svmirror_core::{Error, Owner, PAGE_SIZE, Range};
use svmirror_mm::DevicePages;

/// One device page: a frame number for `range_fault` and the contents.
struct DevicePage {
    pfn: u64,
    data: Box<[u8]>,
}

/// What the lock guards: the pages by the address they live at, and the next frame number.
#[derive(Default)]
struct Pages {
    by_addr: HashMap<u64, DevicePage>,
    next_pfn: u64,
}

/// Device memory. Its owner identity is its own address, distinct from the IOMMU mirror's, so
/// the mirror drops its CPU-page mappings when pages migrate here.
pub(crate) struct DeviceMemory {
    pages: Mutex<Pages>,
}

impl DeviceMemory {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(DeviceMemory {
            pages: Mutex::new(Pages {
                by_addr: HashMap::new(),
                // Frame numbers of device memory, far from RAM's, for readable logs.
                next_pfn: 1 << 40,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pages> {
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the page at `addr` lives here.
    pub(crate) fn contains(&self, addr: u64) -> bool {
        self.lock().by_addr.contains_key(&addr)
    }

    /// Copies the page at `addr` into `out` (a page); false if it does not live here.
    pub(crate) fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        match self.lock().by_addr.get(&addr) {
            Some(p) => {
                out.copy_from_slice(&p.data);
                true
            }
            None => false,
        }
    }

    /// Overwrites the page at `addr` with `data` (a page); false if it does not live here.
    pub(crate) fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lock().by_addr.get_mut(&addr) {
            Some(p) => {
                p.data.copy_from_slice(data);
                true
            }
            None => false,
        }
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
        g.by_addr.insert(addr, DevicePage { pfn, data });
        Ok(())
    }

    fn copy_back(&self, addr: u64, dst: *mut u8) -> Result<(), Error> {
        let page = self
            .lock()
            .by_addr
            .remove(&addr)
            .ok_or(Error::BadAddress { addr })?;
        // SAFETY: `DevicePages::copy_back`'s contract: `dst` is writable for a page.
        unsafe { std::ptr::copy_nonoverlapping(page.data.as_ptr(), dst, page.data.len()) };
        Ok(())
    }

    fn device_pfn(&self, addr: u64) -> u64 {
        self.lock().by_addr.get(&addr).map_or(0, |p| p.pfn)
    }

    fn discard(&self, addr: u64) {
        self.lock().by_addr.remove(&addr);
    }
}
