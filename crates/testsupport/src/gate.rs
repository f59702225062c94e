//! A notifier subscriber that holds the monitor's handler: for tests that need a userfaultfd
//! event read (so its syscall returned) but not yet handled.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};

use svmirror_core::{IntervalNotifierOps, InvalidateCtx, NotifierRange, Pass, WouldBlock};

/// A subscriber whose invalidation reports that it started, then waits while its gate is
/// held: the monitor's handler stays in it, as in a driver waiting for a lock, and the events
/// read after it queue up unhandled.
pub struct GatedSub {
    entered: Mutex<Option<Sender<()>>>,
    gate: Arc<Mutex<()>>,
}

impl GatedSub {
    /// A subscriber, the gate it waits on (hold its lock to hold the handler), and what its
    /// first invalidation reports to when it starts.
    pub fn new() -> (Arc<GatedSub>, Arc<Mutex<()>>, Receiver<()>) {
        let gate = Arc::new(Mutex::new(()));
        let (tx, rx) = channel();
        let sub = Arc::new(GatedSub {
            entered: Mutex::new(Some(tx)),
            gate: gate.clone(),
        });
        (sub, gate, rx)
    }
}

impl IntervalNotifierOps for GatedSub {
    fn invalidate(
        &self,
        _ctx: &InvalidateCtx<'_>,
        _range: &NotifierRange,
    ) -> Result<Pass, WouldBlock> {
        let tx = self
            .entered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
        drop(self.gate.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(Pass::Done)
    }
}
