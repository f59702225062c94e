//! Test support: anonymous mappings used as DMA memory.
//!
//! Memory a device can touch is never a Rust reference (STYLE.md rule 6), so tests of the
//! simulated device (here, in `tests/` and in later crates) keep their buffers as an [`AnonMap`]
//! and read and write them through raw pointers only.

use std::io;
use std::ptr::NonNull;

/// An anonymous private read-write mapping between two PROT_NONE guard pages, unmapped on drop.
/// The guards make it a VMA of its own, never merged with a neighbour, so a test knows exactly
/// what a fault on it maps and pins. All access copies through raw pointers.
#[derive(Debug)]
pub struct AnonMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access is a raw-pointer copy
// that the caller orders with the device's work (fence waits).
unsafe impl Send for AnonMap {}
// SAFETY: as above; `&AnonMap` methods only copy bytes in and out through raw pointers.
unsafe impl Sync for AnonMap {}

const GUARD: usize = 4096;

impl AnonMap {
    /// Maps `len` bytes (rounded up to pages) anywhere.
    pub fn new(len: usize) -> io::Result<AnonMap> {
        Self::map(None, len, GUARD)
    }

    /// Maps `len` bytes at exactly `addr`, failing if anything is mapped there or in the guard
    /// pages around it (`MAP_FIXED_NOREPLACE`).
    pub fn at(addr: u64, len: usize) -> io::Result<AnonMap> {
        Self::map(Some(addr), len, GUARD)
    }

    /// Maps `len` bytes at an address aligned to `align` (a power of two), e.g. 2 MiB so the
    /// region can be mapped with large IO page-table leaves.
    pub fn aligned(len: usize, align: usize) -> io::Result<AnonMap> {
        Self::map(None, len, align.max(GUARD))
    }

    fn map(at: Option<u64>, len: usize, align: usize) -> io::Result<AnonMap> {
        let len = len.max(1).next_multiple_of(GUARD);
        let (hint, total, flags) = match at {
            Some(a) => {
                let hint = a
                    .checked_sub(GUARD as u64)
                    .ok_or(io::ErrorKind::InvalidInput)?;
                (hint as usize, len + 2 * GUARD, libc::MAP_FIXED_NOREPLACE)
            }
            None => (0, len + 2 * GUARD + align - GUARD, 0),
        };
        // SAFETY: a new PROT_NONE anonymous reservation; with MAP_FIXED_NOREPLACE the kernel
        // refuses to replace anything. The result is checked.
        let p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = p as usize;
        if at.is_some() && base != hint {
            // Kernels before 4.17 treat MAP_FIXED_NOREPLACE as a hint.
            // SAFETY: unmaps the reservation just made.
            unsafe { libc::munmap(p, total) };
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        let start = (base + GUARD).next_multiple_of(align);
        let end = start + len + GUARD;
        // SAFETY: `[start, start + len)` lies inside our reservation; only its protection changes.
        let rc = unsafe {
            libc::mprotect(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let err = (rc != 0).then(io::Error::last_os_error);
        if start - GUARD > base {
            // SAFETY: unmaps the part of our reservation before the front guard.
            unsafe { libc::munmap(p, start - GUARD - base) };
        }
        if base + total > end {
            // SAFETY: unmaps the part of our reservation after the back guard.
            unsafe { libc::munmap(end as *mut libc::c_void, base + total - end) };
        }
        let map = AnonMap {
            ptr: NonNull::new(start as *mut u8).ok_or(io::ErrorKind::InvalidData)?,
            len,
        };
        match err {
            Some(e) => Err(e),
            None => Ok(map),
        }
    }

    /// The first address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Sets every byte to `b`.
    pub fn fill(&self, b: u8) {
        // SAFETY: the mapping is `len` bytes of read-write memory we own.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), b, self.len) };
    }

    /// Sets byte `i` to `f(i)`.
    pub fn fill_with(&self, f: impl Fn(usize) -> u8) {
        let v: Vec<u8> = (0..self.len).map(f).collect();
        self.write(0, &v);
    }

    /// Copies `data` in at `offset`. Panics if it does not fit (a bug in the test).
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write past the mapping");
        let dst = self.ptr.as_ptr().wrapping_add(offset);
        // SAFETY: bounds checked above; the source is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// Copies `len` bytes out from `offset`. Panics if out of bounds (a bug in the test).
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len, "read past the mapping");
        let mut v = vec![0u8; len];
        let src = self.ptr.as_ptr().wrapping_add(offset);
        // SAFETY: bounds checked above; the destination is a distinct Rust vector.
        unsafe { std::ptr::copy_nonoverlapping(src, v.as_mut_ptr(), len) };
        v
    }

    /// Copies the whole mapping out.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read(0, self.len)
    }

