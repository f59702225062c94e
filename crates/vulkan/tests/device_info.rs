//! Prints the device, driver and limits the suite runs on, and checks that it is usable.
use svmirror_vulkan::{Gpu, GpuConfig};

#[test]
fn device_info() {
    let gpu = Gpu::new(&GpuConfig::validated()).unwrap_or_else(|e| {
        panic!("no usable Vulkan device (lavapipe: apt-get install mesa-vulkan-drivers): {e}")
    });
    let i = gpu.info();
    println!("devices: {:?}", i.all_devices);
    println!(
        "device: {} ({}), driver: {} {}, Vulkan {}",
        i.name, i.kind, i.driver, i.driver_info, i.api_version
    );
    println!(
        "import alignment: {:#x}, max allocations: {}, max allocation size: {:#x}",
        i.import_alignment, i.max_allocations, i.max_allocation_size
    );
    assert!(i.import_alignment.is_power_of_two());
    drop(gpu);
}

#[test]
fn the_validation_error_count_is_live() {
    let gpu = Gpu::new(&GpuConfig::validated()).expect("a usable Vulkan device");
    assert!(gpu.validation_enabled());
    let v = gpu.validation();
    assert_eq!(v.errors(), 0);
    gpu.provoke_validation_error();
    assert!(v.errors() >= 1, "the layer's errors reach the count");
}
