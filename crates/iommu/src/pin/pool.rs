//! The pin pool: the registered-buffer slot table, and how a pin is made and released (see
//! "The slot table" and "Pinning without holding what an invalidation needs" in the
//! [module documentation](super)).

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use io_uring::IoUring;
use io_uring::types::CloneBuffersFlags;
use svmirror_core::MirrorError;
use svmirror_core::{InnerGuard, InnerLock, PAGE_SIZE, might_fault, might_sleep};

use super::limits::{has_cap_ipc_lock, memlock_soft_limit};
use super::staging::{CopyPipe, Staging, copy_pipes};
use super::{MAX_COPY_PIPES, MAX_PIN_LEN, MAX_SLOTS, Pin, PinId, Target};
use crate::error::{IommuError, Result};

/// How to build a [`PinPool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinPoolConfig {
    /// Slots in the registered-buffer table: the most pins alive at once (at most [`MAX_SLOTS`]).
    pub slots: u32,
    /// Bytes of staging memory: the largest chunk moved per submission (a multiple of pages).
    pub staging_bytes: u64,
    /// Pipes of about `staging_bytes` that pin-to-pin copies go through, one chain per pipe at
    /// once (at most [`MAX_COPY_PIPES`]). 0 (the default): one pipe with [`Transfer::Pipe`],
    /// the staging memfd with [`Transfer::Memfd`]. Every path keeps every access on the pins
    /// (see the module documentation). On the 2-core development machine two pipes were no
    /// faster than one.
    pub copy_pipes: usize,
    /// What reads and writes (and copies, unless `copy_pipes` says otherwise) move bytes
    /// through.
    pub transfer: Transfer,
}

/// What a [`PinPool`] moves bytes through between pinned memory and device memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transfer {
    /// A pipe (the default): a fixed-buffer write into it linked to a read out of it, both done
    /// by the submitting thread inside its `io_uring_enter` (pipes take `IOCB_NOWAIT` I/O, so
    /// io_uring issues them inline: `io_write` / `io_read` in io_uring/rw.c succeed at the
    /// first, non-blocking try).
    #[default]
    Pipe,
    /// The staging memfd. shmem does not complete `IOCB_NOWAIT` I/O here, so io_uring hands
    /// each transfer to one of its worker threads (`io_wq_submit_work`) and the submitter
    /// sleeps until it is done: a thread hand-off each way per transfer. Kept as the fallback
    /// when a pipe cannot be made, and as a baseline.
    Memfd,
}

impl Default for PinPoolConfig {
    fn default() -> Self {
        PinPoolConfig {
            slots: 4096,
            staging_bytes: 1 << 20,
            copy_pipes: 0,
            transfer: Transfer::Pipe,
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
/// Submission-queue entries of the pool's ring: room for every lane's chain.
pub(super) const RING_ENTRIES: u32 = 64;
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
pub(super) struct PoolInner {
    pub(super) ring: IoUring,
    pub(super) staging: Staging,
    /// The pipes, or none (the memfd configured, or they could not be made): transfers then
    /// go through `staging`. Reads and writes use the first; copies use all of them.
    pub(super) pipes: Vec<CopyPipe>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    pub(super) stats: PinStats,
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
impl PinPool {
    /// Creates the io_uring instance with an empty table of `config.slots` pins and the staging
    /// memory. Errors: [`IommuError::RingSetup`], [`IommuError::Staging`], and
    /// [`MirrorError::InvalidConfig`] for a zero or oversized configuration.
    pub fn new(config: PinPoolConfig) -> Result<Arc<PinPool>> {
        if config.slots == 0
            || config.slots > MAX_SLOTS
            || config.staging_bytes == 0
            || config.staging_bytes % PAGE_SIZE != 0
            || config.staging_bytes > MAX_PIN_LEN
            || config.copy_pipes > MAX_COPY_PIPES
        {
            return Err(IommuError::Mirror(MirrorError::InvalidConfig {
                reason: "pin slots must be 1 to 16384, staging whole pages up to 1 GiB, and copy pipes at most 4",
            }));
        }
        let accounted = !has_cap_ipc_lock();
        let ring = IoUring::new(RING_ENTRIES).map_err(|source| IommuError::RingSetup { source })?;
        ring.submitter()
            .register_buffers_sparse(config.slots)
            .map_err(|source| IommuError::RingSetup { source })?;
        let staging = Staging::new(config.staging_bytes as usize)
            .map_err(|source| IommuError::Staging { source })?;
        let lanes = match config.transfer {
            Transfer::Pipe => config.copy_pipes.max(1),
            Transfer::Memfd => config.copy_pipes,
        };
        let pipes = copy_pipes(lanes, config.staging_bytes as usize);
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

    pub(super) fn lock(&self) -> InnerGuard<'_, PoolInner> {
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
        let id = cloned.map(|()| g.publish(slot, addr, len));
        if id.is_ok() {
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
        let id = match id {
            Ok(id) => id,
            Err(source) => return Err(give_back(source)),
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
            return IommuError::MemlockLimit {
                addr,
                len,
                limit: memlock_soft_limit(),
                source,
            };
        }
        IommuError::PinFailed { addr, len, source }
    }

    /// Unregisters (and so unpins) `id`.
    pub(super) fn release(&self, id: PinId) -> Result<()> {
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

    /// Whether `id` names a live pin of this pool.
    pub fn is_live(&self, id: PinId) -> bool {
        let g = self.lock();
        g.slots
            .get(id.slot as usize)
            .is_some_and(|s| s.generation == id.generation && s.span.is_some())
    }
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
    /// The process address of `at`, after checking its pin is live and `len` bytes fit in it.
    pub(super) fn resolve(&self, at: Target, len: u64) -> Result<u64> {
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
