//! Device memory for the migration tests, shared by the mm test binaries: pages in a map.
//! Test support: a `DevicePages` double standing in for a backend's memory.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use svmirror_core::{Error, Owner, PAGE_SIZE, Range};
use svmirror_mm::DevicePages;

#[derive(Default)]
pub struct FakeVram {
    pub pages: Mutex<BTreeMap<u64, Vec<u8>>>,
    /// While set, every `copy_back` fails (a device that cannot give its pages back), and the
    /// device keeps its copy.
    pub fail_copy_back: AtomicBool,
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
        if self.fail_copy_back.load(Ordering::SeqCst) {
            return Err(Error::Source {
                range: Range::with_len(addr, PAGE_SIZE).unwrap_or(Range::FULL),
                source: Box::new(std::io::Error::from_raw_os_error(libc::EIO)),
            });
        }
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
