//! Device memory for the migration tests, shared by the mm test binaries: pages in a map.
//! Test support: a `DevicePages` double standing in for a backend's memory.

use std::collections::BTreeMap;
use std::sync::Mutex;

use svmirror_core::{Error, Owner, PAGE_SIZE};
use svmirror_mm::DevicePages;

#[derive(Default)]
pub struct FakeVram {
    pub pages: Mutex<BTreeMap<u64, Vec<u8>>>,
}

impl DevicePages for FakeVram {
    fn owner(&self) -> Owner {
        Owner(0xd00d)
    }
    fn copy_out(&self, addr: u64, src: *const u8) -> Result<(), Error> {
        let mut v = vec![0u8; PAGE_SIZE as usize];
        // SAFETY: `src` is readable for a page while this runs (trait contract).
        unsafe { std::ptr::copy_nonoverlapping(src, v.as_mut_ptr(), v.len()) };
        self.pages.lock().unwrap().insert(addr, v);
        Ok(())
    }
    fn copy_back(&self, addr: u64, dst: *mut u8) -> Result<(), Error> {
        let pages = self.pages.lock().unwrap();
        let v = pages.get(&addr).ok_or(Error::BadAddress { addr })?;
        // SAFETY: `dst` is writable for a page (trait contract); the copy stays until discard.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), dst, v.len()) };
        Ok(())
    }
    fn device_pfn(&self, addr: u64) -> u64 {
        addr >> 12
    }
    fn discard(&self, addr: u64) {
        self.pages.lock().unwrap().remove(&addr);
    }
}

impl FakeVram {
    /// Whether the device holds the page at `addr`.
    pub fn holds(&self, addr: u64) -> bool {
        self.pages.lock().unwrap().contains_key(&addr)
    }

    /// Pages the device holds.
    pub fn len(&self) -> usize {
        self.pages.lock().unwrap().len()
    }
}
