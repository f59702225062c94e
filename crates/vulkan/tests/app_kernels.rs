//! The kernels the example app uses: the frontier BFS over nodes in the layout a CPU program
//! builds, and slot sums with a refused slot. Validation layer on; nothing left at the end.

mod common;

use common::*;
use svmirror_mm::Protection;
use svmirror_testsupport::serial;
use svmirror_vulkan::{
    Dispatch, FrontierCounters, GraphNode, Kernel, ScratchBuffer, SlotStatus, VulkanError,
};

/// Runs the slot-sum kernel over `table` (pairs of address, words) and returns the records.
fn sum_slots(
    rig: &Rig,
    table: &[[u64; 2]],
) -> (
    Result<svmirror_vulkan::DispatchStats, VulkanError>,
    Vec<SlotStatus>,
) {
    let status = ScratchBuffer::new(rig.gpu(), SlotStatus::BYTES * table.len() as u64).unwrap();
    let d = Dispatch::new(
        Kernel::SumSlots,
        table.len() as u32,
        &[table.as_ptr() as u64, status.device_addr()],
    )
    .unwrap();
    // SAFETY: the table and the slots it names are live and untouched during the dispatch.
    let r = unsafe { rig.mirror().dispatch(&d) };
    let rec = (0..table.len() as u64)
        .map(|i| {
            let f = |k: u64| status.read_u64(SlotStatus::BYTES * i + 8 * k).unwrap();
            SlotStatus {
                state: f(0),
                sum: f(1),
                addr: f(2),
                words: f(3),
            }
        })
        .collect();
    (r, rec)
}

#[test]
fn slot_sums_cover_every_word_but_the_last_and_store_there() {
    let _s = serial();
    let rig = Rig::new();
    let sizes = [1usize, 2, 256, 513, 16_384, 24_576, 32_768];
    let mut slots: Vec<Vec<u64>> = sizes
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n as u64)
                .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ s as u64)
                .collect()
        })
        .collect();
    let want: Vec<u64> = slots
        .iter()
        .map(|v| {
            v[..v.len() - 1]
                .iter()
                .fold(0u64, |a, w| a.wrapping_add(*w))
        })
        .collect();
    let table: Vec<[u64; 2]> = slots
        .iter_mut()
        .map(|v| [v.as_mut_ptr() as u64, v.len() as u64])
        .chain([[0, 5]])
        .collect();
    let (r, rec) = sum_slots(&rig, &table);
    r.unwrap();
    for (i, v) in slots.iter().enumerate() {
        assert_eq!(rec[i].state, SlotStatus::STORED, "slot {i}");
        assert_eq!(rec[i].sum, want[i], "slot {i}");
        // The dispatch is over: the Vec may be read again.
        let last = v[v.len() - 1];
        assert_eq!(last, want[i], "slot {i}: last word");
    }
    assert_eq!(rec[sizes.len()].state, SlotStatus::EMPTY);
    drop(slots);
    rig.finish();
}

#[test]
fn a_store_to_a_read_only_slot_fails_the_dispatch_at_that_slot() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let ro = anon(&rig.mm, 2);
    let rw = anon(&rig.mm, 1);
    write_f32s(ro.start(), [0.0; 2048]);
    rig.mm.mprotect(ro, Protection::READ).unwrap();
    let table = [[rw.start(), 4], [ro.start(), 1024]];
    let (r, rec) = sum_slots(&rig, &table);
    match r {
        Err(VulkanError::Fault { addr, write, .. }) => {
            assert!(write);
            // Word 1023 (the last) is at byte 8184: in the second page.
            assert_eq!(addr, ro.start() + 4096);
        }
        other => panic!("expected a refused store, got {other:?}"),
    }
    assert_eq!(rec[1].addr, ro.start());
    assert_eq!(rec[1].words, 1024);
    assert_ne!(rec[1].state, SlotStatus::STORED);
    assert!(m.entry(ro.start()).is_none_or(|w| !w));
    unmap(&rig.mm, &[ro, rw]);
    rig.finish();
}

#[test]
fn frontier_bfs_levels_match_the_cpu_on_nodes_built_by_the_cpu() {
    let _s = serial();
    let rig = Rig::new();
    let m = rig.mirror();
    let n = 3000usize;
    let nodes: Vec<*mut GraphNode> = (0..n)
        .map(|_| {
            Box::into_raw(Box::new(GraphNode {
                level: GraphNode::UNVISITED,
                degree: 0,
                edges: 0,
            }))
        })
        .collect();
    let edges: Vec<Vec<u64>> = (0..n)
        .map(|i| {
            (1..=(i % 5) as u64)
                .map(|k| nodes[(i * 7 + k as usize * 131) % n] as u64)
                .collect()
        })
        .collect();
    for (i, &p) in nodes.iter().enumerate() {
        // SAFETY: a live node of this test, written before any dispatch.
        unsafe {
            p.write_volatile(GraphNode {
                level: GraphNode::UNVISITED,
                degree: edges[i].len() as u64,
                edges: edges[i].as_ptr() as u64,
            })
        };
    }
    // CPU reference.
    let index: std::collections::HashMap<u64, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, &p)| (p as u64, i))
        .collect();
    let mut want = vec![u64::MAX; n];
    want[1] = 0;
    let mut q = std::collections::VecDeque::from([1usize]);
    while let Some(i) = q.pop_front() {
        for e in &edges[i] {
            let j = index[e];
            if want[j] == u64::MAX {
                want[j] = want[i] + 1;
                q.push_back(j);
            }
        }
    }
    let counters = ScratchBuffer::new(rig.gpu(), FrontierCounters::BYTES).unwrap();
    let mut cur = ScratchBuffer::new(rig.gpu(), 8 * n as u64).unwrap();
    let mut next = ScratchBuffer::new(rig.gpu(), 8 * n as u64).unwrap();
    cur.write_u64(0, nodes[1] as u64).unwrap();
    let (mut items, mut level, mut claim_self, mut reached) = (1u32, 0u64, 1u64, 0u64);
    while items > 0 {
        counters.zero(0, FrontierCounters::BYTES).unwrap();
        let d = Dispatch::new(
            Kernel::BfsFrontier,
            items,
            &[
                cur.device_addr(),
                next.device_addr(),
                counters.device_addr(),
                level,
                n as u64,
                claim_self,
            ],
        )
        .unwrap();
        // SAFETY: the nodes and edge lists are live and untouched during the dispatch.
        unsafe { m.dispatch(&d) }.unwrap();
        assert_eq!(counters.read_u32(8).unwrap(), 0, "no overflow");
        items = counters.read_u32(0).unwrap();
        reached += u64::from(items);
        std::mem::swap(&mut cur, &mut next);
        level += 1;
        claim_self = 0;
    }
    assert_eq!(
        reached,
        want.iter().filter(|&&l| l != u64::MAX).count() as u64
    );
    for (i, &p) in nodes.iter().enumerate() {
        // SAFETY: live nodes; the dispatches are over.
        let got = unsafe { p.read_volatile() }.level;
        assert_eq!(got, want[i], "node {i}");
    }
    assert!(
        cur.read_u64(8 * n as u64).is_err(),
        "out of bounds is an error"
    );
    drop((counters, cur, next));
    for p in nodes {
        // SAFETY: from Box::into_raw above, freed once.
        drop(unsafe { Box::from_raw(p) });
    }
    drop(edges);
    rig.finish();
}
