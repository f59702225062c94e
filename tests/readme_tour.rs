//! The README's quick tour of the library API, run as written: if this test needs a change, so
//! does the README.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use svmirror::core::Range;
use svmirror::iommu::{DeviceKernel, IommuMirror, MirrorConfig};
use svmirror::mm::{ProcessMm, settled_vm_pinned_bytes, vm_pinned_bytes};

#[test]
fn readme_quick_tour() -> Result<(), Box<dyn Error>> {
    let pinned = vm_pinned_bytes()?;
    // --- README: quick tour, begin ---
    // The CPU side: a userfaultfd monitor that turns munmap, madvise and mremap into
    // invalidations, and the process's page table as the fault loop's source.
    let mm = Arc::new(ProcessMm::new()?);
    // A device mirroring the whole user address space (IOVA = the CPU's virtual address).
    let user = Range::new(0x1000, 1 << 47)?;
    // SAFETY: while the device may write memory, the CPU touches it only through raw pointers.
    let dev = unsafe { IommuMirror::new(mm.clone(), user, MirrorConfig::default())? };

    // Ordinary Rust data built by the CPU: a Vec of pointers to boxed values.
    let values: Vec<Box<u64>> = (1..=1000).map(Box::new).collect();
    let table: Vec<*const u64> = values.iter().map(|b| &**b as *const u64).collect();

    // A device kernel: every load goes through the IOMMU at the CPU's own addresses, and each
    // page it has no translation for is faulted in through the core (a page request).
    let run = DeviceKernel::new(&dev).run(|k| {
        let mut sum = 0;
        for i in 0..table.len() as u64 {
            let p = k.load_u64(table.as_ptr() as u64 + 8 * i)?;
            sum += k.load_u64(p)?;
        }
        Ok(sum)
    })?;
    assert_eq!(run.value, 500_500);
    println!(
        "{} page requests, {:?}",
        run.stats.page_requests,
        dev.counters()
    );
    // --- README: quick tour, end ---
    assert!(run.stats.page_requests >= 1);
    assert!(dev.counters().total_faults() >= 1);
    drop(dev);
    assert_eq!(
        settled_vm_pinned_bytes(pinned, Duration::from_secs(2))?,
        pinned,
        "no pin outlives the mirror"
    );
    Ok(())
}
