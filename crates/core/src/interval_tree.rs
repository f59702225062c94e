//! An augmented interval tree: inclusive intervals `[start, last]` keyed by `(start, id)`.
//!
//! A treap in an arena: nodes live in one `Vec` addressed by `u32` indices with a free list, each
//! node carrying a heap priority and the largest `last` in its subtree. Insert and remove are
//! `O(log n)` expected; [`IntervalTree::for_each_overlap`] is `O(log n + k)` for `k` hits, because
//! a subtree whose largest `last` is below the query, or whose smallest `start` is above it, is
//! never entered. Priorities come from a xorshift generator owned by the tree, so the shape does
//! not depend on the order or values of the keys.
//!
//! [`LinearIndex`] has the same interface over an unsorted `Vec`: the brute-force oracle of the
//! property tests and the baseline of the dispatch benchmark.

const NIL: u32 = u32::MAX;

struct Node<V> {
    start: u64,
    last: u64,
    /// Largest `last` in this node's subtree. Invariant: `max(last, left.max_last, right.max_last)`.
    max_last: u64,
    id: u64,
    prio: u32,
    left: u32,
    right: u32,
    /// `None` only while the slot is on the free list.
    value: Option<V>,
}

/// An interval tree mapping `[start, last]` (inclusive) intervals with a caller-chosen unique `id`
/// to values.
pub struct IntervalTree<V> {
    nodes: Vec<Node<V>>,
    free: Vec<u32>,
    root: u32,
    len: usize,
    rng: u64,
}

