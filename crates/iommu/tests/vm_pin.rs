//! DESIGN.md invariant 7: after every mapping and subscription is gone, the process's pinned
//! page count (`VmPin`) is back where it started.

mod common;

use common::{PAGE, mirror};
use svmirror_core::{Event, Notifier, NotifierRange, Range};
use svmirror_iommu::DmaCommand;
use svmirror_mm::testing::AnonMap;
use svmirror_mm::{VM_PIN_SETTLE, settled_vm_pinned_bytes, vm_pinned_bytes};

#[test]
fn vm_pin_returns_to_start_after_dropping_everything() {
    let before = vm_pinned_bytes().unwrap();
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    let a = AnonMap::aligned(4 << 20, 2 << 20).unwrap();
    let b = AnonMap::new(100 * PAGE as usize).unwrap();
    m.submit(DmaCommand::Copy {
        src: a.addr(),
        dst: b.addr(),
        len: 100 * PAGE,
    })
    .unwrap()
    .wait()
    .unwrap();
    m.fault(a.addr(), 4 << 20, true).unwrap();
    let pinned = vm_pinned_bytes().unwrap();
    assert!(
        pinned >= before + (4 << 20) + 100 * PAGE,
        "{pinned} vs {before}"
    );
    assert_eq!(m.pins().stats().bytes, pinned - before);

    // Part of it goes through an invalidation, the rest with the mirror.
    let r = Range::with_len(b.addr(), 50 * PAGE).unwrap();
    notifier
        .invalidate_range_start(NotifierRange::new(r, Event::Clear))
        .unwrap()
        .end();
    drop(m);
    assert_eq!(
        settled_vm_pinned_bytes(before, VM_PIN_SETTLE).unwrap(),
        before
    );
    assert_eq!(notifier.stats().subscriptions, 0);
}
