//! Buffers from gpu-allocator and one-shot command submissions.
//!
//! [`GpuBuffer`] is a buffer with its own allocation and device address, freed on drop;
//! [`HostBuffer`] is one the host also reads and writes, through its host mapping.
//! [`Submission`] is one command buffer with its fence: recorded, submitted, then waited for
//! (fence and command buffer freed on drop, after waiting).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ash::vk;
use gpu_allocator::MemoryLocation;
use gpu_allocator::vulkan::{Allocation, AllocationCreateDesc, AllocationScheme};

use crate::conv::{alloc_err, vk_err};
use crate::device::{Gpu, InjectedFailure};
use crate::error::{Result, VulkanError};
use svmirror_core::MirrorError;

/// A buffer with its own gpu-allocator allocation, usable as a storage buffer by device address
/// and as a copy source and destination. Freed on drop.
pub(crate) struct GpuBuffer {
    gpu: Arc<Gpu>,
    pub(crate) buffer: vk::Buffer,
    allocation: Option<Allocation>,
    /// The buffer's device address.
    pub(crate) addr: u64,
    /// Its size in bytes.
    pub(crate) size: u64,
    /// Where the host sees it, for host-visible locations ([`HostBuffer`] takes it).
    ptr: Option<HostPtr>,
}

/// The host mapping of a host-visible allocation.
#[derive(Clone, Copy)]
struct HostPtr(*mut u8);

// SAFETY: the mapping is process memory that stays valid until the allocation is freed (in
// `GpuBuffer::drop`, which takes `&mut self`); all access goes through volatile or copy
// operations on raw pointers, never references shared across threads.
unsafe impl Send for HostPtr {}
// SAFETY: as above.
unsafe impl Sync for HostPtr {}

impl GpuBuffer {
    /// Allocates `size` bytes at `location`.
    pub(crate) fn new(
        gpu: &Arc<Gpu>,
        size: u64,
        location: MemoryLocation,
        name: &str,
    ) -> Result<Self> {
        if size == 0 {
            return Err(VulkanError::Mirror(MirrorError::InvalidConfig {
                reason: "buffer size must not be zero",
            }));
        }
        if gpu.take_injected(InjectedFailure::OutOfDeviceMemory) {
            return Err(VulkanError::OutOfDeviceMemory { bytes: size });
        }
        let info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: a live device and a plain create info.
        let buffer =
            unsafe { gpu.device.create_buffer(&info, None) }.map_err(vk_err("vkCreateBuffer"))?;
        let mut me = GpuBuffer {
            gpu: gpu.clone(),
            buffer,
            allocation: None,
            addr: 0,
            size,
            ptr: None,
        };
        // SAFETY: `buffer` was just created from this device.
        let requirements = unsafe { gpu.device.get_buffer_memory_requirements(buffer) };
        let allocation = {
            let mut a = gpu.allocator();
            let a = a.as_mut().ok_or(VulkanError::DeviceLost)?;
            a.allocate(&AllocationCreateDesc {
                name,
                requirements,
                location,
                linear: true,
                allocation_scheme: AllocationScheme::GpuAllocatorManaged,
            })
            .map_err(alloc_err(size))?
        };
        gpu.allocator_allocations.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the allocation's memory handle is live while the allocation is.
        let memory = unsafe { allocation.memory() };
        let offset = allocation.offset();
        me.ptr = allocation.mapped_ptr().map(|p| HostPtr(p.as_ptr().cast()));
        me.allocation = Some(allocation);
        // SAFETY: the memory satisfies the buffer's requirements (gpu-allocator allocated it
        // from them) and the buffer is not bound yet.
        unsafe { gpu.device.bind_buffer_memory(buffer, memory, offset) }
            .map_err(vk_err("vkBindBufferMemory"))?;
        let ai = vk::BufferDeviceAddressInfo::default().buffer(buffer);
        // SAFETY: the buffer has SHADER_DEVICE_ADDRESS usage and bound memory allocated with
        // the device-address flag (gpu-allocator's `buffer_device_address`).
        me.addr = unsafe { gpu.device.get_buffer_device_address(&ai) };
        Ok(me)
    }
}

/// A [`GpuBuffer`] the host reads and writes through its host mapping (staging and readback
/// buffers, the GPU page table, fault records, scratch memory). Dereferences to the buffer.
pub(crate) struct HostBuffer {
    buf: GpuBuffer,
    ptr: HostPtr,
}

impl std::ops::Deref for HostBuffer {
    type Target = GpuBuffer;

    fn deref(&self) -> &GpuBuffer {
        &self.buf
    }
}

