//! Subscriptions and their read side: a backend's [`Subscription`] to one range, the
//! sequence it takes before a snapshot and checks under its update lock ([`ReadSeq`],
//! `read_begin` / `read_retry`, the kernel's `mmu_interval_read_begin` / `_retry`), and its
//! removal, which waits for the invalidation that froze the tree. The sequence protocol itself
//! is described in the parent module.

use std::fmt;
use std::sync::Arc as StdArc;

use super::{Counters, Deferred, IntervalNotifierOps, Shared};
use crate::context::{UpdateGuard, can_wait_for_invalidations, check_may_wait_for_invalidations};
use crate::error::{Error, Result};
use crate::range::Range;
use crate::sync::{self, Arc, AtomicU8, AtomicU64, AtomicUsize, Ordering};

/// Where a subscription stands in the tree; changed only under the notifier lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Membership {
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
pub(super) struct SubShared {
    pub(super) id: u64,
    pub(super) range: Range,
    /// The subscription's sequence. Always odd. Written by `set_seq` under the backend's update
    /// lock and at insert under the notifier lock; read by `read_begin` under the notifier lock and
    /// by `read_retry` under the update lock.
    pub(super) seq: AtomicU64,
    /// Address of the update lock `set_seq`/`read_retry` were first used with; 0 until then.
    pub(super) lock_id: AtomicUsize,
    /// A [`Membership`]; read and written only under the notifier lock.
    pub(super) membership: AtomicU8,
    pub(super) ops: StdArc<dyn IntervalNotifierOps>,
}

impl SubShared {
    pub(super) fn membership(&self) -> Membership {
        Membership::from_u8(self.membership.load(Ordering::Relaxed))
    }

    pub(super) fn set_membership(&self, m: Membership) {
        self.membership.store(m as u8, Ordering::Relaxed);
    }

    /// Binds the subscription to the update lock `lock_id` on first use; false on a mismatch.
    pub(super) fn check_lock(&self, lock_id: usize) -> bool {
        match self
            .lock_id
            .compare_exchange(0, lock_id, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => true,
            Err(bound) => bound == lock_id,
        }
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
    pub(super) sub: Arc<SubShared>,
    pub(super) notifier: Arc<Shared>,
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
    ///
    /// [`InvalidateCtx::set_seq`]: super::InvalidateCtx::set_seq
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
