//! The interval notifier: subscriptions over address ranges and the sequence/retry protocol
//! (the kernel's `mmu_interval_notifier`).
//!
//! # The protocol
//!
//! State, all under the notifier's internal lock ([`State`]): a global sequence `seq`, the number
//! of active invalidations, the interval tree of subscriptions, the list of deferred tree edits.
//! Each subscription holds its own sequence.
//!
//! - `seq` is even while no invalidation that touches a subscription is running and odd while
//!   one is. It only ever grows: `|= 1` when an invalidation finds a subscription, `+= 1` when the
//!   last active invalidation ends.
//! - A subscription's sequence is always odd. It is set to the odd global value by the backend's
//!   `invalidate` ([`InvalidateCtx::set_seq`], under the backend's update lock), or at insert.
//! - `read_begin` returns the subscription's sequence, first waiting for the global sequence to
//!   move if the two are equal (an invalidation of this subscription is still running).
//!   `read_retry`, under the update lock, is true when the subscription's sequence moved since.
//!
//! The interleaving this defends against: a faulter snapshots the CPU page table, an invalidation
//! of the same range runs to completion (tearing down nothing, since the faulter has not programmed
//! anything yet), and then the faulter programs the device from its now stale snapshot. The
//! invalidation's `set_seq` happened under the update lock before the faulter took it, so the
//! faulter's `read_retry` sees the new sequence and starts over (DESIGN.md invariant 1).
//!
//! While `seq` is odd the tree is frozen: inserts and removes are queued and applied by the end
//! of the last active invalidation, so callbacks can be called without holding the lock
//! (invariant 5). `remove` waits for that end, so when it returns no callback of the subscription
//! runs or will run.
//!
//! # Files
//!
//! This file holds the notifier's state and the invalidation itself (start, end, release);
//! `subscription.rs` the subscriptions and their read side (`read_begin`, `read_retry`,
//! `remove`); `ctx.rs` the backend's side: the callbacks a subscription implements and the
//! contexts they are called with. The two submodules use this file's state (they are its
//! children), and this file uses only what they export to it.

mod ctx;
mod subscription;

use std::fmt;
use std::sync::Arc as StdArc;

use smallvec::SmallVec;

use crate::context::{AtomicSection, might_sleep};
use crate::error::{Error, Result};
use crate::interval_tree::{IntervalTree, LinearIndex};
use crate::range::{Event, NotifierRange, Range};
use crate::sync::{self, Arc, AtomicU8, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};

pub use ctx::{AtomicCtx, IntervalNotifierOps, InvalidateCtx, Pass, WouldBlock};
use subscription::{Membership, SubShared};
pub use subscription::{ReadSeq, Subscription};

/// The kernel starts the global sequence at 2: even (idle), and `2 - 1` is a valid odd
/// initial subscription sequence.
const SEQ_START: u64 = 2;

enum Index {
    Tree(IntervalTree<Arc<SubShared>>),
    Linear(LinearIndex<Arc<SubShared>>),
}

impl Index {
    fn insert(&mut self, s: Arc<SubShared>) {
        let (start, last, id) = (s.range.start(), s.range.last(), s.id);
        match self {
            Index::Tree(t) => t.insert(start, last, id, s),
            Index::Linear(l) => l.insert(start, last, id, s),
        }
    }

    fn remove(&mut self, s: &SubShared) -> Option<Arc<SubShared>> {
        match self {
            Index::Tree(t) => t.remove(s.range.start(), s.id),
            Index::Linear(l) => l.remove(s.range.start(), s.id),
        }
    }

    fn collect(&self, r: &Range, out: &mut Hits) {
        let f = |_, _, s: &Arc<SubShared>| out.push(s.clone());
        match self {
            Index::Tree(t) => t.for_each_overlap(r.start(), r.last(), f),
            Index::Linear(l) => l.for_each_overlap(r.start(), r.last(), f),
        }
    }

    fn len(&self) -> usize {
        match self {
            Index::Tree(t) => t.len(),
            Index::Linear(l) => l.len(),
        }
    }
}

