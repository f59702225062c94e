//! Physical access through kernel pins: io_uring registered buffers (DESIGN.md invariant 2).
//!
//! The simulated device never dereferences a process address. It reaches CPU memory only through
//! a [`Pin`]: a registered buffer of one io_uring instance, which the kernel pins
//! (`pin_user_pages(FOLL_WRITE | FOLL_LONGTERM)`) when it is registered and unpins when it is
//! released. The kernel remembers the pages, not the addresses: after the CPU unmaps the range, or
//! maps something else there, an access through the pin still lands on the old pages, exactly as a
//! VFIO-pinned page does for a real device, and never on the new memory.
//!
//! # How an access works
//!
//! Every transfer is done by the kernel against the pinned pages, through a staging memfd that
//! the pool owns and maps:
//!
//! - device read of pinned memory: `IORING_OP_WRITE_FIXED` from the registered buffer into the
//!   memfd, then a copy out of the memfd's mapping (device-local memory);
//! - device write: a copy into the memfd's mapping, then `IORING_OP_READ_FIXED` from the memfd
//!   into the registered buffer;
//! - pin-to-pin copy: both, linked (`IOSQE_IO_LINK`) in one submission. Optionally
//!   ([`PinPoolConfig::copy_pipes`]) through pipes instead of the memfd:
//!   `IORING_OP_WRITE_FIXED` from the source's registered buffer into a pipe linked to
//!   `IORING_OP_READ_FIXED` from the pipe into the destination's; with several pipes a copy
//!   of several pipe-fulls runs one chain per pipe at once, on io_uring's workers
//!   (`IOSQE_ASYNC`).
//!
//! One `io_uring_enter` per chunk of at most the staging size; no Rust pointer ever touches a
//! pinned page.
//!
//! # The slot table
//!
//! Pins live in a sparse registered-buffer table (`IORING_REGISTER_BUFFERS2` with
//! `IORING_RSRC_REGISTER_SPARSE`), updated one slot at a time (`IORING_REGISTER_BUFFERS_UPDATE`)
//! so pins come and go individually. The kernel allows at most [`MAX_SLOTS`] slots and
//! [`MAX_PIN_LEN`] bytes per buffer. A [`PinId`] carries the slot's generation, so an id kept
//! past its pin's release is refused ([`IommuError::StalePin`]) instead of reaching whatever pin
//! took the slot since.
//!
//! # Pinning without holding what an invalidation needs
//!
//! Pinning runs the kernel's GUP, which faults the pages in, and a page that lives on a device (or
//! any range registered for MISSING faults) makes that fault wait for the userfaultfd monitor. The
//! monitor may be inside an invalidation that releases a pin of this pool, which takes the pool's
//! lock and the ring's kernel lock (`uring_lock`, held by `io_uring_register` for its whole run,
//! GUP included). So [`PinPool::pin`] holds neither across GUP (the rule in
//! `svmirror_core::context`, "Lock order"):
//!
//! 1. under the pool lock, *reserve* a free slot: it leaves the free list but has no span yet, so
//!    nothing resolves it, releases it ([`IommuError::StalePin`]) or hands it out again;
//! 2. without the pool lock, register the buffer in slot 0 of a private single-slot *pinning
//!    ring* (one per concurrent pinner, reused): GUP runs under that ring's `uring_lock`, which
//!    no invalidation ever takes;
//! 3. under the pool lock, clone the pinning ring's slot into the reserved slot of the pool's ring
//!    (`IORING_REGISTER_CLONE_BUFFERS` with `DST_REPLACE`: it takes a reference on the pinned
//!    pages and never faults) and *publish* the slot; on any error the slot goes back to the
//!    free list and nothing stays pinned;
//! 4. drop the pinning ring's own reference (its slot 0) and put the ring back.
//!
//! The pages are charged once, when the pinning ring pins them, and uncharged when the last
//! reference goes, whichever ring drops it, so `VmPin` stays exact. On a kernel without buffer
//! cloning (before 6.13) the pool falls back to registering in its own ring under its lock, and
//! says so once: a pin that faults into the monitor can then deadlock against an invalidation.
//!
//! # Limits and privileges
//!
//! - io_uring must be enabled (`kernel.io_uring_disabled` = 0, or 1 with the process in
//!   `kernel.io_uring_group` or holding `CAP_SYS_ADMIN`).
//! - A process without `CAP_IPC_LOCK` (when the pool is created) has every pinned page charged to
//!   its user's `RLIMIT_MEMLOCK` (`ulimit -l`); a pin past it fails with
//!   [`IommuError::MemlockLimit`]. Such a user needs `ulimit -l` at least as large as everything
//!   pinned at once (see [`raise_memlock_limit`](svmirror_mm::raise_memlock_limit)). Root, with `CAP_IPC_LOCK`, is not limited.
//! - Pins are taken for writing: a read-only or PROT_NONE mapping cannot be pinned
//!   ([`IommuError::PinFailed`] with `EFAULT`). Pinning an untouched or copy-on-write page makes
//!   the CPU's mapping a private writable page first, as any long-term pin does.
//! - Pinned pages show in `VmPin` of /proc/self/status
//!   ([`vm_pinned_bytes`](svmirror_mm::vm_pinned_bytes)).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use io_uring::types::CloneBuffersFlags;
use io_uring::{IoUring, opcode, squeue, types};
use svmirror_core::{InnerGuard, InnerLock, PAGE_SIZE, might_fault, might_sleep};

