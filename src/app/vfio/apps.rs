//! The apps on a device that moves bytes but computes nothing (edu's DMA engine, an NVMe
//! drive): every input is fetched through the device into a CPU buffer, the CPU computes, and
//! every result is stored at its process address in a way the mirror can refuse. One copy of
//! the apps for both VFIO backends; each says how it fetches and stores ([`Mover`]).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use super::u64_at;
use crate::app::{AppError, BackendKind, Node, Progress, Result, SlotRef, SlotResult};

/// How one backend call moves bytes through its device.
pub(super) trait Mover {
    /// What the device reports.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The BFS's read cache block: a power of two of at most a page, so that an aligned block
    /// is readable whenever any byte of it is.
    const BLOCK: u64;

    /// The most bytes of x (and of y) one saxpy step fetches.
    const SAXPY_BYTES: u64;

    /// Fetches `out.len()` bytes at process address `addr` through the device into `out`.
    fn fetch(&mut self, addr: u64, out: &mut [u8]) -> std::result::Result<(), Self::Error>;

    /// Stores each `(address, bytes)`. The outer error is the device failing; the inner ones
    /// say, store by store (one each, in order), whether it was refused ([`Mover::refused`])
    /// or failed.
    ///
    /// # Safety
    ///
    /// Each destination is memory nothing else accesses during the call, valid for any bytes,
    /// and no Rust reference to it is alive.
    unsafe fn store(
        &mut self,
        stores: &[(u64, &[u8])],
    ) -> std::result::Result<Vec<std::result::Result<(), Self::Error>>, Self::Error>;

    /// Whether `e` means the device may not use that memory (nothing mapped there, a write to
    /// read-only memory, outside every mirror), rather than a failure of the device.
    fn refused(e: &Self::Error) -> bool;
}

/// An error of `app` on the VFIO backend while doing `what`.
pub(super) fn dev_err<E: std::error::Error + Send + Sync + 'static>(
    app: &'static str,
    what: &'static str,
) -> impl FnOnce(E) -> AppError {
    move |e| AppError::device(app, BackendKind::Vfio, what, e)
}

/// Stores `stores`, every one of which must land.
///
/// # Safety
///
/// As [`Mover::store`].
unsafe fn store_all<M: Mover>(m: &mut M, app: &'static str, stores: &[(u64, &[u8])]) -> Result<()> {
    // SAFETY: the caller's contract.
    for r in unsafe { m.store(stores) }.map_err(dev_err(app, "storing results"))? {
        r.map_err(dev_err(app, "storing a result"))?;
    }
    Ok(())
}

/// The BFS's per-call read cache of aligned [`Mover::BLOCK`]-byte blocks.
struct Blocks(HashMap<u64, Box<[u8]>>);

impl Blocks {
    fn read<M: Mover>(
        &mut self,
        m: &mut M,
        addr: u64,
        out: &mut [u8],
    ) -> std::result::Result<(), M::Error> {
        let mut done = 0usize;
        while done < out.len() {
            let at = addr + done as u64;
            let block = at & !(M::BLOCK - 1);
            let within = (at - block) as usize;
            let n = (out.len() - done).min(M::BLOCK as usize - within);
            let data = match self.0.entry(block) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let mut data = vec![0u8; M::BLOCK as usize].into_boxed_slice();
                    m.fetch(block, &mut data)?;
                    v.insert(data)
                }
            };
            out[done..done + n].copy_from_slice(&data[within..within + n]);
            done += n;
        }
        Ok(())
    }
}

/// The BFS from `root`: every node's `degree` and `edges`, and its adjacency list, are
/// fetched through the device (cached by block); the CPU walks the graph; every level is
/// stored into its node. Returns how many nodes were reached.
///
/// # Safety
///
/// As [`crate::app::Backend::bfs`].
pub(super) unsafe fn bfs<M: Mover>(
    m: &mut M,
    root: *const Node,
    progress: Progress<'_>,
) -> Result<u64> {
    const LEVEL: u64 = std::mem::offset_of!(Node, level) as u64;
    const DEGREE: u64 = std::mem::offset_of!(Node, degree) as u64;
    const EDGES: u64 = std::mem::offset_of!(Node, edges) as u64;
    const _: () = assert!(EDGES == DEGREE + 8, "degree and edges load as one block");
    let root = root as u64;
    let mut blocks = Blocks(HashMap::new());
    let mut level: HashMap<u64, u64> = HashMap::new();
    let mut order = vec![root];
    let mut queue = std::collections::VecDeque::from([root]);
    level.insert(root, 0);
    let mut done = 0u64;
    let mut header = [0u8; 16];
    let mut adj = Vec::new();
    while let Some(node) = queue.pop_front() {
        let next = level[&node] + 1;
        blocks
            .read(m, node + DEGREE, &mut header)
            .map_err(dev_err("bfs", "reading a node"))?;
        let degree = u64_at(&header, 0);
        let edges = u64_at(&header, 8);
        adj.resize(degree as usize * 8, 0);
        blocks
            .read(m, edges, &mut adj)
            .map_err(dev_err("bfs", "reading an adjacency list"))?;
        for k in 0..degree as usize {
            let to = u64_at(&adj, k * 8);
            if let Entry::Vacant(v) = level.entry(to) {
                v.insert(next);
                order.push(to);
                queue.push_back(to);
            }
        }
        done += 1;
        if done % 16 == 0 {
            progress(done, level.len() as u64);
        }
    }
    let bytes: Vec<(u64, [u8; 8])> = order
        .iter()
        .map(|&node| (node + LEVEL, level[&node].to_ne_bytes()))
        .collect();
    let stores: Vec<(u64, &[u8])> = bytes.iter().map(|(a, b)| (*a, &b[..])).collect();
    // SAFETY: each node's `level` field, a u64 in a node nothing else accesses during the
    // call (the caller's contract).
    unsafe { store_all(m, "bfs", &stores) }?;
    progress(done, level.len() as u64);
    Ok(level.len() as u64)
}

