//! One test per rule of the seq protocol (REFERENCE.md, "Interval notifier").

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as O};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use super::*;
use crate::context::{UpdateLock, may_sleep};
use crate::testing::TestMirror;
use crate::{Owner, PAGE_SIZE};

type Callback =
    dyn Fn(&InvalidateCtx<'_>, &NotifierRange) -> Result<Pass, WouldBlock> + Send + Sync;

/// Ops whose `invalidate` is a closure; the other callbacks record that they ran.
struct FnOps {
    f: Box<Callback>,
    finished: AtomicUsize,
    flushed: AtomicUsize,
    flush_saw_may_sleep: AtomicBool,
}

impl FnOps {
    fn new(
        f: impl Fn(&InvalidateCtx<'_>, &NotifierRange) -> Result<Pass, WouldBlock>
        + Send
        + Sync
        + 'static,
    ) -> Arc<Self> {
        Arc::new(FnOps {
            f: Box::new(f),
            finished: AtomicUsize::new(0),
            flushed: AtomicUsize::new(0),
            flush_saw_may_sleep: AtomicBool::new(false),
        })
    }
}

impl IntervalNotifierOps for FnOps {
    fn invalidate(
        &self,
        ctx: &InvalidateCtx<'_>,
        range: &NotifierRange,
    ) -> Result<Pass, WouldBlock> {
        (self.f)(ctx, range)
    }
    fn invalidate_finish(&self, _: &InvalidateCtx<'_>, _: &NotifierRange) {
        self.finished.fetch_add(1, O::SeqCst);
    }
    fn invalidate_secondary_tlb(&self, _: &AtomicCtx<'_>, _: &NotifierRange) {
        self.flushed.fetch_add(1, O::SeqCst);
        self.flush_saw_may_sleep.store(may_sleep(), O::SeqCst);
    }
}

fn r(start: u64, pages: u64) -> Range {
    Range::with_len(start, pages * PAGE_SIZE).unwrap()
}

fn unmap(range: Range) -> NotifierRange {
    NotifierRange::new(range, Event::Unmap)
}

fn mirror() -> Arc<TestMirror> {
    Arc::new(TestMirror::new(Owner(7)))
}

/// Runs `f` on a thread and reports whether it finished within `wait`.
fn spawn_report<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

const BLOCKED: Duration = Duration::from_millis(150);

#[test]
fn insert_when_idle_enters_tree_with_seq_below_global() {
    let n = Notifier::new();
    let m = mirror();
    let sub = n.insert(r(0x10000, 4), m.clone()).unwrap();
    assert_eq!(n.stats().subscriptions, 1);
    let seq = sub.read_begin().unwrap();
    assert_eq!(seq.value(), n.seq() - 1);
    assert_eq!(seq.value() & 1, 1, "subscription seqs are odd");
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end();
    assert_eq!(m.table.lock().invalidations.len(), 1);
}

#[test]
fn insert_while_tree_frozen_is_deferred_until_end() {
    let n = Notifier::new();
    let _a = n.insert(r(0x10000, 4), mirror()).unwrap();
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    assert!(n.is_invalidating());
    let mb = mirror();
    let b = Arc::new(n.insert(r(0x10000, 4), mb.clone()).unwrap());
    assert_eq!(
        n.stats().subscriptions,
        1,
        "deferred insert is not in the tree yet"
    );
    assert_eq!(n.stats().deferred_edits, 1);
    // A second invalidation during the freeze does not see the new subscription.
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end();
    assert!(mb.table.lock().invalidations.is_empty());
    // Its first read_begin waits for the freeze to end.
    let b2 = b.clone();
    let rx = spawn_report(move || b2.read_begin().is_ok());
    assert!(rx.recv_timeout(BLOCKED).is_err(), "read_begin must wait");
    inv.end();
    assert!(rx.recv().unwrap());
    assert_eq!(n.stats().subscriptions, 2);
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end();
    assert_eq!(mb.table.lock().invalidations.len(), 1);
}

#[test]
fn insert_during_invalidation_that_hit_nothing_makes_seq_odd() {
    let n = Notifier::new();
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    assert!(!n.is_invalidating(), "no subscription hit: seq stays even");
    let b = Arc::new(n.insert(r(0x10000, 4), mirror()).unwrap());
    assert!(
        n.is_invalidating(),
        "insert during an active invalidation makes seq odd"
    );
    assert_eq!(
        n.stats().subscriptions,
        1,
        "inserted at once: the tree is not frozen"
    );
    let b2 = b.clone();
    let rx = spawn_report(move || b2.read_begin().map(|s| s.value()));
    assert!(
        rx.recv_timeout(BLOCKED).is_err(),
        "the running invalidation may be past its lookup: read_begin must wait"
    );
    inv.end();
    rx.recv().unwrap().unwrap();
    assert!(!n.is_invalidating());
}

#[test]
fn remove_when_idle_is_immediate() {
    let n = Notifier::new();
    let m = mirror();
    let sub = n.insert(r(0x10000, 4), m.clone()).unwrap();
    sub.remove().unwrap();
    assert_eq!(n.stats().subscriptions, 0);
    n.invalidate_range_start(unmap(r(0x10000, 4)))
        .unwrap()
        .end();
    assert!(m.table.lock().invalidations.is_empty());
}

#[test]
fn remove_while_tree_frozen_waits_for_end() {
    let n = Notifier::new();
    let sub = Arc::new(n.insert(r(0x10000, 4), mirror()).unwrap());
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    let s2 = sub.clone();
    let rx = spawn_report(move || s2.remove());
    assert!(
        rx.recv_timeout(BLOCKED).is_err(),
        "remove must wait for the invalidation"
    );
    assert_eq!(n.stats().subscriptions, 1, "removal deferred");
    inv.end();
    rx.recv().unwrap().unwrap();
    assert_eq!(n.stats().subscriptions, 0);
}

#[test]
fn remove_of_deferred_insert_cancels_it_without_waiting() {
    let n = Notifier::new();
    let _a = n.insert(r(0x10000, 4), mirror()).unwrap();
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    let mb = mirror();
    let b = n.insert(r(0x10000, 4), mb.clone()).unwrap();
    b.remove().unwrap(); // would hang here if it waited: the invalidation is still ours
    inv.end();
    assert_eq!(
        n.stats().subscriptions,
        1,
        "cancelled insert never reached the tree"
    );
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end();
    assert!(mb.table.lock().invalidations.is_empty());
}

#[test]
fn remove_twice_is_an_error() {
    let n = Notifier::new();
    let sub = n.insert(r(0x10000, 4), mirror()).unwrap();
    sub.remove().unwrap();
    let e = sub.remove().unwrap_err();
    assert!(matches!(e, Error::NotSubscribed { .. }), "{e}");
    assert!(matches!(sub.read_begin(), Err(Error::NotSubscribed { .. })));
}

#[test]
fn remove_through_another_notifier_is_an_error() {
    let n = Notifier::new();
    let other = Notifier::new();
    let sub = n.insert(r(0x10000, 4), mirror()).unwrap();
    let e = other.remove(&sub).unwrap_err();
    assert!(matches!(e, Error::ForeignSubscription { .. }), "{e}");
    assert_eq!(n.stats().subscriptions, 1, "still subscribed");
    n.remove(&sub).unwrap();
}

#[test]
fn dropping_a_subscription_removes_it() {
    let n = Notifier::new();
    drop(n.insert(r(0x10000, 4), mirror()).unwrap());
    assert_eq!(n.stats().subscriptions, 0);
}

#[test]
fn remove_returns_only_after_running_callback_finished() {
    let n = Notifier::new();
    let (enter_tx, enter_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let enter_tx = std::sync::Mutex::new(enter_tx);
    let go_rx = std::sync::Mutex::new(go_rx);
    let running = Arc::new(AtomicBool::new(false));
    let running2 = running.clone();
    let ops = FnOps::new(move |_, _| {
        running2.store(true, O::SeqCst);
        enter_tx.lock().unwrap().send(()).unwrap();
        go_rx.lock().unwrap().recv().unwrap();
        running2.store(false, O::SeqCst);
        Ok(Pass::Done)
    });
    let sub = Arc::new(n.insert(r(0x10000, 4), ops).unwrap());
    let n2 = n.clone();
    let inv_thread = thread::spawn(move || {
        n2.invalidate_range_start(unmap(r(0x10000, 1)))
            .map(|i| i.end())
    });
    enter_rx.recv().unwrap();
    let s2 = sub.clone();
    let running3 = running.clone();
    let rx = spawn_report(move || {
        s2.remove().unwrap();
        running3.load(O::SeqCst)
    });
    assert!(
        rx.recv_timeout(BLOCKED).is_err(),
        "remove returned while its callback runs"
    );
    go_tx.send(()).unwrap();
    assert!(
        !rx.recv().unwrap(),
        "callback still running after remove returned"
    );
    inv_thread.join().unwrap().unwrap();
}

#[test]
fn non_blocking_start_refused_returns_would_block_and_ends_itself() {
    let n = Notifier::new();
    let m = mirror();
    let _sub = n.insert(r(0x10000, 4), m.clone()).unwrap();
    let held = m.table.lock();
    let rx = spawn_report({
        let n = n.clone();
        move || {
            n.invalidate_range_start(unmap(r(0x10000, 1)).non_blocking())
                .map(|i| i.end())
        }
    });
    let e = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("non-blocking start must not wait");
    assert!(matches!(e, Err(Error::WouldBlock { .. })), "{e:?}");
    drop(held);
    assert!(
        !n.is_invalidating(),
        "a refused start ends its invalidation"
    );
    assert_eq!(n.stats().would_block, 1);
    // Nothing is left active: an insert now takes the idle path.
    let s = n.insert(r(0x20000, 1), mirror()).unwrap();
    assert_eq!(s.read_begin().unwrap().value(), n.seq() - 1);
}

#[test]
fn non_blocking_start_succeeds_when_nobody_needs_to_sleep() {
    let n = Notifier::new();
    let m = mirror();
    let _sub = n.insert(r(0x10000, 4), m.clone()).unwrap();
    n.invalidate_range_start(unmap(r(0x10000, 1)).non_blocking())
        .unwrap()
        .end();
    assert_eq!(m.table.lock().invalidations.len(), 1);
}

#[test]
fn refusing_a_blockable_range_is_reported_as_a_bug() {
    let n = Notifier::new();
    let _sub = n
        .insert(r(0x10000, 4), FnOps::new(|_, _| Err(WouldBlock)))
        .unwrap();
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1)));
    assert!(inv.is_ok(), "a blockable invalidation cannot be refused");
    drop(inv);
    assert_eq!(n.stats().callback_bugs, 1);
}

