//! Host memory imported with `VK_EXT_external_memory_host`, in chunks.
//!
//! # Chunk choice (as the DRM GPU SVM layer sizes its ranges)
//!
//! A fault at a page imports the chunk around it: the largest of the configured sizes (2 MiB,
//! 64 KiB, 4 KiB by default) whose naturally aligned extent holds the page, lies inside the
//! mapping (VMA) and the mirrored range, overlaps no chunk already imported nor a page living in
//! device memory, and is a multiple of the driver's `minImportedHostPointerAlignment`. Chunks are
//! never split: an invalidation of any part of one drops all of it, and the next fault imports
//! again.
//!
//! # Pins
//!
//! A real driver pins the pages of an import (get_user_pages) until the memory is freed, so a
//! page the CPU unmaps behind svmirror's back stays allocated while the GPU can reach it
//! (DESIGN.md invariant 2). lavapipe does not pin: it reads the process's memory directly, so
//! with lavapipe a range must not be unmapped behind svmirror's back while a dispatch runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ash::vk;
use svmirror_core::{Range, might_fault};

use crate::conv::vk_err;
use crate::device::{Gpu, InjectedFailure};
use crate::error::{Result, VulkanError};

/// The default chunk sizes, largest first.
pub const DEFAULT_CHUNK_SIZES: [u64; 3] = [2 << 20, 64 << 10, 4 << 10];

/// Device memory objects kept free for gpu-allocator's blocks when budgeting imports.
const ALLOCATOR_RESERVE: u32 = 64;

/// The chunk to import for a fault at `page`: see the [module documentation](self).
/// `allowed` is the stretch the chunk must lie in (the VMA clipped to the mirrored range);
/// `occupied` says whether a candidate overlaps something already there.
pub(crate) fn choose_chunk(
    page: u64,
    allowed: Range,
    sizes: &[u64],
    alignment: u64,
    occupied: impl Fn(Range) -> bool,
) -> Option<Range> {
    sizes
        .iter()
        .filter(|&&s| s.is_power_of_two() && s >= alignment)
        .filter_map(|&s| Range::with_len(page & !(s - 1), s).ok())
        .find(|r| r.start() >= allowed.start() && r.end() <= allowed.end() && !occupied(*r))
}

/// One imported chunk: the memory object and a buffer over it. Freed on drop.
pub(crate) struct Import {
    gpu: Arc<Gpu>,
    pub(crate) range: Range,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    /// Device address of the chunk's first byte.
    pub(crate) addr: u64,
}

impl std::fmt::Debug for Import {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Import")
            .field("range", &self.range)
            .field("addr", &format_args!("{:#x}", self.addr))
            .finish()
    }
}