use crate::error::{IommuError, Result};
use crate::page_table::Target;

/// The most copy pipes a pool may have ([`PinPoolConfig::copy_pipes`]).
pub const MAX_COPY_PIPES: usize = 4;

/// The most slots a registered-buffer table may have (`IORING_MAX_REG_BUFFERS`).
pub const MAX_SLOTS: u32 = 1 << 14;
/// The largest registered buffer the kernel accepts.
pub const MAX_PIN_LEN: u64 = 1 << 30;

/// Identifies one pin: its slot in the registered-buffer table and the slot's generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinId {
    slot: u32,
    generation: u32,
}

impl PinId {
    /// The slot in the registered-buffer table.
    pub const fn slot(&self) -> u32 {
        self.slot
    }

    #[cfg(test)]
    pub(crate) const fn for_tests(slot: u32) -> PinId {
        PinId {
            slot,
            generation: 0,
        }
    }
}

impl fmt::Display for PinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pin#{}.{}", self.slot, self.generation)
    }
}

/// How to build a [`PinPool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinPoolConfig {
    /// Slots in the registered-buffer table: the most pins alive at once (at most [`MAX_SLOTS`]).
    pub slots: u32,
    /// Bytes of staging memory: the largest chunk moved per submission (a multiple of pages).
    pub staging_bytes: u64,
    /// Pipes of about `staging_bytes` that pin-to-pin copies go through, one chain per pipe at
    /// once (at most [`MAX_COPY_PIPES`]); 0 (the default): through the staging memfd. Both
    /// keep every access on the pins (see the module documentation). On the 2-core development
    /// machine one pipe beat the memfd when it was lightly loaded and lost to it under load,
    /// and two pipes were no faster than one.
    pub copy_pipes: usize,
}

impl Default for PinPoolConfig {
    fn default() -> Self {
        PinPoolConfig {
            slots: 4096,
            staging_bytes: 1 << 20,
            copy_pipes: 0,
        }
    }
}

/// Counters of a [`PinPool`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinStats {
    /// Pins alive now.
    pub live: u64,
    /// Bytes pinned now.
    pub bytes: u64,
    /// Pins taken, ever.
    pub taken: u64,
    /// Pins released, ever.
    pub released: u64,
    /// Pin attempts that failed.
    pub failed: u64,
    /// Kernel submissions made for transfers.
    pub submissions: u64,
}

/// The staging memfd's mapping. Owned by [`Staging`] and touched only under the pool's lock, so
/// the pointer may move between threads (STYLE.md rule 7).
struct StagingPtr(NonNull<u8>);

// SAFETY: the mapping is private to the pool; every access goes through `PoolInner`, which the
// pool's mutex serializes.
unsafe impl Send for StagingPtr {}

/// A memfd of `len` bytes mapped shared into the process: device-local memory the kernel copies
/// pinned pages into and out of.
struct Staging {
    fd: OwnedFd,
    map: StagingPtr,
    len: usize,
}