    /// Changes the protection of the whole mapping (`mprotect`).
    pub fn protect(&self, prot: i32) -> io::Result<()> {
        // SAFETY: changes only the protection of our own mapping.
        if unsafe { libc::mprotect(self.ptr.as_ptr().cast(), self.len, prot) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        let start = self.ptr.as_ptr() as usize - GUARD;
        // SAFETY: unmaps exactly our own mapping and its guards; nothing refers to them through
        // Rust references.
        unsafe { libc::munmap(start as *mut libc::c_void, self.len + 2 * GUARD) };
    }
}

/// Serializes the unit tests that pin pages: `VmPin` is per process, so a test that checks it
/// returns to its start value must not run beside one that pins.
#[cfg(test)]
pub(crate) fn pin_test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Test double: a page source (this process's real page table, say svmirror-mm's
/// `ProcessPageSource`) with `hook` run once, right after the first snapshot of a fault loop:
/// the moment where a CPU change races a page request (an invalidation through the notifier, a
/// munmap behind its back). A fault loop always looks the mapping up (`area`) before its
/// snapshot; a snapshot with no lookup before it (the mirror's look at the faulting page for a
/// huge page) does not fire the hook. Everything else is passed through unchanged.
pub struct RaceAfterSnapshot<S: svmirror_core::PageSource, F: Fn() + Send + Sync> {
    inner: S,
    hook: F,
    armed: std::sync::atomic::AtomicBool,
    fired: std::sync::atomic::AtomicBool,
}

impl<S: svmirror_core::PageSource, F: Fn() + Send + Sync> RaceAfterSnapshot<S, F> {
    /// Wraps `inner` with `hook`.
    pub fn new(inner: S, hook: F) -> Self {
        RaceAfterSnapshot {
            inner,
            hook,
            armed: std::sync::atomic::AtomicBool::new(false),
            fired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the hook has run.
    pub fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<S: svmirror_core::PageSource, F: Fn() + Send + Sync> svmirror_core::PageSource
    for RaceAfterSnapshot<S, F>
{
    fn area(&self, addr: u64, limit: u64) -> svmirror_core::Result<svmirror_core::Area> {
        self.armed.store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.area(addr, limit)
    }

    fn snapshot(&self, addr: u64, out: &mut [svmirror_core::CpuPte]) -> svmirror_core::Result<()> {
        self.inner.snapshot(addr, out)?;
        if self.armed.load(std::sync::atomic::Ordering::Relaxed)
            && !self.fired.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            (self.hook)();
        }
        Ok(())
    }

    fn fault(&self, range: svmirror_core::Range, write: bool) -> svmirror_core::Result<()> {
        self.inner.fault(range, write)
    }
}

/// A hook for [`RaceAfterSnapshot`]: a `Clear` invalidation of `range` through `notifier`, as if
/// the CPU dropped the pages while a page request was being resolved.
pub fn clear_through(
    notifier: &svmirror_core::Notifier,
    range: svmirror_core::Range,
) -> impl Fn() + Send + Sync + use<> {
    let notifier = notifier.clone();
    move || {
        let nr = svmirror_core::NotifierRange::new(range, svmirror_core::Event::Clear);
        notifier
            .invalidate_range_start(nr)
            .expect("test invalidation starts")
            .end();
    }
}
