//! Bad input gets a typed error, never a panic and never silent success: unaligned,
//! zero-length and overflowing IO ranges, double unmaps, mappings over existing ones, and
//! commands on a device whose engine is gone. Each test names the variant it expects (the
//! dmirror device's own bad input is tested in svmirror-dmirror's `tests/bad_input.rs`).

use std::sync::Arc;

use svmirror_core::MirrorError;
use svmirror_core::{Notifier, PAGE_SIZE, Range};
use svmirror_iommu::{
    DmaCommand, DmaConfig, DmaEngine, IOVA_END, IommuError, IommuMirror, MirrorConfig, Mmu,
    MmuConfig, PageTable, Perms, PinPool, PinPoolConfig,
};
use svmirror_mm::ProcessPageSource;
use svmirror_mm::testing::AnonMap;

const PAGE: u64 = PAGE_SIZE;

/// A real pin over a fresh page, and the target of its first byte, for page-table tests.
fn pinned_page() -> (AnonMap, Arc<PinPool>, svmirror_iommu::Pin) {
    let buf = AnonMap::new(4 * PAGE as usize).unwrap();
    buf.fill(1);
    let pool = PinPool::new(PinPoolConfig::default()).unwrap();
    // SAFETY: `buf` is touched through raw pointers only.
    let pin = unsafe { pool.pin(buf.addr(), 4 * PAGE) }.unwrap();
    (buf, pool, pin)
}

#[test]
fn page_table_map_rejects_unaligned_zero_and_overflowing_ranges() {
    let (buf, _pool, pin) = pinned_page();
    let t = pin.target_of(buf.addr()).unwrap();
    let mut pt = PageTable::new();
    for (iova, len, what) in [
        (0x1000_0001, PAGE, "unaligned start"),
        (0x1000_0000, PAGE + 1, "unaligned length"),
        (0x1000_0000, 0, "zero length"),
        (!(PAGE - 1), 2 * PAGE, "wrapping end"),
    ] {
        let e = pt.map(iova, len, t, Perms::ReadWrite).unwrap_err();
        assert!(
            matches!(e, IommuError::Mirror(MirrorError::InvalidRange { .. })),
            "{what}: {e:?}"
        );
    }
    let e = pt
        .map(IOVA_END - PAGE, 2 * PAGE, t, Perms::ReadWrite)
        .unwrap_err();
    assert!(matches!(e, IommuError::OutsideIovaSpace { .. }), "{e:?}");
    assert_eq!(pt.stats().mapped_bytes, 0, "nothing was mapped");
    drop(pin);
}

#[test]
fn page_table_double_unmap_and_map_over_a_mapping_are_errors() {
    let (buf, _pool, pin) = pinned_page();
    let t = pin.target_of(buf.addr()).unwrap();
    let mut pt = PageTable::new();
    let iova = 0x4000_0000;
    pt.map(iova, 2 * PAGE, t, Perms::ReadWrite).unwrap();

    // Over the existing mapping, fully or in part: refused, nothing changed.
    let e = pt.map(iova + PAGE, 2 * PAGE, t, Perms::Read).unwrap_err();
    assert!(
        matches!(e, IommuError::AlreadyMapped { iova: at } if at == iova + PAGE),
        "{e:?}"
    );
    assert_eq!(pt.translate(iova + PAGE).unwrap().perms, Perms::ReadWrite);

    pt.unmap(iova, 2 * PAGE).unwrap();
    let e = pt.unmap(iova, 2 * PAGE).unwrap_err();
    assert!(
        matches!(e, IommuError::NotMapped { iova: at } if at == iova),
        "{e:?}"
    );
    // A range half mapped is refused as a whole.
    pt.map(iova, PAGE, t, Perms::ReadWrite).unwrap();
    let e = pt.unmap(iova, 2 * PAGE).unwrap_err();
    assert!(
        matches!(e, IommuError::NotMapped { iova: at } if at == iova + PAGE),
        "{e:?}"
    );
    assert!(pt.translate(iova).is_some(), "the mapped half stays");
    let e = pt.protect(iova + PAGE, PAGE, Perms::Read).unwrap_err();
    assert!(matches!(e, IommuError::NotMapped { .. }), "{e:?}");
    drop(pin);
}