impl Staging {
    fn new(len: usize) -> io::Result<Staging> {
        // SAFETY: the name is a NUL-terminated literal; the returned descriptor is checked.
        let raw =
            unsafe { libc::memfd_create(c"svmirror-iommu-staging".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of our own memfd; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Staging {
            fd,
            map: StagingPtr(map),
            len,
        })
    }
}

/// A pipe that pin-to-pin copies go through, emptied by every copy that completes. After a
/// failed transfer it may hold bytes, so it is replaced.
struct CopyPipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// The pipe's capacity: the most one linked pair moves.
    cap: usize,
}

impl CopyPipe {
    /// A pipe of about `want` bytes (as large as the kernel allows, at least a page).
    fn new(want: usize) -> io::Result<CopyPipe> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `pipe2` just created both descriptors; nothing else owns them.
        let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        // SAFETY: plain fcntl on a descriptor we own; a failure leaves the default size.
        unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
        // SAFETY: plain fcntl on a descriptor we own.
        let cap = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if cap < PAGE_SIZE as i32 {
            return Err(io::Error::last_os_error());
        }
        Ok(CopyPipe {
            rd,
            wr,
            cap: cap as usize,
        })
    }
}

/// Submission-queue entries of the pool's ring: room for every lane's chain.
const RING_ENTRIES: u32 = 8;

/// `n` pipes of about `want` bytes, or none if one cannot be made.
fn copy_pipes(n: usize, want: usize) -> Vec<CopyPipe> {
    let pipes: io::Result<Vec<CopyPipe>> = (0..n).map(|_| CopyPipe::new(want)).collect();
    pipes
        .inspect_err(|e| tracing::debug!(%e, "no copy pipes; copies use the staging memfd"))
        .unwrap_or_default()
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing refers to it any more.
        unsafe { libc::munmap(self.map.0.as_ptr().cast(), self.len) };
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    generation: u32,
    /// `(addr, len)` of the registered buffer, or `None` when the slot is free.
    span: Option<(u64, u64)>,
}

/// The pool's state under its lock.
///
/// A slot is in one of three states: *free* (in `free`, no span), *reserved* (out of `free`, no
/// span: a pin of it is being made outside the lock), or *live* (a span; its generation is what
/// the [`PinId`] carries). Only the pinner that reserved a slot moves it on, to live or back to
/// free; `release` and `resolve` see a reserved slot as stale.
struct PoolInner {
    ring: IoUring,
    staging: Staging,
    /// The copy pipes, or none (none configured, or they could not be made): copies then go
    /// through `staging`.
    pipes: Vec<CopyPipe>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    stats: PinStats,
}

/// A table of pins and the means to move bytes through them. Shared as `Arc<PinPool>`; every
/// operation may sleep (it makes system calls) and is serialized by the pool's lock.
pub struct PinPool {
    /// The pool's lock: an inner lock that invalidations take (they release pins), so nothing
    /// that can fault on monitored memory runs under it.
    inner: InnerLock<PoolInner>,
    /// Single-slot rings that pins are made through (see the module documentation), or `None`
    /// when the kernel cannot clone registered buffers. The mutex is held only to take or put a
    /// ring back.
    pinning: Option<Mutex<Vec<IoUring>>>,
    slots: u32,
    /// Whether pins count against RLIMIT_MEMLOCK (no `CAP_IPC_LOCK` when the ring was made).
    accounted: bool,
    /// Pins alive; readable without the lock.
    live: AtomicU64,
}

impl fmt::Debug for PinPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinPool")
            .field("slots", &self.slots)
            .field("accounted", &self.accounted)
            .field("stats", &self.stats())
            .finish()
    }
}