impl<V> Default for IntervalTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> IntervalTree<V> {
    /// An empty tree.
    pub fn new() -> Self {
        IntervalTree {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            len: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Number of intervals stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree holds no interval.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn next_prio(&mut self) -> u32 {
        // xorshift64*: cheap, and independent of the keys.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    fn key(&self, n: u32) -> (u64, u64) {
        let n = &self.nodes[n as usize];
        (n.start, n.id)
    }

    fn max_last(&self, n: u32) -> u64 {
        if n == NIL {
            0
        } else {
            self.nodes[n as usize].max_last
        }
    }

    fn update(&mut self, n: u32) {
        let (l, r) = {
            let node = &self.nodes[n as usize];
            (node.left, node.right)
        };
        let m = self.max_last(l).max(self.max_last(r));
        let node = &mut self.nodes[n as usize];
        node.max_last = node.last.max(m);
    }

    /// Splits `t` into keys `< key` and keys `>= key`.
    fn split(&mut self, t: u32, key: (u64, u64)) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.key(t) < key {
            let (l, r) = self.split(self.nodes[t as usize].right, key);
            self.nodes[t as usize].right = l;
            self.update(t);
            (t, r)
        } else {
            let (l, r) = self.split(self.nodes[t as usize].left, key);
            self.nodes[t as usize].left = r;
            self.update(t);
            (l, t)
        }
    }

    /// Joins two treaps where every key of `a` is below every key of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].prio > self.nodes[b as usize].prio {
            let r = self.merge(self.nodes[a as usize].right, b);
            self.nodes[a as usize].right = r;
            self.update(a);
            a
        } else {
            let l = self.merge(a, self.nodes[b as usize].left);
            self.nodes[b as usize].left = l;
            self.update(b);
            b
        }
    }

    fn insert_at(&mut self, t: u32, n: u32) -> u32 {
        if t == NIL {
            return n;
        }
        if self.nodes[n as usize].prio > self.nodes[t as usize].prio {
            let (l, r) = self.split(t, self.key(n));
            let node = &mut self.nodes[n as usize];
            node.left = l;
            node.right = r;
            self.update(n);
            return n;
        }
        if self.key(n) < self.key(t) {
            let l = self.insert_at(self.nodes[t as usize].left, n);
            self.nodes[t as usize].left = l;
        } else {
            let r = self.insert_at(self.nodes[t as usize].right, n);
            self.nodes[t as usize].right = r;
        }
        self.update(t);
        t
    }

    /// Inserts `[start, last]` under `id`. The `(start, id)` pair must not already be present
    /// (callers use unique ids); `start <= last` is the caller's job too.
    pub fn insert(&mut self, start: u64, last: u64, id: u64, value: V) {
        debug_assert!(start <= last);
        let prio = self.next_prio();
        let node = Node {
            start,
            last,
            max_last: last,
            id,
            prio,
            left: NIL,
            right: NIL,
            value: Some(value),
        };
        let n = match self.free.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                // A capacity limit, as `Vec`'s is: 2^32 nodes are over 200 GiB, so memory runs
                // out first. `insert` has no error path to report it on (the notifier replays
                // deferred inserts when an invalidation ends, where no caller is waiting).
                #[expect(
                    clippy::expect_used,
                    reason = "u32 node indices: 2^32 nodes do not fit in memory"
                )]
                let slot = u32::try_from(self.nodes.len()).expect("interval tree above 2^32 nodes");
                assert!(slot != NIL, "interval tree above 2^32 - 1 nodes");
                self.nodes.push(node);
                slot
            }
        };
        self.root = self.insert_at(self.root, n);
        self.len += 1;
    }

    fn remove_at(&mut self, t: u32, key: (u64, u64)) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        let k = self.key(t);
        if k == key {
            let (l, r) = {
                let node = &self.nodes[t as usize];
                (node.left, node.right)
            };
            return (self.merge(l, r), t);
        }
        let removed;
        if key < k {
            let (l, rem) = self.remove_at(self.nodes[t as usize].left, key);
            self.nodes[t as usize].left = l;
            removed = rem;
        } else {
            let (r, rem) = self.remove_at(self.nodes[t as usize].right, key);
            self.nodes[t as usize].right = r;
            removed = rem;
        }
        if removed != NIL {
            self.update(t);
        }
        (t, removed)
    }

    /// Removes the interval inserted with `(start, id)`, returning its value.
    pub fn remove(&mut self, start: u64, id: u64) -> Option<V> {
        let (root, removed) = self.remove_at(self.root, (start, id));
        self.root = root;
        if removed == NIL {
            return None;
        }
        self.len -= 1;
        self.free.push(removed);
        let node = &mut self.nodes[removed as usize];
        node.left = NIL;
        node.right = NIL;
        node.value.take()
    }

    /// Calls `f` for every interval overlapping `[start, last]`, in `(start, id)` order.
    pub fn for_each_overlap(&self, start: u64, last: u64, mut f: impl FnMut(u64, u64, &V)) {
        self.visit(self.root, start, last, &mut f);
    }

    fn visit(&self, t: u32, start: u64, last: u64, f: &mut impl FnMut(u64, u64, &V)) {
        if t == NIL {
            return;
        }
        let node = &self.nodes[t as usize];
        if node.max_last < start {
            return;
        }
        self.visit(node.left, start, last, f);
        if node.start > last {
            return;
        }
        if node.last >= start {
            if let Some(v) = &node.value {
                f(node.start, node.last, v);
            }
        }
        self.visit(node.right, start, last, f);
    }

    /// Whether any interval overlaps `[start, last]`.
    pub fn any_overlap(&self, start: u64, last: u64) -> bool {
        let mut t = self.root;
        // Walk the leftmost candidate path: O(log n).
        while t != NIL {
            let node = &self.nodes[t as usize];
            if node.max_last < start {
                return false;
            }
            let l = node.left;
            if l != NIL && self.nodes[l as usize].max_last >= start {
                t = l;
                continue;
            }
            if node.start > last {
                return false;
            }
            if node.last >= start {
                return true;
            }
            t = node.right;
        }
        false
    }

    /// Checks the treap's invariants (key order, heap order, `max_last`), for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> usize {
        fn walk<V>(
            t: &IntervalTree<V>,
            n: u32,
            lo: Option<(u64, u64)>,
            hi: Option<(u64, u64)>,
        ) -> usize {
            if n == NIL {
                return 0;
            }
            let node = &t.nodes[n as usize];
            let k = (node.start, node.id);
            assert!(lo.is_none_or(|lo| lo < k), "key order broken");
            assert!(hi.is_none_or(|hi| k < hi), "key order broken");
            for c in [node.left, node.right] {
                if c != NIL {
                    assert!(t.nodes[c as usize].prio <= node.prio, "heap order broken");
                }
            }
            let m = node
                .last
                .max(t.max_last(node.left))
                .max(t.max_last(node.right));
            assert_eq!(node.max_last, m, "max_last stale");
            1 + walk(t, node.left, lo, Some(k)) + walk(t, node.right, Some(k), hi)
        }
        let n = walk(self, self.root, None, None);
        assert_eq!(n, self.len, "length out of step");
        n
    }
}

/// The same interface as [`IntervalTree`] over an unsorted list: every lookup scans everything.
/// The oracle for property tests and the baseline for the dispatch benchmark, not for real use.
pub struct LinearIndex<V> {
    items: Vec<(u64, u64, u64, V)>,
}

impl<V> Default for LinearIndex<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> LinearIndex<V> {
    /// An empty list.
    pub fn new() -> Self {
        LinearIndex { items: Vec::new() }
    }

    /// Number of intervals stored.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Appends `[start, last]` under `id`.
    pub fn insert(&mut self, start: u64, last: u64, id: u64, value: V) {
        self.items.push((start, last, id, value));
    }