/// `y = a·x + y`, [`Mover::SAXPY_BYTES`] of x and of y at a time: both fetched through the
/// device, computed on the CPU, y stored back.
///
/// # Safety
///
/// As [`crate::app::Backend::saxpy`].
pub(super) unsafe fn saxpy<M: Mover>(
    m: &mut M,
    a: f32,
    x: *const f32,
    y: *mut f32,
    n: usize,
    progress: Progress<'_>,
) -> Result<()> {
    let block = (M::SAXPY_BYTES / 4) as usize;
    let (x, y) = (x as u64, y as u64);
    let mut xs = Vec::with_capacity(block * 4);
    let mut ys = Vec::with_capacity(block * 4);
    let mut i = 0;
    while i < n {
        let len = block.min(n - i);
        let off = (i * 4) as u64;
        xs.resize(len * 4, 0);
        ys.resize(len * 4, 0);
        m.fetch(x + off, &mut xs)
            .map_err(dev_err("saxpy", "reading x"))?;
        m.fetch(y + off, &mut ys)
            .map_err(dev_err("saxpy", "reading y"))?;
        crate::app::saxpy::saxpy_bytes(a, &mut ys, &xs);
        // SAFETY: elements `i..i + len` of `y`, which nothing else accesses during the call
        // (the caller's contract).
        unsafe { store_all(m, "saxpy", &[(y + off, &ys)]) }?;
        i += len;
        progress(i as u64, n as u64);
    }
    Ok(())
}

/// The churn's slot sums: the table, then each slot's words but the last, fetched through the
/// device; each sum stored into its slot's last word. A slot the device may not read, or whose
/// last word it may not write, is refused at that address.
///
/// # Safety
///
/// As [`crate::app::Backend::sum_slots`].
pub(super) unsafe fn sum_slots<M: Mover>(
    m: &mut M,
    table: *const SlotRef,
    n: usize,
) -> Result<Vec<SlotResult>> {
    let mut entries = vec![0u8; n * std::mem::size_of::<SlotRef>()];
    if n > 0 {
        m.fetch(table as u64, &mut entries)
            .map_err(dev_err("churn", "reading the slot table"))?;
    }
    // Per slot: the sum and where it goes, or the address the device was refused at.
    let mut sums: Vec<std::result::Result<(u64, u64), u64>> = Vec::with_capacity(n);
    let mut data = Vec::new();
    for i in 0..n {
        let addr = u64_at(&entries, i * 16);
        let words = u64_at(&entries, i * 16 + 8);
        if addr == 0 || words == 0 {
            sums.push(Err(addr));
            continue;
        }
        data.resize((words - 1) as usize * 8, 0);
        if !data.is_empty() {
            match m.fetch(addr, &mut data) {
                Ok(()) => {}
                Err(e) if M::refused(&e) => {
                    sums.push(Err(addr));
                    continue;
                }
                Err(e) => return Err(dev_err("churn", "reading a slot")(e)),
            }
        }
        let sum = data
            .chunks_exact(8)
            .fold(0u64, |s, w| s.wrapping_add(u64_at(w, 0)));
        sums.push(Ok((sum, addr + (words - 1) * 8)));
    }
    let bytes: Vec<(u64, [u8; 8])> = sums
        .iter()
        .filter_map(|s| s.ok().map(|(sum, last)| (last, sum.to_ne_bytes())))
        .collect();
    let stores: Vec<(u64, &[u8])> = bytes.iter().map(|(a, b)| (*a, &b[..])).collect();
    // SAFETY: each slot's last word, a u64 that nothing writes during the call (the caller's
    // contract).
    let mut stored = unsafe { m.store(&stores) }
        .map_err(dev_err("churn", "storing sums"))?
        .into_iter();
    let mut results = Vec::with_capacity(n);
    for s in sums {
        results.push(match s {
            Err(addr) => SlotResult::Refused { addr },
            Ok((sum, last)) => match stored.next() {
                Some(Ok(())) => SlotResult::Stored(sum),
                Some(Err(e)) if M::refused(&e) => SlotResult::Refused { addr: last },
                Some(Err(e)) => return Err(dev_err("churn", "storing a sum")(e)),
                None => {
                    return Err(dev_err("churn", "storing sums")(std::io::Error::other(
                        "fewer results than stores",
                    )));
                }
            },
        });
    }
    Ok(results)
}
