//! Graph traversal: breadth-first search over a graph the CPU built from ordinary heap
//! allocations, each node a `Box`, each adjacency list a `Vec` of node pointers. The device
//! chases the pointers through its mirror of the address space; the CPU then compares every
//! node's level with its own BFS.

use std::collections::VecDeque;
use std::time::Instant;

use super::report::{AppOutcome, Check, ProgressFactory};
use super::{AppConfig, Backend, Node, Result, Rng};

/// The level of a node the search has not reached.
pub const UNVISITED: u64 = u64::MAX;

/// A graph built with ordinary Rust allocations. The nodes are heap allocations owned through
/// raw pointers (the device writes their `level`, so no Rust reference to them is kept); the
/// adjacency lists are `Vec`s the device only reads.
pub struct Graph {
    nodes: Vec<*mut Node>,
    adjacency: Vec<Vec<*const Node>>,
    /// The same edges as node indices, for the CPU reference.
    edges: Vec<Vec<u32>>,
}

// SAFETY: the raw node pointers are owned by the graph (freed in Drop) and touched only through
// volatile accesses by whichever single thread holds the graph; the device's accesses are
// ordered by the backend call that makes them.
unsafe impl Send for Graph {}

impl Graph {
    /// A random graph of `nodes` nodes with out-degrees from 1 to `2 * degree - 1` (mean about
    /// `degree`). Nodes are allocated interleaved with short-lived spacer allocations so that
    /// they scatter over the heap as in a real program.
    pub fn random(nodes: u64, degree: u64, seed: u64) -> Graph {
        let mut rng = Rng::new(seed);
        let n = nodes as usize;
        let mut spacers = Vec::new();
        let mut ptrs = Vec::with_capacity(n);
        for i in 0..n {
            ptrs.push(Box::into_raw(Box::new(Node {
                level: UNVISITED,
                degree: 0,
                edges: std::ptr::null(),
            })));
            if i % 3 == 0 {
                spacers.push(vec![0u8; 16 + (i % 11) * 8]);
            }
        }
        drop(spacers);
        let mut edges = Vec::with_capacity(n);
        let mut adjacency = Vec::with_capacity(n);
        for i in 0..n {
            let d = 1 + rng.below(2 * degree - 1) as usize;
            let e: Vec<u32> = (0..d).map(|_| rng.below(nodes) as u32).collect();
            let adj: Vec<*const Node> = e.iter().map(|&j| ptrs[j as usize].cast_const()).collect();
            let node = Node {
                level: UNVISITED,
                degree: adj.len() as u64,
                edges: adj.as_ptr(),
            };
            // SAFETY: `ptrs[i]` is a live allocation of this graph; no reference to it exists.
            unsafe { ptrs[i].write_volatile(node) };
            edges.push(e);
            adjacency.push(adj);
        }
        Graph {
            nodes: ptrs,
            adjacency,
            edges,
        }
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Number of edges.
    pub fn edges(&self) -> u64 {
        self.adjacency.iter().map(|a| a.len() as u64).sum()
    }

    /// The root of the search.
    pub fn root(&self) -> *const Node {
        self.nodes[0].cast_const()
    }

    /// The level of node `i` as the device left it.
    pub fn level(&self, i: usize) -> u64 {
        // SAFETY: the level of a live node of this graph, read without making a reference.
        unsafe { level_of(self.nodes[i]).read_volatile() }
    }

    /// The levels of a CPU breadth-first search over the same edges, from node 0.
    pub fn reference_levels(&self) -> Vec<u64> {
        let mut level = vec![UNVISITED; self.nodes.len()];
        let mut queue = VecDeque::new();
        if !level.is_empty() {
            level[0] = 0;
            queue.push_back(0u32);
        }
        while let Some(i) = queue.pop_front() {
            let next = level[i as usize] + 1;
            for &j in &self.edges[i as usize] {
                if level[j as usize] == UNVISITED {
                    level[j as usize] = next;
                    queue.push_back(j);
                }
            }
        }
        level
    }

    /// The same search on the CPU by pointer, as the device does it: the baseline that
    /// `svmirror bench` compares the device with. Resets every level first and returns the
    /// number of nodes reached.
    pub fn cpu_pointer_bfs(&self) -> u64 {
        self.reset();
        let root = self.nodes[0];
        let mut queue = VecDeque::new();
        // SAFETY: the level of a live node of this graph, written without a reference.
        unsafe { level_of(root).write_volatile(0) };
        queue.push_back(root.cast_const());
        let mut reached = 1;
        while let Some(p) = queue.pop_front() {
            // SAFETY: every pointer queued is a live node of this graph (a bitwise copy of a
            // node, which owns nothing).
            let node = unsafe { p.read_volatile() };
            for k in 0..node.degree as usize {
                // SAFETY: `k < degree`: in the node's adjacency `Vec`, owned by the graph.
                let q = unsafe { node.edges.wrapping_add(k).read() }.cast_mut();
                let ql = level_of(q);
                // SAFETY: the level of a live node of this graph.
                if unsafe { ql.read_volatile() } == UNVISITED {
                    // SAFETY: as above.
                    unsafe { ql.write_volatile(node.level + 1) };
                    queue.push_back(q.cast_const());
                    reached += 1;
                }
            }
        }
        reached
    }

    /// Sets every node's level back to [`UNVISITED`].
    pub fn reset(&self) {
        for &p in &self.nodes {
            // SAFETY: the level of a live node of this graph, written without a reference.
            unsafe { level_of(p).write_volatile(UNVISITED) };
        }
    }
}

/// The address of `node`'s level (no dereference).
fn level_of(node: *mut Node) -> *mut u64 {
    node.wrapping_byte_add(std::mem::offset_of!(Node, level))
        .cast()
}

impl Drop for Graph {
    fn drop(&mut self) {
        for &p in &self.nodes {
            // SAFETY: every node came from `Box::into_raw` in `random` and is freed once.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// Builds the graph, runs the device's search, and checks every node's level.
pub fn run(
    backend: &dyn Backend,
    config: &AppConfig,
    progress: &dyn ProgressFactory,
) -> Result<AppOutcome> {
    let graph = Graph::random(config.nodes, config.degree, config.seed);
    let reference = graph.reference_levels();
    let want_reached = reference.iter().filter(|&&l| l != UNVISITED).count() as u64;

    let cpu_started = Instant::now();
    let cpu_reached = graph.cpu_pointer_bfs();
    let cpu_time = cpu_started.elapsed();
    graph.reset();

    let bar = progress.bar("bfs", want_reached, "nodes");
    // SAFETY: the graph's nodes and adjacency lists are valid and untouched until it returns.
    let (reached, work) = unsafe { backend.bfs(graph.root(), &|d, t| bar.set(d, t)) }?;
    bar.finish();

    let mut check = Check::default();
    for (i, &want) in reference.iter().enumerate() {
        let got = graph.level(i);
        check.compare(got == want, || {
            format!("node {i}: device level {got:#x}, CPU level {want:#x}")
        });
    }
    check.compare(reached == want_reached, || {
        format!("device reached {reached} nodes, CPU {want_reached}")
    });
    debug_assert_eq!(cpu_reached, want_reached);
    let edges = graph.edges();
    let outcome = AppOutcome {
        app: "bfs",
        work: format!(
            "{} nodes, {} edges, {} reached",
            graph.nodes(),
            edges,
            reached
        ),
        checks: check.count,
        mismatches: check.mismatches,
        first_mismatch: check.first,
        device: work,
        cpu_time,
        rate: Some((edges as f64, "edges/s")),
        extra: vec![],
    };
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_pointer_search_matches_the_index_search() {
        let g = Graph::random(500, 3, 7);
        let want = g.reference_levels();
        let reached = g.cpu_pointer_bfs();
        assert_eq!(
            reached,
            want.iter().filter(|&&l| l != UNVISITED).count() as u64
        );
        for (i, &l) in want.iter().enumerate() {
            assert_eq!(g.level(i), l, "node {i}");
        }
        g.reset();
        assert_eq!(g.level(0), UNVISITED);
    }
}