fn io_err(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

impl PinPool {
    /// Creates the io_uring instance with an empty table of `config.slots` pins and the staging
    /// memory. Errors: [`IommuError::RingSetup`], [`IommuError::Staging`], and
    /// [`IommuError::InvalidConfig`] for a zero or oversized configuration.
    pub fn new(config: PinPoolConfig) -> Result<Arc<PinPool>> {
        if config.slots == 0
            || config.slots > MAX_SLOTS
            || config.staging_bytes == 0
            || config.staging_bytes % PAGE_SIZE != 0
            || config.staging_bytes > MAX_PIN_LEN
            || config.copy_pipes > MAX_COPY_PIPES
        {
            return Err(IommuError::InvalidConfig {
                reason: "pin slots must be 1 to 16384, staging whole pages up to 1 GiB, and copy pipes at most 4",
            });
        }
        let accounted = !has_cap_ipc_lock();
        let ring = IoUring::new(RING_ENTRIES).map_err(|source| IommuError::RingSetup { source })?;
        ring.submitter()
            .register_buffers_sparse(config.slots)
            .map_err(|source| IommuError::RingSetup { source })?;
        let staging = Staging::new(config.staging_bytes as usize)
            .map_err(|source| IommuError::Staging { source })?;
        let pipes = copy_pipes(config.copy_pipes, config.staging_bytes as usize);
        let pinning = match probe_cloning(&ring) {
            Ok(first) => Some(Mutex::new(vec![first])),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "this kernel cannot clone registered buffers: pins are made under the pool \
                     lock, and one faulting into the userfaultfd monitor can deadlock"
                );
                None
            }
        };
        tracing::debug!(slots = config.slots, accounted, "pin pool ready");
        Ok(Arc::new(PinPool {
            pinning,
            inner: InnerLock::new(
                "pin pool",
                PoolInner {
                    ring,
                    staging,
                    pipes,
                    slots: vec![Slot::default(); config.slots as usize],
                    free: (0..config.slots).rev().collect(),
                    stats: PinStats::default(),
                },
            ),
            slots: config.slots,
            accounted,
            live: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> InnerGuard<'_, PoolInner> {
        // A panic under the lock leaves the slot table consistent: every update is one store.
        self.inner.lock()
    }

    /// The counters.
    pub fn stats(&self) -> PinStats {
        self.lock().stats
    }

    /// Pins alive now, without taking the lock.
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether pins count against RLIMIT_MEMLOCK.
    pub fn is_accounted(&self) -> bool {
        self.accounted
    }

    /// Pins the pages behind `[addr, addr + len)` (faulting them in, writable) and registers them
    /// in a free slot. On error nothing stays pinned: [`IommuError::PinSize`],
    /// [`IommuError::PinSlotsExhausted`], [`IommuError::MemlockLimit`], [`IommuError::PinFailed`].
    ///
    /// # Safety
    ///
    /// Writes through the pin ([`write`](Self::write), [`copy`](Self::copy)) change the pinned
    /// memory behind Rust's back. The caller must ensure that while the pin exists no such write
    /// targets memory that Rust code accesses through references (STYLE.md rule 6): DMA memory
    /// is read and written by the CPU through raw pointers only.
    pub unsafe fn pin(self: &Arc<Self>, addr: u64, len: u64) -> Result<Pin> {
        might_fault("PinPool::pin");
        if addr % PAGE_SIZE != 0
            || len == 0
            || len % PAGE_SIZE != 0
            || len > MAX_PIN_LEN
            || addr.checked_add(len).is_none()
        {
            return Err(IommuError::PinSize { addr, len });
        }
        let iov = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len as usize,
        };
        let Some(pinning) = &self.pinning else {
            // SAFETY: this function's contract, passed on.
            return unsafe { self.pin_in_place(iov) };
        };
        // 1. Reserve a slot.
        let slot = {
            let mut g = self.lock();
            let Some(slot) = g.free.pop() else {
                g.stats.failed += 1;
                return Err(IommuError::PinSlotsExhausted { slots: self.slots });
            };
            slot
        };
        let give_back = |source: io::Error| {
            let mut g = self.lock();
            g.free.push(slot);
            g.stats.failed += 1;
            drop(g);
            self.pin_error(addr, len, source)
        };
        // 2. Pin through a private ring, holding no lock.
        let ring = match pinning.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            Some(ring) => ring,
            None => match pinning_ring() {
                Ok(ring) => ring,
                Err(source) => return Err(give_back(source)),
            },
        };
        // SAFETY: the kernel reads the iovec during the call and pins the pages it describes;
        // from then on fixed-buffer I/O uses the pinned pages, never the addresses, so nothing
        // of ours has to stay valid for memory safety of the kernel's accesses. The crate's
        // further requirement, that the memory is not otherwise in use while I/O writes it, is
        // this function's own contract, passed on to the caller.
        if let Err(source) = unsafe { ring.submitter().register_buffers_update(0, &[iov], None) } {
            pinning
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(ring);
            return Err(give_back(source));
        }
        // 3. Clone into the reserved slot and publish, under the pool lock (nothing faults).
        let mut g = self.lock();
        let cloned = g.ring.submitter().register_buffers_clone_offset(
            ring.as_raw_fd(),
            0,
            slot,
            1,
            CloneBuffersFlags::DST_REPLACE,
        );
        let id = match cloned {
            Ok(()) => Some(g.publish(slot, addr, len)),
            Err(_) => None,
        };
        if id.is_some() {
            self.live.fetch_add(1, Ordering::Relaxed);
        }
        drop(g);
        // 4. Drop the pinning ring's reference (the last one if the clone failed: that unpins).
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty iovec registers nothing; it drops the pinning ring's slot, which no
        // request uses (the ring never submits).
        match unsafe { ring.submitter().register_buffers_update(0, &[empty], None) } {
            Ok(_) => pinning
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(ring),
            // Closing the ring drops its reference instead.
            Err(e) => tracing::debug!(error = %e, "dropping a pinning ring"),
        }
        let Some(id) = id else {
            let source = cloned.expect_err("no id only when the clone failed");
            return Err(give_back(source));
        };
        tracing::trace!(addr, len, %id, "pinned");
        Ok(Pin {
            pool: self.clone(),
            id,
            addr,
            len,
        })
    }

    /// [`pin`](Self::pin) on a kernel that cannot clone registered buffers: registers in the
    /// pool's own ring under the pool lock.
    ///
    /// # Safety
    ///
    /// As for [`pin`](Self::pin).
    unsafe fn pin_in_place(self: &Arc<Self>, iov: libc::iovec) -> Result<Pin> {
        let (addr, len) = (iov.iov_base as u64, iov.iov_len as u64);
        let mut g = self.lock();
        let Some(slot) = g.free.pop() else {
            g.stats.failed += 1;
            return Err(IommuError::PinSlotsExhausted { slots: self.slots });
        };
        // SAFETY: as in `pin`: the kernel pins the pages the iovec names during the call; the
        // rest is the caller's contract.
        let r = unsafe {
            g.ring
                .submitter()
                .register_buffers_update(slot, &[iov], None)
        };
        if let Err(source) = r {
            g.free.push(slot);
            g.stats.failed += 1;
            drop(g);
            return Err(self.pin_error(addr, len, source));
        }
        let id = g.publish(slot, addr, len);
        self.live.fetch_add(1, Ordering::Relaxed);
        drop(g);
        Ok(Pin {
            pool: self.clone(),
            id,
            addr,
            len,
        })
    }

    fn pin_error(&self, addr: u64, len: u64, source: io::Error) -> IommuError {
        if self.accounted && source.raw_os_error() == Some(libc::ENOMEM) {
            let limit = svmirror_mm::memlock_limit().map_or(0, |l| l.soft);
            return IommuError::MemlockLimit {
                addr,
                len,
                limit,
                source,
            };
        }
        IommuError::PinFailed { addr, len, source }
    }

    /// Unregisters (and so unpins) `id`.
    fn release(&self, id: PinId) -> Result<()> {
        might_sleep("PinPool::release");
        let mut g = self.lock();
        let s = g.slots[id.slot as usize];
        let Some((_, len)) = s.span.filter(|_| s.generation == id.generation) else {
            return Err(IommuError::StalePin { pin: id });
        };
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty iovec registers nothing; it only drops the slot's buffer, whose
        // pages the kernel unpins once no request uses them (none does: transfers complete under
        // this lock).
        let r = unsafe {
            g.ring
                .submitter()
                .register_buffers_update(id.slot, &[empty], None)
        };
        r.map_err(|source| IommuError::Unpin { pin: id, source })?;
        let s = &mut g.slots[id.slot as usize];
        s.span = None;
        s.generation = s.generation.wrapping_add(1);
        g.free.push(id.slot);
        g.stats.live -= 1;
        g.stats.bytes -= len;
        g.stats.released += 1;
        self.live.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copies `dst.len()` bytes of pinned memory at `at` into device memory `dst`.
    pub fn read(&self, at: Target, dst: &mut [u8]) -> Result<()> {
        might_sleep("PinPool::read");
        let mut g = self.lock();
        let addr = g.resolve(at, dst.len() as u64)?;
        let chunk = g.staging.len;
        let mut done = 0;
        while done < dst.len() {
            let n = (dst.len() - done).min(chunk);
            let e = opcode::WriteFixed::new(
                types::Fd(g.staging.fd.as_raw_fd()),
                (addr + done as u64) as *const u8,
                n as u32,
                at.pin.slot as u16,
            )
            .offset(0)
            .build();
            let [res, _] = g.submit(&[e])?;
            check("read", at.pin, res, n)?;
            // SAFETY: the staging mapping holds at least `chunk >= n` bytes, the kernel has
            // finished writing them (its completion was reaped), and `dst[done..done + n]` is
            // a distinct, valid slice.
            unsafe {
                std::ptr::copy_nonoverlapping(g.staging.map.0.as_ptr(), dst[done..].as_mut_ptr(), n)
            };
            done += n;
        }
        Ok(())
    }

    /// Copies device memory `src` into pinned memory at `at`.
    pub fn write(&self, at: Target, src: &[u8]) -> Result<()> {
        might_sleep("PinPool::write");
        let mut g = self.lock();
        let addr = g.resolve(at, src.len() as u64)?;
        let chunk = g.staging.len;
        let mut done = 0;
        while done < src.len() {
            let n = (src.len() - done).min(chunk);
            // SAFETY: the staging mapping holds at least `chunk >= n` bytes and no I/O uses it
            // now (transfers complete under the lock we hold).
            unsafe {
                std::ptr::copy_nonoverlapping(src[done..].as_ptr(), g.staging.map.0.as_ptr(), n)
            };
            let e = opcode::ReadFixed::new(
                types::Fd(g.staging.fd.as_raw_fd()),
                (addr + done as u64) as *mut u8,
                n as u32,
                at.pin.slot as u16,
            )
            .offset(0)
            .build();
            let [res, _] = g.submit(&[e])?;
            check("write", at.pin, res, n)?;
            done += n;
        }
        Ok(())
    }

    /// Copies `len` bytes of pinned memory from `src` to `dst` (which may be the same pin), in
    /// the kernel: each chunk is a fixed-buffer write into staging linked to a fixed-buffer read
    /// out of it.
    pub fn copy(&self, src: Target, dst: Target, len: u64) -> Result<()> {
        might_sleep("PinPool::copy");
        let mut g = self.lock();
        let from = g.resolve(src, len)?;
        let to = g.resolve(dst, len)?;
        if !g.pipes.is_empty() {
            let r = g.copy_through_pipes(src, dst, from, to, len);
            if r.is_err() {
                g.replace_pipes();
            }
            return r;
        }
        let chunk = g.staging.len as u64;
        let fd = types::Fd(g.staging.fd.as_raw_fd());
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk);
            let out = opcode::WriteFixed::new(
                fd,
                (from + done) as *const u8,
                n as u32,
                src.pin.slot as u16,
            )
            .offset(0)
            .build()
            .flags(squeue::Flags::IO_LINK);
            let back =
                opcode::ReadFixed::new(fd, (to + done) as *mut u8, n as u32, dst.pin.slot as u16)
                    .offset(0)
                    .build();
            let [r1, r2] = g.submit(&[out, back])?;
            check("copy", src.pin, r1, n as usize)?;
            check("copy", dst.pin, r2, n as usize)?;
            done += n;
        }
        Ok(())
    }

    /// Whether `id` names a live pin of this pool.
    pub fn is_live(&self, id: PinId) -> bool {
        let g = self.lock();
        g.slots
            .get(id.slot as usize)
            .is_some_and(|s| s.generation == id.generation && s.span.is_some())
    }
}

