//! Helpers shared by the Vulkan integration tests: one `ProcessMm` per test binary, a validated
//! lavapipe (or GPU) device per test, and the end-of-test checks (no validation error, no
//! import or allocation left). The tests change this process's address space and share one
//! `ProcessMm`: each takes svmirror-testsupport's `serial()` first.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use svmirror_core::{PAGE_SIZE, Range};
use svmirror_mm::{ProcessMm, Protection};
use svmirror_testsupport::volatile;
use svmirror_vulkan::{Gpu, GpuConfig, MirrorConfig, ValidationCounts, VulkanMirror};

pub const PAGE: u64 = PAGE_SIZE;

/// The process's one `ProcessMm` (userfaultfd monitor), shared by every test of the binary.
pub fn mm() -> Arc<ProcessMm> {
    static MM: OnceLock<Arc<ProcessMm>> = OnceLock::new();
    MM.get_or_init(|| {
        Arc::new(ProcessMm::new().expect("userfaultfd available (run the suite as root)"))
    })
    .clone()
}

/// One test's device and mirror, checked on `finish`.
pub struct Rig {
    pub mm: Arc<ProcessMm>,
    pub gpu: Arc<Gpu>,
    pub mirror: Option<VulkanMirror>,
    validation: ValidationCounts,
}

impl Rig {
    pub fn new() -> Rig {
        Rig::with(MirrorConfig::default())
    }

    pub fn with(config: MirrorConfig) -> Rig {
        let gpu = Gpu::new(&GpuConfig::validated()).unwrap_or_else(|e| {
            panic!(
                "no usable Vulkan device with the validation layer (apt-get install \
                 mesa-vulkan-drivers libvulkan1 vulkan-validationlayers): {e}"
            )
        });
        assert!(gpu.validation_enabled(), "the validation layer must be on");
        let validation = gpu.validation();
        let gpu = Arc::new(gpu);
        let mm = mm();
        let range = Range::new(PAGE, 1 << 47).unwrap();
        let mirror = VulkanMirror::new(gpu.clone(), mm.clone(), range, config).unwrap();
        Rig {
            mm,
            gpu,
            mirror: Some(mirror),
            validation,
        }
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn mirror(&self) -> &VulkanMirror {
        self.mirror.as_ref().unwrap()
    }

    /// Drops the mirror, checks nothing is left, drops the device, checks validation.
    pub fn finish(mut self) {
        let m = self.mirror.take().unwrap();
        drop(m);
        assert_eq!(
            self.gpu.live_allocations().0,
            0,
            "host imports left after the mirror went"
        );
        assert_eq!(
            self.gpu.live_allocations().1,
            0,
            "gpu-allocator allocations left after the mirror went"
        );
        let validation = self.validation.clone();
        let gpu = Arc::try_unwrap(self.gpu).expect("the test holds the last Gpu");
        drop(gpu);
        assert_eq!(validation.errors(), 0, "Vulkan validation errors");
    }
}

/// Private anonymous memory from the SVM API's allocation helper, touched by raw pointers.
pub fn anon(mm: &ProcessMm, pages: u64) -> Range {
    mm.mmap_anonymous(pages * PAGE, Protection::READ_WRITE)
        .unwrap()
}

pub fn write_f32s(addr: u64, vals: impl IntoIterator<Item = f32>) {
    for (i, v) in (0..).zip(vals) {
        // SAFETY: the tests pass addresses of mapped memory large enough for the values.
        unsafe { volatile::write(addr + 4 * i, v) };
    }
}

pub fn read_f32(addr: u64, i: usize) -> f32 {
    // SAFETY: as above.
    unsafe { volatile::read(addr + 4 * i as u64) }
}

/// Unmaps `ranges` through the SVM API. The tests touch their buffers by raw pointer only, so
/// no Rust reference into them exists.
pub fn unmap(mm: &ProcessMm, ranges: &[Range]) {
    for &r in ranges {
        // SAFETY: see above.
        unsafe { mm.munmap(r) }.unwrap();
    }
}