#[test]
fn pins_reject_bad_ranges() {
    let pool = PinPool::new(PinPoolConfig::default()).unwrap();
    let buf = AnonMap::new(2 * PAGE as usize).unwrap();
    for (addr, len) in [
        (buf.addr() + 1, PAGE),
        (buf.addr(), 0),
        (buf.addr(), PAGE + 7),
    ] {
        // SAFETY: nothing is pinned (the range is refused), and `buf` is raw memory.
        let e = unsafe { pool.pin(addr, len) }.unwrap_err();
        assert!(
            matches!(e, IommuError::PinSize { .. }),
            "{addr:#x}+{len}: {e:?}"
        );
    }
    assert_eq!(pool.live(), 0);
}

fn mirror_over(notifier: &Notifier, range: Range) -> IommuMirror {
    let source = Box::new(ProcessPageSource::new().unwrap());
    // SAFETY: test memory is touched through raw pointers only.
    unsafe { IommuMirror::with_page_source(notifier, range, MirrorConfig::checked(), source) }
        .unwrap()
}

#[test]
fn mirror_fault_rejects_bad_ranges() {
    let notifier = Notifier::new();
    let buf = AnonMap::new(4 * PAGE as usize).unwrap();
    let range = Range::with_len(buf.addr(), 4 * PAGE).unwrap();
    let m = mirror_over(&notifier, range);
    for (iova, len) in [
        (buf.addr() + 8, PAGE),
        (buf.addr(), 0),
        (u64::MAX - PAGE + 1, PAGE),
    ] {
        let e = m.fault(iova, len, false).unwrap_err();
        assert!(
            matches!(e, IommuError::Mirror(MirrorError::InvalidRange { .. })),
            "{iova:#x}+{len}: {e:?}"
        );
    }
    let e = m.fault(buf.addr(), 8 * PAGE, false).unwrap_err();
    assert!(
        matches!(e, IommuError::Mirror(MirrorError::OutsideMirror { .. })),
        "{e:?}"
    );
    assert_eq!(m.pins().live(), 0, "nothing was pinned");
}

#[test]
fn dma_commands_reject_zero_and_overflowing_lengths() {
    let notifier = Notifier::new();
    let buf = AnonMap::new(4 * PAGE as usize).unwrap();
    let range = Range::with_len(buf.addr(), 4 * PAGE).unwrap();
    let m = mirror_over(&notifier, range);
    let bad = [
        DmaCommand::Read {
            src: buf.addr(),
            len: 0,
        },
        DmaCommand::Read {
            src: u64::MAX - 8,
            len: 64,
        },
        DmaCommand::Fill {
            dst: buf.addr(),
            len: 0,
            value: 1,
        },
        DmaCommand::Copy {
            src: buf.addr(),
            dst: u64::MAX - 8,
            len: 64,
        },
        DmaCommand::AtomicAdd {
            addr: buf.addr() + 3,
            value: 1,
        },
        DmaCommand::Write {
            dst: buf.addr(),
            data: Vec::new(),
        },
    ];
    for cmd in bad {
        let r = m.submit(cmd.clone()).and_then(|f| f.wait());
        let e = r.unwrap_err();
        assert!(
            matches!(e, IommuError::InvalidCommand { .. }),
            "{cmd:?}: {e:?}"
        );
    }
    assert_eq!(m.pins().live(), 0);
}

#[test]
fn commands_on_a_shut_down_engine_fail() {
    let mmu = Arc::new(Mmu::new(MmuConfig::default()));
    let pins = PinPool::new(PinPoolConfig::default()).unwrap();
    let mut dma = DmaEngine::new(mmu, pins, DmaConfig::default()).unwrap();
    dma.shutdown();
    let e = dma
        .submit(DmaCommand::Read {
            src: 0x1000,
            len: 8,
        })
        .unwrap_err();
    assert!(matches!(e, IommuError::EngineStopped), "{e:?}");
}
