//! Churn: the device works on half of a set of slots while a CPU thread changes the memory of
//! the other half, through the SVM API and behind its back with plain libc calls; then the
//! halves swap. Every device result is checked against what the CPU wrote.
//!
//! # Why the expected result is well defined
//!
//! Each round, the device sums every slot of its half (all words but the last) and stores the
//! sum in the slot's last word, reading the slot table (address, words) through its mirror
//! first. Meanwhile the CPU thread changes only the other half's slots, and nothing else the
//! device reads. When both are done, a barrier (an SVM API call, which returns only after the
//! monitor has handled every userfaultfd event it has read; a plain munmap or madvise returns
//! only after its event was read) makes every CPU change of the round coherent on the device.
//! So in the next round, when the device works on the slots just changed, the only right
//! answer is the sum of what the CPU wrote last, stored where the CPU now sees it:
//!
//! - a translation left over from before a munmap/mmap at the same address, a madvise
//!   DONTNEED, or a realloc that moved a `Vec` would read the old page (still pinned) and store
//!   into it: the sum is the old one, and the CPU's slot keeps its sentinel;
//! - a slot the CPU made read-only through the SVM API must refuse the device's store, and keep
//!   its last word unchanged.
//!
//! The CPU computes the expected sums from its own model of what it wrote (generation numbers),
//! not by reading the memory, and checks that the memory holds what the model says.
//!
//! # Plain madvise on pages the device has faulted
//!
//! A plain `madvise(MADV_DONTNEED)` is reported (userfaultfd REMOVE) *before* the kernel zaps
//! the pages. svmirror-mm holds the REMOVE's invalidation open until it sees the zap done, so
//! a device fault on those pages meanwhile waits and then maps what the CPU has after the zap
//! (svmirror-mm `zap.rs`). The churn therefore zaps, with plain libc, pages the device faulted
//! in the round before, and glibc trims its heaps (also `madvise(MADV_DONTNEED)`) as it likes.
//! Each mapped slot is still a mapping of its own between guard pages, so that each plain
//! change hits exactly one slot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use svmirror_core::{PAGE_SIZE, Range};
use svmirror_mm::{Advice, MmError, ProcessMm, Protection};

use super::report::{AppOutcome, Check, ProgressFactory};
use super::{
    AppConfig, AppError, Backend, BackendKind, DeviceWork, Result, Rng, SlotRef, SlotResult,
};

/// The largest slot, in bytes.
pub const MAX_SLOT_BYTES: u64 = 256 << 10;

/// What the last word of a slot holds until the device stores a sum there.
pub const SENTINEL: u64 = 0x5e47_1e1d_dead_beef;

/// How many times the CPU thread goes over its half while the device works, at most.
const MAX_SWEEPS: u32 = 4;

/// The word `k` of generation `generation` of slot `slot`.
fn word(slot: u64, generation: u64, k: u64) -> u64 {
    let mut z = slot
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(generation.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(k);
    z = (z ^ (z >> 31)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 29)
}

/// The sum the device must store for a slot of `words` words at `generation`.
fn expected_sum(slot: u64, generation: u64, words: u64) -> u64 {
    (0..words - 1).fold(0u64, |s, k| s.wrapping_add(word(slot, generation, k)))
}

/// A heap buffer from the global allocator (an ordinary `Vec<u64>` taken apart, so that no
/// Rust reference to memory the device writes is kept).
struct HeapBuf {
    ptr: *mut u64,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer is owned by this value and touched only by the thread that holds it, or by
// the device during a backend call that the owner waits for.
unsafe impl Send for HeapBuf {}

impl HeapBuf {
    fn new(words: usize) -> HeapBuf {
        Self::from_vec(vec![0u64; words])
    }

    fn from_vec(v: Vec<u64>) -> HeapBuf {
        let mut v = std::mem::ManuallyDrop::new(v);
        HeapBuf {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cap: v.capacity(),
        }
    }

    /// Takes the `Vec` back; the device must not be working on it.
    fn into_vec(self) -> Vec<u64> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the parts came from a `Vec<u64>` in `from_vec` and are taken back once.
        unsafe { Vec::from_raw_parts(this.ptr, this.len, this.cap) }
    }
}

impl Drop for HeapBuf {
    fn drop(&mut self) {
        // SAFETY: as in `into_vec`; `self` is not used again.
        drop(unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) });
    }
}

