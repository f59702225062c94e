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

use std::fmt;
use std::sync::Arc as StdArc;

use smallvec::SmallVec;

use crate::context::{
    AtomicSection, CallbackScope, UpdateGuard, UpdateLock, can_wait_for_invalidations,
    check_may_wait_for_invalidations, might_sleep,
};
use crate::error::{Error, Result};
use crate::interval_tree::{IntervalTree, LinearIndex};
use crate::range::{Event, NotifierRange, Range};
use crate::sync::{self, Arc, AtomicU8, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};

/// The kernel starts the global sequence at 2: even (idle), and `2 - 1` is a valid odd
/// initial subscription sequence.
const SEQ_START: u64 = 2;

/// What a subscription's `invalidate` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Everything is torn down; nothing left to wait for.
    Done,
    /// Teardown has started (a TLB flush is queued, a fence is pending); call
    /// [`IntervalNotifierOps::invalidate_finish`] after every subscription has started. This is the
    /// two-pass form: several devices flush in parallel and are waited for together.
    Finish,
}

/// Returned by a callback that would have to sleep in a non-blocking invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WouldBlock;

/// A backend's side of a subscription (the kernel's `mmu_interval_notifier_ops`).
///
/// Callbacks run on the thread that started the invalidation, without any core lock held, and in
/// the order subscriptions start in the address space. They must not call `read_begin` or
/// `remove`, which wait for this very invalidation (checked at run time).
pub trait IntervalNotifierOps: Send + Sync {
    /// Sleepable level: invalidate the device's view of `range` (which may extend beyond the
    /// subscription; clamp to [`InvalidateCtx::subscription_range`]).
    ///
    /// The usual body is one call to [`teardown::invalidate`](crate::teardown::invalidate),
    /// with the backend implementing [`Teardown`](crate::Teardown): it skips your own `Migrate`;
    /// takes the update lock (`try_lock` when `!ctx.may_block()`, returning `Err(WouldBlock)` if
    /// it is taken) and records the sequence under it; and calls your teardown of the device
    /// entries (or their downgrade on a protection change), which waits for device work in
    /// flight on the range and flushes the device TLB.
    ///
    /// Returning `Err(WouldBlock)` is allowed only when `!ctx.may_block()`; on a blockable range it
    /// is a bug that the notifier reports (an error log and [`NotifierStats::callback_bugs`]) and
    /// otherwise ignores, as the kernel's `WARN_ON` does.
    fn invalidate(
        &self,
        ctx: &InvalidateCtx<'_>,
        range: &NotifierRange,
    ) -> Result<Pass, WouldBlock>;

    /// Second pass of the two-pass form, called once for each `invalidate` that returned
    /// [`Pass::Finish`], after every subscription's first pass. Waits for what `invalidate` started.
    fn invalidate_finish(&self, ctx: &InvalidateCtx<'_>, range: &NotifierRange) {
        let _ = (ctx, range);
    }

    /// Page level: flush a secondary TLB that caches CPU translations of `range` (an IOMMU in
    /// shared-virtual-addressing mode). Runs in an atomic section after every `invalidate` and
    /// `invalidate_finish`: it must not sleep, take an update lock or wait for a fence; debug builds
    /// panic if it tries.
    fn invalidate_secondary_tlb(&self, ctx: &AtomicCtx<'_>, range: &NotifierRange) {
        let _ = (ctx, range);
    }
}

/// Where a subscription stands in the tree; changed only under the notifier lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Membership {
    /// Inserted while the tree was frozen; the insert is queued.
    PendingInsert = 0,
    /// In the tree: invalidations see it.
    InTree = 1,
    /// In the tree with its removal queued.
    PendingRemove = 2,
    /// Not in the tree and never will be again.
    Removed = 3,
}

impl Membership {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Membership::PendingInsert,
            1 => Membership::InTree,
            2 => Membership::PendingRemove,
            _ => Membership::Removed,
        }
    }
}

/// A subscription as the notifier and the tree see it.
struct SubShared {
    id: u64,
    range: Range,
    /// The subscription's sequence. Always odd. Written by `set_seq` under the backend's update
    /// lock and at insert under the notifier lock; read by `read_begin` under the notifier lock and
    /// by `read_retry` under the update lock.
    seq: AtomicU64,
    /// Address of the update lock `set_seq`/`read_retry` were first used with; 0 until then.
    lock_id: AtomicUsize,
    /// A [`Membership`]; read and written only under the notifier lock.
    membership: AtomicU8,
    ops: StdArc<dyn IntervalNotifierOps>,
}

impl SubShared {
    fn membership(&self) -> Membership {
        Membership::from_u8(self.membership.load(Ordering::Relaxed))
    }

    fn set_membership(&self, m: Membership) {
        self.membership.store(m as u8, Ordering::Relaxed);
    }