#[test]
fn release_invalidates_everything_and_refuses_new_work() {
    let n = Notifier::new();
    let m = mirror();
    let sub = n.insert(r(0x7fff_0000_0000, 4), m.clone()).unwrap();
    n.release().unwrap();
    assert_eq!(
        m.table.lock().invalidations,
        vec![(Range::FULL, Event::Release)]
    );
    assert!(matches!(sub.read_begin(), Err(Error::Released)));
    assert!(matches!(
        n.insert(r(0x10000, 1), mirror()),
        Err(Error::Released)
    ));
    assert!(matches!(n.release(), Err(Error::Released)));
    sub.remove().unwrap();
}

#[test]
fn deferred_edits_apply_only_when_last_invalidation_ends() {
    let n = Notifier::new();
    let _a = n.insert(r(0x10000, 4), mirror()).unwrap();
    let first = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    let second = n.invalidate_range_start(unmap(r(0x11000, 1))).unwrap();
    let _b = n.insert(r(0x30000, 4), mirror()).unwrap();
    first.end();
    assert!(n.is_invalidating(), "one invalidation still active");
    assert_eq!(n.stats().subscriptions, 1);
    let before = n.seq();
    second.end();
    assert_eq!(n.seq(), before + 1, "seq becomes even exactly once");
    assert_eq!(n.stats().subscriptions, 2);
}

