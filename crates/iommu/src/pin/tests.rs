use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use svmirror_core::MirrorError;
use svmirror_core::PAGE_SIZE;

use super::*;
use crate::error::IommuError;
use svmirror_mm::testing::AnonMap;
use svmirror_mm::{
    VM_PIN_SETTLE, memlock_limit, raise_memlock_limit, settled_vm_pinned_bytes, vm_pinned_bytes,
};

fn pool() -> Arc<PinPool> {
    PinPool::new(PinPoolConfig::default()).unwrap()
}

/// A pool of `slots` pins with one page of staging, moving bytes by `transfer` with
/// `copy_pipes` pipes: the transfer-path tests' configuration.
fn page_staged_pool(slots: u32, copy_pipes: usize, transfer: Transfer) -> Arc<PinPool> {
    PinPool::new(PinPoolConfig {
        slots,
        staging_bytes: PAGE_SIZE,
        copy_pipes,
        transfer,
    })
    .unwrap()
}

#[test]
fn read_through_pin_sees_old_page_after_cpu_remaps_address() {
    let _serial = svmirror_testsupport::serial();
    let before = vm_pinned_bytes().unwrap();
    let pool = pool();
    let old = AnonMap::new(PAGE_SIZE as usize).unwrap();
    old.fill(0xaa);
    let addr = old.addr();
    // SAFETY: the page is test memory accessed only through raw pointers.
    let pin = unsafe { pool.pin(addr, PAGE_SIZE) }.unwrap();
    assert_eq!(vm_pinned_bytes().unwrap(), before + PAGE_SIZE);
    drop(old); // munmap: only the pin keeps the old page now
    let new = AnonMap::at(addr, PAGE_SIZE as usize).unwrap();
    assert_eq!(new.addr(), addr);
    new.fill(0x55);

    let mut buf = vec![0u8; PAGE_SIZE as usize];
    pool.read(pin.target_of(addr).unwrap(), &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa), "device read the new page");

    pool.write(pin.target_of(addr).unwrap(), &[0x11; 64])
        .unwrap();
    assert!(
        new.to_vec().iter().all(|&b| b == 0x55),
        "device wrote the new page"
    );
    pool.read(pin.target_of(addr + 32).unwrap(), &mut buf[..64])
        .unwrap();
    assert_eq!(&buf[..32], &[0x11; 32]);
    assert_eq!(&buf[32..64], &[0xaa; 32]);

    pin.release().unwrap();
    assert_eq!(
        settled_vm_pinned_bytes(before, VM_PIN_SETTLE).unwrap(),
        before
    );
}

#[test]
fn copy_moves_bytes_between_pins() {
    let _serial = svmirror_testsupport::serial();
    let pool = pool();
    let a = AnonMap::new(3 * PAGE_SIZE as usize).unwrap();
    let b = AnonMap::new(3 * PAGE_SIZE as usize).unwrap();
    a.fill_with(|i| i as u8);
    // SAFETY: test memory accessed only through raw pointers.
    let pa = unsafe { pool.pin(a.addr(), a.len() as u64) }.unwrap();
    // SAFETY: as above.
    let pb = unsafe { pool.pin(b.addr(), b.len() as u64) }.unwrap();
    pool.copy(
        pa.target_of(a.addr() + 7).unwrap(),
        pb.target_of(b.addr()).unwrap(),
        9000,
    )
    .unwrap();
    let got = b.to_vec();
    let want: Vec<u8> = (7..9007).map(|i| i as u8).collect();
    assert_eq!(&got[..9000], &want[..]);
    assert!(got[9000..].iter().all(|&x| x == 0));
    assert_eq!(pool.stats().live, 2);
}

