use super::*;
use crate::pin::PinId;
use svmirror_core::MirrorError;

const K4: u64 = 4 << 10;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

fn t(offset: u64) -> Target {
    Target {
        pin: PinId::for_tests(1),
        offset,
    }
}

#[test]
fn map_picks_largest_leaf_for_alignment_and_length() {
    let mut pt = PageTable::new();
    // 4K-aligned start, running through a 2M boundary and a whole 1G page.
    let start = G1 - M2 - K4;
    pt.map(start, K4 + M2 + G1 + K4, t(0), Perms::ReadWrite)
        .unwrap();
    assert_eq!(pt.stats().leaves, [2, 1, 1]);
    assert_eq!(pt.translate(start).unwrap().size, LeafSize::Size4K);
    assert_eq!(pt.translate(G1 - M2).unwrap().size, LeafSize::Size2M);
    assert_eq!(pt.translate(G1 + 5).unwrap().size, LeafSize::Size1G);
    assert_eq!(pt.translate(2 * G1).unwrap().size, LeafSize::Size4K);
    assert_eq!(pt.stats().mapped_bytes, K4 + M2 + G1 + K4);
}

/// A `Clear` invalidation unmaps with `free_tables: false`, keeping the emptied table; a
/// later 2 MiB leaf over the same block must replace it. Seen failing before the fix: the
/// debug assertion in `map_rec` fired ("assertion failed: matches!(table.entries[i],
/// Entry::Empty)"), killing the DMA thread in the torture test.
#[test]
fn a_whole_leaf_replaces_a_table_a_clear_kept() {
    let mut pt = PageTable::new();
    pt.map(M2 + K4, K4, t(0), Perms::ReadWrite).unwrap();
    let before = pt.stats().live_tables();
    pt.unmap_present(Range::with_len(M2, M2).unwrap(), false);
    assert_eq!(pt.stats().live_tables(), before, "the table was kept");
    pt.map(M2, M2, t(0), Perms::ReadWrite).unwrap();
    assert_eq!(pt.translate(M2 + K4).unwrap().size, LeafSize::Size2M);
    assert_eq!(
        pt.stats().live_tables(),
        before - 1,
        "the kept table was freed"
    );
    assert_eq!(pt.stats().mapped_bytes, M2);
}

#[test]
fn translate_gives_target_of_each_byte() {
    let mut pt = PageTable::new();
    pt.map(M2, M2, t(0x1000), Perms::Read).unwrap();
    let tr = pt.translate(M2 + 0x1234).unwrap();
    assert_eq!(tr.iova, M2);
    assert_eq!(tr.perms, Perms::Read);
    assert_eq!(tr.target_at(M2 + 0x1234), t(0x2234));
    assert_eq!(pt.translate(M2 - 1), None);
    assert_eq!(pt.translate(2 * M2), None);
}

#[test]
fn map_over_existing_mapping_is_refused_and_changes_nothing() {
    let mut pt = PageTable::new();
    pt.map(0x5000, K4, t(0), Perms::Read).unwrap();
    let before = pt.stats();
    let err = pt.map(0x1000, 0x8000, t(0), Perms::Read).unwrap_err();
    assert!(
        matches!(err, IommuError::AlreadyMapped { iova: 0x5000 }),
        "{err}"
    );
    assert_eq!(pt.stats(), before);
    assert_eq!(pt.translate(0x1000), None);
}

#[test]
fn bad_ranges_are_typed_errors() {
    let mut pt = PageTable::new();
    for (iova, len) in [(0x1001, K4), (0x1000, 0x10), (0x1000, 0), (!0xfff, 2 * K4)] {
        let err = pt.map(iova, len, t(0), Perms::Read).unwrap_err();
        assert!(
            matches!(err, IommuError::Mirror(MirrorError::InvalidRange { .. })),
            "{err}"
        );
    }
    let err = pt
        .map(IOVA_END - K4, 2 * K4, t(0), Perms::Read)
        .unwrap_err();
    assert!(matches!(err, IommuError::OutsideIovaSpace { .. }), "{err}");
    assert!(matches!(
        pt.unmap(0x1000, 0),
        Err(IommuError::Mirror(MirrorError::InvalidRange { .. }))
    ));
}

#[test]
fn double_unmap_is_not_mapped_error() {
    let mut pt = PageTable::new();
    pt.map(0x10_0000, 4 * K4, t(0), Perms::ReadWrite).unwrap();
    pt.unmap(0x10_0000, 4 * K4).unwrap();
    let err = pt.unmap(0x10_0000, 4 * K4).unwrap_err();
    assert!(
        matches!(err, IommuError::NotMapped { iova: 0x10_0000 }),
        "{err}"
    );
}

#[test]
fn unmap_with_a_hole_changes_nothing() {
    let mut pt = PageTable::new();
    pt.map(0x10_0000, K4, t(0), Perms::ReadWrite).unwrap();
    pt.map(0x10_2000, K4, t(0), Perms::ReadWrite).unwrap();
    let err = pt.unmap(0x10_0000, 3 * K4).unwrap_err();
    assert!(
        matches!(err, IommuError::NotMapped { iova: 0x10_1000 }),
        "{err}"
    );
    assert!(pt.translate(0x10_0000).is_some());
}

