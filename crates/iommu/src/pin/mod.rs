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
//! Every transfer is done by the kernel against the pinned pages, through a pipe the pool owns
//! ([`Transfer::Pipe`], the default):
//!
//! - device read of pinned memory: `IORING_OP_WRITE_FIXED` from the registered buffer into the
//!   pipe, linked (`IOSQE_IO_LINK`) to `IORING_OP_READ` out of the pipe into device memory;
//! - device write: `IORING_OP_WRITE` of device memory into the pipe, linked to
//!   `IORING_OP_READ_FIXED` from the pipe into the registered buffer;
//! - pin-to-pin copy: `IORING_OP_WRITE_FIXED` from the source's registered buffer into the pipe
//!   linked to `IORING_OP_READ_FIXED` from the pipe into the destination's. With several pipes
//!   ([`PinPoolConfig::copy_pipes`]) a copy of several pipe-fulls runs one chain per pipe at
//!   once, on io_uring's workers (`IOSQE_ASYNC`).
//!
//! A pipe takes non-blocking I/O, so io_uring issues both halves inline, in the submitting
//! thread's `io_uring_enter`: a transfer costs one system call and no thread hand-off. With
//! [`Transfer::Memfd`] (and as the fallback when no pipe can be made) the same transfers go
//! through a staging memfd the pool maps, with a memcpy on our side of it; io_uring cannot
//! complete shmem I/O without blocking, so it hands each one to a worker thread
//! (`io_wq_submit_work`), which cost a read of 8 bytes about 30 µs of the 33 µs it took on the
//! 2-core development machine.
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
//!   pinned at once (svmirror-mm's `raise_memlock_limit` raises the soft limit up to the hard
//!   one). Root, with `CAP_IPC_LOCK`, is not limited.
//! - Pins are taken for writing: a read-only or PROT_NONE mapping cannot be pinned
//!   ([`IommuError::PinFailed`] with `EFAULT`). Pinning an untouched or copy-on-write page makes
//!   the CPU's mapping a private writable page first, as any long-term pin does.
//! - Pinned pages show in `VmPin` of /proc/self/status
//!   (svmirror-mm's `vm_pinned_bytes`).
//!
//! # Where the pieces are
//!
//! This module holds the ids, the targets and [`Pin`]; `pool` the slot table and how pins are
//! made and released ([`PinPool`]); `staging` the staging memfd, the copy pipes and the
//! transfers through them ([`PinPool::read`], [`write`](PinPool::write),
//! [`copy`](PinPool::copy)); `limits` what the process may pin.
//!
//! [`IommuError::StalePin`]: crate::IommuError::StalePin
//! [`IommuError::MemlockLimit`]: crate::IommuError::MemlockLimit
//! [`IommuError::PinFailed`]: crate::IommuError::PinFailed

mod limits;
mod pool;
mod staging;

use std::fmt;
use std::sync::Arc;

use crate::error::Result;

pub use self::pool::{PinPool, PinPoolConfig, PinStats, Transfer};

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

/// Where a mapping lands: `offset` bytes into the memory a pin holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The pin.
    pub pin: PinId,
    /// Offset into the pinned range.
    pub offset: u64,
}

impl Target {
    /// The target `delta` bytes further on.
    pub const fn add(self, delta: u64) -> Target {
        Target {
            pin: self.pin,
            offset: self.offset + delta,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.pin, self.offset)
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

#[cfg(test)]
mod tests;