/// Where a slot's words live.
enum Memory {
    /// A `Vec<u64>` from the global allocator: small ones live in the malloc heap, large ones
    /// in their own mmap that `free` unmaps and `realloc` mremaps.
    Heap(HeapBuf),
    /// A private anonymous mapping of its own.
    Mapped(Range),
}

/// One slot and the CPU's model of it.
struct Slot {
    id: u64,
    mem: Memory,
    words: u64,
    generation: u64,
    read_only: bool,
    /// What the last word must hold.
    last: u64,
}

impl Slot {
    fn addr(&self) -> u64 {
        match &self.mem {
            Memory::Heap(b) => b.ptr as u64,
            Memory::Mapped(r) => r.start(),
        }
    }

    fn slot_ref(&self) -> SlotRef {
        SlotRef {
            addr: self.addr(),
            words: self.words,
        }
    }

    fn ptr(&self) -> *mut u64 {
        self.addr() as usize as *mut u64
    }

    /// Writes generation `generation` and the sentinel.
    fn fill(&mut self, generation: u64) {
        let p = self.ptr();
        for k in 0..self.words - 1 {
            // SAFETY: `k < words`, inside the slot's memory, which is mapped read-write and
            // not in the device's half this round.
            unsafe {
                p.wrapping_add(k as usize)
                    .write_volatile(word(self.id, generation, k))
            };
        }
        // SAFETY: as above, the last word.
        unsafe {
            p.wrapping_add(self.words as usize - 1)
                .write_volatile(SENTINEL)
        };
        self.generation = generation;
        self.last = SENTINEL;
    }

    /// Reads word `k`.
    fn read(&self, k: u64) -> u64 {
        // SAFETY: `k < words`, inside the slot's memory, which is mapped readable.
        unsafe { self.ptr().wrapping_add(k as usize).read_volatile() }
    }
}

/// A CPU change, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Change {
    VecReplaced,
    VecReallocated,
    Rewritten,
    SvmMunmap,
    LibcMunmap,
    SvmDontNeed,
    LibcDontNeed,
    SvmReadOnly,
    SvmReadWrite,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::VecReplaced => "Vec freed and reallocated",
            Change::VecReallocated => "Vec grown or shrunk (realloc)",
            Change::Rewritten => "rewritten in place",
            Change::SvmMunmap => "munmap + mmap through the SVM API",
            Change::LibcMunmap => "munmap + mmap through libc (userfaultfd)",
            Change::SvmDontNeed => "madvise DONTNEED through the SVM API",
            Change::LibcDontNeed => "madvise DONTNEED through libc (userfaultfd)",
            Change::SvmReadOnly => "mprotect read-only through the SVM API",
            Change::SvmReadWrite => "mprotect read-write through the SVM API",
        }
    }
}

fn mm_err(what: &'static str) -> impl FnOnce(MmError) -> AppError {
    move |e| AppError::device("churn", BackendKind::Sim, what, e)
}

fn os_err(what: &'static str) -> AppError {
    AppError::device(
        "churn",
        BackendKind::Sim,
        what,
        std::io::Error::last_os_error(),
    )
}

