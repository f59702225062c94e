//! Test and benchmark support: [`AnonMap`], an anonymous mapping that device buffers live in.
//!
//! Memory a device can touch is never a Rust reference (STYLE.md rule 6), so tests and
//! benchmarks of every backend (and the app's simulated-device benchmarks) keep their buffers as
//! an [`AnonMap`] and read and write them through raw pointers only. It lives here, with the
//! process's address space, because every crate above can reach it: the backends' tests, the
//! benchmarks and the app, which must not link a test crate.
//!
//! Like a test helper, its `read` and `write` panic on an offset past the mapping (a bug in the caller's
//! arithmetic, as with slice indexing); everything the kernel can refuse is an `io::Error`.

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

    /// `madvise(advice)` over the whole mapping: for the advice tests and benchmarks give it,
    /// `MADV_HUGEPAGE` / `MADV_NOHUGEPAGE` (which change a flag of the VMA, never its contents).
    pub fn advise(&self, advice: i32) -> io::Result<()> {
        // SAFETY: advice about our own mapping, which holds no Rust object and which nothing
        // refers into through a Rust reference.
        if unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) } != 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `/proc/self/maps` lines (start, end, permissions) of the VMAs overlapping
    /// `[start, end)`.
    fn vmas(start: u64, end: u64) -> Vec<(u64, u64, String)> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter_map(|l| {
                let (range, rest) = l.split_once(' ')?;
                let (s, e) = range.split_once('-')?;
                let (s, e) = (
                    u64::from_str_radix(s, 16).ok()?,
                    u64::from_str_radix(e, 16).ok()?,
                );
                let perms = rest.split(' ').next()?.to_owned();
                (s < end && e > start).then_some((s, e, perms))
            })
            .collect()
    }

    #[test]
    fn the_mapping_is_a_vma_of_its_own_between_guard_pages() {
        let m = AnonMap::new(3 * 4096 - 100).unwrap();
        assert_eq!(m.len(), 3 * 4096, "rounded up to pages");
        let (start, end) = (m.addr(), m.addr() + m.len() as u64);
        let g = GUARD as u64;
        // A guard may have merged with a PROT_NONE neighbour; the mapping itself may not.
        let v = vmas(start - g, end + g);
        assert_eq!(v.len(), 3, "{v:x?}");
        assert_eq!((v[0].1, v[0].2.as_str()), (start, "---p"), "front guard");
        assert_eq!((v[1].0, v[1].1, v[1].2.as_str()), (start, end, "rw-p"));
        assert_eq!((v[2].0, v[2].2.as_str()), (end, "---p"), "back guard");
    }

    #[test]
    fn bytes_written_are_read_back_and_fill_sets_every_byte() {
        let m = AnonMap::new(2 * 4096).unwrap();
        assert_eq!(m.to_vec(), vec![0; 2 * 4096]);
        m.fill(0x5a);
        m.write(4095, &[1, 2, 3]);
        assert_eq!(m.read(4094, 5), vec![0x5a, 1, 2, 3, 0x5a]);
        m.fill_with(|i| i as u8);
        assert_eq!(m.read(4096 + 7, 2), vec![7, 8]);
    }

    #[test]
    #[should_panic(expected = "write past the mapping")]
    fn a_write_past_the_end_panics() {
        AnonMap::new(4096).unwrap().write(4095, &[0, 0]);
    }

    #[test]
    fn aligned_and_fixed_mappings_land_where_asked() {
        let a = AnonMap::aligned(4096, 2 << 20).unwrap();
        assert_eq!(a.addr() % (2 << 20), 0);
        // Far from anything else the process maps: a fixed mapping lands exactly there, and a
        // second one there (or on its guards) is refused.
        let addr = 0x3b5e_0000_0000;
        let fixed = AnonMap::at(addr, 4096).unwrap();
        assert_eq!(fixed.addr(), addr);
        let again = AnonMap::at(addr + GUARD as u64, 4096).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(
            AnonMap::at(0, 4096).unwrap_err().kind(),
            io::ErrorKind::InvalidInput,
            "no room for the front guard"
        );
    }

    #[test]
    fn protect_and_advise_reach_the_kernel() {
        let m = AnonMap::new(4096).unwrap();
        m.protect(libc::PROT_READ).unwrap();
        let (start, end) = (m.addr(), m.addr() + 4096);
        assert_eq!(vmas(start, end)[0].2, "r--p");
        m.advise(libc::MADV_NOHUGEPAGE).unwrap();
        let err = m.advise(-1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