type Hits = SmallVec<[Arc<SubShared>; 4]>;

enum Deferred {
    Insert(Arc<SubShared>),
    Remove(Arc<SubShared>),
}

/// The notifier's state, all under one lock.
///
/// States of `seq` × `active`:
/// - even, 0: idle. Tree edits apply at once.
/// - even, >0: invalidations run but none touched a subscription. Tree edits apply at once; an
///   insert makes `seq` odd so the new subscription's first `read_begin` waits for them.
/// - odd, >0: an invalidation touched a subscription. The tree is frozen; edits go to `deferred`.
/// - odd, 0: never observable (the last end makes `seq` even under the lock).
struct State {
    seq: u64,
    active: usize,
    index: Index,
    deferred: Vec<Deferred>,
    released: bool,
}

impl State {
    fn is_invalidating(&self) -> bool {
        self.seq & 1 == 1
    }
}

struct Shared {
    state: Mutex<State>,
    /// Woken whenever `seq` becomes even: `read_begin` and `remove` wait here.
    wq: Condvar,
    next_id: AtomicU64,
    stats: Counters,
}

/// Event counters, updated with relaxed atomics.
struct Counters {
    by_event: [AtomicU64; Event::KINDS],
    callbacks: AtomicU64,
    would_block: AtomicU64,
    callback_bugs: AtomicU64,
    read_begin_waits: AtomicU64,
    deferred_edits: AtomicU64,
}

impl Counters {
    fn new() -> Self {
        Counters {
            by_event: std::array::from_fn(|_| AtomicU64::new(0)),
            callbacks: AtomicU64::new(0),
            would_block: AtomicU64::new(0),
            callback_bugs: AtomicU64::new(0),
            read_begin_waits: AtomicU64::new(0),
            deferred_edits: AtomicU64::new(0),
        }
    }

    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of a notifier's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotifierStats {
    /// Invalidations started, by [`Event::index`].
    pub invalidations: [u64; Event::KINDS],
    /// `invalidate` callbacks called.
    pub callbacks: u64,
    /// Non-blocking invalidations refused by a callback.
    pub would_block: u64,
    /// Protocol bugs seen in callbacks (a refused blockable range, `set_seq` under a different
    /// update lock than `read_retry`).
    pub callback_bugs: u64,
    /// `read_begin` calls that had to wait for an invalidation to end.
    pub read_begin_waits: u64,
    /// Inserts and removes deferred because the tree was frozen.
    pub deferred_edits: u64,
    /// Subscriptions currently in the tree.
    pub subscriptions: usize,
}

/// One address space's interval notifier. Cheap to clone: clones share the same notifier.
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = sync::lock(&self.shared.state);
        f.debug_struct("Notifier")
            .field("seq", &st.seq)
            .field("active", &st.active)
            .field("subscriptions", &st.index.len())
            .field("deferred", &st.deferred.len())
            .field("released", &st.released)
            .finish()
    }
}

impl Notifier {
    /// A notifier with no subscriptions.
    pub fn new() -> Self {
        Self::with_index(Index::Tree(IntervalTree::new()))
    }

    /// A notifier that keeps subscriptions in an unsorted list and scans all of them on every
    /// invalidation. Only the baseline of the dispatch benchmark; use [`Notifier::new`].
    #[doc(hidden)]
    pub fn with_linear_index() -> Self {
        Self::with_index(Index::Linear(LinearIndex::new()))
    }