impl HostBuffer {
    /// Allocates `size` bytes at `location`, one the host sees (`CpuToGpu`, `GpuToCpu`:
    /// gpu-allocator maps those for the host).
    pub(crate) fn new(
        gpu: &Arc<Gpu>,
        size: u64,
        location: MemoryLocation,
        name: &str,
    ) -> Result<Self> {
        let buf = GpuBuffer::new(gpu, size, location, name)?;
        let ptr = buf.ptr.ok_or(VulkanError::NoHostMapping { bytes: size })?;
        Ok(HostBuffer { buf, ptr })
    }

    /// The host pointer of the buffer's first byte.
    pub(crate) fn host_ptr(&self) -> *mut u8 {
        self.ptr.0
    }

    /// Writes `v` at byte `offset` (volatile: the device reads it).
    pub(crate) fn write_u64(&self, offset: u64, v: u64) {
        let p = self.host_ptr();
        assert!(
            offset + 8 <= self.size && offset % 8 == 0,
            "write in bounds"
        );
        // SAFETY: in bounds and aligned (asserted); the mapping is live while `self` is.
        unsafe {
            p.wrapping_add(offset as usize)
                .cast::<u64>()
                .write_volatile(v)
        };
    }

    /// Reads the u64 at byte `offset`.
    pub(crate) fn read_u64(&self, offset: u64) -> u64 {
        let p = self.host_ptr();
        assert!(offset + 8 <= self.size && offset % 8 == 0, "read in bounds");
        // SAFETY: in bounds and aligned (asserted); the mapping is live while `self` is.
        unsafe {
            p.wrapping_add(offset as usize)
                .cast::<u64>()
                .read_volatile()
        }
    }

    /// Writes `v` at byte `offset`.
    pub(crate) fn write_u32(&self, offset: u64, v: u32) {
        let p = self.host_ptr();
        assert!(
            offset + 4 <= self.size && offset % 4 == 0,
            "write in bounds"
        );
        // SAFETY: in bounds and aligned (asserted); the mapping is live while `self` is.
        unsafe {
            p.wrapping_add(offset as usize)
                .cast::<u32>()
                .write_volatile(v)
        };
    }

    /// Reads the u32 at byte `offset`.
    pub(crate) fn read_u32(&self, offset: u64) -> u32 {
        let p = self.host_ptr();
        assert!(offset + 4 <= self.size && offset % 4 == 0, "read in bounds");
        // SAFETY: in bounds and aligned (asserted); the mapping is live while `self` is.
        unsafe {
            p.wrapping_add(offset as usize)
                .cast::<u32>()
                .read_volatile()
        }
    }

