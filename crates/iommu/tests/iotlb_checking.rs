//! The IOTLB checking mode: quiet when the protocol is followed, one report when a test skips
//! an IOTLB flush on purpose.

mod common;

use common::{PAGE, mirror};
use svmirror_core::{Event, Notifier, NotifierRange, Range};
use svmirror_iommu::{DmaCommand, IommuError, IommuMirror, Perms};
use svmirror_mm::testing::AnonMap;

fn run(m: &IommuMirror, cmd: DmaCommand) -> Result<(), IommuError> {
    m.submit(cmd)?.wait().map(drop)
}

fn invalidate(n: &Notifier, addr: u64, len: u64, event: Event) {
    let r = Range::with_len(addr, len).unwrap();
    n.invalidate_range_start(NotifierRange::new(r, event))
        .unwrap()
        .end();
}

#[test]
fn normal_run_reports_zero_violations() {
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    let a = AnonMap::aligned(4 << 20, 2 << 20).unwrap();
    let b = AnonMap::new(64 * PAGE as usize).unwrap();
    a.fill(1);
    for round in 0..4u64 {
        run(
            &m,
            DmaCommand::Copy {
                src: a.addr() + round * PAGE,
                dst: b.addr(),
                len: 32 * PAGE,
            },
        )
        .unwrap();
        let event = [
            Event::Unmap,
            Event::Clear,
            Event::ProtectionVma,
            Event::ProtectionPage,
        ][round as usize];
        invalidate(&notifier, a.addr() + (2 << 20) - 8 * PAGE, 16 * PAGE, event);
        invalidate(&notifier, b.addr() + 3 * PAGE, PAGE, event);
        run(
            &m,
            DmaCommand::Fill {
                dst: b.addr(),
                len: 64 * PAGE,
                value: round as u8,
            },
        )
        .unwrap();
    }
    let (records, count) = m.violations();
    assert_eq!(count, 0, "{records:?}");
    assert!(
        m.mmu().with(|s| s.iotlb().stats().hits) > 0,
        "the IOTLB was used"
    );
}

#[test]
fn skipped_iotlb_flush_is_reported_once() {
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    let buf = AnonMap::new(PAGE as usize).unwrap();
    buf.fill(9);
    run(
        &m,
        DmaCommand::Read {
            src: buf.addr(),
            len: 8,
        },
    )
    .unwrap();
    let cached = m.mmu().translate(buf.addr()).unwrap();
    assert_eq!(cached.perms, Perms::ReadWrite);

    m.set_skip_iotlb_flush(true);
    invalidate(&notifier, buf.addr(), PAGE, Event::Unmap);
    assert!(
        m.mmu().translate(buf.addr()).is_none(),
        "the page table was updated"
    );

    // The device still hits the stale IOTLB entry: reported. The access goes on through the
    // cached translation, as hardware would; it fails only if the pin behind it is gone (other
    // pages of a merged VMA may keep it alive).
    let r = run(
        &m,
        DmaCommand::Read {
            src: buf.addr() + 16,
            len: 8,
        },
    );
    assert!(
        r.is_ok() || matches!(r, Err(IommuError::StalePin { .. })),
        "{r:?}"
    );
    let (records, count) = m.violations();
    assert_eq!(count, 1);
    assert_eq!(records[0].iova, buf.addr() + 16);
    assert_eq!(records[0].cached, cached);
    assert_eq!(records[0].table, None);
}
