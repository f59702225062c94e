//! Device kernels: small Rust closures that run "on the device", every load and store going
//! through the IOMMU (the way the example SVM compute app runs with no GPU).
//!
//! A kernel is a closure given a [`KernelCtx`]. It computes on the calling thread, but it has no
//! Rust reference to the memory it works on: every load and store is a [`DmaCommand::Read`] or
//! [`DmaCommand::Write`] (or [`DmaCommand::AtomicAdd`]) executed by the mirror's DMA device
//! thread, which translates the address through the IOTLB and IO page table and reaches memory
//! only through the kernel pins. The kernel therefore sees exactly what the device sees: a miss
//! raises a page request that the driver resolves through the core's fault loop and the access
//! is replayed (recoverable mode); an access the driver cannot resolve aborts the kernel with
//! [`KernelError::Fault`], which names the address.
//!
//! # Why on top of the DMA commands
//!
//! The translation entry points of [`Mmu`](crate::Mmu) (`begin_access` and its grant, which
//! registers the access as in flight so an invalidation waits for it) are crate-private, and the
//! DMA engine's command set is closed. Going through the existing commands keeps every
//! guarantee of the engine (accesses in flight are waited for by invalidations, page requests,
//! fault records, the watchdog, fail-closed) with no second access path to keep correct.
//!
//! # Cost model
//!
//! Each access is one command: a queue round trip to the device thread, a translation, and an
//! io_uring round trip on a registered buffer (a fixed-buffer read or write). Expect about ten
//! microseconds per access whatever its size (the pointer-chasing test measures about 12 µs
//! per 8-byte load on an idle machine, debug or release, and up to 100-250 µs when the machine is
//! busy: the cost is thread hand-offs and system calls, not the copy), plus a page request the
//! first time the access's pages are touched (one per 2 MiB fault window the access spans: the
//! mirror maps what the access asks for, see [`Prefetch`](crate::Prefetch)). Batch: [`KernelCtx::load_bytes`] /
//! [`KernelCtx::store_bytes`] (and the slice helpers) move a whole buffer in one command, so a
//! kernel that streams should load its inputs in blocks, compute, and store blocks; pointer
//! chasing pays one round trip per hop. [`KernelStats`] counts the commands a run issued.
//!
//! # Coherence
//!
//! A load sees the page the device is mapped to: after the CPU replaced a page behind the
//! notifier's back the kernel keeps seeing the old (pinned) page until the invalidation
//! arrives, then faults again and sees the new one. Loads and stores of one kernel are issued
//! in order, and the device runs its commands in the order they were issued, so a load after
//! a store to the same address sees the stored value, whether the store was waited for or only
//! started ([`KernelCtx::start_store`]). Accesses are not atomic with respect to the CPU.
//!
//! # Hiding latency
//!
//! [`KernelCtx::start_load`] and [`KernelCtx::start_store`] issue a command and return at once;
//! [`KernelCtx::finish`] waits for it. A streaming kernel loads its next block while it computes
//! on this one, and leaves its store in flight meanwhile: the device thread moves one block
//! while the kernel's thread computes on another. A command that fails fails at its `finish`;
//! one never finished still runs, and its failure is not reported.

use std::time::{Duration, Instant};

use crate::dma::{Access, DmaCommand};
use crate::error::IommuError;
use crate::mirror::IommuMirror;

/// Why a kernel was aborted.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// An access faulted and the driver could not (or, in unrecoverable mode, did not) resolve
    /// it.
    #[error("kernel {access} of {len} bytes at {addr:#x} faulted at {iova:#x}")]
    Fault {
        /// The address the kernel accessed.
        addr: u64,
        /// Bytes accessed.
        len: u64,
        /// Read or write.
        access: Access,
        /// The address that faulted (in `[addr, addr + len)`).
        iova: u64,
        /// The device's error.
        #[source]
        source: IommuError,
    },
    /// An access failed for another reason (device died or hung, invalid command).
    #[error("kernel {access} of {len} bytes at {addr:#x} failed")]
    Device {
        /// The address the kernel accessed.
        addr: u64,
        /// Bytes accessed.
        len: u64,
        /// Read or write.
        access: Access,
        /// The device's error.
        #[source]
        source: IommuError,
    },
}

impl KernelError {
    /// The address of the access that aborted the kernel.
    pub fn addr(&self) -> u64 {
        match self {
            KernelError::Fault { addr, .. } | KernelError::Device { addr, .. } => *addr,
        }
    }
}