#[test]
fn read_begin_waits_while_its_subscription_is_invalidated() {
    let n = Notifier::new();
    let sub = Arc::new(n.insert(r(0x10000, 4), mirror()).unwrap());
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    let s2 = sub.clone();
    let rx = spawn_report(move || s2.read_begin().unwrap().value());
    assert!(rx.recv_timeout(BLOCKED).is_err(), "read_begin must wait");
    let cur = n.seq();
    inv.end();
    assert_eq!(
        rx.recv().unwrap(),
        cur,
        "returns the invalidation's seq, now stale-free"
    );
    assert_eq!(n.stats().read_begin_waits, 1);
}

#[test]
fn read_begin_does_not_wait_for_an_unrelated_invalidation() {
    let n = Notifier::new();
    let _a = n.insert(r(0x10000, 4), mirror()).unwrap();
    let b = n.insert(r(0x50000, 4), mirror()).unwrap();
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    assert!(n.is_invalidating());
    b.read_begin().unwrap(); // would hang if it waited
    inv.end();
}

#[test]
fn read_retry_is_true_only_after_an_invalidation() {
    let n = Notifier::new();
    let m = mirror();
    let sub = n.insert(r(0x10000, 4), m.clone()).unwrap();
    let seq = sub.read_begin().unwrap();
    assert!(!sub.read_retry(&m.table.lock(), seq).unwrap());
    assert!(!sub.check_retry(seq));
    // An invalidation elsewhere does not disturb it.
    n.invalidate_range_start(unmap(r(0x90000, 1)))
        .unwrap()
        .end();
    assert!(!sub.read_retry(&m.table.lock(), seq).unwrap());
    n.invalidate_range_start(unmap(r(0x13000, 1)))
        .unwrap()
        .end();
    assert!(sub.check_retry(seq));
    assert!(sub.read_retry(&m.table.lock(), seq).unwrap());
}