fn check(op: &'static str, pin: PinId, res: i32, want: usize) -> Result<()> {
    if res < 0 {
        return Err(IommuError::Transfer {
            op,
            pin,
            source: io_err(res),
        });
    }
    if res as usize != want {
        return Err(IommuError::ShortTransfer {
            op,
            pin,
            done: res as u64,
            len: want as u64,
        });
    }
    Ok(())
}

impl PoolInner {
    /// Makes reserved `slot` live with the buffer just registered there; returns its id.
    fn publish(&mut self, slot: u32, addr: u64, len: u64) -> PinId {
        let s = &mut self.slots[slot as usize];
        debug_assert!(s.span.is_none(), "only a reserved slot is published");
        s.span = Some((addr, len));
        let id = PinId {
            slot,
            generation: s.generation,
        };
        self.stats.live += 1;
        self.stats.bytes += len;
        self.stats.taken += 1;
        id
    }

    /// [`PinPool::copy`] through the pipes: per pipe-full, a fixed-buffer write into a pipe
    /// linked to a fixed-buffer read out of it; up to one such chain per pipe at once, in
    /// parallel on io_uring's workers when there are several. `from` and `to` are the resolved
    /// addresses.
    fn copy_through_pipes(
        &mut self,
        src: Target,
        dst: Target,
        from: u64,
        to: u64,
        len: u64,
    ) -> Result<()> {
        let chunk = self.pipes.iter().map(|p| p.cap).min().unwrap_or(0) as u64;
        if chunk == 0 {
            return Ok(());
        }
        let mut done = 0;
        while done < len {
            let mut entries = Vec::with_capacity(2 * self.pipes.len());
            let mut sizes = Vec::with_capacity(self.pipes.len());
            let lanes = (len - done).div_ceil(chunk).min(self.pipes.len() as u64) as usize;
            for pipe in &self.pipes[..lanes] {
                let n = (len - done).min(chunk);
                let mut first = squeue::Flags::IO_LINK;
                if lanes > 1 {
                    first |= squeue::Flags::ASYNC;
                }
                entries.push(
                    opcode::WriteFixed::new(
                        types::Fd(pipe.wr.as_raw_fd()),
                        (from + done) as *const u8,
                        n as u32,
                        src.pin.slot as u16,
                    )
                    .offset(0)
                    .build()
                    .flags(first),
                );
                entries.push(
                    opcode::ReadFixed::new(
                        types::Fd(pipe.rd.as_raw_fd()),
                        (to + done) as *mut u8,
                        n as u32,
                        dst.pin.slot as u16,
                    )
                    .offset(0)
                    .build(),
                );
                sizes.push(n as usize);
                done += n;
            }
            let res = self.submit_all(&entries)?;
            for (i, n) in sizes.into_iter().enumerate() {
                check("copy", src.pin, res[2 * i], n)?;
                check("copy", dst.pin, res[2 * i + 1], n)?;
            }
        }
        Ok(())
    }

