//! The device threads: each drives its own [`IommuMirror`] (its own DMA engine and IO page
//! table on the one notifier) with small reads of slot tags, write leases, and reads of heap
//! vectors, and checks every result against the model.
//!
//! - **Reads** go out in batches of [`READ_BATCH`] commands, half of them at slots a CPU
//!   thread changed a moment ago (where a stale translation would show), each bracketed by two
//!   clock reads. Every word read must be a tag live at that slot during the access
//!   ([`Slot::was_live`]); a refusal is always acceptable.
//! - **Write leases** take a slot's owner lock (so no CPU thread changes it meanwhile), write a
//!   marker past the tag words of one page, and then read it back with the CPU: a read-write
//!   slot must show the marker (a write through a stale translation lands in the old page and
//!   is lost), a read-only or unmapped one must refuse the write.
//! - **Heap reads** read a word of a live heap vector; if the vector was not freed meanwhile the
//!   word must be its tag.

use std::sync::atomic::Ordering;

use svmirror_iommu::{DmaCommand, IommuError, IommuMirror};

use crate::engine::Shared;
use crate::model::{MARKER_OFFSET, Map, PAGE, Slot, TAG_BYTES, Tags, lock};
use svmirror_testsupport::Rng;

/// Reads submitted before the first is waited for.
pub const READ_BATCH: usize = 8;
const HEAP_BATCH: usize = 4;

/// Why a device command failed, if it is a refusal (a device fault the driver could not or
/// would not resolve): the root cause's message with addresses blanked, for the summary.
/// `None` for any other failure (a dead or hung device, a failed transfer): those are bugs.
pub fn refusal_kind(e: &IommuError) -> Option<String> {
    if !matches!(e, IommuError::DeviceFault { .. }) {
        return None;
    }
    let mut root: &dyn std::error::Error = e;
    while let Some(s) = root.source() {
        root = s;
    }
    let msg = root.to_string();
    let mut out = String::new();
    let mut rest = msg.as_str();
    while let Some(i) = rest.find("0x") {
        out.push_str(&rest[..i]);
        out.push('_');
        rest = rest[i + 2..].trim_start_matches(|c: char| c.is_ascii_hexdigit());
    }
    out.push_str(rest);
    Some(out)
}

fn pick_slot<'a>(sh: &'a Shared, rng: &mut Rng) -> &'a Slot {
    if rng.below(2) == 0 {
        if let Some(i) = sh.hot.pick(rng) {
            return &sh.region.slots[i];
        }
    }
    let class = &sh.region.classes[rng.below(sh.region.classes.len())];
    &sh.region.slots[class.start + rng.below(class.len())]
}

pub fn device_thread(sh: &Shared, t: usize, mirror: &IommuMirror) {
    let mut rng = Rng::new(sh.cfg.seed ^ (0xd0_u64 << 56 | t as u64));
    let me = &sh.progress[sh.cfg.cpu_threads + t];
    while !sh.stop.load(Ordering::Relaxed) {
        let roll = rng.below(100);
        if roll < 70 {
            read_batch(sh, &mut rng, t, mirror);
        } else if roll < 95 {
            write_lease(sh, &mut rng, t, mirror);
        } else if sh.cfg.mix.has(crate::engine::Op::Heap) {
            heap_batch(sh, &mut rng, t, mirror);
        }
    }
    me.beat("finished");
}

fn read_batch(sh: &Shared, rng: &mut Rng, t: usize, mirror: &IommuMirror) {
    let me = &sh.progress[sh.cfg.cpu_threads + t];
    let clock = &sh.region.clock;
    sh.region.inflight.start(t, clock);
    let mut pending = Vec::with_capacity(READ_BATCH);
    for _ in 0..READ_BATCH {
        let slot = pick_slot(sh, rng);
        let addr = slot.start + rng.below(slot.pages() as usize) as u64 * PAGE;
        let len = 8 * (1 + rng.below((TAG_BYTES / 8) as usize)) as u64;
        let s = clock.now();
        match mirror.submit(DmaCommand::Read { src: addr, len }) {
            Ok(f) => pending.push((slot, addr, len, s, f)),
            Err(e) => {
                sh.fail(
                    "device",
                    format!("device {t}: submit of a read at {addr:#x}: {e}"),
                );
                break;
            }
        }
    }
    for (slot, addr, len, s, fence) in pending {
        me.set(format_args!(
            "waiting for a read of {len} bytes at {addr:#x} (slot {} {})",
            slot.index,
            slot.size_name()
        ));
        let res = fence.wait();
        let e = clock.now();
        sh.stats.reads.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(done) => {
                let mut seen: Vec<u64> = done
                    .data
                    .chunks_exact(8)
                    .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                seen.dedup();
                for v in seen {
                    if !slot.was_live(v, s, e) {
                        sh.stats.stale.fetch_add(1, Ordering::Relaxed);
                        let by = slot.ended_by(v);
                        let by_name = by.unwrap_or("never live here (or pruned)");
                        *lock(&sh.stats.stale_by).entry(by_name).or_default() += 1;
                        sh.fail(
                            if by.is_some() {
                                "stale-read"
                            } else {
                                "stale-read-pruned"
                            },
                            format!(
                                "stale read: device {t} read {len} bytes at {addr:#x} (slot {} \
                                 {}) in op window [{s}, {e}] and got {v:#x} ({}), live there: \
                                 {}; slot history: [{}]",
                                slot.index,
                                slot.size_name(),
                                describe_value(v),
                                slot.windows_of(v),
                                slot.describe()
                            ),
                        );
                    }
                }
            }
            Err(err) => match refusal_kind(&err) {
                Some(kind) => sh.stats.refusal("read", kind),
                None => sh.fail(
                    "device",
                    format!("device {t}: read of {len} bytes at {addr:#x} failed: {err}"),
                ),
            },
        }
    }
    sh.region.inflight.done(t);
}

