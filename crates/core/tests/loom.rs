//! loom models of the seq protocol. Run bounded with `cargo xtask loom`
//! (`RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p svmirror-core --test loom`).
//!
//! The CPU page table here is the scripted test double: loom must own every synchronisation
//! point, so the real process's page table cannot take part.
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;

use svmirror_core::testing::{ScriptedPageSource, TestMirror};
use svmirror_core::{
    AreaKind, CpuPte, Event, IntervalNotifierOps, InvalidateCtx, Notifier, NotifierRange, Owner,
    Pass, Range, WouldBlock, entry,
};

const PAGE: u64 = 0x10_0000;

fn page() -> Range {
    Range::with_len(PAGE, 4096).unwrap()
}

/// A faulter racing an invalidation never leaves a device entry that disagrees with the CPU:
/// whatever the interleaving, after both finish the device either has no entry or the CPU's page.
#[test]
fn faulter_racing_invalidation_never_programs_a_stale_entry() {
    loom::model(|| {
        let cpu = Arc::new(ScriptedPageSource::new());
        cpu.map_area(
            page(),
            AreaKind::Mapped {
                read: true,
                write: true,
            },
        );
        cpu.populate(page(), true);
        let n = Notifier::new();
        let m = Arc::new(TestMirror::new(Owner(1)));
        let sub = Arc::new(n.insert(page(), m.clone()).unwrap());

        let faulter = {
            let (cpu, m, sub) = (cpu.clone(), m.clone(), sub.clone());
            thread::spawn(move || {
                m.fault(&sub, &*cpu, page(), false).unwrap();
            })
        };

        // The CPU drops the page (MADV_DONTNEED) and a new one appears at the same address.
        let inv = n
            .invalidate_range_start(NotifierRange::new(page(), Event::Clear))
            .unwrap();
        cpu.clear(page());
        cpu.populate(page(), true);
        inv.end();

        faulter.join().unwrap();
        let CpuPte::Present { pfn, .. } = cpu.pte(PAGE) else {
            panic!("CPU page vanished")
        };
        if let Some(e) = m.entry(PAGE) {
            assert_eq!(entry::pfn(e), pfn, "device maps a page the CPU dropped");
        }
    });
}

/// Counts callbacks; loom atomics so the model sees every access.
struct Counting {
    calls: AtomicUsize,
}

impl IntervalNotifierOps for Counting {
    fn invalidate(&self, _: &InvalidateCtx<'_>, _: &NotifierRange) -> Result<Pass, WouldBlock> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Pass::Done)
    }
}

/// Insert and remove racing an active invalidation: the tree ends up exactly as if the edits had
/// happened in order, and no callback runs after `remove` returned.
#[test]
fn insert_and_remove_during_an_active_invalidation() {
    loom::model(|| {
        let n = Notifier::new();
        let a = n
            .insert(page(), Arc::new(TestMirror::new(Owner(1))))
            .unwrap();
        let ops = Arc::new(Counting {
            calls: AtomicUsize::new(0),
        });

        let invalidator = {
            let n = n.clone();
            thread::spawn(move || {
                let wide = Range::with_len(PAGE, 0x10_0000).unwrap();
                n.invalidate_range_start(NotifierRange::new(wide, Event::Unmap))
                    .unwrap()
                    .end();
            })
        };

        let other = Range::with_len(PAGE + 0x8000, 4096).unwrap();
        let b = n.insert(other, ops.clone()).unwrap();
        b.remove().unwrap();
        let calls_at_remove = ops.calls.load(Ordering::SeqCst);

        invalidator.join().unwrap();
        assert_eq!(
            ops.calls.load(Ordering::SeqCst),
            calls_at_remove,
            "callback ran after remove returned"
        );
        assert_eq!(
            n.stats().subscriptions,
            1,
            "only the first subscription is left"
        );
        assert!(!n.is_invalidating());
        drop(a);
        assert_eq!(n.stats().subscriptions, 0);
    });
}

/// A callback that checks, on entry and exit, that its subscription's removal has not returned.
struct Watched {
    running: AtomicBool,
    removed: Arc<AtomicBool>,
}

impl IntervalNotifierOps for Watched {
    fn invalidate(&self, _: &InvalidateCtx<'_>, _: &NotifierRange) -> Result<Pass, WouldBlock> {
        assert!(
            !self.removed.load(Ordering::SeqCst),
            "callback after remove"
        );
        self.running.store(true, Ordering::SeqCst);
        thread::yield_now();
        self.running.store(false, Ordering::SeqCst);
        assert!(
            !self.removed.load(Ordering::SeqCst),
            "remove returned mid-callback"
        );
        Ok(Pass::Done)
    }
}

/// `remove` never returns while the subscription's callback runs.
#[test]
fn removal_never_returns_while_its_callback_runs() {
    loom::model(|| {
        let n = Notifier::new();
        let removed = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(Watched {
            running: AtomicBool::new(false),
            removed: removed.clone(),
        });
        let sub = n.insert(page(), ops.clone()).unwrap();

        let invalidator = {
            let n = n.clone();
            thread::spawn(move || {
                n.invalidate_range_start(NotifierRange::new(page(), Event::Unmap))
                    .unwrap()
                    .end();
            })
        };

        sub.remove().unwrap();
        assert!(
            !ops.running.load(Ordering::SeqCst),
            "remove returned mid-callback"
        );
        removed.store(true, Ordering::SeqCst);
        invalidator.join().unwrap();
    });
}
