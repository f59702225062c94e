//! What the test knows about the region: its slots, the logical clock, and for every slot the
//! history of the tags that were live there, with the window in which each was.
//!
//! # The clock and the windows
//!
//! `Clock` is one global counter. A CPU change of one or more slots ticks it twice, once when
//! it begins (before its first system call) and once when it ends (after its last write), each
//! tick taken *under the history locks of every slot it changes*:
//!
//! - at the begin tick `b` (the clock is `b + 1` afterwards), the tags the change will make
//!   live, or may show while it runs (the zero page between a munmap and the next tag write,
//!   the old tags of pages it moves in), are added with `from = b + 1`, `until = OPEN`;
//! - at the end tick `v`, the tags that died (the old tags, the passing ones) get `until = v`.
//!
//! A device access reads the clock before it is submitted (`s`) and after its completion
//! (`e`), so the access itself happened inside `[s, e]`. A tag `T` it read was live at that
//! address during the access iff some entry for `T` has `from <= e && until >= s`:
//!
//! - an access that completed before a change began read `e <= b` and cannot have seen its new
//!   tags (`from = b + 1 > e`); it could not have, since they were written after the tick;
//! - an access that began after a change ended read `s >= v + 1` and must not see the tags that
//!   change killed (`until = v < s`): that is a stale read.
//!
//! Because the begin tick is taken under the history lock, a device check that takes the lock
//! after reading `e` sees every entry that a change begun before `e` added. Dead entries are
//! pruned only when no access in flight can still match them (`Inflight`).
//!
//! An unmapped slot has no live tag: a device read there must be refused, and a refusal is
//! always an acceptable outcome for a read (the device cannot always fault a page in: a
//! read-only slot it must pin, a fault that keeps racing invalidations).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The 64 MiB region: 22 slots of 2 MiB, then 256 of 64 KiB, then 1024 of 4 KiB, each class
/// in whole 2 MiB chunks, so no slot straddles a 2 MiB boundary (the mirror's fault window).
pub const BASE: u64 = 0x1500_0000_0000;
pub const REGION_LEN: u64 = 64 << 20;
pub const PAGE: u64 = 4096;
const CHUNK: u64 = 2 << 20;
/// (slot size, chunks of the region).
const CLASSES: [(u64, u64); 3] = [(2 << 20, 22), (64 << 10, 8), (4 << 10, 2)];
/// Bytes at each page start that hold the page's tag (eight copies of it); device reads stay
/// inside them.
pub const TAG_BYTES: u64 = 64;
/// Where in a page a device write puts its marker (past the tag words).
pub const MARKER_OFFSET: u64 = 64;

/// History entries a slot keeps past the pruning horizon, for failure messages.
const KEEP_DEAD: usize = 6;

/// A tag value that never is one: entries use it for "open".
pub const OPEN: u64 = u64::MAX;

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The global logical clock.
#[derive(Default)]
pub struct Clock(AtomicU64);

impl Clock {
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

/// Unique tags: slot tags, heap tags and device-write markers each have their own high byte,
/// so a value read anywhere says what wrote it.
#[derive(Default)]
pub struct Tags(AtomicU64);

impl Tags {
    pub const SLOT: u64 = 0x5400_0000_0000_0000;
    pub const HEAP: u64 = 0x4800_0000_0000_0000;
    pub const MARKER: u64 = 0x4d00_0000_0000_0000;

