//! Bad input and driver failures give typed errors and leave no imported memory or allocation
//! behind. Driver failures lavapipe never produces on its own (a refused import, device
//! memory exhaustion, a lost device) are injected at the driver boundary with
//! `Gpu::inject_failure`; the backend's own error mapping and clean-up run as they would.

mod common;

use common::*;
use svmirror_core::MirrorError;
use svmirror_testsupport::serial;
use svmirror_vulkan::{
    Dispatch, Gpu, GpuConfig, InjectedFailure, Kernel, MirrorConfig, VulkanError, VulkanMirror,
};

fn saxpy(x: u64, y: u64, n: u32) -> Dispatch {
    Dispatch::new(Kernel::Stream, n, &[x, y, u64::from(1.0f32.to_bits())]).unwrap()
}

#[test]
fn bad_ranges_are_typed_errors() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let buf = anon(&rig.mm, 2);
    assert!(matches!(
        m.prefetch(buf.start(), 0, false),
        Err(VulkanError::Mirror(MirrorError::InvalidRange {
            len: 0,
            ..
        }))
    ));
    assert!(matches!(
        m.prefetch(u64::MAX - 10, 100, false),
        Err(VulkanError::Mirror(MirrorError::InvalidRange { .. }))
            | Err(VulkanError::Mirror(MirrorError::OutsideMirror { .. }))
    ));
    assert!(matches!(
        m.prefetch(0, PAGE, false),
        Err(VulkanError::Mirror(MirrorError::OutsideMirror {
            addr: 0,
            ..
        }))
    ));
    assert!(matches!(
        m.prefetch(1 << 50, PAGE, false),
        Err(VulkanError::Mirror(MirrorError::OutsideMirror { .. }))
    ));
    assert!(matches!(
        m.migrate_to_device(buf.start(), 0),
        Err(VulkanError::Mirror(MirrorError::InvalidRange { .. }))
    ));
    assert!(matches!(
        Dispatch::new(Kernel::Stream, 1, &[0; 10]),
        Err(VulkanError::InvalidDispatch { .. })
    ));
    // SAFETY: zero items: refused before anything runs.
    let r = unsafe { m.dispatch(&saxpy(buf.start(), buf.start(), 0)) };
    assert!(matches!(r, Err(VulkanError::InvalidDispatch { .. })));
    // A PROT_NONE page (a hole that no other thread's mmap can fill meanwhile): a fault there
    // is EFAULT, typed.
    let hole = rig
        .mm
        .mmap_anonymous(PAGE, svmirror_mm::Protection::NONE)
        .unwrap();
    assert!(matches!(
        m.prefetch(hole.start(), PAGE, false),
        Err(VulkanError::Fault {
            source: svmirror_core::Error::BadAddress { .. },
            ..
        })
    ));
    // SAFETY: the kernel reads `hole` (inaccessible: the fault fails closed) and writes `buf`.
    let r = unsafe { m.dispatch(&saxpy(hole.start(), buf.start(), 16)) };
    assert!(matches!(r, Err(VulkanError::Fault { .. })), "{r:?}");
    // A read-only mapping refuses writes with EPERM, typed.
    let ro = rig
        .mm
        .mmap_anonymous(PAGE, svmirror_mm::Protection::READ)
        .unwrap();
    assert!(matches!(
        m.prefetch(ro.start(), PAGE, true),
        Err(VulkanError::Fault {
            source: svmirror_core::Error::WriteToReadOnly { .. },
            ..
        })
    ));
    unmap(&rig.mm, &[buf, ro, hole]);
    assert_eq!(m.resources().imports, 0);
    rig.finish();
}

#[test]
fn bad_configurations_are_refused() {
    let _s = serial();
    let gpu = std::sync::Arc::new(Gpu::new(&GpuConfig::validated()).unwrap());
    let range = svmirror_core::Range::new(PAGE, 1 << 47).unwrap();
    for config in [
        MirrorConfig {
            chunk_sizes: vec![],
            ..MirrorConfig::default()
        },
        MirrorConfig {
            chunk_sizes: vec![3 * PAGE],
            ..MirrorConfig::default()
        },
        MirrorConfig {
            chunk_sizes: vec![4 << 20],
            ..MirrorConfig::default()
        },
        MirrorConfig {
            fault_capacity: 0,
            ..MirrorConfig::default()
        },
        MirrorConfig {
            page_table_leaves: 0,
            ..MirrorConfig::default()
        },
    ] {
        let r = VulkanMirror::new(gpu.clone(), mm(), range, config.clone());
        assert!(
            matches!(
                r,
                Err(VulkanError::Mirror(MirrorError::InvalidConfig { .. }))
            ),
            "{config:?}"
        );
    }
    assert_eq!(gpu.live_allocations(), (0, 0));
    // A device override that matches nothing names what exists.
    let r = Gpu::new(&GpuConfig {
        device: Some("no such device".into()),
        validation: false,
    });
    assert!(matches!(r, Err(VulkanError::NoMatchingDevice { .. })));
}

