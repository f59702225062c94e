//! The invalidation skeleton, once: what every backend's `IntervalNotifierOps::invalidate` does
//! around its own device work.
//!
//! A backend implements [`Teardown`] (its update lock, its counters, its owner, and the
//! device-specific teardown) and its `invalidate` is one call to [`invalidate`]. The skeleton
//! skips what the event lets it skip (the backend's own migration or exclusive access, a
//! soft-dirty reset), takes the update lock as the callback level allows (waiting when it may
//! block, trying once when it may not), cuts the range to the subscription (and to what the
//! backend can map), decides the [`Action`] from the event, and counts. The decision is one
//! table, [`Action::for_range`]: DESIGN.md invariant 6 ("events carry their reason, and backends
//! use it") lives there and is tested there.
//!
//! The backend keeps what only it knows: how to tear entries down, how to wait for device work
//! in flight, and when it must refuse a non-blocking invalidation rather than wait
//! ([`WouldBlock`]; that check has to be made atomically with the teardown, under whatever lock
//! orders device accesses against it, so it is the backend's).

use crate::context::{UpdateGuard, UpdateLock};
use crate::counters::Counters;
use crate::notifier::{InvalidateCtx, Pass, WouldBlock};
use crate::range::{Event, NotifierRange, Owner, Range};

/// What an invalidation asks of a backend's entries over its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The virtual range is gone (`Unmap`, `Release`): drop the entries, and free the
    /// page-table memory and device resources (IOVA windows, imports) that covered only it.
    FreeLeaves,
    /// The pages change but the mapping stays (`Clear`, `ProtectionPage`, another driver's
    /// `Migrate` or `Exclusive`): drop the entries; the tables may stay for the next fault.
    Clear,
    /// The mapping's protection changes and it stays readable (`ProtectionVma`): make the
    /// entries read-only. A backend that cannot downgrade (VFIO type1) drops them instead.
    Downgrade,
}

impl Action {
    /// The action an invalidation of `nr` asks of the backend `owner`, or `None` when the
    /// backend skips it: its own `Migrate` or `Exclusive` (it moved the pages itself, the
    /// kernel's `mmu_interval_notifier` users test `range->owner` the same way) and `SoftDirty`
    /// (no page or permission changes).
    pub fn for_range(nr: &NotifierRange, owner: Owner) -> Option<Action> {
        if nr.skippable_by(owner) {
            return None;
        }
        Some(match nr.event {
            Event::Unmap | Event::Release => Action::FreeLeaves,
            Event::ProtectionVma => Action::Downgrade,
            Event::Clear
            | Event::ProtectionPage
            | Event::SoftDirty
            | Event::Migrate { .. }
            | Event::Exclusive { .. } => Action::Clear,
        })
    }
}

/// A backend's part of an invalidation. See the [module documentation](self).
pub trait Teardown {
    /// What the update lock protects: the backend's page table and its bookkeeping.
    type State;

    /// What a teardown takes out of the state to be dropped once the update lock is released
    /// (device memory, imports: freeing them may wait for locks a fault holds while it takes
    /// the update lock). `()` for none.
    type Garbage;

    /// The backend's update lock: faults program entries under it, after `read_retry`.
    fn update_lock(&self) -> &UpdateLock<Self::State>;

    /// The counters invalidations are recorded in.
    fn counters(&self) -> &Counters;

    /// The owner the backend migrates or takes exclusive access as.
    fn owner(&self) -> Owner;

    /// A short name for traces ("iommu", "vulkan", "vfio").
    fn name(&self) -> &'static str;

    /// `r` (already cut to the subscription) cut to what the backend can map at all; `None`
    /// when nothing of it is left. The default keeps it whole.
    fn clamp(&self, r: Range) -> Option<Range> {
        Some(r)
    }

    /// Under the update lock: applies `action` to the entries of `r` for an invalidation of
    /// `event`, and returns the bytes of device mappings it tore down (or downgraded), with
    /// what is to be dropped after the lock. When
    /// `blockable` is false it must not sleep: if device work in flight may still use `r` it
    /// returns `Err(WouldBlock)` having changed nothing, and the invalidation ends there (the
    /// kernel's non-blocking notifier contract).
    fn teardown(
        &self,
        g: &mut UpdateGuard<'_, Self::State>,
        r: Range,
        action: Action,
        event: Event,
        blockable: bool,
    ) -> Result<(u64, Self::Garbage), WouldBlock>;

    /// Called for an invalidation the backend skipped (its own stats; the counters already
    /// have it).
    fn skipped(&self) {}

    /// Called for an invalidation refused with [`WouldBlock`].
    fn would_block(&self) {}
}

