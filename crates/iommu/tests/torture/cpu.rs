//! The CPU threads: each picks an operation by weight from the mix, a slot, takes the slot's
//! owner lock (never waiting for it: a busy slot is skipped), and changes the slot, writing a
//! fresh tag into every page it (re)maps, bracketed by the model's begin and end ticks.

use std::io;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::Duration;

use svmirror_core::Range;
use svmirror_mm::{Advice, Protection};

use crate::engine::{Op, Shared};
use crate::model::{Map, PAGE, Plan, Slot, SlotState, Tags, lock};
use svmirror_testsupport::Rng;

fn ptr(addr: u64) -> *mut libc::c_void {
    addr as usize as *mut libc::c_void
}

fn os_err(what: &str, addr: u64) -> String {
    format!("{what} at {addr:#x}: {}", io::Error::last_os_error())
}

/// mmap of fresh private anonymous read-write memory at exactly `addr`: over whatever is there
/// (`MAP_FIXED`), or only into a hole (`MAP_FIXED_NOREPLACE`).
fn map_at(addr: u64, len: u64, replace: bool) -> Result<(), String> {
    let fixed = if replace {
        libc::MAP_FIXED
    } else {
        libc::MAP_FIXED_NOREPLACE
    };
    // SAFETY: maps at an address of the test's own region, owned by this thread (the slot's
    // owner lock); nothing in Rust refers into it. With MAP_FIXED the old pages go, as the
    // change intends; the device keeps its pinned copies until the invalidation.
    let p = unsafe {
        libc::mmap(
            ptr(addr),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
            -1,
            0,
        )
    };
    if p as u64 != addr {
        return Err(os_err(
            if replace { "mmap MAP_FIXED" } else { "mmap" },
            addr,
        ));
    }
    if len == 2 << 20 {
        // THP where the system allows it (enabled=madvise): huge pages, and invalidations
        // widened over them, are part of the torture.
        // SAFETY: advice only; no contents change.
        unsafe { libc::madvise(p, len as usize, libc::MADV_HUGEPAGE) };
    }
    Ok(())
}

/// Writes `tag` into the tag words of every page of `[start, start + len)`.
pub fn write_tag(start: u64, len: u64, tag: u64) {
    for page in (start..start + len).step_by(PAGE as usize) {
        for w in 0..8 {
            // SAFETY: the page is mapped read-write and owned by this thread (the slot's owner
            // lock, which a device write lease also takes): nothing else writes it, and the
            // device only reads it meanwhile. Raw pointer, volatile: DMA memory (STYLE rule 6).
            unsafe { std::ptr::write_volatile((page + w * 8) as *mut u64, tag) };
        }
    }
}

fn range(start: u64, len: u64) -> Range {
    Range::with_len(start, len).expect("slot range")
}