    pub fn next(&self, kind: u64) -> u64 {
        kind | (self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// The start of every device access in flight, so history is never pruned under one.
pub struct Inflight(Mutex<Vec<u64>>);

impl Inflight {
    pub fn new(threads: usize) -> Self {
        Inflight(Mutex::new(vec![OPEN; threads]))
    }

    /// Reads the clock for an access (or a batch of them) of device thread `t` and marks it in
    /// flight from then on.
    pub fn start(&self, t: usize, clock: &Clock) -> u64 {
        let mut g = lock(&self.0);
        let s = clock.now();
        g[t] = s;
        s
    }

    pub fn done(&self, t: usize) {
        lock(&self.0)[t] = OPEN;
    }

    /// Entries that died before this are matched by no access in flight or to come.
    fn horizon(&self, clock: &Clock) -> u64 {
        let g = lock(&self.0);
        g.iter().copied().min().unwrap_or(OPEN).min(clock.now())
    }
}

/// How a slot is mapped now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    Unmapped,
    ReadWrite,
    ReadOnly,
}

/// What the owner of a slot (the CPU thread changing it, or the device thread holding a write
/// lease on it) knows. Guarded by `Slot::owner`, held for a whole change or lease.
#[derive(Debug)]
pub struct SlotState {
    pub map: Map,
    /// The live history entries: none when unmapped; one tag, or the zero page (tag 0);
    /// after MADV_FREE both the old tag and 0.
    pub live: Vec<Live>,
}

/// A live history entry of a slot: its id and tag.
#[derive(Clone, Copy, Debug)]
pub struct Live {
    pub id: u64,
    pub tag: u64,
}

impl SlotState {
    pub fn mapped(&self) -> bool {
        self.map != Map::Unmapped
    }

    pub fn live_tags(&self) -> Vec<u64> {
        self.live.iter().map(|l| l.tag).collect()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub id: u64,
    pub tag: u64,
    pub from: u64,
    pub until: u64,
    /// The operation that made it live, and the one that ended it.
    pub by: &'static str,
    pub ended_by: &'static str,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.until == OPEN {
            write!(f, "{:#x} [{}, open) by {}", self.tag, self.from, self.by)
        } else {
            write!(
                f,
                "{:#x} [{}, {}] by {}, ended by {}",
                self.tag, self.from, self.until, self.by, self.ended_by
            )
        }
    }
}

pub struct Slot {
    pub index: usize,
    pub start: u64,
    pub len: u64,
    pub owner: Mutex<SlotState>,
    pub hist: Mutex<Vec<Entry>>,
}

impl Slot {
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }

    pub fn size_name(&self) -> &'static str {
        match self.len {
            l if l == 2 << 20 => "2M",
            l if l == 64 << 10 => "64K",
            _ => "4K",
        }
    }

    /// Whether `tag` was live here at some point of `[s, e]`.
    pub fn was_live(&self, tag: u64, s: u64, e: u64) -> bool {
        lock(&self.hist)
            .iter()
            .any(|x| x.tag == tag && x.from <= e && x.until >= s)
    }

    /// The history, for failure messages.
    pub fn describe(&self) -> String {
        let h = lock(&self.hist);
        let mut out = String::new();
        for (i, x) in h.iter().enumerate() {
            let _ = write!(out, "{}{x}", if i == 0 { "" } else { ", " });
        }
        out
    }

    /// The operation that ended the last window of `tag` here (`None`: never live here).
    pub fn ended_by(&self, tag: u64) -> Option<&'static str> {
        let h = lock(&self.hist);
        h.iter().rev().find(|x| x.tag == tag).map(|x| x.ended_by)
    }

    /// The window(s) in which `tag` was live here, for failure messages.
    pub fn windows_of(&self, tag: u64) -> String {
        let h = lock(&self.hist);
        let w: Vec<String> = h
            .iter()
            .filter(|x| x.tag == tag)
            .map(|x| x.to_string())
            .collect();
        if w.is_empty() {
            "never live here (or pruned)".into()
        } else {
            w.join(", ")
        }
    }
}

/// What one slot of a change does to its history (see the module documentation).
pub struct Plan<'a> {
    pub slot: &'a Slot,
    /// Tags that may show only while the change runs.
    pub passing: Vec<u64>,
    /// Tags live once it has ended (replacing `SlotState::live`, unless `keep_live`).
    pub after: Vec<u64>,
    /// Keep the slot's live entries alive (MADV_FREE without a new tag: the old tag may stay).
    pub keep_live: bool,
}

impl<'a> Plan<'a> {
    pub fn new(slot: &'a Slot, passing: &[u64], after: &[u64]) -> Self {
        Plan {
            slot,
            passing: passing.to_vec(),
            after: after.to_vec(),
            keep_live: false,
        }
    }
}

