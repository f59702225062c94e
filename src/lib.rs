//! svmirror: userspace shared virtual memory.
//!
//! A device works directly on a process's ordinary memory, at the process's own virtual
//! addresses, while the process keeps mapping, unmapping, protecting and freeing it; svmirror keeps
//! the device's page table an exact mirror of the CPU's. This facade re-exports the crates that
//! make it up:
//!
//! - [`core`]: the shared invalidation core (interval notifier, seq/retry protocol,
//!   `range_fault`, the counters every mirror keeps).
//! - [`mm`]: the CPU side: the process's page table as a `PageSource`, and `ProcessMm`, a
//!   userfaultfd monitor with the SVM API (munmap, mprotect, madvise, mremap that devices see
//!   before they happen).
//! - [`iommu`]: the simulated IOMMU, the embedded default backend.
//! - [`vfio`]: the VFIO backend (a real device behind an IOMMU, through rust-vmm's
//!   `vfio-ioctls`).
//! - [`edu`]: the VFIO backend's test device, a driver for QEMU's `edu` DMA device (the device
//!   of the app's VFIO backend).
//! - [`vulkan`]: the Vulkan backend (a GPU page table walked by compute shaders).
//!
//! and adds [`app`], the example SVM compute app that the `svmirror` command runs: a device
//! chasing pointers through `Vec`s the CPU built, streaming over large vectors, and working
//! while another thread frees, reallocates, unmaps and protects its data, every result checked
//! against a CPU reference.
//!
//! A device kernel on an ordinary `Vec`, by pointer, on the simulated IOMMU:
//!
//! ```no_run
//! use svmirror::app::{self, sim::SimBackend};
//! use svmirror::iommu::DeviceKernel;
//!
//! let mm = app::open_mm()?;                 // the userfaultfd monitor and the SVM API
//! let sim = SimBackend::open(mm.clone())?;  // a device mirroring the whole address space
//! let x: Vec<f32> = (0..4096).map(|i| i as f32).collect();
//! let mut y = vec![1.0f32; 4096];
//! let (xp, yp) = (x.as_ptr() as u64, y.as_mut_ptr() as u64);
//! DeviceKernel::new(sim.mirror()).run(|k| {
//!     let xs = k.load_f32s(xp, 4096)?;      // every load and store goes through the IOMMU
//!     let ys: Vec<f32> = k.load_f32s(yp, 4096)?.iter().zip(&xs).map(|(y, x)| 2.0 * x + y).collect();
//!     k.store_f32s(yp, &ys)
//! })
//! .expect("the device ran");
//! // SAFETY: in bounds; `y` was written by the device, so it is read through its pointer.
//! assert_eq!(unsafe { y.as_ptr().wrapping_add(10).read_volatile() }, 21.0);
//! let c = sim.mirror().counters();
//! println!("{} faults, median {:?}", c.total_faults(), c.fault_latency.median());
//! # Ok::<(), svmirror::app::AppError>(())
//! ```
//!
//! The whole app, as `svmirror run` runs it:
//!
//! ```no_run
//! use svmirror::app::{self, AppConfig, AppKind, BackendKind, report::NoProgress};
//!
//! let mm = app::open_mm()?;                               // the userfaultfd monitor
//! let backend = app::open_backend(BackendKind::Sim, &mm)?; // a device mirroring this process
//! let config = AppConfig { nodes: 1000, saxpy_bytes: 1 << 20, ..AppConfig::default() };
//! let report = app::run_apps(&*backend, &mm, AppKind::All.expand(), &config, &NoProgress)?;
//! assert_eq!(report.mismatches, 0);
//! print!("{}", report.render());
//! # Ok::<(), svmirror::app::AppError>(())
//! ```

pub mod app;

pub use svmirror_core as core;
pub use svmirror_edu as edu;
pub use svmirror_iommu as iommu;
pub use svmirror_mm as mm;
pub use svmirror_vfio as vfio;
pub use svmirror_vulkan as vulkan;