pub fn cpu_thread(sh: &Shared, t: usize) {
    let mut rng = Rng::new(sh.cfg.seed ^ (0x00c0_ffee_u64 << 8 | t as u64));
    let me = &sh.progress[t];
    while !sh.stop.load(Ordering::Relaxed) {
        // Paced by the devices: one change per `ops_per_change` device operations (plus one
        // per thread of slack), whatever the build profile makes fast or slow.
        let allowed = sh.stats.ops() / sh.cfg.ops_per_change + sh.cfg.cpu_threads as u64;
        if sh.stats.attempts.load(Ordering::Relaxed) >= allowed {
            me.beat("waiting for the devices to catch up");
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        sh.stats.attempts.fetch_add(1, Ordering::Relaxed);
        me.beat("picking an operation");
        let op = sh.cfg.mix.pick(&mut rng);
        let res = if op == Op::Heap {
            heap_op(sh, &mut rng, t)
        } else {
            slot_op(sh, &mut rng, t, op)
        };
        if let Err(e) = res {
            sh.fail("cpu", format!("cpu thread {t}: {e}"));
        }
    }
    me.beat("finished");
}

fn heap_op(sh: &Shared, rng: &mut Rng, t: usize) -> Result<(), String> {
    let i = rng.below(sh.heap.len());
    let me = &sh.progress[t];
    me.set(format_args!("heap: free and reallocate vec {i}"));
    let mut rec = lock(&sh.heap[i]);
    // Free first: the new allocation may land where the old one was.
    rec.vec = Vec::new();
    let words = [512usize, 4096, 32 << 10, 160 << 10][rng.below(4)] + rng.below(512);
    let tag = sh.region.tags.next(Tags::HEAP);
    rec.vec = vec![tag; words];
    rec.tag = tag;
    rec.gen_ += 1;
    drop(rec);
    sh.count(Op::Heap);
    Ok(())
}

fn slot_op(sh: &Shared, rng: &mut Rng, t: usize, op: Op) -> Result<(), String> {
    let class = sh.region.classes[rng.below(sh.region.classes.len())].clone();
    let idx = class.start + rng.below(class.len());
    let slot = &sh.region.slots[idx];
    let Ok(mut st) = slot.owner.try_lock() else {
        return Ok(());
    };
    let me = &sh.progress[t];
    let (start, len) = (slot.start, slot.len);
    let r = sh.region.tags.next(Tags::SLOT);
    let done = if !st.mapped() {
        me.set(format_args!(
            "refill: mmap slot {idx} {:#x}+{len:#x}",
            start
        ));
        let plan = [Plan::new(slot, &[0], &[r])];
        let b = sh.region.begin("refill", &plan);
        map_at(start, len, false)?;
        write_tag(start, len, r);
        st.map = Map::ReadWrite;
        sh.region.end("refill", &plan, b, &mut [&mut st]);
        sh.count_refill();
        true
    } else {
        let op = applicable(sh, op, &st, len);
        me.set(format_args!(
            "{}: slot {idx} {:#x}+{len:#x} ({:?})",
            op.name(),
            start,
            st.map
        ));
        run(sh, rng, op, slot, &mut st, r)?
    };
    drop(st);
    if done {
        sh.hot.push(idx);
    }
    Ok(())
}

/// What `op` becomes on a slot where it does not apply: a read-only slot goes back to
/// read-write (or is unmapped when the mix has no mprotect); a 4 KiB slot cannot be shrunk.
fn applicable(sh: &Shared, op: Op, st: &SlotState, len: u64) -> Op {
    let ro_ok = matches!(
        op,
        Op::Munmap | Op::MmapFixed | Op::ApiMunmap | Op::ApiMprotect
    );
    if st.map == Map::ReadOnly && !ro_ok {
        return if sh.cfg.mix.has(Op::ApiMprotect) {
            Op::ApiMprotect
        } else {
            Op::Munmap
        };
    }
    if len == PAGE && matches!(op, Op::MremapGrow | Op::ApiMremap) {
        return if op == Op::ApiMremap {
            Op::ApiMunmap
        } else {
            Op::Munmap
        };
    }
    op
}

/// Runs `op` on an owned, mapped slot. Returns whether the slot changed.
fn run(
    sh: &Shared,
    rng: &mut Rng,
    op: Op,
    slot: &Slot,
    st: &mut SlotState,
    r: u64,
) -> Result<bool, String> {
    let region = &sh.region;
    let (start, len) = (slot.start, slot.len);
    let mm = &*sh.mm;
    match op {
        Op::Munmap | Op::ApiMunmap => {
            let remap = rng.below(2) == 0;
            let plan = if remap {
                [Plan::new(slot, &[0], &[r])]
            } else {
                [Plan::new(slot, &[], &[])]
            };
            let name = match (op, remap) {
                (Op::Munmap, true) => "munmap+mmap",
                (Op::Munmap, false) => "munmap (hole)",
                (_, true) => "api-munmap+mmap",
                (_, false) => "api-munmap (hole)",
            };
            let b = region.begin(name, &plan);
            if op == Op::ApiMunmap {
                // SAFETY: nothing in Rust refers into the region (raw pointers only).
                unsafe { mm.munmap(range(start, len)) }.map_err(|e| format!("api munmap: {e}"))?;
            } else {
                // SAFETY: as above.
                if unsafe { libc::munmap(ptr(start), len as usize) } != 0 {
                    return Err(os_err("munmap", start));
                }
            }
            st.map = Map::Unmapped;
            if remap {
                map_at(start, len, false)?;
                write_tag(start, len, r);
                st.map = Map::ReadWrite;
            }
            region.end(name, &plan, b, &mut [st]);
        }
        Op::MmapFixed => {
            let plan = [Plan::new(slot, &[0], &[r])];
            let b = region.begin(op.name(), &plan);
            map_at(start, len, true)?;
            write_tag(start, len, r);
            st.map = Map::ReadWrite;
            region.end(op.name(), &plan, b, &mut [st]);
        }
        Op::MremapMove | Op::MremapDontunmap => {
            let Some((dst, mut dst_st)) = free_slot_like(sh, rng, slot) else {
                // No free slot of this size right now.
                return Ok(false);
            };
            let dontunmap = op == Op::MremapDontunmap;
            let moved = st.live_tags();
            let plan = [
                Plan::new(slot, &[], if dontunmap { &[0] } else { &[] }),
                Plan::new(dst, &moved, &[r]),
            ];
            let b = region.begin(op.name(), &plan);
            let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
            if dontunmap {
                flags |= libc::MREMAP_DONTUNMAP;
            }
            // SAFETY: moves the test's own slot to another slot of the region that is
            // unmapped and owned by this thread; nothing in Rust refers into either.
            let p = unsafe {
                libc::mremap(
                    ptr(start),
                    len as usize,
                    len as usize,
                    flags,
                    ptr(dst.start),
                )
            };
            if p as u64 != dst.start {
                return Err(os_err(op.name(), start));
            }
            write_tag(dst.start, len, r);
            st.map = if dontunmap {
                Map::ReadWrite
            } else {
                Map::Unmapped
            };
            dst_st.map = Map::ReadWrite;
            region.end(op.name(), &plan, b, &mut [&mut *st, &mut *dst_st]);
            drop(dst_st);
            sh.hot.push(dst.index);
        }
        Op::MremapGrow | Op::ApiMremap => {
            let plan = [Plan::new(slot, &[0], &[r])];
            let b = region.begin(op.name(), &plan);
            let half = len / 2;
            if op == Op::ApiMremap {
                // SAFETY: nothing in Rust refers into the region.
                let got = unsafe { mm.mremap(range(start, len), half, false) }
                    .map_err(|e| format!("api mremap shrink: {e}"))?;
                if got.start() != start {
                    return Err(format!("api mremap shrink moved {start:#x} to {got}"));
                }
            } else {
                // SAFETY: shrinks the test's own slot in place; nothing refers into it.
                let p = unsafe { libc::mremap(ptr(start), len as usize, half as usize, 0) };
                if p as u64 != start {
                    return Err(os_err("mremap shrink", start));
                }
            }
            // Grow back in place: no event (nothing is unmapped), fresh zero pages.
            // SAFETY: the tail is the slot's own, just unmapped; nothing refers into it.
            let p = unsafe { libc::mremap(ptr(start), half as usize, len as usize, 0) };
            if p as u64 != start {
                return Err(os_err("mremap grow in place", start));
            }
            write_tag(start, len, r);
            region.end(op.name(), &plan, b, &mut [st]);
        }
        Op::MadvDontneed | Op::MadvFree | Op::ApiMadvise => {
            let free = match op {
                Op::MadvFree => true,
                Op::ApiMadvise => rng.below(2) == 0,
                _ => false,
            };
            let rewrite = rng.below(2) == 0;
            let mut plan = if rewrite {
                [Plan::new(slot, &[0], &[r])]
            } else {
                [Plan::new(slot, &[], &[0])]
            };
            // MADV_FREE without a new tag: the page may keep its old contents.
            plan[0].keep_live = free && !rewrite;
            let name = match (op, free, rewrite) {
                (Op::ApiMadvise, true, true) => "api-madvise-free+tag",
                (Op::ApiMadvise, true, false) => "api-madvise-free",
                (Op::ApiMadvise, false, true) => "api-madvise-dontneed+tag",
                (Op::ApiMadvise, false, false) => "api-madvise-dontneed",
                (_, true, true) => "madv-free+tag",
                (_, true, false) => "madv-free",
                (_, false, true) => "madv-dontneed+tag",
                (_, false, false) => "madv-dontneed",
            };
            let b = region.begin(name, &plan);
            if op == Op::ApiMadvise {
                let advice = if free { Advice::Free } else { Advice::DontNeed };
                // SAFETY: the contents may go; nothing in Rust refers into the region.
                unsafe { mm.madvise(range(start, len), advice) }
                    .map_err(|e| format!("api madvise: {e}"))?;
            } else {
                let advice = if free {
                    libc::MADV_FREE
                } else {
                    libc::MADV_DONTNEED
                };
                // SAFETY: as above.
                if unsafe { libc::madvise(ptr(start), len as usize, advice) } != 0 {
                    return Err(os_err(op.name(), start));
                }
            }
            if rewrite {
                write_tag(start, len, r);
            }
            region.end(name, &plan, b, &mut [st]);
        }
        Op::ApiMprotect => {
            // Contents do not change: no history entry. Write leases check the protection.
            let (prot, map) = if st.map == Map::ReadOnly {
                (Protection::READ_WRITE, Map::ReadWrite)
            } else {
                (Protection::READ, Map::ReadOnly)
            };
            mm.mprotect(range(start, len), prot)
                .map_err(|e| format!("api mprotect: {e}"))?;
            st.map = map;
        }
        Op::Heap => unreachable!("heap operations take no slot"),
    }
    sh.count(op);
    Ok(true)
}

/// An unmapped slot of the same size as `like`, with its owner lock (only tried: the caller
/// already owns `like`, and waiting for a second slot could deadlock).
fn free_slot_like<'a>(
    sh: &'a Shared,
    rng: &mut Rng,
    like: &Slot,
) -> Option<(&'a Slot, MutexGuard<'a, SlotState>)> {
    let class = sh
        .region
        .classes
        .iter()
        .find(|c| c.contains(&like.index))?
        .clone();
    for _ in 0..8 {
        let d = &sh.region.slots[class.start + rng.below(class.len())];
        if d.index == like.index {
            continue;
        }
        if let Ok(g) = d.owner.try_lock() {
            if !g.mapped() {
                return Some((d, g));
            }
        }
    }
    None
}