/// Every transfer path (pipes, one or two lanes, and the staging memfd), in chunks smaller than
/// the copy, moves the same bytes, and a copy, read or write lands on the pinned pages even
/// after the CPU remapped them.
#[test]
fn copies_through_pipe_and_memfd_are_chunked_and_stay_on_the_pins() {
    let _serial = svmirror_testsupport::serial();
    for (copy_pipes, transfer) in [
        (1, Transfer::Memfd),
        (2, Transfer::Memfd),
        (0, Transfer::Memfd),
        (0, Transfer::Pipe),
        (2, Transfer::Pipe),
    ] {
        let pool = page_staged_pool(4, copy_pipes, transfer);
        let a = AnonMap::new(8 * PAGE_SIZE as usize).unwrap();
        a.fill_with(|i| (i / 3) as u8);
        let b = AnonMap::new(8 * PAGE_SIZE as usize).unwrap();
        let addr = b.addr();
        // SAFETY: test memory accessed only through raw pointers.
        let pa = unsafe { pool.pin(a.addr(), a.len() as u64) }.unwrap();
        // SAFETY: as above.
        let pb = unsafe { pool.pin(addr, b.len() as u64) }.unwrap();
        drop(b); // munmap: only the pin keeps the old pages now
        let new = AnonMap::at(addr, 8 * PAGE_SIZE as usize).unwrap();
        new.fill(0x55);
        let before = pool.stats().submissions;
        let len = 5 * PAGE_SIZE + 100;
        pool.copy(
            pa.target_of(a.addr() + 3).unwrap(),
            pb.target_of(addr).unwrap(),
            len,
        )
        .unwrap();
        // Six chunks: one per submission, or one per pipe per submission.
        let least = 6 / copy_pipes.max(1) as u64;
        assert!(
            pool.stats().submissions - before >= least,
            "pipes {copy_pipes}"
        );
        assert!(
            new.to_vec().iter().all(|&x| x == 0x55),
            "pipes {copy_pipes}: the copy reached the new mapping"
        );
        let mut got = vec![0u8; len as usize];
        pool.read(pb.target_of(addr).unwrap(), &mut got).unwrap();
        let want: Vec<u8> = (3..3 + len as usize).map(|i| (i / 3) as u8).collect();
        assert_eq!(got, want, "pipes {copy_pipes}, {transfer:?}");
        // A write through the pin lands on the old pages too, in chunks.
        let ones = vec![0xeeu8; 2 * PAGE_SIZE as usize + 7];
        pool.write(pb.target_of(addr + 9).unwrap(), &ones).unwrap();
        assert!(
            new.to_vec().iter().all(|&x| x == 0x55),
            "{transfer:?}: the write reached the new mapping"
        );
        let mut back = vec![0u8; ones.len()];
        pool.read(pb.target_of(addr + 9).unwrap(), &mut back)
            .unwrap();
        assert_eq!(back, ones, "{transfer:?}");
    }
}

#[test]
fn transfers_larger_than_staging_are_chunked() {
    let _serial = svmirror_testsupport::serial();
    let pool = PinPool::new(PinPoolConfig {
        slots: 4,
        staging_bytes: PAGE_SIZE,
        ..PinPoolConfig::default()
    })
    .unwrap();
    let a = AnonMap::new(4 * PAGE_SIZE as usize).unwrap();
    // SAFETY: test memory accessed only through raw pointers.
    let p = unsafe { pool.pin(a.addr(), a.len() as u64) }.unwrap();
    let data: Vec<u8> = (0..a.len()).map(|i| (i / 7) as u8).collect();
    pool.write(p.target_of(a.addr()).unwrap(), &data).unwrap();
    assert_eq!(a.to_vec(), data);
    let mut back = vec![0; a.len()];
    pool.read(p.target_of(a.addr()).unwrap(), &mut back)
        .unwrap();
    assert_eq!(back, data);
    assert!(pool.stats().submissions >= 8);
}

#[test]
fn pin_of_unmapped_range_fails_and_pins_nothing() {
    let _serial = svmirror_testsupport::serial();
    let before = vm_pinned_bytes().unwrap();
    let pool = pool();
    // Below vm.mmap_min_addr: nothing is mapped there, whatever other threads map.
    // SAFETY: the call must fail; nothing is pinned.
    let err = unsafe { pool.pin(0x2000, 2 * PAGE_SIZE) }.unwrap_err();
    assert!(matches!(err, IommuError::PinFailed { .. }), "{err}");
    assert_eq!(pool.stats().live, 0);
    assert_eq!(pool.stats().failed, 1);
    assert_eq!(
        settled_vm_pinned_bytes(before, VM_PIN_SETTLE).unwrap(),
        before
    );
}