#[test]
fn check_retry_sees_a_running_invalidation() {
    let n = Notifier::new();
    let sub = n.insert(r(0x10000, 4), mirror()).unwrap();
    let seq = sub.read_begin().unwrap();
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    assert!(sub.check_retry(seq), "set_seq already ran in invalidate");
    inv.end();
}

#[test]
fn read_retry_with_another_subscriptions_seq_is_an_error() {
    let n = Notifier::new();
    let m = mirror();
    let a = n.insert(r(0x10000, 4), m.clone()).unwrap();
    let b = n.insert(r(0x20000, 4), m.clone()).unwrap();
    let seq_b = b.read_begin().unwrap();
    let e = a.read_retry(&m.table.lock(), seq_b).unwrap_err();
    assert!(matches!(e, Error::SeqFromOtherSubscription { .. }), "{e}");
    assert!(a.check_retry(seq_b), "a foreign seq is always stale");
}

#[test]
fn read_retry_under_a_different_lock_than_set_seq_is_an_error() {
    let n = Notifier::new();
    let m = mirror();
    let sub = n.insert(r(0x10000, 4), m.clone()).unwrap();
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end(); // binds m.table
    let other = UpdateLock::new(());
    let seq = sub.read_begin().unwrap();
    let e = sub.read_retry(&other.lock(), seq).unwrap_err();
    assert!(matches!(e, Error::WrongUpdateLock { .. }), "{e}");
}

