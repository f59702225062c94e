//! Process-wide pin accounting and limits: `VmPin` (what this process has pinned, by any
//! means: io_uring buffers, VFIO, RDMA) and RLIMIT_MEMLOCK (what unprivileged pins are charged
//! against). Every backend pins, so these live with the CPU side.

use std::io;

use crate::error::MmError;

/// How long tests give `VmPin` to settle (see [`settled_vm_pinned_bytes`]).
pub const VM_PIN_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// [`vm_pinned_bytes`] once it equals `expected`, or what it is after `timeout` if it never
/// does: for checks that pins went back to where they were. io_uring can drop the last
/// reference to a released buffer from an io-wq worker just after the completion it waited for
/// was posted, so `VmPin` may fall a moment after a pin's release returned; a pin that really
/// leaked never falls, and the caller sees the wrong value.
pub fn settled_vm_pinned_bytes(
    expected: u64,
    timeout: std::time::Duration,
) -> Result<u64, MmError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let now = vm_pinned_bytes()?;
        if now == expected || std::time::Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Bytes this process has pinned (`VmPin` of /proc/self/status): io_uring registered buffers,
/// RDMA and VFIO pins of every part of the process.
pub fn vm_pinned_bytes() -> Result<u64, MmError> {
    const FIELD: &str = "VmPin:";
    let bad = |source| MmError::ProcStatus {
        field: FIELD,
        source,
    };
    let status = std::fs::read_to_string("/proc/self/status").map_err(bad)?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(FIELD))
        .ok_or_else(|| bad(io::Error::from(io::ErrorKind::NotFound)))?;
    let kib: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .map_err(|_| bad(io::Error::from(io::ErrorKind::InvalidData)))?;
    Ok(kib * 1024)
}

/// The RLIMIT_MEMLOCK limits in bytes (`u64::MAX` for unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemlockLimit {
    /// The soft limit: what pins are checked against.
    pub soft: u64,
    /// The hard limit: how far an unprivileged process may raise the soft one.
    pub hard: u64,
}

/// The process's RLIMIT_MEMLOCK.
pub fn memlock_limit() -> Result<MemlockLimit, MmError> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Err(MmError::Rlimit {
            source: io::Error::last_os_error(),
        });
    }
    let conv = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            v
        }
    };
    Ok(MemlockLimit {
        soft: conv(r.rlim_cur),
        hard: conv(r.rlim_max),
    })
}

/// Raises the soft RLIMIT_MEMLOCK to at least `bytes`, and the hard one too if needed (which
/// takes `CAP_SYS_RESOURCE`). Returns the new limits. Only matters for a process without
/// `CAP_IPC_LOCK`, whose pins are charged against it.
pub fn raise_memlock_limit(bytes: u64) -> Result<MemlockLimit, MmError> {
    let cur = memlock_limit()?;
    if cur.soft >= bytes {
        return Ok(cur);
    }
    let r = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: cur.hard.max(bytes),
    };
    // SAFETY: setrlimit reads one `rlimit` we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) } != 0 {
        return Err(MmError::Rlimit {
            source: io::Error::last_os_error(),
        });
    }
    memlock_limit()
}