    /// Removes the interval inserted with `(start, id)`.
    pub fn remove(&mut self, start: u64, id: u64) -> Option<V> {
        // From the back: removing in reverse insertion order is O(1) per removal.
        let i = self
            .items
            .iter()
            .rposition(|&(s, _, i, _)| s == start && i == id)?;
        Some(self.items.swap_remove(i).3)
    }

    /// Calls `f` for every interval overlapping `[start, last]`, in insertion order.
    pub fn for_each_overlap(&self, start: u64, last: u64, mut f: impl FnMut(u64, u64, &V)) {
        for (s, l, _, v) in &self.items {
            if *s <= last && *l >= start {
                f(*s, *l, v);
            }
        }
    }

    /// Whether any interval overlaps `[start, last]`.
    pub fn any_overlap(&self, start: u64, last: u64) -> bool {
        self.items
            .iter()
            .any(|&(s, l, _, _)| s <= last && l >= start)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hits_tree(t: &IntervalTree<u64>, s: u64, l: u64) -> Vec<u64> {
        let mut v = Vec::new();
        t.for_each_overlap(s, l, |_, _, x| v.push(*x));
        v.sort_unstable();
        v
    }

    fn hits_linear(t: &LinearIndex<u64>, s: u64, l: u64) -> Vec<u64> {
        let mut v = Vec::new();
        t.for_each_overlap(s, l, |_, _, x| v.push(*x));
        v.sort_unstable();
        v
    }

    #[test]
    fn overlap_query_is_inclusive_at_both_ends() {
        let mut t = IntervalTree::new();
        t.insert(10, 19, 1, 1u64);
        assert_eq!(hits_tree(&t, 19, 30), vec![1]);
        assert_eq!(hits_tree(&t, 0, 10), vec![1]);
        assert!(hits_tree(&t, 20, 30).is_empty());
        assert!(!t.any_overlap(0, 9));
    }

    #[test]
    fn remove_returns_value_and_reuses_slot() {
        let mut t = IntervalTree::new();
        t.insert(0, 9, 1, 10u64);
        t.insert(0, 9, 2, 20u64);
        assert_eq!(t.remove(0, 1), Some(10));
        assert_eq!(t.remove(0, 1), None);
        t.insert(5, 6, 3, 30u64);
        assert_eq!(t.nodes.len(), 2, "freed slot reused");
        assert_eq!(hits_tree(&t, 0, 100), vec![20, 30]);
        t.check_invariants();
    }

    #[test]
    fn sequential_inserts_stay_shallow() {
        let mut t = IntervalTree::new();
        for i in 0..100_000u64 {
            t.insert(i * 4096, i * 4096 + 4095, i, i);
        }
        fn depth<V>(t: &IntervalTree<V>, n: u32) -> usize {
            if n == NIL {
                0
            } else {
                let node = &t.nodes[n as usize];
                1 + depth(t, node.left).max(depth(t, node.right))
            }
        }
        let d = depth(&t, t.root);
        assert!(d < 60, "treap depth {d} for 100k sorted keys");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(usize),
        Query(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..1000, 0u64..200).prop_map(|(s, len)| Op::Insert(s, s + len)),
            any::<usize>().prop_map(Op::Remove),
            (0u64..1300, 0u64..300).prop_map(|(s, len)| Op::Query(s, s + len)),
        ]
    }

    proptest! {
        #[test]
        fn tree_matches_brute_force_list(ops in proptest::collection::vec(op(), 1..400)) {
            let mut tree = IntervalTree::new();
            let mut list = LinearIndex::new();
            let mut live: Vec<(u64, u64)> = Vec::new();
            let mut next_id = 0u64;
            for op in ops {
                match op {
                    Op::Insert(s, l) => {
                        tree.insert(s, l, next_id, next_id);
                        list.insert(s, l, next_id, next_id);
                        live.push((s, next_id));
                        next_id += 1;
                    }
                    Op::Remove(i) if !live.is_empty() => {
                        let (s, id) = live.swap_remove(i % live.len());
                        prop_assert_eq!(tree.remove(s, id), list.remove(s, id));
                    }
                    Op::Remove(_) => {
                        prop_assert_eq!(tree.remove(0, 0), None);
                    }
                    Op::Query(s, l) => {
                        prop_assert_eq!(hits_tree(&tree, s, l), hits_linear(&list, s, l));
                        prop_assert_eq!(tree.any_overlap(s, l), list.any_overlap(s, l));
                    }
                }
                prop_assert_eq!(tree.len(), list.len());
            }
            tree.check_invariants();
        }
    }
}
