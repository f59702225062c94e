//! A pin past RLIMIT_MEMLOCK is a typed error and leaves nothing pinned. Alone in its binary:
//! it lowers the process's RLIMIT_MEMLOCK.

use svmirror_iommu::{IommuError, PinPool, PinPoolConfig};
use svmirror_mm::testing::AnonMap;
use svmirror_mm::{VM_PIN_SETTLE, memlock_limit, settled_vm_pinned_bytes, vm_pinned_bytes};

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops CAP_IPC_LOCK from the calling thread's effective set (so io_uring charges pins to
/// RLIMIT_MEMLOCK, as for an unprivileged user).
fn drop_cap_ipc_lock() {
    let mut h = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: capget with a version-3 header writes two data structs.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    assert_eq!(r, 0);
    d[0].effective &= !(1 << 14);
    // SAFETY: capset reads the header and two data structs; it only lowers our own set.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
    assert_eq!(r, 0);
}

fn set_memlock_soft(bytes: u64) {
    let hard = memlock_limit().unwrap().hard;
    let r = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one struct we own.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) }, 0);
}

#[test]
fn pin_past_rlimit_memlock_is_typed_error_and_pins_nothing() {
    let saved = memlock_limit().unwrap();
    std::thread::spawn(|| {
        drop_cap_ipc_lock();
        set_memlock_soft(64 << 10);
        let before = vm_pinned_bytes().unwrap();
        let pool = PinPool::new(PinPoolConfig::default()).unwrap();
        assert!(pool.is_accounted());
        let buf = AnonMap::new(1 << 20).unwrap();
        // SAFETY: the pin must fail; nothing is written.
        let err = unsafe { pool.pin(buf.addr(), 1 << 20) }.unwrap_err();
        assert!(
            matches!(err, IommuError::MemlockLimit { limit: 65536, .. }),
            "{err}"
        );
        assert_eq!(pool.stats().live, 0);
        assert_eq!(pool.stats().failed, 1);
        assert_eq!(
            settled_vm_pinned_bytes(before, VM_PIN_SETTLE).unwrap(),
            before
        );
    })
    .join()
    .unwrap();
    set_memlock_soft(saved.soft);
}
