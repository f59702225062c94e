//! Volatile reads and writes of test memory at an address.
//!
//! Memory a device can touch is never a Rust reference (STYLE.md rule 6): tests keep buffers
//! as addresses and go through these. They are `unsafe` because an address says nothing about
//! what is mapped there; a test suite's own helpers (a byte of a buffer, an int of a range)
//! wrap them with the contract that suite keeps, once.

/// Reads the `T` at `addr` with one volatile read.
///
/// # Safety
///
/// `addr` is aligned for `T`, and `size_of::<T>()` bytes at it are mapped readable for the whole
/// call, hold a valid `T`, and are not covered by a Rust reference that another thread writes
/// through meanwhile.
///
/// ```
/// let word = Box::into_raw(Box::new(0x1234_u32));
/// // SAFETY: the box's memory, aligned and initialised; no reference to it exists.
/// let v: u32 = unsafe { svmirror_testsupport::volatile::read(word as u64) };
/// assert_eq!(v, 0x1234);
/// // SAFETY: from `Box::into_raw` above, freed once.
/// drop(unsafe { Box::from_raw(word) });
/// ```
pub unsafe fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the caller's contract above.
    unsafe { std::ptr::read_volatile(addr as *const T) }
}

/// Writes `value` to the `T` at `addr` with one volatile write.
///
/// # Safety
///
/// `addr` is aligned for `T`, `size_of::<T>()` bytes at it are mapped writable for the whole
/// call, and no Rust reference covers them.
pub unsafe fn write<T: Copy>(addr: u64, value: T) {
    // SAFETY: the caller's contract above.
    unsafe { std::ptr::write_volatile(addr as *mut T, value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_read_back_at_their_own_address_and_width() {
        let buf = Box::into_raw(Box::new([0u64; 4]));
        let base = buf as u64;
        let word = 0x1122_3344_5566_7788_u64;
        // SAFETY: here and below, the address is inside the boxed array and aligned for the type;
        // the array is touched through raw pointers only until it is freed at the end.
        unsafe { write::<u64>(base + 8, word) };
        // SAFETY: as above.
        unsafe { write::<u8>(base + 16, 0xab) };
        // SAFETY: as above.
        unsafe { write::<u32>(base + 24, 0xdead_beef) };
        // SAFETY: as above.
        unsafe { write::<f32>(base + 28, -1.5) };

        // SAFETY: as above.
        assert_eq!(unsafe { read::<u64>(base) }, 0, "untouched");
        // SAFETY: as above.
        assert_eq!(unsafe { read::<u64>(base + 8) }, word);
        // SAFETY: as above.
        assert_eq!(unsafe { read::<u8>(base + 8) }, word.to_ne_bytes()[0]);
        // SAFETY: as above.
        assert_eq!(unsafe { read::<u8>(base + 16) }, 0xab);
        // SAFETY: as above.
        let next = unsafe { read::<u8>(base + 17) };
        assert_eq!(next, 0, "a byte write is one byte wide");
        // SAFETY: as above.
        assert_eq!(unsafe { read::<u32>(base + 24) }, 0xdead_beef);
        // SAFETY: as above.
        assert_eq!(unsafe { read::<f32>(base + 28) }, -1.5);
        // SAFETY: from `Box::into_raw` above, freed once.
        drop(unsafe { Box::from_raw(buf) });
    }
}
