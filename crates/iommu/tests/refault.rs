//! After the CPU unmaps and remaps an address, the device sees the new page once the notifier
//! has told the mirror, and only the old (pinned) page before.

mod common;

use common::{PAGE, mirror};
use svmirror_core::{Event, Notifier, NotifierRange, Range};
use svmirror_iommu::{DmaCommand, IommuMirror};
use svmirror_mm::testing::AnonMap;

fn read(m: &IommuMirror, addr: u64, len: u64) -> Vec<u8> {
    m.submit(DmaCommand::Read { src: addr, len })
        .unwrap()
        .wait()
        .unwrap()
        .data
}

#[test]
fn after_unmap_invalidation_the_device_faults_again_and_sees_the_new_page() {
    // Both tests unmap an address and map it again: one at a time, so that neither maps into
    // the other's hole (MAP_FIXED_NOREPLACE then fails with EEXIST; seen once in CI).
    let _serial = svmirror_testsupport::serial();
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    // Inside one 2 MiB fault window, so each read is one fault wherever the kernel maps it.
    let old = AnonMap::aligned(4 * PAGE as usize, 2 << 20).unwrap();
    old.fill(0xaa);
    let addr = old.addr();
    assert_eq!(read(&m, addr, 4 * PAGE), vec![0xaa; 4 * PAGE as usize]);
    assert_eq!(m.stats().faults, 1);

    // munmap as the SVM API does it: invalidate, change, end.
    let range = Range::with_len(addr, 4 * PAGE).unwrap();
    let inv = notifier
        .invalidate_range_start(NotifierRange::new(range, Event::Unmap))
        .unwrap();
    assert!(m.mmu().translate(addr).is_none());
    drop(old);
    inv.end();

    let new = AnonMap::at(addr, 4 * PAGE as usize).unwrap();
    new.fill(0x55);
    assert_eq!(read(&m, addr, 4 * PAGE), vec![0x55; 4 * PAGE as usize]);
    assert_eq!(m.stats().faults, 2, "the device faulted again");
    assert_eq!(m.violations().1, 0);
    drop(m);
}

#[test]
fn unmap_behind_the_notifiers_back_leaves_the_device_on_the_old_page() {
    let _serial = svmirror_testsupport::serial();
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    let old = AnonMap::new(PAGE as usize).unwrap();
    old.fill(0xaa);
    let addr = old.addr();
    read(&m, addr, 1);

    // The CPU unmaps and maps something else there; nobody told the notifier yet.
    drop(old);
    let new = AnonMap::at(addr, PAGE as usize).unwrap();
    new.fill(0x55);
    assert_eq!(read(&m, addr, 8), vec![0xaa; 8], "pinned old page");
    m.submit(DmaCommand::Fill {
        dst: addr,
        len: PAGE,
        value: 0x11,
    })
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(
        new.to_vec(),
        vec![0x55; PAGE as usize],
        "new memory untouched"
    );

    // The monitor reads the unmap event: now the device moves to the new page.
    let range = Range::with_len(addr, PAGE).unwrap();
    notifier
        .invalidate_range_start(NotifierRange::new(range, Event::Unmap))
        .unwrap()
        .end();
    assert_eq!(read(&m, addr, 8), vec![0x55; 8]);
    assert_eq!(m.violations().1, 0);
    drop(m);
}