#[test]
fn pin_of_read_only_mapping_fails() {
    let _serial = svmirror_testsupport::serial();
    let pool = pool();
    let a = AnonMap::new(PAGE_SIZE as usize).unwrap();
    a.protect(libc::PROT_READ).unwrap();
    // SAFETY: the call must fail; nothing is written.
    let err = unsafe { pool.pin(a.addr(), PAGE_SIZE) }.unwrap_err();
    assert!(matches!(err, IommuError::PinFailed { .. }), "{err}");
    assert_eq!(pool.live(), 0);
}

#[test]
fn bad_pin_sizes_are_refused() {
    let pool = pool();
    for (addr, len) in [
        (0x1001, PAGE_SIZE),
        (0x1000, 0),
        (0x1000, 100),
        (0, 2 << 30),
    ] {
        // SAFETY: refused before anything is pinned.
        let err = unsafe { pool.pin(addr, len) }.unwrap_err();
        assert!(matches!(err, IommuError::PinSize { .. }), "{err}");
    }
}

#[test]
fn slot_exhaustion_is_typed_error_and_slots_are_reused() {
    let _serial = svmirror_testsupport::serial();
    let pool = PinPool::new(PinPoolConfig {
        slots: 1,
        staging_bytes: PAGE_SIZE,
        ..PinPoolConfig::default()
    })
    .unwrap();
    let a = AnonMap::new(2 * PAGE_SIZE as usize).unwrap();
    // SAFETY: test memory accessed only through raw pointers.
    let p = unsafe { pool.pin(a.addr(), PAGE_SIZE) }.unwrap();
    // SAFETY: as above.
    let err = unsafe { pool.pin(a.addr() + PAGE_SIZE, PAGE_SIZE) }.unwrap_err();
    assert!(
        matches!(err, IommuError::PinSlotsExhausted { slots: 1 }),
        "{err}"
    );
    drop(p);
    // SAFETY: as above.
    let q = unsafe { pool.pin(a.addr() + PAGE_SIZE, PAGE_SIZE) }.unwrap();
    assert_eq!(q.id().slot(), 0);
}

#[test]
fn stale_pin_id_is_refused_after_slot_reuse() {
    let _serial = svmirror_testsupport::serial();
    let pool = PinPool::new(PinPoolConfig {
        slots: 1,
        staging_bytes: PAGE_SIZE,
        ..PinPoolConfig::default()
    })
    .unwrap();
    let a = AnonMap::new(PAGE_SIZE as usize).unwrap();
    // SAFETY: test memory accessed only through raw pointers.
    let p = unsafe { pool.pin(a.addr(), PAGE_SIZE) }.unwrap();
    let stale = p.target_of(a.addr()).unwrap();
    drop(p);
    // SAFETY: as above.
    let q = unsafe { pool.pin(a.addr(), PAGE_SIZE) }.unwrap();
    assert_eq!(q.id().slot(), stale.pin.slot());
    let err = pool.read(stale, &mut [0u8; 8]).unwrap_err();
    assert!(matches!(err, IommuError::StalePin { .. }), "{err}");
    assert!(!pool.is_live(stale.pin));
}

#[test]
fn access_past_pin_end_is_refused() {
    let _serial = svmirror_testsupport::serial();
    let pool = pool();
    let a = AnonMap::new(PAGE_SIZE as usize).unwrap();
    // SAFETY: test memory accessed only through raw pointers.
    let p = unsafe { pool.pin(a.addr(), PAGE_SIZE) }.unwrap();
    let at = p.target_of(a.addr() + PAGE_SIZE - 4).unwrap();
    let err = pool.read(at, &mut [0u8; 8]).unwrap_err();
    assert!(matches!(err, IommuError::OutsidePin { .. }), "{err}");
}