#[test]
fn a_refused_import_fails_closed() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let buf = anon(&rig.mm, 4);
    rig.gpu.inject_failure(InjectedFailure::ImportRefused);
    let r = m.prefetch(buf.start(), buf.len(), true);
    assert!(matches!(r, Err(VulkanError::ImportRefused { .. })), "{r:?}");
    assert_eq!(m.resources().imports, 0);
    assert_eq!(m.resources().mapped_pages, 0);
    assert_eq!(rig.gpu.live_allocations().0, 0, "no import left");
    // The next attempt works.
    m.prefetch(buf.start(), buf.len(), true).unwrap();
    assert!(m.resources().imports > 0);
    // SAFETY: nothing refers into `buf`.
    unsafe { rig.mm.munmap(buf) }.unwrap();
    rig.finish();
}

#[test]
fn out_of_device_memory_on_import_and_on_migration_fails_closed() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let buf = anon(&rig.mm, 4);
    write_f32s(buf.start(), (0..4096).map(|i| i as f32));
    rig.gpu.inject_failure(InjectedFailure::OutOfDeviceMemory);
    let r = m.prefetch(buf.start(), buf.len(), true);
    assert!(
        matches!(r, Err(VulkanError::OutOfDeviceMemory { .. })),
        "{r:?}"
    );
    assert_eq!(m.resources().imports, 0);
    // Migration whose device allocation fails: the pages stay safe in host memory and come
    // back intact; nothing stays allocated.
    let allocs = rig.gpu.live_allocations().1;
    rig.gpu.inject_failure(InjectedFailure::OutOfDeviceMemory);
    let r = m.migrate_to_device(buf.start(), buf.len());
    assert!(
        matches!(r, Err(VulkanError::OutOfDeviceMemory { .. })),
        "{r:?}"
    );
    assert_eq!(rig.gpu.live_allocations().1, allocs);
    assert_eq!(
        read_f32(buf.start(), 1234),
        1234.0,
        "the CPU touch brings it back"
    );
    m.migrate_to_ram(buf.start(), buf.len()).unwrap();
    assert_eq!(m.resources().device_pages, 0);
    // SAFETY: nothing refers into `buf`.
    unsafe { rig.mm.munmap(buf) }.unwrap();
    rig.finish();
}

#[test]
fn device_loss_is_a_typed_error_and_leaves_nothing_behind() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let x = anon(&rig.mm, 4);
    let y = anon(&rig.mm, 4);
    m.prefetch(x.start(), x.len(), false).unwrap();
    assert!(m.resources().imports > 0);
    rig.gpu.inject_failure(InjectedFailure::DeviceLost);
    // SAFETY: both ranges hold 4096 floats.
    let r = unsafe { m.dispatch(&saxpy(x.start(), y.start(), 4096)) };
    assert!(matches!(r, Err(VulkanError::DeviceLost)), "{r:?}");
    assert!(rig.gpu.is_lost());
    assert_eq!(m.resources().imports, 0, "imports go at once");
    assert_eq!(rig.gpu.live_allocations().0, 0);
    // SAFETY: as above.
    let r = unsafe { m.dispatch(&saxpy(x.start(), y.start(), 4096)) };
    assert!(
        matches!(r, Err(VulkanError::DeviceLost)),
        "later work is refused"
    );
    assert_eq!(m.resources().in_flight, 0);
    unmap(&rig.mm, &[x, y]);
    rig.finish();
}

#[test]
fn the_import_budget_is_a_typed_error() {
    let _s = serial();
    let rig = Rig::with(MirrorConfig {
        chunk_sizes: vec![PAGE],
        max_imports: 2,
        ..MirrorConfig::default()
    });
    let m = rig.mirror();
    let buf = anon(&rig.mm, 4);
    let r = m.prefetch(buf.start(), buf.len(), true);
    assert!(
        matches!(
            r,
            Err(VulkanError::TooManyAllocations { count: 2, limit: 2 })
        ),
        "{r:?}"
    );
    assert_eq!(m.resources().imports, 2, "what fitted stays mapped");
    assert_eq!(rig.gpu.live_allocations().0, 2);
    unmap(&rig.mm, &[buf]);
    assert_eq!(rig.gpu.live_allocations().0, 0);
    rig.finish();
}

#[test]
fn a_full_page_table_fails_closed() {
    let _s = serial();
    let rig = Rig::with(MirrorConfig {
        page_table_leaves: 1,
        ..MirrorConfig::default()
    });
    let m = rig.mirror();
    // 4 MiB: at least two 2 MiB blocks, one leaf.
    let buf = anon(&rig.mm, 1024);
    let r = m.prefetch(buf.start(), buf.len(), true);
    assert!(
        matches!(r, Err(VulkanError::PageTableFull { leaves: 1 })),
        "{r:?}"
    );
    let res = m.resources();
    assert_eq!(res.leaves, 1);
    assert_eq!(
        res.imported_bytes,
        res.mapped_pages * PAGE,
        "every import is fully mapped: the refused one went"
    );
    unmap(&rig.mm, &[buf]);
    assert_eq!(m.resources().imports, 0);
    assert_eq!(m.resources().leaves, 0);
    rig.finish();
}