    /// Replaces the copy pipes after a failed transfer (they may hold bytes); without new ones,
    /// copies fall back to the staging memfd.
    fn replace_pipes(&mut self) {
        let want = self.pipes.first().map_or(0, |p| p.cap);
        self.pipes = copy_pipes(self.pipes.len(), want);
    }

    /// The process address of `at`, after checking its pin is live and `len` bytes fit in it.
    fn resolve(&self, at: Target, len: u64) -> Result<u64> {
        let s = self
            .slots
            .get(at.pin.slot as usize)
            .filter(|s| s.generation == at.pin.generation)
            .and_then(|s| s.span);
        let Some((addr, pin_len)) = s else {
            return Err(IommuError::StalePin { pin: at.pin });
        };
        if at.offset.checked_add(len).is_none_or(|end| end > pin_len) {
            return Err(IommuError::OutsidePin {
                pin: at.pin,
                offset: at.offset,
                len,
                pin_len,
            });
        }
        Ok(addr + at.offset)
    }

    /// Submits one or two entries (the second linked to the first) and waits for all of them.
    /// Returns each one's result in order (the unused second is 0).
    fn submit(&mut self, entries: &[squeue::Entry]) -> Result<[i32; 2]> {
        debug_assert!(!entries.is_empty() && entries.len() <= 2);
        let r = self.submit_all(entries)?;
        Ok([r[0], r.get(1).copied().unwrap_or(0)])
    }