    /// Binds the subscription to the update lock `lock_id` on first use; false on a mismatch.
    fn check_lock(&self, lock_id: usize) -> bool {
        match self
            .lock_id
            .compare_exchange(0, lock_id, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => true,
            Err(bound) => bound == lock_id,
        }
    }
}

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

/// A sequence number taken by [`Subscription::read_begin`], to be checked with
/// [`Subscription::read_retry`]. Tied to the subscription that issued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSeq {
    seq: u64,
    sub: u64,
}

impl ReadSeq {
    /// The raw sequence value (always odd).
    pub fn value(&self) -> u64 {
        self.seq
    }
}

/// A subscription of a backend to invalidations of one range (the kernel's
/// `mmu_interval_notifier`). Dropping it removes it (see [`Subscription::remove`]).
pub struct Subscription {
    sub: Arc<SubShared>,
    notifier: Arc<Shared>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("range", &self.sub.range)
            .field("id", &self.sub.id)
            .field("seq", &self.sub.seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl Subscription {
    /// The subscribed range.
    pub fn range(&self) -> Range {
        self.sub.range
    }

    /// Starts a read-side critical section (the kernel's `mmu_interval_read_begin`).
    ///
    /// Waits only if an invalidation of this subscription is still running (its sequence equals
    /// the global one). The returned sequence may already be stale; [`read_retry`] catches that.
    /// Must not be called from a callback or under an update lock (it would wait for itself).
    ///
    /// [`read_retry`]: Subscription::read_retry
    #[track_caller]
    pub fn read_begin(&self) -> Result<ReadSeq> {
        check_may_wait_for_invalidations("read_begin")?;
        let mut st = sync::lock(&self.notifier.state);
        if st.released {
            return Err(Error::Released);
        }
        if self.sub.membership() == Membership::Removed {
            return Err(Error::NotSubscribed {
                range: self.sub.range,
            });
        }
        let seq = self.sub.seq.load(Ordering::Acquire);
        if seq == st.seq {
            Counters::bump(&self.notifier.stats.read_begin_waits);
            while st.seq == seq {
                st = sync::wait(&self.notifier.wq, st);
            }
        }
        Ok(ReadSeq {
            seq,
            sub: self.sub.id,
        })
    }

    /// Whether an invalidation ran since `seq` was taken (the kernel's `mmu_interval_read_retry`).
    /// The guard proves the caller holds the backend's update lock, the one its `invalidate` uses
    /// for [`InvalidateCtx::set_seq`]; if `false`, device entries may be programmed from the
    /// snapshot before the guard is dropped.
    ///
    /// Errors: a `seq` from another subscription, or a guard of a different lock than the one
    /// this subscription's `set_seq` and earlier `read_retry`s used.
    pub fn read_retry<T>(&self, guard: &UpdateGuard<'_, T>, seq: ReadSeq) -> Result<bool> {
        if seq.sub != self.sub.id {
            return Err(Error::SeqFromOtherSubscription {
                range: self.sub.range,
            });
        }
        if !self.sub.check_lock(guard.lock_id()) {
            return Err(Error::WrongUpdateLock {
                range: self.sub.range,
            });
        }
        Ok(self.sub.seq.load(Ordering::Relaxed) != seq.seq)
    }

    /// The retry test without the update lock (the kernel's `mmu_interval_check_retry`): only a
    /// hint to give up early. A sequence from another subscription is always stale.
    pub fn check_retry(&self, seq: ReadSeq) -> bool {
        seq.sub != self.sub.id || self.sub.seq.load(Ordering::Acquire) != seq.seq
    }

    /// Removes the subscription (the kernel's `mmu_interval_notifier_remove`). On return no
    /// callback of it runs or will run: if an invalidation has the tree frozen, the removal is
    /// queued and this waits for the invalidation's end.
    ///
    /// Errors: already removed; called from a callback or under an update lock.
    #[track_caller]
    pub fn remove(&self) -> Result<()> {
        check_may_wait_for_invalidations("remove")?;
        self.remove_inner(true)
    }

    fn remove_inner(&self, wait: bool) -> Result<()> {
        let mut freed = None;
        let mut st = sync::lock(&self.notifier.state);
        let wait_for = match self.sub.membership() {
            Membership::Removed => {
                return Err(Error::NotSubscribed {
                    range: self.sub.range,
                });
            }
            Membership::PendingRemove => {
                // Someone else is removing it: wait like them, then report it was not ours.
                let seq = st.seq;
                if wait {
                    while st.seq == seq {
                        st = sync::wait(&self.notifier.wq, st);
                    }
                }
                return Err(Error::NotSubscribed {
                    range: self.sub.range,
                });
            }
            Membership::PendingInsert => {
                // Never reached the tree: cancel the queued insert.
                let id = self.sub.id;
                if let Some(i) = st
                    .deferred
                    .iter()
                    .position(|d| matches!(d, Deferred::Insert(s) if s.id == id))
                {
                    if let Deferred::Insert(s) = st.deferred.swap_remove(i) {
                        freed = Some(s);
                    }
                }
                self.sub.set_membership(Membership::Removed);
                None
            }
            Membership::InTree if st.is_invalidating() => {
                self.sub.set_membership(Membership::PendingRemove);
                st.deferred.push(Deferred::Remove(self.sub.clone()));
                Counters::bump(&self.notifier.stats.deferred_edits);
                Some(st.seq)
            }
            Membership::InTree => {
                freed = st.index.remove(&self.sub);
                self.sub.set_membership(Membership::Removed);
                None
            }
        };
        if let (Some(seq), true) = (wait_for, wait) {
            while st.seq == seq {
                st = sync::wait(&self.notifier.wq, st);
            }
        }
        drop(st);
        drop(freed);
        tracing::trace!(range = %self.sub.range, id = self.sub.id, "subscription removed");
        Ok(())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let st = sync::lock(&self.notifier.state);
        let m = self.sub.membership();
        drop(st);
        if m == Membership::Removed || m == Membership::PendingRemove {
            return;
        }
        // Dropped inside a callback (or under an update lock), waiting would deadlock: queue the
        // removal and go on. The ops object stays alive until the removal is applied.
        let _ = self.remove_inner(can_wait_for_invalidations());
    }
}

/// What an `invalidate` callback may do: it may sleep (when [`may_block`](Self::may_block)),
/// take its update lock, and must record the sequence with [`set_seq`](Self::set_seq).
pub struct InvalidateCtx<'a> {
    sub: &'a SubShared,
    notifier: &'a Notifier,
    cur_seq: u64,
    blockable: bool,
    _scope: CallbackScope,
}

impl<'a> InvalidateCtx<'a> {
    fn new(sub: &'a SubShared, notifier: &'a Notifier, cur_seq: u64, blockable: bool) -> Self {
        InvalidateCtx {
            sub,
            notifier,
            cur_seq,
            blockable,
            _scope: CallbackScope::enter(blockable),
        }
    }