    fn with_index(index: Index) -> Self {
        Notifier {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    seq: SEQ_START,
                    active: 0,
                    index,
                    deferred: Vec::new(),
                    released: false,
                }),
                wq: Condvar::new(),
                next_id: AtomicU64::new(1),
                stats: Counters::new(),
            }),
        }
    }

    fn same(&self, shared: &Arc<Shared>) -> bool {
        Arc::ptr_eq(&self.shared, shared)
    }

    /// Subscribes `ops` to invalidations overlapping `range` (the kernel's
    /// `mmu_interval_notifier_insert`).
    ///
    /// If no invalidation is active the subscription enters the tree now. If one is active and has
    /// frozen the tree the insert is deferred to its end, and the first `read_begin` waits for
    /// that end. If one is active but touched no subscription, the insert happens now and the
    /// first `read_begin` still waits, because that invalidation may already be past its lookup.
    pub fn insert(
        &self,
        range: Range,
        ops: StdArc<dyn IntervalNotifierOps>,
    ) -> Result<Subscription> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(SubShared {
            id,
            range,
            seq: AtomicU64::new(0),
            lock_id: AtomicUsize::new(0),
            membership: AtomicU8::new(Membership::InTree as u8),
            ops,
        });
        let mut st = sync::lock(&self.shared.state);
        if st.released {
            return Err(Error::Released);
        }
        if st.active > 0 {
            if st.is_invalidating() {
                sub.set_membership(Membership::PendingInsert);
                st.deferred.push(Deferred::Insert(sub.clone()));
                Counters::bump(&self.shared.stats.deferred_edits);
            } else {
                st.seq |= 1;
                st.index.insert(sub.clone());
            }
            sub.seq.store(st.seq, Ordering::Release);
        } else {
            debug_assert!(!st.is_invalidating(), "odd seq with no active invalidation");
            sub.seq.store(st.seq - 1, Ordering::Release);
            st.index.insert(sub.clone());
        }
        drop(st);
        tracing::trace!(%range, id, "subscription inserted");
        Ok(Subscription {
            sub,
            notifier: self.shared.clone(),
        })
    }

    /// Removes `sub`, checking that it belongs to this notifier. See [`Subscription::remove`].
    pub fn remove(&self, sub: &Subscription) -> Result<()> {
        if !self.same(&sub.notifier) {
            return Err(Error::ForeignSubscription {
                range: sub.sub.range,
            });
        }
        sub.remove()
    }

    /// Starts an invalidation (the kernel's `mmu_notifier_invalidate_range_start`): every
    /// overlapping subscription's `invalidate` runs, then the two-pass finishes, then the
    /// secondary-TLB flushes. Make the CPU change after this returns, then end the returned
    /// [`Invalidation`] (or drop it).
    ///
    /// A non-blocking start that a callback refuses ends the invalidation itself and returns
    /// [`Error::WouldBlock`]; the caller must not make the change.
    #[track_caller]
    pub fn invalidate_range_start(&self, range: NotifierRange) -> Result<Invalidation<'_>> {
        if range.blockable {
            might_sleep("invalidate_range_start");
        }
        let _span = tracing::trace_span!(
            "invalidate",
            start = range.range.start(),
            end = range.range.end(),
            event = range.event.name()
        )
        .entered();
        let stats = &self.shared.stats;
        Counters::bump(&stats.by_event[range.event.index()]);
        let mut hits = Hits::new();
        let cur_seq = {
            let mut st = sync::lock(&self.shared.state);
            st.active += 1;
            st.index.collect(&range.range, &mut hits);
            if !hits.is_empty() {
                st.seq |= 1;
            }
            st.seq
        };
        // From here on the guard ends the invalidation on every path, a panicking callback too.
        let inv = Invalidation {
            notifier: self,
            range,
        };
        let mut finish: SmallVec<[usize; 4]> = SmallVec::new();
        let mut refused = false;
        for (i, sub) in hits.iter().enumerate() {
            let ctx = InvalidateCtx::new(sub, self, cur_seq, range.blockable);
            Counters::bump(&stats.callbacks);
            match sub.ops.invalidate(&ctx, &range) {
                Ok(Pass::Done) => {}
                Ok(Pass::Finish) => finish.push(i),
                Err(WouldBlock) if range.blockable => {
                    Counters::bump(&stats.callback_bugs);
                    tracing::error!(
                        subscription = %sub.range,
                        range = %range.range,
                        "bug: invalidate refused a blockable range; only non-blocking \
                         invalidations may be refused"
                    );
                }
                Err(WouldBlock) => {
                    refused = true;
                    break;
                }
            }
        }
        for &i in &finish {
            let sub = &hits[i];
            let ctx = InvalidateCtx::new(sub, self, cur_seq, range.blockable);
            sub.ops.invalidate_finish(&ctx, &range);
        }
        if refused {
            Counters::bump(&stats.would_block);
            drop(inv);
            return Err(Error::WouldBlock { range: range.range });
        }
        for sub in &hits {
            let _atomic = AtomicSection::enter();
            let ctx = AtomicCtx {
                subscription: sub.range,
                _not_send: std::marker::PhantomData,
            };
            sub.ops.invalidate_secondary_tlb(&ctx, &range);
        }
        Ok(inv)
    }

    /// Ends one invalidation (the kernel's `mn_itree_inv_end`).
    fn end(&self) {
        let mut st = sync::lock(&self.shared.state);
        debug_assert!(st.active > 0, "invalidation ended twice");
        st.active -= 1;
        if st.active > 0 || !st.is_invalidating() {
            return;
        }
        st.seq += 1;
        let mut freed: SmallVec<[Arc<SubShared>; 4]> = SmallVec::new();
        for edit in std::mem::take(&mut st.deferred) {
            match edit {
                Deferred::Insert(s) => {
                    s.set_membership(Membership::InTree);
                    st.index.insert(s);
                }
                Deferred::Remove(s) => {
                    s.set_membership(Membership::Removed);
                    freed.extend(st.index.remove(&s));
                    freed.push(s);
                }
            }
        }
        drop(st);
        self.shared.wq.notify_all();
        // Backend state dropped with the last reference runs outside the notifier lock.
        drop(freed);
    }

    /// Invalidates every subscription over the whole address space with [`Event::Release`] and
    /// refuses new subscriptions and faults from then on: what happens when the address space goes
    /// away (or its monitor fails and svmirror fails closed). Releasing twice is an error.
    pub fn release(&self) -> Result<()> {
        {
            let mut st = sync::lock(&self.shared.state);
            if st.released {
                return Err(Error::Released);
            }
            st.released = true;
        }
        self.invalidate_range_start(NotifierRange::new(Range::FULL, Event::Release))?
            .end();
        Ok(())
    }

    /// Whether [`Notifier::release`] has run.
    pub fn is_released(&self) -> bool {
        sync::lock(&self.shared.state).released
    }

    /// Whether an invalidation that touches a subscription is running (the global sequence is odd).
    pub fn is_invalidating(&self) -> bool {
        sync::lock(&self.shared.state).is_invalidating()
    }

    /// The current global sequence. Diagnostic only: no decision may rest on it.
    pub fn seq(&self) -> u64 {
        sync::lock(&self.shared.state).seq
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NotifierStats {
        let c = &self.shared.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NotifierStats {
            invalidations: std::array::from_fn(|i| load(&c.by_event[i])),
            callbacks: load(&c.callbacks),
            would_block: load(&c.would_block),
            callback_bugs: load(&c.callback_bugs),
            read_begin_waits: load(&c.read_begin_waits),
            deferred_edits: load(&c.deferred_edits),
            subscriptions: sync::lock(&self.shared.state).index.len(),
        }
    }
}

/// An active invalidation. End it after the CPU change with [`Invalidation::end`] (the kernel's
/// `mmu_notifier_invalidate_range_end`); dropping it ends it too, so an error path or a panic
/// between start and end cannot leave the notifier frozen.
#[must_use = "the invalidation ends when this is dropped: make the CPU change first"]
pub struct Invalidation<'a> {
    notifier: &'a Notifier,
    range: NotifierRange,
}

impl Invalidation<'_> {
    /// The range being invalidated.
    pub fn range(&self) -> &NotifierRange {
        &self.range
    }

    /// Ends the invalidation: when it is the last active one, deferred tree edits apply and
    /// waiting `read_begin`s and `remove`s go on.
    pub fn end(self) {
        // Drop does the work.
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        self.notifier.end();
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
