//! svmirror-vulkan: a Vulkan compute shader works on the process's ordinary memory by CPU
//! pointer.
//!
//! A [`VulkanMirror`] keeps a GPU page table (a storage buffer) that maps the CPU pages of a
//! range of the process's address space to device addresses, and keeps it an exact mirror of
//! the CPU's through the shared core: it subscribes to the [`AddressSpace`]'s notifier (svmirror-mm's
//! `ProcessMm` is the real process's), fills the
//! table through the core's fault loop
//! ([`fault_prepare_and_program`](svmirror_core::fault_prepare_and_program)) and clears it
//! through the core's invalidation skeleton after waiting for the GPU.
//!
//! - **Memory** reaches the GPU as host-memory imports (`VK_EXT_external_memory_host`), in
//!   chunks of 2 MiB, 64 KiB or 4 KiB ([`import`](crate::MirrorConfig::chunk_sizes)), or as
//!   device-local pages after [`VulkanMirror::migrate_to_device`].
//! - **Shaders** include `shaders/svm.glsl`, whose `svm_translate(ptr, write)` turns a CPU
//!   pointer into a device address or records a miss; [`VulkanMirror::dispatch`] resolves the
//!   misses and replays the work items that faulted.
//! - **Devices**: [`Gpu`] prefers a discrete GPU, falls back to lavapipe, takes an override
//!   (`SVMIRROR_VK_DEVICE`), and says what is missing when a device cannot do this.
//!
//! # What is the caller's job
//!
//! - Keep Rust references off memory a kernel writes while it runs (dispatch is `unsafe` for
//!   this reason), and do not write a range while it migrates.
//! - Change mappings through the SVM API (`ProcessMm::munmap`, `mprotect`, ...) for changes
//!   to be coherent before the call returns; changes behind svmirror's back become coherent
//!   when the userfaultfd monitor reads their event. With lavapipe, which reads host memory
//!   without pinning it, do not unmap memory behind svmirror's back while a dispatch runs.
//!
//! ```
//! use std::sync::Arc;
//! use svmirror_mm::ProcessMm;
//! use svmirror_vulkan::{Dispatch, Kernel, VulkanMirror};
//!
//! // One per process: the userfaultfd monitor and the notifier every backend subscribes to.
//! let mm = Arc::new(ProcessMm::new()?);
//! // The best device, mirroring the whole user address space.
//! let mirror = VulkanMirror::open(mm)?;
//!
//! let x = vec![1.0f32; 1 << 20];
//! let mut y = vec![2.0f32; 1 << 20];
//! // y = 3 x + y on the GPU, in place, through the page table (safe: the borrows settle it).
//! let stats = mirror.saxpy(3.0, &x, &mut y)?;
//! assert_eq!(y[0], 5.0);
//! println!("{} passes, {} pages faulted", stats.passes, stats.pages_resolved);
//!
//! // Any kernel by CPU pointers: the caller vouches for what it touches.
//! let d = Dispatch::new(
//!     Kernel::Stream,
//!     x.len() as u32,
//!     &[x.as_ptr() as u64, y.as_mut_ptr() as u64, 1.0f32.to_bits() as u64],
//! )?;
//! // SAFETY: `x` and `y` hold `items` floats and nothing else touches them meanwhile.
//! unsafe { mirror.dispatch(&d) }?;
//! assert_eq!(y[0], 6.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg(target_os = "linux")]
// Library code reports what can fail as an error value (STYLE.md rule 4); an unwrap or expect
// that stays names its invariant in an `#[expect(.., reason = "..")]` on the smallest item.
// Unit tests (cfg(test)) and the integration tests in tests/, crates of their own, may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod conv;
pub mod cuda;
pub mod device;
pub mod dispatch;
mod error;
pub mod import;
pub mod kernels;
mod memory;
pub mod migrate;
pub mod mirror;
pub mod page_table;
pub mod scratch;
mod state;

pub use device::{
    DEVICE_ENV, DeviceInfo, Gpu, GpuConfig, InjectedFailure, VALIDATION_ENV, ValidationCounts,
};
pub use dispatch::{DeviceArray, DispatchStats, StagedChase, StagedStream};
pub use error::{Result, VulkanError};
pub use import::DEFAULT_CHUNK_SIZES;
pub use kernels::{BfsNode, ChaseNode, Dispatch, FrontierCounters, GraphNode, Kernel, SlotStatus};
pub use mirror::{MirrorConfig, Resources, VulkanMirror};
pub use scratch::ScratchBuffer;
#[doc(no_inline)]
pub use svmirror_core::AddressSpace;
