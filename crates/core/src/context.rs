//! Lock levels, the update lock, the one lock order, and the run-time checks that keep callbacks
//! and backends honest.
//!
//! # Lock order
//!
//! This is the one written lock order of svmirror (STYLE.md rule 9, DESIGN.md "Lock order"); no
//! other module restates it. Outermost first, a thread may only go down the list:
//!
//! 1. [`LockClass::Notifier`]: waiting for the notifier, that is for running invalidations to end
//!    (`read_begin`, `Subscription::remove`). The notifier's own state lock is a leaf below
//!    everything: held only for a few stores, never while a callback runs or anything else is
//!    taken, and never visible outside the core.
//! 2. [`LockClass::Update`]: a backend's [`UpdateLock`]. Its `invalidate` callback takes it, and
//!    the fault path holds it around `read_retry` and device programming.
//! 3. [`LockClass::Inner`]: a backend's inner locks, each an [`InnerLock`] named for what it
//!    guards: the pin pool, the IO page table and IOTLB, the GPU page-table buffer, the VFIO
//!    chunk table, device memory. Invalidations take them (under the update lock), so every one
//!    counts as "a lock an invalidation takes". Inner locks do not nest in each other except where
//!    the backend's own docs say so. Page-level state under an inner lock is additionally in an
//!    [`AtomicSection`], which must not sleep.
//!
//! Two rules follow, and debug builds check both on every acquisition, panicking with a message
//! that names the rule:
//!
//! - **Order.** Taking a lock of a class while holding one of a later class (an update lock under
//!   an inner lock, or waiting for the notifier under either) is refused: the invalidation that
//!   holds the earlier one is waiting for the later one.
//! - **No fault under an invalidation's lock.** Nothing that can fault on monitored memory (a pin,
//!   a host-pointer import, a populate, a VFIO map: anything that makes the kernel run GUP or touch
//!   user pages) runs while the thread holds an update lock or an inner lock, or inside an
//!   invalidation callback. Such a fault may have to be served by the userfaultfd monitor, and the
//!   monitor may be inside an invalidation waiting for exactly that lock. Call [`might_fault`]
//!   first. The same holds for kernel-side locks: a pin must not be made through a kernel object
//!   (an io_uring ring, a VFIO container) whose lock an invalidation's unpin also takes; see the
//!   pin pool in svmirror-iommu.
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
//! `remove` refuse to run inside a callback or while the thread holds an update or inner lock,
//! because both wait for running invalidations, whose callbacks need that lock (a deadlock). Debug
//! builds panic there; release builds return [`Error::CalledFromCallback`].
//!
//! The level is tracked per thread, like the kernel's preempt count and lockdep's held-lock
//! stack; it is the only per-thread state in svmirror and holds nothing but counters and the name
//! of the innermost inner lock. Release builds keep the counters (the `read_begin` check needs
//! them) but run none of the order or fault checks.

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
    /// Inner locks this thread holds.
    inner_locks: u32,
    /// The name of the inner lock this thread took last and still holds, for messages.
    inner_name: Option<&'static str>,
}

/// The classes of the one lock order, outermost first (see the [module documentation](self)).
/// A thread holding a lock of one class may only take locks of the same or a later class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockClass {
    /// Waiting for the notifier: for running invalidations to end.
    Notifier,
    /// A backend's [`UpdateLock`].
    Update,
    /// A backend's [`InnerLock`]s (pin pool, page table, IOTLB, ...).
    Inner,
}

impl LockClass {
    /// How messages name the class.
    pub const fn name(self) -> &'static str {
        match self {
            LockClass::Notifier => "waiting for the notifier",
            LockClass::Update => "a backend's update lock",
            LockClass::Inner => "a backend's inner lock",
        }
    }
}

/// The first rule every order message names.
const ORDER_RULE: &str = "lock order: notifier, then a backend's update lock, then its inner \
                          locks (svmirror_core::context, \"Lock order\")";

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

/// What the thread holds that an invalidation takes, innermost first, for messages.
fn held_by_invalidations(l: &Level) -> Option<String> {
    if let Some(name) = l.inner_name.filter(|_| l.inner_locks > 0) {
        return Some(format!("holds the inner lock `{name}`"));
    }
    if l.inner_locks > 0 {
        return Some("holds an inner lock".to_owned());
    }
    if l.update_locks > 0 {
        return Some("holds a backend's update lock".to_owned());
    }
    if l.callback > 0 {
        return Some("is running an invalidation callback".to_owned());
    }
    None
}

