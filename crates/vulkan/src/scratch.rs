//! [`ScratchBuffer`]: device memory a kernel reaches by device address and the host reads and
//! writes directly, for a kernel's own state (a BFS frontier, per-item status records) next to
//! the process memory it reaches through the page table.

use std::sync::Arc;

use gpu_allocator::MemoryLocation;

use crate::device::Gpu;
use crate::error::{Result, VulkanError};
use crate::memory::HostBuffer;

/// A host-visible device buffer with a device address, freed on drop. Kernels take its
/// [`device_addr`](Self::device_addr) as an argument and use it untranslated; the host reads
/// and writes it between dispatches (never while one that uses it runs: the mirror's
/// dispatches wait for completion, so between two calls is always safe).
pub struct ScratchBuffer {
    buf: HostBuffer,
}

impl std::fmt::Debug for ScratchBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchBuffer")
            .field("addr", &format_args!("{:#x}", self.buf.addr))
            .field("bytes", &self.buf.size)
            .finish()
    }
}

impl ScratchBuffer {
    /// `bytes` (more than zero) of host-visible device memory, zeroed.
    pub fn new(gpu: &Arc<Gpu>, bytes: u64) -> Result<Self> {
        let buf = HostBuffer::new(gpu, bytes, MemoryLocation::GpuToCpu, "scratch")?;
        buf.zero(0, bytes);
        Ok(ScratchBuffer { buf })
    }

    /// The device address kernels use.
    pub fn device_addr(&self) -> u64 {
        self.buf.addr
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.buf.size
    }

    /// Whether it is empty (never: zero-sized buffers are refused).
    pub fn is_empty(&self) -> bool {
        self.buf.size == 0
    }

    fn check(&self, offset: u64, len: u64, align: u64) -> Result<()> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.buf.size) || offset % align != 0 {
            return Err(VulkanError::ScratchBounds {
                offset,
                len,
                size: self.buf.size,
            });
        }
        Ok(())
    }

    /// The `u64` at byte `offset` (a multiple of 8, in bounds).
    pub fn read_u64(&self, offset: u64) -> Result<u64> {
        self.check(offset, 8, 8)?;
        Ok(self.buf.read_u64(offset))
    }

    /// Writes `v` at byte `offset` (a multiple of 8, in bounds).
    pub fn write_u64(&self, offset: u64, v: u64) -> Result<()> {
        self.check(offset, 8, 8)?;
        self.buf.write_u64(offset, v);
        Ok(())
    }

    /// The `u32` at byte `offset` (a multiple of 4, in bounds).
    pub fn read_u32(&self, offset: u64) -> Result<u32> {
        self.check(offset, 4, 4)?;
        Ok(self.buf.read_u32(offset))
    }

    /// Writes `v` at byte `offset` (a multiple of 4, in bounds).
    pub fn write_u32(&self, offset: u64, v: u32) -> Result<()> {
        self.check(offset, 4, 4)?;
        self.buf.write_u32(offset, v);
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, 1)?;
        self.buf.zero(offset, len);
        Ok(())
    }
}
