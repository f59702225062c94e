//! The one place the core names the synchronisation primitives of its seq protocol.
//!
//! Normal builds use `std`; `RUSTFLAGS="--cfg loom"` swaps in `loom`'s model-checked versions so the
//! seq protocol can be explored exhaustively (`cargo xtask loom`). Every lock, condition variable,
//! atomic and thread-local the protocol's state lives in comes from here: the notifier's state,
//! sequences and wait queue (`notifier`), the update and inner locks and the per-thread lock level
//! (`context`), and the scripted page table of `testing`.
//!
//! `std::sync` is named directly only where there is nothing for loom to model: an `Arc` that only
//! shares a backend's object (`Arc<dyn IntervalNotifierOps>` in `notifier`, `Arc<dyn DevicePages>`
//! in `address_space`, `PageSource for Arc<T>` in `fault`), the relaxed statistics counters
//! (`counters`), the std-only paths of `context` behind `#[cfg(not(loom))]` (a poisoned
//! `try_lock`, `InnerGuard::wait_timeout`), and tests and examples. A primitive that protocol state
//! lives in is taken from here.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(loom)]
pub(crate) use loom::thread_local;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::thread_local;

/// Locks `m`, ignoring poisoning: every critical section in the core leaves its state consistent
/// before anything that can panic (a callback) runs, so a poisoned lock holds valid state.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Waits on `cv`, ignoring poisoning for the same reason as [`lock`].
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    match cv.wait(g) {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