/// What kind of value a word read is, by its high byte.
fn describe_value(v: u64) -> &'static str {
    match v & (0xff << 56) {
        _ if v == 0 => "zero page",
        Tags::SLOT => "a slot tag",
        Tags::HEAP => "a heap tag",
        Tags::MARKER => "a device-write marker",
        _ => "not a tag",
    }
}

fn write_lease(sh: &Shared, rng: &mut Rng, t: usize, mirror: &IommuMirror) {
    let me = &sh.progress[sh.cfg.cpu_threads + t];
    let slot = pick_slot(sh, rng);
    let Ok(st) = slot.owner.try_lock() else {
        return;
    };
    let page = slot.start + rng.below(slot.pages() as usize) as u64 * PAGE;
    let dst = page + MARKER_OFFSET;
    let marker = sh.region.tags.next(Tags::MARKER);
    me.set(format_args!(
        "write lease: device write of a marker at {dst:#x} (slot {} {}, {:?})",
        slot.index,
        slot.size_name(),
        st.map
    ));
    let data = marker.to_ne_bytes().to_vec();
    let res = mirror
        .submit(DmaCommand::Write { dst, data })
        .and_then(|f| f.wait());
    sh.stats.writes.fetch_add(1, Ordering::Relaxed);
    let what = |kind: &str| {
        format!(
            "{kind}: device {t} wrote marker {marker:#x} at {dst:#x} (slot {} {}, {:?}, live \
             {:?}); slot history: [{}]",
            slot.index,
            slot.size_name(),
            st.map,
            st.live_tags(),
            slot.describe()
        )
    };
    match (st.map, res) {
        (Map::ReadWrite, Ok(_)) => {
            // SAFETY: the slot is mapped read-write and this thread owns it (lease): no CPU
            // thread changes it, and the device write has completed. Raw pointer, volatile.
            let cpu = unsafe { std::ptr::read_volatile(dst as *const u64) };
            if cpu != marker {
                sh.stats.lost.fetch_add(1, Ordering::Relaxed);
                sh.fail(
                    "lost-write",
                    format!(
                        "{}; the CPU reads {cpu:#x} there",
                        what("lost device write")
                    ),
                );
            }
        }
        (Map::ReadOnly, Ok(_)) => sh.fail(
            "ro-write",
            what("device write to a read-only slot succeeded"),
        ),
        (Map::Unmapped, Ok(_)) => sh.fail(
            "unmapped-write",
            what("device write to an unmapped slot succeeded"),
        ),
        (map, Err(err)) => match refusal_kind(&err) {
            Some(kind) => {
                let class = if map == Map::ReadWrite {
                    "write to read-write"
                } else {
                    "write"
                };
                sh.stats.refusal(class, kind);
            }
            None => sh.fail(
                "device",
                format!("device {t}: write at {dst:#x} failed: {err}"),
            ),
        },
    }
    drop(st);
}

fn heap_batch(sh: &Shared, rng: &mut Rng, t: usize, mirror: &IommuMirror) {
    let me = &sh.progress[sh.cfg.cpu_threads + t];
    let mut pending = Vec::with_capacity(HEAP_BATCH);
    for _ in 0..HEAP_BATCH {
        let i = rng.below(sh.heap.len());
        let (addr, tag, gen_) = {
            let r = lock(&sh.heap[i]);
            if r.vec.is_empty() {
                continue;
            }
            let at = r.vec.as_ptr() as u64 + 8 * rng.below(r.vec.len()) as u64;
            (at, r.tag, r.gen_)
        };
        match mirror.submit(DmaCommand::Read { src: addr, len: 8 }) {
            Ok(f) => pending.push((i, addr, tag, gen_, f)),
            Err(e) => {
                sh.fail("device", format!("device {t}: submit of a heap read: {e}"));
                break;
            }
        }
    }
    for (i, addr, tag, gen_, fence) in pending {
        me.set(format_args!(
            "waiting for a heap read at {addr:#x} (vec {i})"
        ));
        let res = fence.wait();
        let same = lock(&sh.heap[i]).gen_ == gen_;
        sh.stats.heap_reads.fetch_add(1, Ordering::Relaxed);
        if !same {
            // Freed while the device read it: the memory may hold anything by now.
            sh.stats.heap_raced.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match res {
            Ok(done) => {
                let v = u64::from_ne_bytes(done.data[..8].try_into().expect("8 bytes"));
                if v != tag {
                    sh.stats.stale.fetch_add(1, Ordering::Relaxed);
                    sh.fail(
                        "heap-stale-read",
                        format!(
                            "stale heap read: device {t} read {v:#x} ({}) at {addr:#x} in heap \
                             vec {i}, which held {tag:#x} during the whole access",
                            describe_value(v)
                        ),
                    );
                }
            }
            Err(err) => match refusal_kind(&err) {
                Some(kind) => sh.stats.refusal("heap read", kind),
                None => sh.fail(
                    "device",
                    format!("device {t}: heap read at {addr:#x} failed: {err}"),
                ),
            },
        }
    }
}
