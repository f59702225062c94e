//! What the process may pin: whether its pins count against RLIMIT_MEMLOCK, and that limit.
//! (svmirror-mm has the full helpers, `memlock_limit` and `raise_memlock_limit`, for the
//! caller; the pool only reads the soft limit to report it.)

/// Whether the calling thread has `CAP_IPC_LOCK` in its effective set (then io_uring does not
/// charge pins to RLIMIT_MEMLOCK).
pub(super) fn has_cap_ipc_lock() -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_IPC_LOCK: u32 = 14;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget with a version-3 header writes two `Data` structs into `d`.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    r == 0 && d[0].effective & (1 << CAP_IPC_LOCK) != 0
}

/// The soft RLIMIT_MEMLOCK in bytes (`u64::MAX` for none), for the error of a pin past it; 0
/// when it cannot be read.
pub(super) fn memlock_soft_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return 0;
    }
    if r.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        r.rlim_cur
    }
}