/// Declares that the caller can fault on monitored memory: it pins user pages (GUP), imports a
/// host pointer into a device, populates a range, or maps it for DMA (a VFIO map pins).
///
/// Such a fault may wait for the userfaultfd monitor (a page that lives on a device, a range
/// registered for MISSING faults), and the monitor may be inside an invalidation that waits for a
/// lock this thread holds: a deadlock. In debug builds this panics, naming the rule, when the
/// thread holds an update lock or an inner lock, or runs an invalidation callback; it also checks
/// [`might_sleep`]. Release builds check nothing.
///
/// ```
/// use svmirror_core::{UpdateLock, might_fault};
///
/// let lock = UpdateLock::new(());
/// might_fault("pin"); // fine: no lock held
/// let g = lock.lock();
/// // might_fault("pin") here would panic in debug builds: pin first, then lock and publish.
/// drop(g);
/// ```
#[inline]
#[track_caller]
pub fn might_fault(what: &'static str) {
    if cfg!(debug_assertions) {
        might_sleep(what);
        if let Some(held) = held_by_invalidations(&level()) {
            panic!(
                "svmirror: {what} can fault on monitored memory, but this thread {held}: an \
                 invalidation takes that lock, and the userfaultfd monitor that must serve the \
                 fault may be inside that invalidation, waiting for it (rule: nothing that can \
                 fault on monitored memory runs under a lock an invalidation takes; {ORDER_RULE})"
            );
        }
    }
}

/// Checks, in debug builds, that the current thread may take a lock of `class` now: it holds no
/// lock of a later class. `what` names the lock being taken.
#[inline]
#[track_caller]
pub fn check_lock_order(class: LockClass, what: &'static str) {
    if cfg!(debug_assertions) {
        let l = level();
        let later = if l.inner_locks > 0 && class < LockClass::Inner {
            Some(match l.inner_name {
                Some(name) => format!("the inner lock `{name}`"),
                None => "an inner lock".to_owned(),
            })
        } else if l.update_locks > 0 && class < LockClass::Update {
            Some("a backend's update lock".to_owned())
        } else {
            None
        };
        if let Some(later) = later {
            panic!(
                "svmirror: {what} ({}) taken while holding {later}: an invalidation that holds \
                 the first may be waiting for the second ({ORDER_RULE})",
                class.name()
            );
        }
    }
}

/// Refuses `op` (a call that waits for invalidations to end) inside a callback or under an update
/// lock: panics in debug builds, returns a typed error in release builds.
#[track_caller]
pub(crate) fn check_may_wait_for_invalidations(op: &'static str) -> Result<()> {
    let l = level();
    if l.callback > 0 || l.update_locks > 0 || l.inner_locks > 0 {
        if cfg!(debug_assertions) {
            let place = if l.callback > 0 {
                "an invalidation callback"
            } else if l.update_locks > 0 {
                "code holding an update lock"
            } else {
                "code holding an inner lock"
            };
            panic!(
                "svmirror: {op} called from {place}: it waits for running invalidations, whose \
                 callbacks need the update lock, so it would wait for itself ({ORDER_RULE}; never \
                 wait for the notifier under an update or inner lock)"
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
    l.callback == 0 && l.update_locks == 0 && l.inner_locks == 0 && l.atomic == 0
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
        check_lock_order(LockClass::Update, "UpdateLock::lock");
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

/// A backend's inner lock (class [`LockClass::Inner`]): a mutex named for what it guards (the
/// pin pool, the IO page table and IOTLB, the VFIO chunk table), whose holder debug builds track
/// so that [`might_fault`] and the order check can name it.
///
/// Every inner lock counts as one that invalidations take. Take it only for short bookkeeping,
/// never around anything that can fault on monitored memory.
///
/// Poisoning is ignored, as with [`UpdateLock`]: a backend keeps the guarded state consistent at
/// every step.
pub struct InnerLock<T> {
    name: &'static str,
    inner: Mutex<T>,
}

impl<T> InnerLock<T> {
    /// Wraps `value` in a lock named `name` (used in the checks' messages).
    pub fn new(name: &'static str, value: T) -> Self {
        InnerLock {
            name,
            inner: Mutex::new(value),
        }
    }

    /// The lock's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Takes the lock, sleeping if needed. Debug builds check the lock order first.
    #[track_caller]
    pub fn lock(&self) -> InnerGuard<'_, T> {
        check_lock_order(LockClass::Inner, self.name);
        let guard = sync::lock(&self.inner);
        self.guard(guard)
    }

    /// Takes the lock only if it is free.
    pub fn try_lock(&self) -> Option<InnerGuard<'_, T>> {
        match self.inner.try_lock() {
            Ok(g) => Some(self.guard(g)),
            #[cfg(not(loom))]
            Err(std::sync::TryLockError::Poisoned(p)) => Some(self.guard(p.into_inner())),
            Err(_) => None,
        }
    }

    fn guard<'a>(&'a self, guard: MutexGuard<'a, T>) -> InnerGuard<'a, T> {
        let mut prev = None;
        update_level(|l| {
            l.inner_locks += 1;
            prev = l.inner_name.replace(self.name);
        });
        InnerGuard {
            guard: Some(guard),
            prev,
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

impl<T> std::fmt::Debug for InnerLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InnerLock")
            .field("name", &self.name)
            .finish()
    }
}

/// Holding this proves an [`InnerLock`] is held. Dereferences to the protected state.
#[must_use = "the inner lock is released when the guard is dropped"]
pub struct InnerGuard<'a, T> {
    /// `None` only while [`wait_timeout`](Self::wait_timeout) has lent it to a condition
    /// variable.
    guard: Option<MutexGuard<'a, T>>,
    /// The inner lock named before this one was taken, restored on release.
    prev: Option<&'static str>,
}

impl<T> InnerGuard<'_, T> {
    /// Waits on `cv` for at most `dur`, releasing the lock meanwhile. Returns whether the wait
    /// timed out. The thread still counts as holding the lock while it waits.
    #[cfg(not(loom))]
    pub fn wait_timeout(&mut self, cv: &std::sync::Condvar, dur: std::time::Duration) -> bool {
        #[expect(
            clippy::expect_used,
            reason = "`guard` is `None` only inside this function, which puts it back before returning"
        )]
        let g = self.guard.take().expect("the guard holds its lock");
        let (g, timeout) = match cv.wait_timeout(g, dur) {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        self.guard = Some(g);
        timeout.timed_out()
    }
}

