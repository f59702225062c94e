//! Lock levels, the update lock, and the run-time checks that keep callbacks honest.
//!
//! # Lock order
//!
//! This is the one written lock order of svmirror (STYLE.md rule 9):
//!
//! 1. the notifier's internal lock (never held while a callback runs, never visible outside the
//!    core);
//! 2. a backend's [`UpdateLock`]: taken by the backend's `invalidate` callback and around
//!    `read_retry` + device programming on the fault path; nothing in the core waits for the
//!    notifier while one is held;
//! 3. page-level state (a device's IOTLB, a GPU page-table buffer): only in an [`AtomicSection`],
//!    which must not sleep.
//!
//! # Levels (DESIGN.md invariant 3)
//!
//! The virtual-address level may sleep: `invalidate` callbacks can take update locks and wait for
//! fences. The page level may not: the secondary-TLB callback runs in an atomic section, and so
//! does any code a backend brackets with [`AtomicSection::enter`]. An invalidation started in
//! non-blocking mode puts its callbacks at the page level too: they may only `try_lock` and must
//! refuse with `WouldBlock` when they would have to wait.
//!
//! Every call that can sleep (taking an [`UpdateLock`], `read_begin`, `remove`, the fault loop, a
//! backend's fence wait) starts with [`might_sleep`]. In debug builds it panics, naming the rule,
//! when it runs where sleeping is forbidden. Two further checks always run: `read_begin` and
//! `remove` refuse to run inside a callback or while the thread holds an update lock, because
//! both wait for running invalidations, whose callbacks need that lock (a deadlock). Debug builds
//! panic there; release builds return [`Error::CalledFromCallback`].
//!
//! The level is tracked per thread, like the kernel's preempt count; it is the only per-thread
//! state in svmirror and holds nothing but counters.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use crate::error::{Error, Result};
use crate::sync::{self, Mutex, MutexGuard, thread_local};

#[derive(Clone, Copy, Default)]
struct Level {
    /// Nesting depth of atomic sections (page level) on this thread.
    atomic: u32,
    /// Nesting depth of non-blocking invalidation callbacks.
    nonblocking: u32,
    /// Nesting depth of invalidation callbacks of any kind.
    callback: u32,
    /// Update locks this thread holds.
    update_locks: u32,
}

thread_local! {
    static LEVEL: Cell<Level> = Cell::new(Level::default());
}

fn update_level(f: impl FnOnce(&mut Level)) {
    LEVEL.with(|l| {
        let mut v = l.get();
        f(&mut v);
        l.set(v);
    });
}

fn level() -> Level {
    LEVEL.with(|l| l.get())
}

/// Declares that the caller may sleep (the kernel's `might_sleep()`).
///
/// Call it at the top of anything that can block. In debug builds it panics when the current
/// thread is in an [`AtomicSection`] or inside a non-blocking invalidation callback, with a message
/// that names the rule; release builds check nothing.
#[inline]
#[track_caller]
pub fn might_sleep(what: &'static str) {
    if cfg!(debug_assertions) {
        let l = level();
        if l.atomic > 0 {
            panic!(
                "svmirror: {what} may sleep, but this thread is in an atomic section \
                 (the page level / secondary-TLB flush): the page level must not sleep \
                 (DESIGN.md invariant 3, the mmu-notifier lock-level rule)"
            );
        }
        if l.nonblocking > 0 {
            panic!(
                "svmirror: {what} may sleep, but this thread is in a non-blocking invalidation: \
                 a callback on a non-blockable range must use try_lock and return WouldBlock \
                 instead of sleeping (DESIGN.md invariant 3)"
            );
        }
    }
}

/// Whether the current thread may sleep: false inside an [`AtomicSection`] or a non-blocking
/// invalidation callback.
pub fn may_sleep() -> bool {
    let l = level();
    l.atomic == 0 && l.nonblocking == 0
}

/// Refuses `op` (a call that waits for invalidations to end) inside a callback or under an update
/// lock: panics in debug builds, returns a typed error in release builds.
#[track_caller]
pub(crate) fn check_may_wait_for_invalidations(op: &'static str) -> Result<()> {
    let l = level();
    if l.callback > 0 || l.update_locks > 0 {
        if cfg!(debug_assertions) {
            let place = if l.callback > 0 {
                "an invalidation callback"
            } else {
                "code holding an update lock"
            };
            panic!(
                "svmirror: {op} called from {place}: it waits for running invalidations, whose \
                 callbacks need the update lock, so it would wait for itself (lock order: \
                 notifier, then update lock; never wait for the notifier under an update lock)"
            );
        }
        return Err(Error::CalledFromCallback { op });
    }
    might_sleep(op);
    Ok(())
}

/// Whether the current thread may wait for invalidations to end: not inside a callback and not
/// holding an update lock. The quiet form of the check, for `Drop`.
pub(crate) fn can_wait_for_invalidations() -> bool {
    let l = level();
    l.callback == 0 && l.update_locks == 0 && l.atomic == 0
}

/// Marks the current thread as being at the page level until dropped: nothing may sleep.
///
/// The core enters one around every secondary-TLB callback; a backend enters one around its own
/// page-level critical sections (an IOTLB spin lock, say) so debug builds catch a sleep there.
#[must_use = "the section ends when this is dropped"]
pub struct AtomicSection {
    _not_send: PhantomData<*const ()>,
}