/// The result of a kernel access.
pub type KernelResult<T> = std::result::Result<T, KernelError>;

/// What one kernel run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Load commands issued.
    pub loads: u64,
    /// Store (and atomic) commands issued.
    pub stores: u64,
    /// Bytes loaded.
    pub bytes_loaded: u64,
    /// Bytes stored.
    pub bytes_stored: u64,
    /// Page requests the accesses raised.
    pub page_requests: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl KernelStats {
    /// Mean wall time per access of the run (zero for a run with none).
    pub fn per_access(&self) -> Duration {
        let n = self.loads + self.stores;
        if n == 0 {
            return Duration::ZERO;
        }
        self.elapsed / u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// A command issued by [`KernelCtx::start_load`] or [`KernelCtx::start_store`] and not yet
/// waited for ([`KernelCtx::finish`]).
#[derive(Debug)]
#[must_use = "a command not finished runs, but its failure goes unreported"]
pub struct Pending {
    fence: crate::dma::Fence,
    addr: u64,
    len: u64,
    access: Access,
}

/// What a kernel's closure gets: its loads and stores, all through the IOMMU.
pub struct KernelCtx<'m> {
    mirror: &'m IommuMirror,
    stats: KernelStats,
}

impl KernelCtx<'_> {
    fn fail(addr: u64, len: u64, access: Access, e: IommuError) -> KernelError {
        match e {
            IommuError::DeviceFault { iova, .. } => KernelError::Fault {
                addr,
                len,
                access,
                iova,
                source: e,
            },
            source => KernelError::Device {
                addr,
                len,
                access,
                source,
            },
        }
    }

    fn run_cmd(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
        cmd: DmaCommand,
    ) -> KernelResult<crate::dma::Completion> {
        let done = self
            .mirror
            .submit(cmd)
            .and_then(|f| f.wait())
            .map_err(|e| Self::fail(addr, len, access, e))?;
        self.stats.page_requests += u64::from(done.page_requests);
        Ok(done)
    }

    /// Loads `dst.len()` bytes at `addr` in one device command (nothing for an empty `dst`).
    pub fn load_bytes(&mut self, addr: u64, dst: &mut [u8]) -> KernelResult<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let len = dst.len() as u64;
        let done = self.run_cmd(addr, len, Access::Read, DmaCommand::Read { src: addr, len })?;
        self.stats.loads += 1;
        self.stats.bytes_loaded += len;
        dst.copy_from_slice(&done.data);
        Ok(())
    }

    /// Stores `src` at `addr` in one device command (nothing for an empty `src`).
    pub fn store_bytes(&mut self, addr: u64, src: &[u8]) -> KernelResult<()> {
        if src.is_empty() {
            return Ok(());
        }
        let len = src.len() as u64;
        self.run_cmd(
            addr,
            len,
            Access::Write,
            DmaCommand::Write {
                dst: addr,
                data: src.to_vec(),
            },
        )?;
        self.stats.stores += 1;
        self.stats.bytes_stored += len;
        Ok(())
    }

    /// Issues a load of `len` bytes at `addr` in one device command and returns without
    /// waiting for it: [`KernelCtx::finish`] gives its bytes. `len` 0 is an invalid command.
    pub fn start_load(&mut self, addr: u64, len: u64) -> KernelResult<Pending> {
        let fence = self
            .mirror
            .submit(DmaCommand::Read { src: addr, len })
            .map_err(|e| Self::fail(addr, len, Access::Read, e))?;
        Ok(Pending {
            fence,
            addr,
            len,
            access: Access::Read,
        })
    }

    /// Issues a store of `data` at `addr` in one device command and returns without waiting
    /// for it ([`KernelCtx::finish`] does). An empty `data` is an invalid command.
    pub fn start_store(&mut self, addr: u64, data: Vec<u8>) -> KernelResult<Pending> {
        let len = data.len() as u64;
        let fence = self
            .mirror
            .submit(DmaCommand::Write { dst: addr, data })
            .map_err(|e| Self::fail(addr, len, Access::Write, e))?;
        Ok(Pending {
            fence,
            addr,
            len,
            access: Access::Write,
        })
    }

    /// Waits for a command [`KernelCtx::start_load`] or [`KernelCtx::start_store`] issued:
    /// a load's bytes (the device's buffer, not a copy), nothing for a store.
    pub fn finish(&mut self, p: Pending) -> KernelResult<Vec<u8>> {
        let done = p
            .fence
            .wait()
            .map_err(|e| Self::fail(p.addr, p.len, p.access, e))?;
        self.stats.page_requests += u64::from(done.page_requests);
        match p.access {
            Access::Read => {
                self.stats.loads += 1;
                self.stats.bytes_loaded += p.len;
            }
            Access::Write => {
                self.stats.stores += 1;
                self.stats.bytes_stored += p.len;
            }
        }
        Ok(done.data)
    }

    fn load_array<const N: usize>(&mut self, addr: u64) -> KernelResult<[u8; N]> {
        let mut b = [0u8; N];
        self.load_bytes(addr, &mut b)?;
        Ok(b)
    }

    /// Loads the native-endian u64 at `addr` (any alignment).
    pub fn load_u64(&mut self, addr: u64) -> KernelResult<u64> {
        self.load_array(addr).map(u64::from_ne_bytes)
    }

    /// Stores `v` native-endian at `addr` (any alignment).
    pub fn store_u64(&mut self, addr: u64, v: u64) -> KernelResult<()> {
        self.store_bytes(addr, &v.to_ne_bytes())
    }

    /// Loads the native-endian u32 at `addr`.
    pub fn load_u32(&mut self, addr: u64) -> KernelResult<u32> {
        self.load_array(addr).map(u32::from_ne_bytes)
    }

    /// Stores `v` native-endian at `addr`.
    pub fn store_u32(&mut self, addr: u64, v: u32) -> KernelResult<()> {
        self.store_bytes(addr, &v.to_ne_bytes())
    }

    /// Loads the f32 at `addr`.
    pub fn load_f32(&mut self, addr: u64) -> KernelResult<f32> {
        self.load_u32(addr).map(f32::from_bits)
    }

    /// Stores `v` at `addr`.
    pub fn store_f32(&mut self, addr: u64, v: f32) -> KernelResult<()> {
        self.store_u32(addr, v.to_bits())
    }

    /// Loads `n` consecutive native-endian f32s at `addr` in one command.
    pub fn load_f32s(&mut self, addr: u64, n: usize) -> KernelResult<Vec<f32>> {
        let mut b = vec![0u8; n * 4];
        self.load_bytes(addr, &mut b)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Stores `v` as consecutive native-endian f32s at `addr` in one command.
    pub fn store_f32s(&mut self, addr: u64, v: &[f32]) -> KernelResult<()> {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
        self.store_bytes(addr, &b)
    }

    /// Adds `v` to the u64 at `addr` (8-aligned) and returns the old value: atomic with respect
    /// to other device commands, not to the CPU.
    pub fn atomic_add_u64(&mut self, addr: u64, v: u64) -> KernelResult<u64> {
        let done = self.run_cmd(
            addr,
            8,
            Access::Write,
            DmaCommand::AtomicAdd { addr, value: v },
        )?;
        self.stats.stores += 1;
        self.stats.bytes_stored += 8;
        Ok(done.old_value.unwrap_or(0))
    }

    /// The counters so far.
    pub fn stats(&self) -> KernelStats {
        self.stats
    }
}

/// Runs kernels on an [`IommuMirror`]'s device.
#[derive(Clone, Copy)]
pub struct DeviceKernel<'m> {
    mirror: &'m IommuMirror,
}

/// A finished kernel run: the closure's value and the counters.
#[derive(Debug)]
pub struct KernelRun<R> {
    /// What the kernel returned.
    pub value: R,
    /// What it did.
    pub stats: KernelStats,
}

impl<'m> DeviceKernel<'m> {
    /// A kernel launcher for `mirror`'s device.
    pub fn new(mirror: &'m IommuMirror) -> Self {
        DeviceKernel { mirror }
    }

    /// Runs `kernel`; the first access that fails aborts it (through `?`) with that error.
    pub fn run<R>(
        &self,
        kernel: impl FnOnce(&mut KernelCtx<'m>) -> KernelResult<R>,
    ) -> KernelResult<KernelRun<R>> {
        let mut ctx = KernelCtx {
            mirror: self.mirror,
            stats: KernelStats::default(),
        };
        let started = Instant::now();
        let value = kernel(&mut ctx)?;
        let mut stats = ctx.stats;
        stats.elapsed = started.elapsed();
        Ok(KernelRun { value, stats })
    }
}