impl<T> Deref for InnerGuard<'_, T> {
    type Target = T;
    #[expect(
        clippy::expect_used,
        reason = "`guard` is `None` only inside `wait_timeout`, which holds `&mut self` throughout"
    )]
    fn deref(&self) -> &T {
        self.guard.as_ref().expect("the guard holds its lock")
    }
}

impl<T> DerefMut for InnerGuard<'_, T> {
    #[expect(
        clippy::expect_used,
        reason = "`guard` is `None` only inside `wait_timeout`, which puts it back before returning"
    )]
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_mut().expect("the guard holds its lock")
    }
}

impl<T> Drop for InnerGuard<'_, T> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let prev = self.prev;
        update_level(|l| {
            l.inner_locks -= 1;
            l.inner_name = prev;
        });
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

    #[test]
    fn locks_in_the_written_order_do_not_fire() {
        let update = UpdateLock::new(0);
        let pool = InnerLock::new("pin pool", 0);
        let table = InnerLock::new("page table", 0);
        might_fault("pin before any lock");
        let _u = update.lock();
        let _p = pool.lock();
        let _t = table.lock();
        check_lock_order(LockClass::Inner, "another inner lock");
    }

    #[test]
    fn inner_lock_name_unwinds_to_the_outer_one() {
        let outer = InnerLock::new("outer", 0);
        let inner = InnerLock::new("inner", 0);
        let _o = outer.lock();
        drop(inner.lock());
        assert_eq!(level().inner_name, Some("outer"));
        assert_eq!(level().inner_locks, 1);
        drop(_o);
        assert_eq!(level().inner_locks, 0);
        might_fault("after every lock is gone");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(
        expected = "UpdateLock::lock (a backend's update lock) taken while holding \
                               the inner lock `pin pool`"
    )]
    fn update_lock_under_inner_lock_panics_naming_the_order() {
        let update = UpdateLock::new(0);
        let pool = InnerLock::new("pin pool", 0);
        let _p = pool.lock();
        let _u = update.lock();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "code holding an inner lock")]
    fn waiting_for_invalidations_under_inner_lock_panics() {
        let pool = InnerLock::new("pin pool", 0);
        let _p = pool.lock();
        let _ = check_may_wait_for_invalidations("Subscription::remove");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(
        expected = "notifier (waiting for the notifier) taken while holding a \
                               backend's update lock"
    )]
    fn notifier_class_under_update_lock_panics_naming_the_order() {
        let update = UpdateLock::new(0);
        let _u = update.lock();
        check_lock_order(LockClass::Notifier, "notifier");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(
        expected = "PinPool::pin can fault on monitored memory, but this thread \
                               holds a backend's update lock"
    )]
    fn might_fault_under_update_lock_panics_naming_the_rule() {
        let update = UpdateLock::new(0);
        let _u = update.lock();
        might_fault("PinPool::pin");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(
        expected = "holds the inner lock `pin pool`: an invalidation takes that \
                               lock"
    )]
    fn might_fault_under_inner_lock_panics_naming_the_lock() {
        let pool = InnerLock::new("pin pool", 0);
        let _p = pool.lock();
        might_fault("vkAllocateMemory (host-pointer import)");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "is running an invalidation callback")]
    fn might_fault_in_a_callback_panics() {
        let _cb = CallbackScope::enter(true);
        might_fault("VFIO_IOMMU_MAP_DMA");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(
        expected = "nothing that can fault on monitored memory runs under a lock an \
                               invalidation takes"
    )]
    fn might_fault_message_names_the_rule() {
        let update = UpdateLock::new(0);
        let _u = update.lock();
        might_fault("populate");
    }
}