    /// Zeroes `len` bytes at `offset`.
    pub(crate) fn zero(&self, offset: u64, len: u64) {
        let p = self.host_ptr();
        assert!(offset + len <= self.size, "zero in bounds");
        // SAFETY: in bounds (asserted); the mapping is live while `self` is.
        unsafe { std::ptr::write_bytes(p.wrapping_add(offset as usize), 0, len as usize) };
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        // SAFETY: the owner guarantees no submitted work uses the buffer any more (it waited
        // for the fences of work that could).
        unsafe { self.gpu.device.destroy_buffer(self.buffer, None) };
        if let Some(a) = self.allocation.take() {
            if let Some(alloc) = self.gpu.allocator().as_mut() {
                if let Err(e) = alloc.free(a) {
                    tracing::error!(error = %e, "freeing a buffer's memory failed");
                }
            }
            self.gpu
                .allocator_allocations
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One command buffer and its fence. Drop waits for the fence (if submitted) and frees both.
pub(crate) struct Submission {
    gpu: Arc<Gpu>,
    pub(crate) cb: vk::CommandBuffer,
    pub(crate) fence: vk::Fence,
    submitted: bool,
}

impl Submission {
    /// A command buffer in the recording state.
    pub(crate) fn begin(gpu: &Arc<Gpu>) -> Result<Self> {
        if gpu.is_lost() {
            return Err(VulkanError::DeviceLost);
        }
        // SAFETY: a live device and a plain create info.
        let fence = unsafe {
            gpu.device
                .create_fence(&vk::FenceCreateInfo::default(), None)
        }
        .map_err(vk_err("vkCreateFence"))?;
        let cb = {
            let pool = gpu.pool();
            let ai = vk::CommandBufferAllocateInfo::default()
                .command_pool(*pool)
                .level(vk::CommandBufferLevel::PRIMARY)
                .command_buffer_count(1);
            // SAFETY: the pool is externally synchronised by its mutex, held here.
            match unsafe { gpu.device.allocate_command_buffers(&ai) } {
                Ok(v) => v[0],
                Err(e) => {
                    // SAFETY: the fence is unused.
                    unsafe { gpu.device.destroy_fence(fence, None) };
                    return Err(vk_err("vkAllocateCommandBuffers")(e));
                }
            }
        };
        let me = Submission {
            gpu: gpu.clone(),
            cb,
            fence,
            submitted: false,
        };
        let bi = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: a fresh command buffer; only this thread records it.
        unsafe { gpu.device.begin_command_buffer(cb, &bi) }
            .map_err(vk_err("vkBeginCommandBuffer"))?;
        // Writes of earlier submissions (a shader's, a copy's) become visible to this one's
        // shaders and copies: submission order alone orders execution, not memory.
        let barrier = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(
                vk::AccessFlags::SHADER_READ
                    | vk::AccessFlags::SHADER_WRITE
                    | vk::AccessFlags::TRANSFER_READ
                    | vk::AccessFlags::TRANSFER_WRITE,
            );
        // SAFETY: `cb` is recording on this thread.
        unsafe {
            gpu.device.cmd_pipeline_barrier(
                cb,
                vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &[barrier],
                &[],
                &[],
            )
        };
        Ok(me)
    }

    /// Ends recording with a barrier that makes shader and transfer writes visible to the host,
    /// and submits.
    pub(crate) fn submit(&mut self) -> Result<()> {
        let barrier = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ);
        // SAFETY: `cb` is recording on this thread.
        unsafe {
            self.gpu.device.cmd_pipeline_barrier(
                self.cb,
                vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &[barrier],
                &[],
                &[],
            )
        };
        // SAFETY: as above.
        unsafe { self.gpu.device.end_command_buffer(self.cb) }
            .map_err(vk_err("vkEndCommandBuffer"))?;
        if self.gpu.take_injected(InjectedFailure::DeviceLost) {
            self.gpu.mark_lost();
            return Err(VulkanError::DeviceLost);
        }
        let cbs = [self.cb];
        let si = [vk::SubmitInfo::default().command_buffers(&cbs)];
        let r = {
            let q = self.gpu.queue();
            // SAFETY: the queue is externally synchronised by its mutex, held here; the command
            // buffer is fully recorded and the fence unsignalled.
            unsafe { self.gpu.device.queue_submit(*q, &si, self.fence) }
        };
        self.gpu.check(r.map_err(vk_err("vkQueueSubmit")))?;
        self.submitted = true;
        Ok(())
    }

    /// Waits until the submitted work completes.
    pub(crate) fn wait(&self) -> Result<()> {
        wait_fences(&self.gpu, &[self.fence])
    }
}

/// Waits for `fences` without a time limit.
pub(crate) fn wait_fences(gpu: &Gpu, fences: &[vk::Fence]) -> Result<()> {
    if fences.is_empty() {
        return Ok(());
    }
    // SAFETY: the fences are live (their owners destroy them only after removing them from
    // wherever this caller found them); waiting needs no external synchronisation.
    let r = unsafe { gpu.device.wait_for_fences(fences, true, u64::MAX) };
    gpu.check(r.map_err(vk_err("vkWaitForFences")))
}

impl Drop for Submission {
    fn drop(&mut self) {
        if self.submitted {
            // Device loss signals nothing; then the wait returns DEVICE_LOST and the objects are
            // freed anyway (a lost device runs nothing).
            let _ = self.wait();
        }
        {
            let pool = self.gpu.pool();
            // SAFETY: the command buffer is not pending (waited above); the pool's mutex is held.
            unsafe { self.gpu.device.free_command_buffers(*pool, &[self.cb]) };
        }
        // SAFETY: the fence is not in use by a pending submission.
        unsafe { self.gpu.device.destroy_fence(self.fence, None) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::GpuConfig;

    #[test]
    fn synchronization_validation_reports_a_missing_barrier() {
        let gpu = Arc::new(Gpu::new(&GpuConfig::validated()).expect("a usable Vulkan device"));
        let v = gpu.validation();
        let a = GpuBuffer::new(&gpu, 4096, MemoryLocation::CpuToGpu, "a").unwrap();
        let b = GpuBuffer::new(&gpu, 4096, MemoryLocation::GpuOnly, "b").unwrap();
        let mut sub = Submission::begin(&gpu).unwrap();
        let region = [vk::BufferCopy::default().size(4096)];
        for _ in 0..2 {
            // SAFETY: recording on this thread; both buffers are live and a page long. The
            // second copy writes `b` again with no barrier between: a write-after-write hazard.
            unsafe {
                gpu.device
                    .cmd_copy_buffer(sub.cb, a.buffer, b.buffer, &region)
            };
        }
        sub.submit().unwrap();
        sub.wait().unwrap();
        drop(sub);
        assert!(v.errors() >= 1, "the hazard is reported");
        drop((a, b));
    }
}