#[test]
fn seq_is_odd_only_while_a_subscription_is_being_invalidated() {
    let n = Notifier::new();
    let start = n.seq();
    assert_eq!(start & 1, 0);
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    assert_eq!(n.seq(), start, "no subscriptions: seq untouched");
    inv.end();
    let _s = n.insert(r(0x10000, 4), mirror()).unwrap();
    let inv = n.invalidate_range_start(unmap(r(0x10000, 1))).unwrap();
    assert_eq!(n.seq(), start | 1);
    inv.end();
    assert_eq!(n.seq(), start + 2);
}

#[test]
fn callbacks_see_only_overlapping_subscriptions_half_open() {
    let n = Notifier::new();
    let left = mirror();
    let right = mirror();
    let _l = n.insert(r(0x10000, 1), left.clone()).unwrap();
    let _r = n.insert(r(0x12000, 1), right.clone()).unwrap();
    n.invalidate_range_start(unmap(r(0x11000, 1)))
        .unwrap()
        .end();
    assert!(left.table.lock().invalidations.is_empty());
    assert!(right.table.lock().invalidations.is_empty());
    n.invalidate_range_start(unmap(r(0x10000, 3)))
        .unwrap()
        .end();
    assert_eq!(left.table.lock().invalidations.len(), 1);
    assert_eq!(right.table.lock().invalidations.len(), 1);
}

#[test]
fn two_pass_finishes_run_after_every_start() {
    let n = Notifier::new();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mk = |name: &'static str| {
        let order = order.clone();
        FnOps::new(move |_, _| {
            order.lock().unwrap().push(name);
            Ok(Pass::Finish)
        })
    };
    let (a, b) = (mk("a"), mk("b"));
    let _sa = n.insert(r(0x10000, 1), a.clone()).unwrap();
    let _sb = n.insert(r(0x10000, 1), b.clone()).unwrap();
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end();
    assert_eq!(*order.lock().unwrap(), vec!["a", "b"]);
    assert_eq!(a.finished.load(O::SeqCst), 1);
    assert_eq!(b.finished.load(O::SeqCst), 1);
}

#[test]
fn two_pass_test_mirror_tears_down_in_finish() {
    let n = Notifier::new();
    let mut tm = TestMirror::new(Owner(3));
    tm.two_pass = true;
    let m = Arc::new(tm);
    let sub = n.insert(r(0x10000, 4), m.clone()).unwrap();
    m.table.lock().entries.insert(0x10000, 1);
    let seq = sub.read_begin().unwrap();
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end();
    assert!(m.entry(0x10000).is_none());
    assert!(sub.read_retry(&m.table.lock(), seq).unwrap());
}

#[test]
fn secondary_tlb_flush_runs_at_page_level() {
    let n = Notifier::new();
    let ops = FnOps::new(|_, _| Ok(Pass::Done));
    let _s = n.insert(r(0x10000, 1), ops.clone()).unwrap();
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end();
    assert_eq!(ops.flushed.load(O::SeqCst), 1);
    assert!(
        !ops.flush_saw_may_sleep.load(O::SeqCst),
        "flush must run in an atomic section"
    );
    assert!(may_sleep(), "atomic section ended");
}