/// The whole `invalidate` callback of a backend: skip → lock → cut → [`Teardown::teardown`] →
/// count. See the [module documentation](self).
pub fn invalidate<B: Teardown + ?Sized>(
    backend: &B,
    ctx: &InvalidateCtx<'_>,
    nr: &NotifierRange,
) -> Result<Pass, WouldBlock> {
    let counters = backend.counters();
    let Some(action) = Action::for_range(nr, backend.owner()) else {
        backend.skipped();
        counters.record_invalidation(&nr.event, nr.range.len(), false);
        return Ok(Pass::Done);
    };
    let _span = tracing::trace_span!(
        "invalidate",
        backend = backend.name(),
        start = nr.range.start(),
        end = nr.range.end(),
        event = nr.event.name()
    )
    .entered();
    let blockable = ctx.may_block();
    let mut g = ctx
        .lock_update(backend.update_lock())
        .inspect_err(|_| backend.would_block())?;
    let Some(r) = nr
        .range
        .intersect(&ctx.subscription_range())
        .and_then(|r| backend.clamp(r))
    else {
        return Ok(Pass::Done);
    };
    let (bytes, garbage) = backend
        .teardown(&mut g, r, action, nr.event, blockable)
        .inspect_err(|_| backend.would_block())?;
    drop(g);
    drop(garbage);
    counters.record_invalidation(&nr.event, r.len(), true);
    if bytes > 0 {
        counters.record_unmap(bytes);
    }
    Ok(Pass::Done)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::Mutex;

    use super::*;
    use crate::notifier::{IntervalNotifierOps, Notifier};

    /// Invariant 6 as one table: every event, for the backend that caused it and for another.
    #[test]
    fn the_action_of_every_event_is_one_table() {
        let r = Range::new(0x1000, 0x3000).unwrap();
        let (me, other) = (Owner(1), Owner(2));
        let a = |e| Action::for_range(&NotifierRange::new(r, e), me);
        assert_eq!(a(Event::Unmap), Some(Action::FreeLeaves));
        assert_eq!(a(Event::Release), Some(Action::FreeLeaves));
        assert_eq!(a(Event::Clear), Some(Action::Clear));
        assert_eq!(a(Event::ProtectionPage), Some(Action::Clear));
        assert_eq!(a(Event::ProtectionVma), Some(Action::Downgrade));
        assert_eq!(a(Event::SoftDirty), None);
        assert_eq!(a(Event::Migrate { owner: me }), None);
        assert_eq!(a(Event::Exclusive { owner: me }), None);
        assert_eq!(a(Event::Migrate { owner: other }), Some(Action::Clear));
        assert_eq!(a(Event::Exclusive { owner: other }), Some(Action::Clear));
        // Every kind is covered (a new kind must be added to the table above).
        assert_eq!(Event::KINDS, 8);
    }

    /// Test double: a backend whose teardown records what it was asked, and can refuse.
    struct Recorder {
        lock: UpdateLock<Vec<(Range, Action, bool)>>,
        counters: Counters,
        busy: Mutex<bool>,
        refused: Mutex<u32>,
    }

    impl Teardown for Recorder {
        type State = Vec<(Range, Action, bool)>;
        type Garbage = ();
        fn update_lock(&self) -> &UpdateLock<Self::State> {
            &self.lock
        }
        fn counters(&self) -> &Counters {
            &self.counters
        }
        fn owner(&self) -> Owner {
            Owner(7)
        }
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn clamp(&self, r: Range) -> Option<Range> {
            r.intersect(&Range::new(0, 0x10_0000).unwrap())
        }
        fn teardown(
            &self,
            g: &mut UpdateGuard<'_, Self::State>,
            r: Range,
            action: Action,
            _event: Event,
            blockable: bool,
        ) -> Result<(u64, ()), WouldBlock> {
            if !blockable && *self.busy.lock().unwrap() {
                return Err(WouldBlock);
            }
            g.push((r, action, blockable));
            Ok((r.len(), ()))
        }
        fn would_block(&self) {
            *self.refused.lock().unwrap() += 1;
        }
    }

    impl IntervalNotifierOps for Recorder {
        fn invalidate(
            &self,
            ctx: &InvalidateCtx<'_>,
            nr: &NotifierRange,
        ) -> Result<Pass, WouldBlock> {
            invalidate(self, ctx, nr)
        }
    }

    /// The skeleton cuts to the subscription and to the backend's clamp, skips the backend's
    /// own migration, counts acted and skipped events and torn-down bytes, and passes a
    /// non-blocking refusal through (counted by the backend).
    #[test]
    fn the_skeleton_cuts_skips_counts_and_refuses() {
        let notifier = Notifier::new();
        let rec = Arc::new(Recorder {
            lock: UpdateLock::new(Vec::new()),
            counters: Counters::default(),
            busy: Mutex::new(false),
            refused: Mutex::new(0),
        });
        let sub = notifier
            .insert(Range::new(0x8_0000, 0x20_0000).unwrap(), rec.clone())
            .unwrap();
        let inv = |r: (u64, u64), e| {
            notifier
                .invalidate_range_start(NotifierRange::new(Range::new(r.0, r.1).unwrap(), e))
                .unwrap()
                .end();
        };
        inv((0, 0x40_0000), Event::Unmap);
        inv((0x9_0000, 0xa_0000), Event::ProtectionVma);
        inv((0x9_0000, 0xa_0000), Event::Migrate { owner: Owner(7) });
        inv((0x18_0000, 0x19_0000), Event::Clear); // past the clamp: nothing to do
        let seen = rec.lock.lock().clone();
        assert_eq!(
            seen,
            vec![
                (
                    Range::new(0x8_0000, 0x10_0000).unwrap(),
                    Action::FreeLeaves,
                    true
                ),
                (
                    Range::new(0x9_0000, 0xa_0000).unwrap(),
                    Action::Downgrade,
                    true
                ),
            ]
        );
        let c = rec.counters.snapshot();
        assert_eq!(c.invalidations[Event::Unmap.index()], 1);
        assert_eq!(c.invalidations[Event::ProtectionVma.index()], 1);
        assert_eq!(c.skipped[Event::Migrate { owner: Owner(7) }.index()], 1);
        assert_eq!(c.bytes_unmapped, 0x8_0000 + 0x1_0000);

        // Non-blocking, with device work in flight: refused, nothing torn down.
        *rec.busy.lock().unwrap() = true;
        let nr = NotifierRange::new(Range::new(0x9_0000, 0xa_0000).unwrap(), Event::Clear);
        assert!(notifier.invalidate_range_start(nr.non_blocking()).is_err());
        assert_eq!(*rec.refused.lock().unwrap(), 1);
        assert_eq!(rec.lock.lock().len(), 2);
        drop(sub);
    }
}