#[test]
fn vm_pin_counts_pinned_bytes_and_returns_to_start() {
    let _serial = svmirror_testsupport::serial();
    let before = vm_pinned_bytes().unwrap();
    let pool = pool();
    let a = AnonMap::new(16 * PAGE_SIZE as usize).unwrap();
    // SAFETY: test memory accessed only through raw pointers.
    let p = unsafe { pool.pin(a.addr(), a.len() as u64) }.unwrap();
    assert_eq!(vm_pinned_bytes().unwrap(), before + 16 * PAGE_SIZE);
    assert_eq!(pool.stats().bytes, 16 * PAGE_SIZE);
    drop(p);
    assert_eq!(
        settled_vm_pinned_bytes(before, VM_PIN_SETTLE).unwrap(),
        before
    );
    assert_eq!(pool.stats().bytes, 0);
}

#[test]
fn pin_keeps_its_pool_alive_until_released() {
    let _serial = svmirror_testsupport::serial();
    let before = vm_pinned_bytes().unwrap();
    let pool = pool();
    let a = AnonMap::new(4 * PAGE_SIZE as usize).unwrap();
    // SAFETY: test memory accessed only through raw pointers.
    let p = unsafe { pool.pin(a.addr(), a.len() as u64) }.unwrap();
    drop(pool);
    assert_eq!(vm_pinned_bytes().unwrap(), before + 4 * PAGE_SIZE);
    drop(p);
    assert_eq!(
        settled_vm_pinned_bytes(before, VM_PIN_SETTLE).unwrap(),
        before
    );
}

#[test]
fn memlock_limit_reads_and_raise_to_current_is_noop() {
    let cur = memlock_limit().unwrap();
    assert!(cur.soft <= cur.hard);
    assert_eq!(limits::memlock_soft_limit(), cur.soft);
    assert_eq!(raise_memlock_limit(cur.soft.min(PAGE_SIZE)).unwrap(), cur);
}

/// A shared mapping of `len` bytes of `fd`, unmapped on drop.
struct SharedMap(*mut libc::c_void, usize);