impl Import {
    /// Imports the host memory of `range`.
    ///
    /// # Safety
    ///
    /// `range` must be mapped, readable memory of this process. The device may read and write
    /// it until the import is dropped; the caller keeps Rust references off memory the device
    /// writes (STYLE.md rule 6).
    pub(crate) unsafe fn new(gpu: &Arc<Gpu>, range: Range) -> Result<Self> {
        let refused = |source| VulkanError::ImportRefused { range, source };
        let align = gpu.info.import_alignment.max(1);
        if range.start() % align != 0 || range.len() % align != 0 {
            return Err(VulkanError::NoChunk {
                addr: range.start(),
                alignment: align,
            });
        }
        if range.len() > gpu.info.max_allocation_size {
            return Err(refused(vk::Result::ERROR_OUT_OF_DEVICE_MEMORY));
        }
        let count = gpu.direct_allocations.load(Ordering::Relaxed)
            + gpu.allocator_allocations.load(Ordering::Relaxed);
        let limit = gpu.info.max_allocations.saturating_sub(ALLOCATOR_RESERVE);
        if count >= limit {
            return Err(VulkanError::TooManyAllocations { count, limit });
        }
        if gpu.take_injected(InjectedFailure::ImportRefused) {
            return Err(refused(vk::Result::ERROR_INVALID_EXTERNAL_HANDLE));
        }
        if gpu.take_injected(InjectedFailure::OutOfDeviceMemory) {
            return Err(VulkanError::OutOfDeviceMemory { bytes: range.len() });
        }
        // The driver pins the pages (GUP) on import: never under a lock an invalidation takes.
        might_fault("Import::new (VK_EXT_external_memory_host import)");
        let ptr = range.start() as usize as *mut std::ffi::c_void;
        let handle_type = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let mut host_props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: `ptr` is a host pointer aligned to the import alignment (checked) and mapped
        // (the caller's contract); the out struct is a local.
        let r = unsafe {
            (gpu.emh.fp().get_memory_host_pointer_properties_ext)(
                gpu.device.handle(),
                handle_type,
                ptr,
                &mut host_props,
            )
        };
        if r != vk::Result::SUCCESS {
            return Err(refused(r));
        }
        let mut ext = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle_type);
        let bi = vk::BufferCreateInfo::default()
            .size(range.len())
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut ext);
        // SAFETY: a live device and a create info whose chain points at locals.
        let buffer =
            unsafe { gpu.device.create_buffer(&bi, None) }.map_err(vk_err("vkCreateBuffer"))?;
        let destroy_buffer = |gpu: &Gpu| {
            // SAFETY: the buffer is unbound or bound to memory freed after it; nothing uses it.
            unsafe { gpu.device.destroy_buffer(buffer, None) }
        };
        // SAFETY: `buffer` was just created from this device.
        let req = unsafe { gpu.device.get_buffer_memory_requirements(buffer) };
        let bits = req.memory_type_bits & host_props.memory_type_bits;
        let mem_type = gpu.memory_type(
            bits,
            vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT,
        );
        let Some(mem_type) = mem_type.filter(|_| req.size <= range.len()) else {
            destroy_buffer(gpu);
            return Err(refused(vk::Result::ERROR_INVALID_EXTERNAL_HANDLE));
        };
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(handle_type)
            .host_pointer(ptr);
        let mut flags =
            vk::MemoryAllocateFlagsInfo::default().flags(vk::MemoryAllocateFlags::DEVICE_ADDRESS);
        let ai = vk::MemoryAllocateInfo::default()
            .allocation_size(range.len())
            .memory_type_index(mem_type)
            .push_next(&mut import)
            .push_next(&mut flags);
        // SAFETY: the chain points at locals; the host pointer is aligned, its size a multiple
        // of the alignment, and it stays mapped while imported (the caller's contract).
        let memory = match unsafe { gpu.device.allocate_memory(&ai, None) } {
            Ok(m) => m,
            Err(e) => {
                destroy_buffer(gpu);
                return Err(match e {
                    vk::Result::ERROR_OUT_OF_DEVICE_MEMORY => {
                        VulkanError::OutOfDeviceMemory { bytes: range.len() }
                    }
                    vk::Result::ERROR_OUT_OF_HOST_MEMORY => VulkanError::OutOfHostMemory,
                    e => refused(e),
                });
            }
        };
        gpu.direct_allocations.fetch_add(1, Ordering::Relaxed);
        let mut me = Import {
            gpu: gpu.clone(),
            range,
            buffer,
            memory,
            addr: 0,
        };
        // SAFETY: `memory` was allocated for this buffer's requirements (type and size checked).
        unsafe { gpu.device.bind_buffer_memory(buffer, memory, 0) }
            .map_err(vk_err("vkBindBufferMemory"))?;
        let info = vk::BufferDeviceAddressInfo::default().buffer(buffer);
        // SAFETY: the buffer has SHADER_DEVICE_ADDRESS usage and memory allocated with the
        // DEVICE_ADDRESS flag.
        me.addr = unsafe { gpu.device.get_buffer_device_address(&info) };
        Ok(me)
    }
}

impl Drop for Import {
    fn drop(&mut self) {
        // SAFETY: the owner waited for every submission that could use this import.
        unsafe { self.gpu.device.destroy_buffer(self.buffer, None) };
        // SAFETY: as above; the buffer bound to it is destroyed.
        unsafe { self.gpu.device.free_memory(self.memory, None) };
        self.gpu.direct_allocations.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;
    const M: u64 = 1024 * 1024;

    fn r(s: u64, e: u64) -> Range {
        Range::new(s, e).unwrap()
    }

    #[test]
    fn largest_chunk_that_fits_the_mapping_wins() {
        let vma = r(0x4000_0000, 0x4000_0000 + 4 * M);
        let c = choose_chunk(0x4012_3000, vma, &DEFAULT_CHUNK_SIZES, 4 * K, |_| false);
        assert_eq!(c, Some(r(0x4000_0000, 0x4020_0000)));
    }

    #[test]
    fn a_mapping_smaller_than_2_mib_gets_64_kib_or_4_kib_chunks() {
        let vma = r(0x4001_0000, 0x4003_3000);
        let c = choose_chunk(0x4001_2000, vma, &DEFAULT_CHUNK_SIZES, 4 * K, |_| false);
        assert_eq!(c, Some(r(0x4001_0000, 0x4002_0000)));
        // The tail past the last 64 KiB boundary only fits 4 KiB chunks.
        let c = choose_chunk(0x4003_1000, vma, &DEFAULT_CHUNK_SIZES, 4 * K, |_| false);
        assert_eq!(c, Some(r(0x4003_1000, 0x4003_2000)));
    }

    #[test]
    fn chunks_never_overlap_existing_ones() {
        let vma = r(0x4000_0000, 0x4020_0000);
        let existing = r(0x4000_0000, 0x4000_1000);
        let c = choose_chunk(0x4000_5000, vma, &DEFAULT_CHUNK_SIZES, 4 * K, |c| {
            c.start() < existing.end() && existing.start() < c.end()
        });
        assert_eq!(c, Some(r(0x4000_5000, 0x4000_6000)));
    }

    #[test]
    fn import_alignment_rules_out_smaller_chunks() {
        let vma = r(0x4001_0000, 0x4003_3000);
        let c = choose_chunk(0x4003_1000, vma, &DEFAULT_CHUNK_SIZES, 64 * K, |_| false);
        assert_eq!(c, None);
    }
}