/// A change begun: the entries it added, to settle at its end.
pub struct Begun {
    /// Per plan: (passing ids, after entries).
    ids: Vec<(Vec<u64>, Vec<Live>)>,
}

/// The region's slots and the clock.
pub struct Region {
    pub slots: Vec<Slot>,
    /// Index ranges of the size classes in `slots`.
    pub classes: Vec<std::ops::Range<usize>>,
    pub clock: Clock,
    pub tags: Tags,
    pub inflight: Inflight,
    next_id: AtomicU64,
}

impl Region {
    pub fn new(device_threads: usize) -> Self {
        let mut slots = Vec::new();
        let mut classes = Vec::new();
        let mut at = BASE;
        for (size, chunks) in CLASSES {
            let first = slots.len();
            for _ in 0..chunks * CHUNK / size {
                slots.push(Slot {
                    index: slots.len(),
                    start: at,
                    len: size,
                    owner: Mutex::new(SlotState {
                        map: Map::Unmapped,
                        live: Vec::new(),
                    }),
                    hist: Mutex::new(Vec::new()),
                });
                at += size;
            }
            classes.push(first..slots.len());
        }
        assert_eq!(at, BASE + REGION_LEN);
        Region {
            slots,
            classes,
            clock: Clock::default(),
            tags: Tags::default(),
            inflight: Inflight::new(device_threads),
            next_id: AtomicU64::new(1),
        }
    }

    /// Locks the histories of the plans' slots in index order.
    fn lock_hists<'a>(&self, plans: &'a [Plan<'a>]) -> Vec<(usize, MutexGuard<'a, Vec<Entry>>)> {
        let mut order: Vec<usize> = (0..plans.len()).collect();
        order.sort_by_key(|&i| plans[i].slot.index);
        order
            .into_iter()
            .map(|i| (i, lock(&plans[i].slot.hist)))
            .collect()
    }

    /// The begin tick of a change (see the module documentation). The caller owns every slot
    /// of `plans`.
    pub fn begin(&self, op: &'static str, plans: &[Plan<'_>]) -> Begun {
        let mut guards = self.lock_hists(plans);
        let tick = self.clock.tick();
        let mut ids = vec![(Vec::new(), Vec::new()); plans.len()];
        for (i, h) in &mut guards {
            let p = &plans[*i];
            for (k, &tag) in p.passing.iter().chain(&p.after).enumerate() {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                h.push(Entry {
                    id,
                    tag,
                    from: tick + 1,
                    until: OPEN,
                    by: op,
                    ended_by: "",
                });
                if k < p.passing.len() {
                    ids[*i].0.push(id);
                } else {
                    ids[*i].1.push(Live { id, tag });
                }
            }
        }
        Begun { ids }
    }

    /// The end tick: closes the entries that died and makes the plans' `after` tags the
    /// slots' live ones. `states` are the owned states of the plans' slots, in plan order.
    pub fn end(
        &self,
        op: &'static str,
        plans: &[Plan<'_>],
        begun: Begun,
        states: &mut [&mut SlotState],
    ) -> u64 {
        let horizon = self.inflight.horizon(&self.clock);
        let mut guards = self.lock_hists(plans);
        let tick = self.clock.tick();
        for (i, h) in &mut guards {
            let p = &plans[*i];
            let st = &mut *states[*i];
            let (passing, after) = &begun.ids[*i];
            let mut dying: Vec<u64> = passing.clone();
            if p.keep_live {
                st.live.extend(after);
            } else {
                dying.extend(st.live.iter().map(|l| l.id));
                st.live = after.clone();
            }
            for x in h.iter_mut() {
                if dying.contains(&x.id) {
                    x.until = tick;
                    x.ended_by = op;
                }
            }
            // The last few entries stay for failure messages, whatever their age.
            let keep_from = h.len().saturating_sub(KEEP_DEAD);
            let mut k = 0;
            h.retain(|x| {
                k += 1;
                k > keep_from || x.until == OPEN || x.until >= horizon
            });
        }
        tick
    }
}
