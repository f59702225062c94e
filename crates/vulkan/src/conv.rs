//! Translation of Vulkan and gpu-allocator results into [`VulkanError`] at the boundary.

use ash::vk;

use crate::error::VulkanError;

/// The error for a failed Vulkan call `call`: exhaustion and device loss get their own variants,
/// whatever the call.
pub(crate) fn vk_err(call: &'static str) -> impl Fn(vk::Result) -> VulkanError {
    move |r| match r {
        vk::Result::ERROR_DEVICE_LOST => VulkanError::DeviceLost,
        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY => VulkanError::OutOfDeviceMemory { bytes: 0 },
        vk::Result::ERROR_OUT_OF_HOST_MEMORY => VulkanError::OutOfHostMemory,
        source => VulkanError::Vk { call, source },
    }
}

/// The error for a failed gpu-allocator allocation of `bytes`.
pub(crate) fn alloc_err(bytes: u64) -> impl Fn(gpu_allocator::AllocationError) -> VulkanError {
    move |e| match e {
        gpu_allocator::AllocationError::OutOfMemory => VulkanError::OutOfDeviceMemory { bytes },
        source => VulkanError::Allocator { source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_loss_and_exhaustion_have_their_own_variants() {
        let f = vk_err("vkQueueSubmit");
        assert!(matches!(
            f(vk::Result::ERROR_DEVICE_LOST),
            VulkanError::DeviceLost
        ));
        assert!(matches!(
            f(vk::Result::ERROR_OUT_OF_DEVICE_MEMORY),
            VulkanError::OutOfDeviceMemory { .. }
        ));
        assert!(matches!(
            f(vk::Result::ERROR_INITIALIZATION_FAILED),
            VulkanError::Vk {
                call: "vkQueueSubmit",
                ..
            }
        ));
        assert!(matches!(
            alloc_err(4096)(gpu_allocator::AllocationError::OutOfMemory),
            VulkanError::OutOfDeviceMemory { bytes: 4096 }
        ));
    }
}
