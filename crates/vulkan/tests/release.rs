//! A dying userfaultfd monitor releases every mirror: the GPU page table empties, the imports
//! go, and later faults are refused with a typed error. In its own test binary: the process's
//! `ProcessMm` is dead afterwards.

mod common;

use common::*;
use svmirror_core::Event;
use svmirror_testsupport::serial;
use svmirror_vulkan::VulkanError;

#[test]
fn a_failed_monitor_releases_the_gpu_mirror_and_faults_fail_closed() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let x: Vec<f32> = (0..4096).map(|i| i as f32).collect();
    let mut y = vec![1.0f32; 4096];
    m.saxpy(1.0, &x, &mut y).unwrap();
    assert!(m.resources().imports > 0);
    rig.mm.inject_monitor_failure();
    assert!(m.counters().invalidations[Event::Release.index()] >= 1);
    assert_eq!(m.resources().imports, 0, "imports freed on release");
    assert_eq!(m.resources().mapped_pages, 0);
    assert_eq!(m.entry(y.as_ptr() as u64), None);
    // Refused before it is submitted: the dispatch settles first, and a dead monitor answers.
    let r = m.saxpy(1.0, &x, &mut y);
    assert!(
        matches!(
            r,
            Err(VulkanError::Mirror(svmirror_core::MirrorError::Core {
                source: svmirror_core::Error::Released,
                ..
            }))
        ),
        "{r:?}"
    );
    assert_eq!(y[5], 6.0, "the refused dispatch wrote nothing");
    rig.finish();
}