impl SharedMap {
    fn new(fd: i32, len: usize) -> SharedMap {
        // SAFETY: a new shared mapping of a descriptor we own; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        SharedMap(p, len)
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping `new` made.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

#[test]
fn shmem_mapping_can_be_pinned_and_written() {
    let _serial = svmirror_testsupport::serial();
    let pool = pool();
    // SAFETY: plain memfd_create with a literal name.
    let fd = unsafe { libc::memfd_create(c"pin-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is ours; it is closed once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizes our own memfd.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), 2 * PAGE_SIZE as i64) };
    assert_eq!(rc, 0);
    let m = SharedMap::new(fd.as_raw_fd(), 2 * PAGE_SIZE as usize);
    // SAFETY: test memory accessed only through raw pointers.
    let p = unsafe { pool.pin(m.0 as u64, 2 * PAGE_SIZE) }.unwrap();
    pool.write(p.target_of(m.0 as u64 + 8).unwrap(), b"shmem")
        .unwrap();
    let mut back = [0u8; 5];
    // SAFETY: reads the file through the descriptor, not the mapping.
    let n = unsafe { libc::pread(fd.as_raw_fd(), back.as_mut_ptr().cast(), 5, 8) };
    assert_eq!(n, 5);
    assert_eq!(&back, b"shmem");
}

#[test]
fn zero_or_oversized_pool_configuration_is_refused() {
    for config in [
        PinPoolConfig {
            slots: 0,
            staging_bytes: PAGE_SIZE,
            ..PinPoolConfig::default()
        },
        PinPoolConfig {
            slots: MAX_SLOTS + 1,
            staging_bytes: PAGE_SIZE,
            ..PinPoolConfig::default()
        },
        PinPoolConfig {
            slots: 1,
            staging_bytes: 100,
            ..PinPoolConfig::default()
        },
        PinPoolConfig {
            copy_pipes: MAX_COPY_PIPES + 1,
            ..PinPoolConfig::default()
        },
    ] {
        let err = PinPool::new(config).unwrap_err();
        assert!(
            matches!(err, IommuError::Mirror(MirrorError::InvalidConfig { .. })),
            "{err}"
        );
    }
}

/// Gathers and scatters move every part, in order, in every transfer configuration: batched
/// through the pipe, or part by part where there is none. Seen failing with a one-page pipe
/// (the staging size caps it): a piece that did not fit the page estimate of an empty batch
/// flushed the empty batch ("attempt to subtract with overflow").
#[test]
fn read_many_and_write_many_move_every_part_with_and_without_a_pipe() {
    let _serial = svmirror_testsupport::serial();
    for (copy_pipes, transfer) in [
        (0, Transfer::Memfd),
        (2, Transfer::Memfd),
        (0, Transfer::Pipe),
        (2, Transfer::Pipe),
    ] {
        let pool = page_staged_pool(4, copy_pipes, transfer);
        let a = AnonMap::new(8 * PAGE_SIZE as usize).unwrap();
        a.fill_with(|i| (i % 251) as u8);
        // SAFETY: the test buffer is accessed only through raw pointers.
        let pin = unsafe { pool.pin(a.addr(), a.len() as u64) }.unwrap();
        let at = |off: u64| pin.target_of(a.addr() + off).unwrap();
        // Out of order, one across a page, one longer than the staging buffer.
        let parts = [(at(5000), 7), (at(10), 3 * PAGE_SIZE), (at(4090), 12)];
        let mut got = vec![0u8; 7 + 3 * PAGE_SIZE as usize + 12];
        pool.read_many(&parts, &mut got).unwrap();
        let want = [
            a.read(5000, 7),
            a.read(10, 3 * PAGE_SIZE as usize),
            a.read(4090, 12),
        ]
        .concat();
        assert_eq!(got, want, "{copy_pipes} {transfer:?}");
        let data: Vec<u8> = (0..got.len()).map(|i| (i % 7) as u8 + 1).collect();
        let writes = [
            (at(6 * PAGE_SIZE), 7),
            (at(0), 3 * PAGE_SIZE),
            (at(5 * PAGE_SIZE - 6), 12),
        ];
        pool.write_many(&writes, &data).unwrap();
        assert_eq!(
            a.read(6 * PAGE_SIZE as usize, 7),
            data[..7],
            "{copy_pipes} {transfer:?}"
        );
        assert_eq!(
            a.read(0, 3 * PAGE_SIZE as usize),
            data[7..7 + 3 * PAGE_SIZE as usize]
        );
        assert_eq!(
            a.read(5 * PAGE_SIZE as usize - 6, 12),
            data[7 + 3 * PAGE_SIZE as usize..]
        );
        drop(pin);
    }
}

/// A fill writes exactly its bytes, from one staging length up to more than one submission of
/// them (the ring takes `RING_ENTRIES` at once), and leaves the bytes around it alone, with a
/// pipe or without.
#[test]
fn fill_writes_exactly_its_bytes_across_submissions() {
    let _serial = svmirror_testsupport::serial();
    for transfer in [Transfer::Memfd, Transfer::Pipe] {
        let pool = page_staged_pool(2, 0, transfer);
        // More than RING_ENTRIES staging lengths, so more than one submission.
        let pages = super::pool::RING_ENTRIES as usize + 8;
        let a = AnonMap::new(pages * PAGE_SIZE as usize).unwrap();
        a.fill_with(|i| (i % 251) as u8);
        // SAFETY: the test buffer is accessed only through raw pointers.
        let pin = unsafe { pool.pin(a.addr(), a.len() as u64) }.unwrap();
        let (from, len) = (100u64, (pages as u64 - 1) * PAGE_SIZE - 37);
        pool.fill(pin.target_of(a.addr() + from).unwrap(), len, 0xc3)
            .unwrap();
        let all = a.read(0, a.len());
        for (i, &b) in all.iter().enumerate() {
            let want = if (from..from + len).contains(&(i as u64)) {
                0xc3
            } else {
                (i % 251) as u8
            };
            assert_eq!(b, want, "byte {i} ({transfer:?})");
        }
        // A short fill inside one page, and an empty one.
        pool.fill(pin.target_of(a.addr() + 5).unwrap(), 3, 7)
            .unwrap();
        pool.fill(pin.target_of(a.addr()).unwrap(), 0, 9).unwrap();
        assert_eq!(a.read(0, 9), [0, 1, 2, 3, 4, 7, 7, 7, 8]);
        drop(pin);
    }
}