impl AtomicSection {
    /// Enters an atomic section on the current thread.
    pub fn enter() -> Self {
        update_level(|l| l.atomic += 1);
        AtomicSection {
            _not_send: PhantomData,
        }
    }
}

impl Drop for AtomicSection {
    fn drop(&mut self) {
        update_level(|l| l.atomic -= 1);
    }
}

/// Marks the current thread as running an invalidation callback until dropped.
pub(crate) struct CallbackScope {
    blockable: bool,
    _not_send: PhantomData<*const ()>,
}

impl CallbackScope {
    pub(crate) fn enter(blockable: bool) -> Self {
        update_level(|l| {
            l.callback += 1;
            if !blockable {
                l.nonblocking += 1;
            }
        });
        CallbackScope {
            blockable,
            _not_send: PhantomData,
        }
    }
}

impl Drop for CallbackScope {
    fn drop(&mut self) {
        let blockable = self.blockable;
        update_level(|l| {
            l.callback -= 1;
            if !blockable {
                l.nonblocking -= 1;
            }
        });
    }
}

/// A backend's update lock: the lock its `invalidate` callback takes to tear down device entries
/// and `set_seq`, and its fault path holds around `read_retry` and device programming (the
/// kernel's driver "update lock", e.g. `dmirror->mutex` or the GPU SVM notifier lock).
///
/// The guard is the proof the protocol asks for: [`InvalidateCtx::set_seq`] and
/// [`Subscription::read_retry`] take an [`UpdateGuard`], and the subscription remembers which lock
/// it was used with so a mismatch is an error instead of a silent race.
///
/// Poisoning is ignored: a backend that panics while holding the lock must leave the device side
/// torn down (fail closed), not half-programmed.
///
/// [`InvalidateCtx::set_seq`]: crate::InvalidateCtx::set_seq
/// [`Subscription::read_retry`]: crate::Subscription::read_retry
pub struct UpdateLock<T> {
    inner: Mutex<T>,
}

impl<T> UpdateLock<T> {
    /// Wraps the backend state the lock protects.
    pub fn new(value: T) -> Self {
        UpdateLock {
            inner: Mutex::new(value),
        }
    }

    /// Takes the lock, sleeping if needed. May sleep: forbidden at the page level.
    #[track_caller]
    pub fn lock(&self) -> UpdateGuard<'_, T> {
        might_sleep("UpdateLock::lock");
        let guard = sync::lock(&self.inner);
        self.guard(guard)
    }

    /// Takes the lock only if it is free: what a callback does in a non-blocking invalidation.
    pub fn try_lock(&self) -> Option<UpdateGuard<'_, T>> {
        match self.inner.try_lock() {
            Ok(g) => Some(self.guard(g)),
            #[cfg(not(loom))]
            Err(std::sync::TryLockError::Poisoned(p)) => Some(self.guard(p.into_inner())),
            Err(_) => None,
        }
    }

    fn guard<'a>(&'a self, guard: MutexGuard<'a, T>) -> UpdateGuard<'a, T> {
        update_level(|l| l.update_locks += 1);
        UpdateGuard {
            guard,
            lock_id: self as *const Self as usize,
        }
    }

    /// Consumes the lock, returning the state.
    pub fn into_inner(self) -> T {
        match self.inner.into_inner() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        }
    }
}

impl<T: Default> Default for UpdateLock<T> {
    fn default() -> Self {
        UpdateLock::new(T::default())
    }
}

/// Holding this proves the backend's update lock is held. Dereferences to the protected state.
#[must_use = "the update lock is released when the guard is dropped"]
pub struct UpdateGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    lock_id: usize,
}

impl<T> UpdateGuard<'_, T> {
    /// Identity of the lock this guard holds, for the wrong-lock check.
    pub(crate) fn lock_id(&self) -> usize {
        self.lock_id
    }
}

impl<T> Deref for UpdateGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for UpdateGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for UpdateGuard<'_, T> {
    fn drop(&mut self) {
        update_level(|l| l.update_locks -= 1);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn sleeping_is_allowed_outside_atomic_sections() {
        assert!(may_sleep());
        might_sleep("test");
        let lock = UpdateLock::new(1);
        assert_eq!(*lock.lock(), 1);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "the page level must not sleep")]
    fn update_lock_in_atomic_section_panics_naming_the_rule() {
        let lock = UpdateLock::new(0);
        let _atomic = AtomicSection::enter();
        let _g = lock.lock();
    }

    #[test]
    fn try_lock_is_allowed_in_atomic_section() {
        let lock = UpdateLock::new(0);
        let _atomic = AtomicSection::enter();
        assert!(!may_sleep());
        assert!(lock.try_lock().is_some());
    }

    #[test]
    fn atomic_section_nests_and_unwinds() {
        {
            let _a = AtomicSection::enter();
            let _b = AtomicSection::enter();
            assert!(!may_sleep());
        }
        assert!(may_sleep());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "holding an update lock")]
    fn waiting_for_invalidations_under_update_lock_panics() {
        let lock = UpdateLock::new(0);
        let _g = lock.lock();
        let _ = check_may_wait_for_invalidations("read_begin");
    }
}
