//! Mappings of svmirror's own: private anonymous memory that no device ever faults and that
//! the kernel never merges into a neighbour, so it is never registered with the userfaultfd
//! and the monitor never waits for itself on it. The monitor's ring (`queue.rs`) and buffers
//! (`monitor.rs`), and the bounce pages through which pages come back from a device
//! (`fill.rs`), live in these.
//!
//! At the bottom of the graph described in `process.rs`: it imports no module of the crate.

use std::io;

use svmirror_core::PAGE_SIZE;

/// A private anonymous mapping of `len` bytes that the kernel never merges into a neighbour
/// (so a device fault next door, which registers its whole VMA, never registers it).
pub(crate) struct PrivateMap {
    pub(crate) base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned outright (nothing else has the pointer); what is stored in it is
// accessed under the rules of its owner (`Buffers`: one thread; `Queue`: its mutex).
unsafe impl Send for PrivateMap {}
// SAFETY: as above; shared access goes through `Queue`'s mutex.
unsafe impl Sync for PrivateMap {}

impl PrivateMap {
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // A VMA flag its neighbours lack keeps the kernel from merging this mapping into an
        // adjacent anonymous one: merged, a device fault next door could register it with the
        // userfaultfd, and the monitor's own munmap of it would then wait for the monitor.
        // SAFETY: MADV_DONTFORK on our own fresh mapping changes a VMA flag, not its contents.
        let rc = unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: the mapping made above, unmapped once.
            unsafe { libc::munmap(p, len) };
            return Err(e);
        }
        Ok(PrivateMap {
            base: p.cast(),
            len,
        })
    }
}

impl Drop for PrivateMap {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The handler's page-sized bounce buffer, in a mapping of its own.
pub(crate) struct Buffers(PrivateMap);

impl Buffers {
    pub(crate) fn new() -> io::Result<Self> {
        PrivateMap::new(PAGE_SIZE as usize).map(Buffers)
    }

    pub(crate) fn page(&self) -> *mut u8 {
        self.0.base
    }
}

/// A page-sized bounce buffer in a mapping of its own, for bringing a page back from a device
/// outside the monitor.
pub(crate) struct Bounce(Buffers);

impl Bounce {
    pub(crate) fn new() -> io::Result<Self> {
        Buffers::new().map(Bounce)
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.0.page()
    }
}