    /// Submits `entries` (at most the ring's size) and waits for all of them. Returns each
    /// one's result in order.
    fn submit_all(&mut self, entries: &[squeue::Entry]) -> Result<Vec<i32>> {
        debug_assert!(!entries.is_empty() && entries.len() <= RING_ENTRIES as usize);
        let mut sq = self.ring.submission();
        for (i, e) in entries.iter().enumerate() {
            let e = e.clone().user_data(i as u64);
            // SAFETY: the buffers the entries name are registered buffers (pinned by the kernel)
            // and the staging mapping, which outlives the submission: we wait for every
            // completion below, under the pool lock.
            unsafe { sq.push(&e) }.map_err(|_| IommuError::Transfer {
                op: "submit",
                pin: PinId {
                    slot: 0,
                    generation: 0,
                },
                source: io::Error::from_raw_os_error(libc::EBUSY),
            })?;
        }
        drop(sq);
        let mut res = vec![0i32; entries.len()];
        let mut seen = 0;
        while seen < entries.len() {
            if let Err(source) = self.ring.submit_and_wait(entries.len() - seen) {
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(IommuError::Transfer {
                    op: "submit",
                    pin: PinId {
                        slot: 0,
                        generation: 0,
                    },
                    source,
                });
            }
            for cqe in self.ring.completion() {
                if let Some(r) = res.get_mut(cqe.user_data() as usize) {
                    *r = cqe.result();
                    seen += 1;
                }
            }
        }
        self.stats.submissions += 1;
        Ok(res)
    }
}