#[test]
fn unmap_everything_frees_every_table() {
    let mut pt = PageTable::new();
    pt.map(G1 - K4, G1 + 2 * M2 + K4, t(0), Perms::ReadWrite)
        .unwrap();
    assert!(pt.stats().live_tables() > 0);
    let gone = pt.unmap(G1 - K4, G1 + 2 * M2 + K4).unwrap();
    assert_eq!(
        gone,
        vec![Unmapped {
            iova: G1 - K4,
            len: G1 + 2 * M2 + K4,
            target: t(0)
        }]
    );
    let s = pt.stats();
    assert_eq!(s.live_tables(), 0, "{s:?}");
    assert_eq!(s.mapped_bytes, 0);
    assert_eq!(s.leaves, [0, 0, 0]);
}

#[test]
fn partial_unmap_splits_large_leaf() {
    let mut pt = PageTable::new();
    pt.map(M2, M2, t(0), Perms::ReadWrite).unwrap();
    let gone = pt.unmap(M2 + 0x3000, K4).unwrap();
    assert_eq!(
        gone,
        vec![Unmapped {
            iova: M2 + 0x3000,
            len: K4,
            target: t(0x3000)
        }]
    );
    assert_eq!(pt.stats().leaves, [511, 0, 0]);
    assert_eq!(pt.translate(M2 + 0x3000), None);
    assert_eq!(pt.translate(M2 + 0x4000).unwrap().target, t(0x4000));
    assert_eq!(pt.stats().mapped_bytes, M2 - K4);
}

#[test]
fn partial_unmap_of_1g_leaf_splits_twice() {
    let mut pt = PageTable::new();
    pt.map(G1, G1, t(0), Perms::Read).unwrap();
    pt.unmap(G1 + M2 + K4, K4).unwrap();
    assert_eq!(pt.stats().leaves, [511, 511, 0]);
    assert_eq!(pt.translate(G1 + 3 * M2).unwrap().size, LeafSize::Size2M);
    assert_eq!(
        pt.translate(G1 + M2 + 2 * K4).unwrap().target,
        t(M2 + 2 * K4)
    );
    pt.unmap_present(Range::with_len(G1, G1).unwrap(), true);
    assert_eq!(pt.stats().live_tables(), 0);
}

#[test]
fn unmap_present_keeps_tables_unless_asked() {
    let mut pt = PageTable::new();
    pt.map(0x40_0000, 2 * K4, t(0), Perms::ReadWrite).unwrap();
    let r = Range::with_len(0x40_0000, M2).unwrap();
    let gone = pt.unmap_present(r, false);
    assert_eq!(gone.len(), 1);
    assert_eq!(pt.stats().live_tables(), 3);
    // A later Unmap over the now empty tables frees them.
    assert!(pt.unmap_present(r, true).is_empty());
    assert_eq!(pt.stats().live_tables(), 0);
}

#[test]
fn unmap_present_reports_pieces_per_pin() {
    let mut pt = PageTable::new();
    pt.map(0x1000, K4, t(0), Perms::Read).unwrap();
    let other = Target {
        pin: PinId::for_tests(2),
        offset: 0,
    };
    pt.map(0x2000, K4, other, Perms::Read).unwrap();
    let gone = pt.unmap_present(Range::new(0, 0x10000).unwrap(), true);
    assert_eq!(gone.len(), 2);
    assert_eq!(gone[1].target.pin, PinId::for_tests(2));
}

#[test]
fn protect_downgrades_and_splits_partially_covered_leaf() {
    let mut pt = PageTable::new();
    pt.map(M2, M2, t(0), Perms::ReadWrite).unwrap();
    let changed = pt.protect(M2, K4, Perms::Read).unwrap();
    assert_eq!(changed, K4);
    assert_eq!(pt.translate(M2).unwrap().perms, Perms::Read);
    assert_eq!(pt.translate(M2 + K4).unwrap().perms, Perms::ReadWrite);
    assert_eq!(pt.stats().leaves, [512, 0, 0]);
}

#[test]
fn protect_never_upgrades() {
    let mut pt = PageTable::new();
    pt.map(M2, M2, t(0), Perms::Read).unwrap();
    assert_eq!(pt.protect(M2, K4, Perms::ReadWrite).unwrap(), 0);
    assert_eq!(pt.translate(M2).unwrap().perms, Perms::Read);
    // Nothing changed, so nothing was split.
    assert_eq!(pt.stats().leaves, [0, 1, 0]);
}

#[test]
fn protect_of_unmapped_range_is_not_mapped_error() {
    let mut pt = PageTable::new();
    let err = pt.protect(0x1000, K4, Perms::Read).unwrap_err();
    assert!(
        matches!(err, IommuError::NotMapped { iova: 0x1000 }),
        "{err}"
    );
}

#[test]
fn leaves_lists_mappings_in_order() {
    let mut pt = PageTable::new();
    pt.map(0x1000, K4, t(0), Perms::Read).unwrap();
    pt.map(G1, M2, t(0x1000), Perms::ReadWrite).unwrap();
    let all = pt.leaves(Range::new(0, IOVA_END).unwrap());
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].iova, 0x1000);
    assert_eq!(all[1].size, LeafSize::Size2M);
}