/// Maps `len` bytes read-write between two PROT_NONE guard pages, so that the slot is a
/// mapping (VMA) of its own: the kernel never merges it with a neighbour, and a device fault
/// next door never takes it in (see [`run`] on why that matters).
fn map_guarded(len: u64) -> Result<Range> {
    let total = len + 2 * PAGE_SIZE;
    // SAFETY: a new private anonymous reservation at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap"));
    }
    let slot = p as u64 + PAGE_SIZE;
    // SAFETY: the middle of the reservation just made, which nothing else uses.
    let rc = unsafe {
        libc::mprotect(
            slot as usize as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if rc != 0 {
        let e = os_err("mprotect");
        // SAFETY: the reservation made above, unmapped once.
        unsafe { libc::munmap(p, total as usize) };
        return Err(e);
    }
    Range::with_len(slot, len).map_err(|e| AppError::device("churn", BackendKind::Sim, "mmap", e))
}

/// Unmaps the guard pages around `slot` (which must be unmapped already, or unmapped by the
/// caller through the SVM API).
fn unmap_guards(slot: Range) {
    for g in [slot.start() - PAGE_SIZE, slot.end()] {
        // SAFETY: a PROT_NONE guard page of ours, never touched and never faulted by a device.
        unsafe { libc::munmap(g as usize as *mut libc::c_void, PAGE_SIZE as usize) };
    }
}

/// Maps a new slot where `old` (just unmapped, its guard pages still there) was, or, if
/// something else took the hole, a guarded slot elsewhere.
fn remap(old: Range) -> Result<Range> {
    // SAFETY: a new private anonymous mapping; MAP_FIXED_NOREPLACE never replaces one.
    let p = unsafe {
        libc::mmap(
            old.start() as usize as *mut libc::c_void,
            old.len() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as u64 == old.start() {
        return Ok(old);
    }
    if p != libc::MAP_FAILED {
        // SAFETY: the mapping just made at an address we did not ask for: ours to undo.
        unsafe { libc::munmap(p, old.len() as usize) };
    }
    unmap_guards(old);
    map_guarded(old.len())
}

/// The CPU thread's side of one round: changes every slot of `half` at least once, and keeps
/// going over them while the device works (`device_done` unset), up to [`MAX_SWEEPS`] times.
fn churn_half(
    mm: &ProcessMm,
    half: &mut [Slot],
    table: &mut [SlotRef],
    rng: &mut Rng,
    next_generation: &mut u64,
    device_done: &AtomicBool,
    changes: &mut BTreeMap<Change, u64>,
) -> Result<()> {
    for sweep in 0..MAX_SWEEPS {
        if sweep > 0 && device_done.load(Ordering::Acquire) {
            break;
        }
        for (slot, entry) in half.iter_mut().zip(table.iter_mut()) {
            *next_generation += 1;
            let change = change_slot(mm, slot, rng, *next_generation)?;
            *changes.entry(change).or_default() += 1;
            // The device does not read this half's table this round.
            *entry = slot.slot_ref();
        }
    }
    Ok(())
}

/// Applies one random change to `slot` and leaves it holding generation `generation` (or, for
/// a slot made read-only, what it held).
fn change_slot(mm: &ProcessMm, slot: &mut Slot, rng: &mut Rng, generation: u64) -> Result<Change> {
    let change = match &mut slot.mem {
        Memory::Heap(buf) => {
            let large = slot.words * 8 > 64 << 10;
            match rng.below(3) {
                0 => {
                    let words = if large {
                        16_384 + rng.below(16_384)
                    } else {
                        64 + rng.below(448)
                    };
                    // Free first, so the allocator may hand the same memory back.
                    drop(std::mem::replace(buf, HeapBuf::from_vec(Vec::new())));
                    *buf = HeapBuf::new(words as usize);
                    slot.words = words;
                    Change::VecReplaced
                }
                1 => {
                    let words = if large {
                        16_384 + rng.below(16_384)
                    } else {
                        64 + rng.below(448)
                    };
                    let mut v = std::mem::replace(buf, HeapBuf::from_vec(Vec::new())).into_vec();
                    if words as usize > v.len() {
                        v.reserve_exact(words as usize - v.len());
                    }
                    v.resize(words as usize, 0);
                    v.shrink_to_fit();
                    *buf = HeapBuf::from_vec(v);
                    slot.words = words;
                    Change::VecReallocated
                }
                _ => Change::Rewritten,
            }
        }
        Memory::Mapped(range) => {
            let range = *range;
            if slot.read_only {
                mm.mprotect(range, Protection::READ_WRITE)
                    .map_err(mm_err("mprotect"))?;
                slot.read_only = false;
                Change::SvmReadWrite
            } else {
                match rng.below(6) {
                    0 => {
                        // SAFETY: no Rust reference into the slot exists; the device is not
                        // working on it this round.
                        unsafe { mm.munmap(range) }.map_err(mm_err("munmap"))?;
                        slot.mem = Memory::Mapped(remap(range)?);
                        Change::SvmMunmap
                    }
                    1 => {
                        // SAFETY: as above; the userfaultfd monitor sees the unmap.
                        let rc = unsafe {
                            libc::munmap(
                                range.start() as usize as *mut libc::c_void,
                                range.len() as usize,
                            )
                        };
                        if rc != 0 {
                            return Err(os_err("munmap"));
                        }
                        slot.mem = Memory::Mapped(remap(range)?);
                        Change::LibcMunmap
                    }
                    2 => {
                        // SAFETY: as above; the contents are rewritten below.
                        unsafe { mm.madvise(range, Advice::DontNeed) }
                            .map_err(mm_err("madvise"))?;
                        Change::SvmDontNeed
                    }
                    3 => {
                        // SAFETY: as above; the userfaultfd monitor sees the REMOVE.
                        let rc = unsafe {
                            libc::madvise(
                                range.start() as usize as *mut libc::c_void,
                                range.len() as usize,
                                libc::MADV_DONTNEED,
                            )
                        };
                        if rc != 0 {
                            return Err(os_err("madvise"));
                        }
                        Change::LibcDontNeed
                    }
                    4 => {
                        mm.mprotect(range, Protection::READ)
                            .map_err(mm_err("mprotect"))?;
                        slot.read_only = true;
                        return Ok(Change::SvmReadOnly);
                    }
                    _ => Change::Rewritten,
                }
            }
        }
    };
    slot.fill(generation);
    Ok(change)
}

/// Builds the slots, runs the rounds, checks every result, and frees everything.
pub fn run(
    backend: &dyn Backend,
    mm: &Arc<ProcessMm>,
    config: &AppConfig,
    progress: &dyn ProgressFactory,
) -> Result<AppOutcome> {
    run_rounds(backend, mm, config, progress)
}

fn run_rounds(
    backend: &dyn Backend,
    mm: &Arc<ProcessMm>,
    config: &AppConfig,
    progress: &dyn ProgressFactory,
) -> Result<AppOutcome> {
    let scratch = mm
        .mmap_anonymous(PAGE_SIZE, Protection::READ_WRITE)
        .map_err(mm_err("mmap"))?;
    let mut halves: [Vec<Slot>; 2] = [Vec::new(), Vec::new()];
    let mut generation = 0u64;
    for id in 0..config.slots {
        let kind = (id / 2) % 4;
        let (mem, words) = match kind {
            0 => (Memory::Heap(HeapBuf::new(256)), 256),
            1 => (Memory::Heap(HeapBuf::new(24_576)), 24_576),
            2 => (Memory::Mapped(map_guarded(64 << 10)?), 8192),
            _ => (
                Memory::Mapped(map_guarded(MAX_SLOT_BYTES)?),
                MAX_SLOT_BYTES / 8,
            ),
        };
        let mut slot = Slot {
            id,
            mem,
            words,
            generation: 0,
            read_only: false,
            last: SENTINEL,
        };
        generation += 1;
        slot.fill(generation);
        halves[(id % 2) as usize].push(slot);
    }
    let mut tables: [Vec<SlotRef>; 2] = [
        halves[0].iter().map(Slot::slot_ref).collect(),
        halves[1].iter().map(Slot::slot_ref).collect(),
    ];

    let mut check = Check::default();
    let mut work = DeviceWork::default();
    let mut changes = BTreeMap::new();
    let mut refused = 0u64;
    let mut cpu_time = Duration::ZERO;
    let bar = progress.bar("churn", config.rounds, "rounds");
    let result = (|| -> Result<()> {
        for round in 0..config.rounds {
            let h = (round % 2) as usize;
            let [t0, t1] = &mut tables;
            let (dev_table, cpu_table) = if h == 0 { (t0, t1) } else { (t1, t0) };
            let [s0, s1] = &mut halves;
            let (dev_half, cpu_half) = if h == 0 { (s0, s1) } else { (s1, s0) };
            let device_done = AtomicBool::new(false);
            let mut rng = Rng::new(config.seed ^ round.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let (results, cpu) = std::thread::scope(|s| {
                let cpu = s.spawn(|| {
                    let started = Instant::now();
                    let r = churn_half(
                        mm,
                        cpu_half,
                        cpu_table,
                        &mut rng,
                        &mut generation,
                        &device_done,
                        &mut changes,
                    );
                    (r, started.elapsed())
                });
                // SAFETY: the table and the slots it points at are this half's, which nothing
                // else touches until the call returns.
                let results = unsafe { backend.sum_slots(dev_table.as_ptr(), dev_table.len()) };
                device_done.store(true, Ordering::Release);
                (results, cpu.join())
            });
            let (cpu_result, elapsed) = cpu.map_err(|_| AppError::BadParameter {
                what: "churn: the CPU thread panicked".into(),
            })?;
            cpu_result?;
            cpu_time += elapsed;
            let (results, w) = results?;
            work.add(&w);
            // The barrier: every plain munmap/madvise of the round has had its event read;
            // this SVM API call returns once the monitor has handled them all.
            // SAFETY: the scratch page holds nothing and nothing refers into it.
            unsafe { mm.madvise(scratch, Advice::DontNeed) }.map_err(mm_err("madvise"))?;

            for (slot, got) in dev_half.iter_mut().zip(&results) {
                verify(slot, *got, round, &mut check, &mut refused);
            }
            check.compare(results.len() == dev_half.len(), || {
                format!(
                    "round {round}: {} results for {} slots",
                    results.len(),
                    dev_half.len()
                )
            });
            bar.set(round + 1, config.rounds);
        }
        Ok(())
    })();
    bar.finish();

    for slot in halves.into_iter().flatten() {
        if let Memory::Mapped(r) = slot.mem {
            // SAFETY: the device is done; nothing refers into the slot.
            unsafe { mm.munmap(r) }.map_err(mm_err("munmap"))?;
            unmap_guards(r);
        }
    }
    // SAFETY: nothing refers into the scratch page.
    unsafe { mm.munmap(scratch) }.map_err(mm_err("munmap"))?;
    result?;

    let total_changes: u64 = changes.values().sum();
    let mut extra: Vec<(String, String)> = changes
        .iter()
        .map(|(c, n)| ("CPU change".to_string(), format!("{} x {n}", c.name())))
        .collect();
    extra.push((
        "device stores refused on read-only slots (expected)".into(),
        refused.to_string(),
    ));
    let outcome = AppOutcome {
        app: "churn",
        work: format!(
            "{} rounds, {} slots, {} CPU changes",
            config.rounds, config.slots, total_changes
        ),
        checks: check.count,
        mismatches: check.mismatches,
        first_mismatch: check.first,
        device: work,
        cpu_time,
        rate: None,
        extra,
    };
    Ok(outcome)
}

/// Checks the device's result for `slot` against the model, and what the memory holds.
fn verify(slot: &mut Slot, got: SlotResult, round: u64, check: &mut Check, refused: &mut u64) {
    let id = slot.id;
    let want = expected_sum(id, slot.generation, slot.words);
    match (slot.read_only, got) {
        (false, SlotResult::Stored(sum)) => {
            check.compare(sum == want, || {
                format!("round {round}, slot {id}: device summed {sum:#x}, CPU wrote words summing to {want:#x}")
            });
            slot.last = want;
        }
        (true, SlotResult::Refused { .. }) => *refused += 1,
        (false, SlotResult::Refused { addr }) => check.compare(false, || {
            format!("round {round}, slot {id}: device refused at {addr:#x} on a read-write slot")
        }),
        (true, SlotResult::Stored(sum)) => check.compare(false, || {
            format!("round {round}, slot {id}: device stored {sum:#x} into a read-only slot")
        }),
    }
    let last = slot.read(slot.words - 1);
    let expected_last = slot.last;
    check.compare(last == expected_last, || {
        format!(
            "round {round}, slot {id} at {:#x}: last word {last:#x}, expected {expected_last:#x} (a device store went elsewhere)",
            slot.addr()
        )
    });
    let mut sum = 0u64;
    for k in 0..slot.words - 1 {
        sum = sum.wrapping_add(slot.read(k));
    }
    check.compare(sum == want, || {
        format!("round {round}, slot {id}: CPU memory no longer holds what the CPU wrote")
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_change_the_expected_sum() {
        assert_ne!(expected_sum(1, 1, 256), expected_sum(1, 2, 256));
        assert_ne!(expected_sum(1, 1, 256), expected_sum(2, 1, 256));
        assert_eq!(expected_sum(3, 4, 2), word(3, 4, 0));
    }

    /// A heap slot holding generation 2, as the CPU left it.
    fn slot() -> Slot {
        let mut s = Slot {
            id: 5,
            mem: Memory::Heap(HeapBuf::new(64)),
            words: 64,
            generation: 0,
            read_only: false,
            last: SENTINEL,
        };
        s.fill(2);
        s
    }

    /// What a device does on the slot: stores `sum` in the last word.
    fn store(s: &Slot, sum: u64) -> SlotResult {
        // SAFETY: the slot's last word; no device is working on it.
        unsafe { s.ptr().wrapping_add(63).write_volatile(sum) };
        SlotResult::Stored(sum)
    }

    #[test]
    fn a_right_result_passes() {
        let mut s = slot();
        let (mut c, mut refused) = (Check::default(), 0);
        let got = store(&s, expected_sum(5, 2, 64));
        verify(&mut s, got, 0, &mut c, &mut refused);
        assert_eq!((c.count, c.mismatches), (3, 0), "{:?}", c.first);
    }

    #[test]
    fn a_stale_read_is_a_mismatch() {
        // The device summed the previous generation (an old page behind a stale translation).
        let mut s = slot();
        let (mut c, mut refused) = (Check::default(), 0);
        let got = store(&s, expected_sum(5, 1, 64));
        verify(&mut s, got, 0, &mut c, &mut refused);
        assert_eq!(c.mismatches, 2, "the sum, and the word it stored");
        assert!(c.first.unwrap().contains("device summed"));
    }

    #[test]
    fn a_store_that_went_elsewhere_is_a_mismatch() {
        // The right sum, stored into an old page: the CPU's slot keeps its sentinel.
        let mut s = slot();
        let (mut c, mut refused) = (Check::default(), 0);
        let got = SlotResult::Stored(expected_sum(5, 2, 64));
        verify(&mut s, got, 0, &mut c, &mut refused);
        assert_eq!(c.mismatches, 1);
        assert!(c.first.unwrap().contains("went elsewhere"));
    }

    #[test]
    fn read_only_slots_must_refuse_and_read_write_ones_must_not() {
        let mut s = slot();
        s.read_only = true;
        let (mut c, mut refused) = (Check::default(), 0);
        verify(
            &mut s,
            SlotResult::Refused { addr: 1 },
            0,
            &mut c,
            &mut refused,
        );
        assert_eq!((c.mismatches, refused), (0, 1));
        let got = store(&s, expected_sum(5, 2, 64));
        verify(&mut s, got, 1, &mut c, &mut refused);
        assert!(c.mismatches >= 1, "a store into a read-only slot");

        let mut s = slot();
        let mut c = Check::default();
        verify(
            &mut s,
            SlotResult::Refused { addr: 1 },
            0,
            &mut c,
            &mut refused,
        );
        assert_eq!(c.mismatches, 1, "a refusal on a read-write slot");
    }

    #[test]
    fn heap_buffers_round_trip_through_their_parts() {
        let b = HeapBuf::new(100);
        let v = b.into_vec();
        assert_eq!(v.len(), 100);
        assert!(v.iter().all(|&w| w == 0));
    }
}
