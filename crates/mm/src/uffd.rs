//! A userfaultfd, as the kernel's UAPI (`include/uapi/linux/userfaultfd.h`) defines it: opening
//! with or without privilege, the feature handshake, registration, resolving missing faults, and
//! reading events.
//!
//! Only the monitor's reader thread reads events, and only the owner of a migrated range resolves its
//! faults; everything here is a thin, checked wrapper over one system call.

use std::fs::OpenOptions;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use svmirror_core::{PAGE_SIZE, Range};
use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE, ioctl_expr};

use crate::error::MmError;

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// The ioctl type of userfaultfd (`include/uapi/linux/userfaultfd.h`).
const UFFDIO: u32 = 0xAA;

/// `_IOWR(UFFDIO, nr, T)`, encoded by vmm-sys-util.
const fn uffdio_rw<T>(nr: u32) -> libc::c_ulong {
    ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, nr, size_of::<T>() as u32)
}

const UFFDIO_API: libc::c_ulong = uffdio_rw::<UffdioApi>(0x3F);
const UFFDIO_REGISTER: libc::c_ulong = uffdio_rw::<UffdioRegister>(0x00);
const UFFDIO_COPY: libc::c_ulong = uffdio_rw::<UffdioCopy>(0x03);
const UFFDIO_ZEROPAGE: libc::c_ulong = uffdio_rw::<UffdioZeropage>(0x04);
/// `_IOR(UFFDIO, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong =
    ioctl_expr(_IOC_READ, UFFDIO, 0x02, size_of::<UffdioRange>() as u32);
const UFFDIO_WRITEPROTECT: libc::c_ulong = uffdio_rw::<UffdioWriteprotect>(0x06);
/// `_IOR(UFFDIO, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong =
    ioctl_expr(_IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>() as u32);
/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = ioctl_expr(_IOC_NONE, UFFDIO, 0x00, 0);
// The numbers the kernel headers give (x86-64 and arm64 alike).
const _: () = assert!(
    UFFDIO_API == 0xc018_aa3f
        && UFFDIO_REGISTER == 0xc020_aa00
        && UFFDIO_COPY == 0xc028_aa03
        && UFFDIO_WAKE == 0x8010_aa02
        && UFFDIO_UNREGISTER == 0x8010_aa01
        && USERFAULTFD_IOC_NEW == 0xaa00
);
/// `UFFD_USER_MODE_ONLY`: handle faults from user mode only (what an unprivileged process gets).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Registration modes.
pub(crate) const MODE_MISSING: u64 = 1 << 0;
pub(crate) const MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const COPY_MODE_DONTWAKE: u64 = 1 << 0;