#[cfg(debug_assertions)]
struct SleepyFlush(UpdateLock<()>);
#[cfg(debug_assertions)]
impl IntervalNotifierOps for SleepyFlush {
    fn invalidate(&self, _: &InvalidateCtx<'_>, _: &NotifierRange) -> Result<Pass, WouldBlock> {
        Ok(Pass::Done)
    }
    fn invalidate_secondary_tlb(&self, _: &AtomicCtx<'_>, _: &NotifierRange) {
        let _g = self.0.lock();
    }
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "the page level must not sleep")]
fn sleeping_in_secondary_tlb_flush_panics_naming_the_rule() {
    let n = Notifier::new();
    let _s = n
        .insert(r(0x10000, 1), Arc::new(SleepyFlush(UpdateLock::new(()))))
        .unwrap();
    let _ = n.invalidate_range_start(unmap(r(0x10000, 1)));
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "non-blocking invalidation")]
fn sleeping_in_non_blocking_invalidate_panics_naming_the_rule() {
    let n = Notifier::new();
    let lock = Arc::new(UpdateLock::new(()));
    let _s = n
        .insert(
            r(0x10000, 1),
            FnOps::new(move |_, _| {
                let _g = lock.lock();
                Ok(Pass::Done)
            }),
        )
        .unwrap();
    let _ = n.invalidate_range_start(unmap(r(0x10000, 1)).non_blocking());
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "read_begin called from an invalidation callback")]
fn read_begin_inside_a_callback_panics() {
    let n = Notifier::new();
    let slot: Arc<std::sync::Mutex<Option<Arc<Subscription>>>> = Arc::default();
    let s2 = slot.clone();
    let sub = Arc::new(
        n.insert(
            r(0x10000, 1),
            FnOps::new(move |_, _| {
                if let Some(s) = s2.lock().unwrap().as_ref() {
                    let _ = s.read_begin();
                }
                Ok(Pass::Done)
            }),
        )
        .unwrap(),
    );
    *slot.lock().unwrap() = Some(sub);
    let _ = n.invalidate_range_start(unmap(r(0x10000, 1)));
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "remove called from an invalidation callback")]
fn remove_inside_a_callback_panics() {
    let n = Notifier::new();
    let victim = Arc::new(n.insert(r(0x20000, 1), mirror()).unwrap());
    let v2 = victim.clone();
    let _s = n
        .insert(
            r(0x10000, 1),
            FnOps::new(move |_, _| {
                let _ = v2.remove();
                Ok(Pass::Done)
            }),
        )
        .unwrap();
    let _ = n.invalidate_range_start(unmap(r(0x10000, 1)));
}

#[test]
fn a_panicking_callback_does_not_leave_the_notifier_frozen() {
    let n = Notifier::new();
    let _s = n
        .insert(r(0x10000, 1), FnOps::new(|_, _| panic!("device exploded")))
        .unwrap();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = n.invalidate_range_start(unmap(r(0x10000, 1)));
    }));
    assert!(res.is_err());
    assert!(
        !n.is_invalidating(),
        "the guard ended the invalidation on unwind"
    );
    assert!(may_sleep(), "callback scope unwound");
}

#[test]
fn own_migration_is_skipped_by_its_owner_only() {
    let n = Notifier::new();
    let mine = Arc::new(TestMirror::new(Owner(1)));
    let theirs = Arc::new(TestMirror::new(Owner(2)));
    let _a = n.insert(r(0x10000, 1), mine.clone()).unwrap();
    let _b = n.insert(r(0x10000, 1), theirs.clone()).unwrap();
    let ev = NotifierRange::new(r(0x10000, 1), Event::Migrate { owner: Owner(1) });
    n.invalidate_range_start(ev).unwrap().end();
    assert!(mine.table.lock().invalidations.is_empty());
    assert_eq!(theirs.table.lock().invalidations.len(), 1);
}

#[test]
fn stats_count_invalidations_by_event() {
    let n = Notifier::new();
    let _s = n.insert(r(0x10000, 1), mirror()).unwrap();
    n.invalidate_range_start(unmap(r(0x10000, 1)))
        .unwrap()
        .end();
    n.invalidate_range_start(NotifierRange::new(r(0x10000, 1), Event::ProtectionVma))
        .unwrap()
        .end();
    let st = n.stats();
    assert_eq!(st.invalidations[Event::Unmap.index()], 1);
    assert_eq!(st.invalidations[Event::ProtectionVma.index()], 1);
    assert_eq!(st.callbacks, 2);
}