/// A pinned range of the process's memory, registered in a [`PinPool`]. Dropping it releases
/// the pin (errors are logged); [`Pin::release`] reports them.
pub struct Pin {
    pool: Arc<PinPool>,
    id: PinId,
    addr: u64,
    len: u64,
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({} at {:#x}+{:#x})", self.id, self.addr, self.len)
    }
}

impl Pin {
    /// The pin's id, as page-table targets name it.
    pub fn id(&self) -> PinId {
        self.id
    }

    /// The process address the pin was taken at.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Bytes pinned.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a pin covers at least a page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The target of process address `addr` inside the pin, if it lies there.
    pub fn target_of(&self, addr: u64) -> Option<Target> {
        (self.addr <= addr && addr < self.addr + self.len).then_some(Target {
            pin: self.id,
            offset: addr - self.addr,
        })
    }

    /// Releases the pin now, reporting a failure (the pin then stays registered until the pool
    /// goes away).
    pub fn release(self) -> Result<()> {
        let this = std::mem::ManuallyDrop::new(self);
        let r = this.pool.release(this.id);
        // SAFETY: `this` is never used again and its destructor does not run; the Arc is moved
        // out exactly once.
        drop(unsafe { std::ptr::read(&this.pool) });
        r
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Err(e) = self.pool.release(self.id) {
            tracing::error!(pin = %self.id, error = %e, "releasing a pin failed");
        }
    }
}

/// A private ring with a one-slot buffer table, that pins are made through.
fn pinning_ring() -> io::Result<IoUring> {
    let ring = IoUring::new(1)?;
    ring.submitter().register_buffers_sparse(1)?;
    Ok(ring)
}

/// Whether `ring` can take buffers cloned from a pinning ring (Linux 6.13 and later): clones the
/// empty slot of a new pinning ring into slot 0, which is free. Returns that pinning ring.
fn probe_cloning(ring: &IoUring) -> io::Result<IoUring> {
    let pinning = pinning_ring()?;
    ring.submitter().register_buffers_clone_offset(
        pinning.as_raw_fd(),
        0,
        0,
        1,
        CloneBuffersFlags::DST_REPLACE,
    )?;
    Ok(pinning)
}

/// Whether the calling thread has `CAP_IPC_LOCK` in its effective set (then io_uring does not
/// charge pins to RLIMIT_MEMLOCK).
fn has_cap_ipc_lock() -> bool {
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

#[cfg(test)]
#[path = "pin_tests.rs"]
mod tests;