/// Event codes of `struct uffd_msg`.
pub(crate) const EVENT_PAGEFAULT: u8 = 0x12;
pub(crate) const EVENT_FORK: u8 = 0x13;
pub(crate) const EVENT_REMAP: u8 = 0x14;
pub(crate) const EVENT_REMOVE: u8 = 0x15;
pub(crate) const EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`: 32 bytes, an event code and a 24-byte argument.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct UffdMsg {
    pub event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    /// The argument words; their meaning depends on `event`.
    pub arg: [u64; 3],
}

const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);

/// userfaultfd features svmirror asks for, as the kernel numbers them.
pub mod feature {
    /// Write-protect faults are reported (the kernel offers it only where the architecture has
    /// a uffd-wp PTE bit; without it, MODE_WP registration is refused).
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// Fork events (needs `CAP_SYS_PTRACE`).
    pub const EVENT_FORK: u64 = 1 << 1;
    /// mremap events.
    pub const EVENT_REMAP: u64 = 1 << 2;
    /// madvise DONTNEED/FREE/REMOVE events, before the zap.
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// Missing faults on hugetlbfs.
    pub const MISSING_HUGETLBFS: u64 = 1 << 4;
    /// Missing faults on shmem.
    pub const MISSING_SHMEM: u64 = 1 << 5;
    /// munmap events.
    pub const EVENT_UNMAP: u64 = 1 << 6;
    /// Write-protect unpopulated pages too.
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    /// Write-protect faults resolved by the kernel itself, recorded for PAGEMAP_SCAN.
    pub const WP_ASYNC: u64 = 1 << 15;
    /// Everything svmirror asks for. Not EVENT_FORK, deliberately: a fork with it waits in
    /// the kernel until the monitor reads the FORK event, and glibc's `fork` holds every malloc
    /// arena lock across that wait, so a monitor that allocates at that moment (any
    /// invalidation callback may) deadlocks the process. The event would tell us nothing we
    /// act on: without it the child's VMAs simply lose their registration, which is the
    /// documented behaviour (the child mirrors nothing).
    pub const WANTED: u64 = EVENT_REMAP
        | EVENT_REMOVE
        | MISSING_HUGETLBFS
        | MISSING_SHMEM
        | EVENT_UNMAP
        | WP_UNPOPULATED
        | WP_ASYNC;
    /// The events without which svmirror cannot see CPU changes at all.
    pub const REQUIRED: u64 = EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP;
    /// Names, for messages and `svmirror info`.
    pub const NAMES: [(u64, &str); 8] = [
        (EVENT_FORK, "EVENT_FORK"),
        (EVENT_REMAP, "EVENT_REMAP"),
        (EVENT_REMOVE, "EVENT_REMOVE"),
        (EVENT_UNMAP, "EVENT_UNMAP"),
        (MISSING_SHMEM, "MISSING_SHMEM"),
        (MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (WP_ASYNC, "WP_ASYNC"),
        (WP_UNPOPULATED, "WP_UNPOPULATED"),
    ];
}

/// How the userfaultfd was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdAccess {
    /// Through /dev/userfaultfd: full access.
    DevUserfaultfd,
    /// The userfaultfd syscall with privilege (`CAP_SYS_PTRACE` or
    /// `vm.unprivileged_userfaultfd = 1`): full access.
    Syscall,
    /// The syscall with `UFFD_USER_MODE_ONLY`, what an unprivileged process gets: faults the
    /// kernel itself takes on MISSING-registered pages (a `read(2)` into a page that lives on a
    /// device) fail with EFAULT instead of reaching the monitor. Events are unaffected.
    UserModeOnly,
}

/// An open, negotiated userfaultfd.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
    /// Features the kernel granted.
    pub features: u64,
    /// Features the kernel offered.
    pub offered: u64,
    pub access: UffdAccess,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a fresh userfaultfd by the best means this process has.
fn open_raw() -> Result<(OwnedFd, UffdAccess), MmError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if let Ok(dev) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and returns a new fd.
        if let Ok(fd) = cvt(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) }) {
            // SAFETY: the ioctl just returned this fd to us and nobody else owns it.
            return Ok((
                unsafe { OwnedFd::from_raw_fd(fd) },
                UffdAccess::DevUserfaultfd,
            ));
        }
    }
    for (extra, access) in [
        (0, UffdAccess::Syscall),
        (UFFD_USER_MODE_ONLY, UffdAccess::UserModeOnly),
    ] {
        // SAFETY: the userfaultfd syscall takes flags by value and returns a new fd or -1.
        let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | extra) };
        if rc >= 0 {
            // SAFETY: the syscall just returned this fd to us and nobody else owns it.
            return Ok((unsafe { OwnedFd::from_raw_fd(rc as RawFd) }, access));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EPERM) {
            return Err(MmError::Userfaultfd {
                op: "open",
                source: err,
            });
        }
    }
    Err(MmError::Userfaultfd {
        op: "open",
        source: io::Error::from_raw_os_error(libc::EPERM),
    })
}

fn api(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `a` is.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut a as *mut UffdioApi) })?;
    Ok(a.features)
}

impl Uffd {
    /// Opens a userfaultfd and negotiates as many of `wanted` as the kernel and the process's
    /// privilege allow. The kernel lets a userfaultfd negotiate once, so a first one probes what
    /// is offered and a second one asks for it.
    pub(crate) fn open(wanted: u64) -> Result<Self, MmError> {
        let (probe, _) = open_raw()?;
        let offered = api(&probe, 0).map_err(|source| MmError::Userfaultfd {
            op: "UFFDIO_API",
            source,
        })?;
        drop(probe);
        let mut ask = wanted & offered;
        loop {
            let (fd, access) = open_raw()?;
            match api(&fd, ask) {
                Ok(_) => {
                    return Ok(Uffd {
                        fd,
                        features: ask,
                        offered,
                        access,
                    });
                }
                // EVENT_FORK needs CAP_SYS_PTRACE even when offered: ask again without it.
                Err(e)
                    if e.raw_os_error() == Some(libc::EPERM) && ask & feature::EVENT_FORK != 0 =>
                {
                    ask &= !feature::EVENT_FORK;
                }
                Err(source) => {
                    return Err(MmError::Userfaultfd {
                        op: "UFFDIO_API",
                        source,
                    });
                }
            }
        }
    }

    /// The raw fd, for poll.
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Registers `range` in `mode`. The range must be covered by mappings userfaultfd supports
    /// (anonymous, shmem, hugetlbfs).
    pub(crate) fn register(&self, range: Range, mode: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: range.start(),
                len: range.len(),
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; registration
        // changes how faults in the range are delivered, not any memory's contents.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER, &mut r as *mut UffdioRegister) })?;
        Ok(())
    }

    /// Resolves a missing fault at `dst` (one page) with the contents at `src` and wakes the
    /// faulting thread. `EEXIST` (someone else resolved it) counts as success. `EAGAIN` means an
    /// event is queued unread (`mmap_changing`, fs/userfaultfd.c `mfill_atomic`): nothing was
    /// copied, and the caller retries once the event has been read (see `fill`).
    ///
    /// # Safety
    /// `src` must be readable for `PAGE_SIZE` bytes and must not be memory this userfaultfd
    /// monitors.
    pub(crate) unsafe fn copy_page(&self, dst: u64, src: *const u8) -> io::Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.copy_page_mode(dst, src, 0) }
    }

    /// As [`copy_page`](Self::copy_page), but wakes nobody (`UFFDIO_COPY_MODE_DONTWAKE`): the
    /// caller finishes its bookkeeping first and then calls [`wake`](Self::wake).
    ///
    /// # Safety
    /// As for `copy_page`.
    pub(crate) unsafe fn copy_page_dontwake(&self, dst: u64, src: *const u8) -> io::Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.copy_page_mode(dst, src, COPY_MODE_DONTWAKE) }
    }

    unsafe fn copy_page_mode(&self, dst: u64, src: *const u8, mode: u64) -> io::Result<()> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len: PAGE_SIZE,
            mode,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads one `struct uffdio_copy`; the kernel copies from `src`,
        // readable per this function's contract, into the missing page at `dst`.
        match cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_COPY, &mut c as *mut UffdioCopy) }) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Resolves a missing fault with the zero page and wakes the faulting thread.
    pub(crate) fn zero_page(&self, dst: u64) -> io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst,
                len: PAGE_SIZE,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads one `struct uffdio_zeropage`; it maps the zero page at
        // a page that has none.
        match cvt(unsafe {
            libc::ioctl(self.raw(), UFFDIO_ZEROPAGE, &mut z as *mut UffdioZeropage)
        }) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether the caller of some event has not resumed yet: the kernel's `mmap_changing` is
    /// raised by a thread about to send an event that changes the address space
    /// (`userfaultfd_remove`, `userfaultfd_unmap_prep`, `mremap_userfaultfd_prep`) and dropped
    /// by that thread once its event was read and it runs again (the end of
    /// `userfaultfd_event_wait_completion`, fs/userfaultfd.c). UFFDIO_ZEROPAGE looks at it
    /// before it looks at its arguments (`userfaultfd_zeropage`): asked with an empty range it
    /// answers EAGAIN while it is raised and EINVAL otherwise, changing nothing. Errors other
    /// than those two read as "not changing".
    pub(crate) fn mmap_changing(&self) -> bool {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: 0, len: 0 },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads one `struct uffdio_zeropage`; an empty range maps
        // nothing.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_ZEROPAGE, &mut z as *mut UffdioZeropage) };
        rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
    }

    /// Unregisters `range`: its VMAs send no more events and raise no more faults here
    /// (fs/userfaultfd.c `userfaultfd_unregister` clears their context, splitting VMAs at the
    /// range's ends, and wakes any thread waiting in a fault there, which retries on its own).
    pub(crate) fn unregister(&self, range: Range) -> io::Result<()> {
        let mut r = UffdioRange {
            start: range.start(),
            len: range.len(),
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`; unregistering changes how
        // faults in the range are delivered, not any memory's contents.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_UNREGISTER, &mut r as *mut UffdioRange) })?;
        Ok(())
    }

    /// Whether a message is queued unread now (`poll` with no wait).
    pub(crate) fn readable(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one pollfd of our own, without waiting.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        rc > 0 && p.revents & libc::POLLIN != 0
    }

    /// Wakes every thread waiting in a userfaultfd fault on `range` without resolving it: each
    /// retries its access (and faults again if the page is still missing). Used where a read
    /// fault cannot be resolved, so that no thread stays blocked on it.
    pub(crate) fn wake(&self, range: Range) -> io::Result<()> {
        let mut r = UffdioRange {
            start: range.start(),
            len: range.len(),
        };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`; it wakes waiters, touching no
        // memory.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_WAKE, &mut r as *mut UffdioRange) })?;
        Ok(())
    }

    /// Write-protects `range` (with `WP_ASYNC`, the CPU's writes then clear the protection
    /// themselves and PAGEMAP_SCAN reports them as written).
    pub(crate) fn write_protect(&self, range: Range) -> io::Result<()> {
        self.writeprotect_ioctl(range, WRITEPROTECT_MODE_WP)
    }

    /// Lifts the write protection of `range` (what a write fault under `WP_ASYNC` would do,
    /// page by page; over a whole huge page it keeps the huge mapping, see
    /// `ProcessMm::before_pin`).
    pub(crate) fn write_unprotect(&self, range: Range) -> io::Result<()> {
        self.writeprotect_ioctl(range, 0)
    }

    fn writeprotect_ioctl(&self, range: Range, mode: u64) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: range.start(),
                len: range.len(),
            },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`; it changes page
        // protection bits, not memory contents.
        cvt(unsafe {
            libc::ioctl(
                self.raw(),
                UFFDIO_WRITEPROTECT,
                &mut w as *mut UffdioWriteprotect,
            )
        })?;
        Ok(())
    }

    /// Reads as many pending messages as fit in `buf`; 0 when none is pending.
    /// Reading an event completes it: the thread that caused it goes on.
    pub(crate) fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `size_of_val(buf)` bytes, and the kernel writes
        // whole `struct uffd_msg`s, which `UffdMsg` matches (size checked above).
        let n = unsafe {
            libc::read(
                self.raw(),
                buf.as_mut_ptr().cast(),
                std::mem::size_of_val(buf),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize / size_of::<UffdMsg>())
    }
}

/// Names of the features in `bits`, for messages.
pub(crate) fn feature_names(bits: u64) -> Vec<&'static str> {
    feature::NAMES
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect()
}
