//! One scenario suite (`svmirror_mm::scenarios`), written once against the core's `Mirror`
//! contract, run on every backend this machine has: the simulated IOMMU, and Vulkan on Mesa's
//! lavapipe (installed by `cargo xtask ci`; missing, the test fails, it does not skip). VFIO
//! runs the same suite inside the `cargo xtask vfio-vm` guest. One backend at a time
//! ([`serial`]): each opens the process's userfaultfd monitor, and the scenarios use fixed
//! addresses.

use std::sync::Arc;

use svmirror::core::{Mirror, MirrorError, Range};
use svmirror::iommu::{IommuMirror, MirrorConfig};
use svmirror::mm::{ProcessMm, VM_PIN_SETTLE, scenarios, settled_vm_pinned_bytes, vm_pinned_bytes};
use svmirror::vulkan::{Gpu, GpuConfig, VulkanMirror};
use svmirror_testsupport::serial;

/// Runs the suite, prints the list of scenarios it ran, fails naming every scenario that
/// failed, and checks that no pin outlived the mirrors.
fn run(backend: &str, mm: &Arc<ProcessMm>, open: &scenarios::Open<'_>) {
    let pinned = vm_pinned_bytes().unwrap();
    let report = scenarios::run_all(backend, mm, open, &[]);
    println!("{report}");
    assert_eq!(report.results.len(), scenarios::all().len());
    assert!(
        report.passed(),
        "{backend}: scenarios failed:\n{}",
        report.failures().join("\n")
    );
    assert_eq!(
        settled_vm_pinned_bytes(pinned, VM_PIN_SETTLE).unwrap(),
        pinned,
        "{backend}: pins outlived the mirrors"
    );
}

#[test]
fn the_simulated_iommu_passes_the_backend_scenarios() {
    let _s = serial();
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let open = |mm: &Arc<ProcessMm>, range: Range| -> Result<Box<dyn Mirror>, MirrorError> {
        // SAFETY: the scenarios touch their buffers through raw pointers only.
        let m = unsafe { IommuMirror::new(mm.clone(), range, MirrorConfig::checked()) }?;
        Ok(Box::new(m))
    };
    run("iommu", &mm, &open);
}

#[test]
fn vulkan_passes_the_backend_scenarios() {
    let _s = serial();
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let gpu = Arc::new(Gpu::new(&GpuConfig::validated()).unwrap_or_else(|e| {
        panic!(
            "no usable Vulkan device with the validation layer (apt-get install \
             mesa-vulkan-drivers libvulkan1 vulkan-validationlayers): {e}"
        )
    }));
    let validation = gpu.validation();
    let open = |mm: &Arc<ProcessMm>, range: Range| -> Result<Box<dyn Mirror>, MirrorError> {
        let m = VulkanMirror::new(
            gpu.clone(),
            mm.clone(),
            range,
            svmirror::vulkan::MirrorConfig::default(),
        )?;
        Ok(Box::new(m))
    };
    run("vulkan", &mm, &open);
    assert_eq!(validation.errors(), 0, "Vulkan validation errors");
}
