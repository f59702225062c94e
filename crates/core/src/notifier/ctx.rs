//! The backend's side of an invalidation: the callbacks a subscription implements
//! ([`IntervalNotifierOps`], the kernel's `mmu_interval_notifier_ops`, with [`Pass`] and
//! [`WouldBlock`] for what they answer) and the contexts they are called with, one per lock
//! level: [`InvalidateCtx`] for the sleepable `invalidate` (take the update lock, record the
//! sequence) and [`AtomicCtx`] for the secondary-TLB flush, which must not sleep.

use super::subscription::SubShared;
use super::{Counters, Notifier};
use crate::context::{CallbackScope, UpdateGuard, UpdateLock};
use crate::range::{NotifierRange, Range};
use crate::sync::Ordering;

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
    ///
    /// [`NotifierStats::callback_bugs`]: crate::NotifierStats::callback_bugs
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
    pub(super) fn new(
        sub: &'a SubShared,
        notifier: &'a Notifier,
        cur_seq: u64,
        blockable: bool,
    ) -> Self {
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
    pub(super) subscription: Range,
    pub(super) _not_send: std::marker::PhantomData<&'a *const ()>,
}

impl AtomicCtx<'_> {
    /// The range of the subscription being called.
    pub fn subscription_range(&self) -> Range {
        self.subscription
    }
}