    /// The odd sequence of this invalidation.
    pub fn cur_seq(&self) -> u64 {
        self.cur_seq
    }

    /// Whether the callback may sleep. When false, take locks with `try_lock` and return
    /// `Err(WouldBlock)` rather than wait (debug builds panic on a sleeping call).
    pub fn may_block(&self) -> bool {
        self.blockable
    }

    /// The range of the subscription being called.
    pub fn subscription_range(&self) -> Range {
        self.sub.range
    }

    /// Takes the backend's update lock as this callback may, and records the invalidation's
    /// sequence under it ([`set_seq`](Self::set_seq)): what every backend's `invalidate` starts
    /// with. Waits for the lock when the callback may block; otherwise tries once and returns
    /// `Err(WouldBlock)`, which the callback returns as it is (the invalidation then ends
    /// itself, as the kernel's non-blocking notifiers do).
    pub fn lock_update<'l, T>(
        &self,
        lock: &'l UpdateLock<T>,
    ) -> std::result::Result<UpdateGuard<'l, T>, WouldBlock> {
        let guard = if self.blockable {
            lock.lock()
        } else {
            lock.try_lock().ok_or(WouldBlock)?
        };
        self.set_seq(&guard);
        Ok(guard)
    }

    /// Records this invalidation's sequence in the subscription (the kernel's
    /// `mmu_interval_set_seq`), under the backend's update lock: every faulter that took its
    /// sequence before now will see `read_retry` true. Call it unconditionally unless the event is
    /// skipped entirely (your own `Migrate`).
    pub fn set_seq<T>(&self, guard: &UpdateGuard<'_, T>) {
        if !self.sub.check_lock(guard.lock_id()) {
            Counters::bump(&self.notifier.shared.stats.callback_bugs);
            tracing::error!(
                subscription = %self.sub.range,
                "bug: set_seq under a different update lock than read_retry uses"
            );
            debug_assert!(
                false,
                "svmirror: set_seq for {} under a different update lock than read_retry uses: \
                 the retry check then protects nothing (DESIGN.md invariant 1)",
                self.sub.range
            );
        }
        self.sub.seq.store(self.cur_seq, Ordering::Release);
    }
}

/// What a secondary-TLB callback may do: nothing that sleeps.
pub struct AtomicCtx<'a> {
    subscription: Range,
    _not_send: std::marker::PhantomData<&'a *const ()>,
}

impl AtomicCtx<'_> {
    /// The range of the subscription being called.
    pub fn subscription_range(&self) -> Range {
        self.subscription
    }
}

#[cfg(all(test, not(loom)))]
#[path = "notifier_tests.rs"]
mod tests;
