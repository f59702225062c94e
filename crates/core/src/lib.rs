//! svmirror-core: the shared invalidation core of svmirror.
//!
//! The userspace counterpart of the kernel's `mmu_interval_notifier` and `hmm_range_fault`. It
//! knows no backend and no operating-system detail: the CPU side (svmirror-mm) feeds it
//! invalidations and implements [`PageSource`]; device backends subscribe to ranges and program
//! their page tables from [`range_fault`]'s output.
//!
//! # What the core guarantees
//!
//! - **No stale mapping**: a backend that programs its device only inside [`fault_and_program`]'s
//!   closure (or after `read_retry` returned false under its [`UpdateLock`]) never installs an
//!   entry from a snapshot that an invalidation has overtaken.
//! - **Ranges with reasons**: every invalidation is a [`Range`] with an [`Event`]; callbacks run
//!   for every overlapping subscription, found in `O(log n + k)`.
//! - **Frozen tree, deferred edits**: subscriptions inserted or removed during an invalidation
//!   take effect at its end; [`Subscription::remove`] returns only when no callback of it runs or
//!   will run.
//! - **Checked lock levels**: the sleepable `invalidate` and the atomic secondary-TLB flush get
//!   different context types, and debug builds panic, naming the rule, when something sleeps
//!   where it must not (see [`context`]).
//!
//! # What is the caller's job
//!
//! - Start an invalidation *before* the CPU change where it can ([`Notifier::invalidate_range_start`])
//!   and end it after; a change source that only learns afterwards must keep pages pinned.
//! - In `invalidate`: take the update lock, call [`InvalidateCtx::set_seq`], tear down, wait for
//!   device work on the range, flush the device TLB.
//! - On the fault path: never wait for the notifier (`read_begin`) while holding the update lock.
//!
//! ```
//! use std::sync::Arc;
//! use svmirror_core::testing::{ScriptedPageSource, TestMirror};
//! use svmirror_core::{AreaKind, Event, Notifier, NotifierRange, Owner, Range};
//!
//! let cpu = ScriptedPageSource::new();
//! let buf = Range::new(0x10_0000, 0x10_4000)?;
//! cpu.map_area(buf, AreaKind::Mapped { read: true, write: true });
//!
//! let notifier = Notifier::new();
//! let mirror = Arc::new(TestMirror::new(Owner(1)));
//! let sub = notifier.insert(buf, mirror.clone())?;
//!
//! mirror.fault(&sub, &cpu, buf, true)?; // device fault: snapshot, fault in, program
//! assert!(mirror.entry(0x10_0000).is_some());
//!
//! // munmap: the device loses the translation before the CPU change happens.
//! let inv = notifier.invalidate_range_start(NotifierRange::new(buf, Event::Unmap))?;
//! assert!(mirror.entry(0x10_0000).is_none());
//! cpu.unmap(buf);
//! inv.end();
//! sub.remove()?;
//! # Ok::<(), svmirror_core::Error>(())
//! ```

// Library code reports what can fail as an error value (STYLE.md rule 4); an unwrap or expect
// that stays names its invariant in an `#[expect(.., reason = "..")]` on the smallest item.
// Unit tests (cfg(test)) and the integration tests in tests/, crates of their own, may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod address_space;
pub mod context;
pub mod counters;
mod device_pages;
mod error;
mod fault;
pub mod interval_tree;
mod mirror;
mod notifier;
mod range;
mod sync;
pub mod teardown;
#[cfg(any(test, feature = "testing"))]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test doubles, built only for tests (the `testing` feature)"
)]
pub mod testing;

pub use address_space::AddressSpace;
pub use context::{
    AtomicSection, InnerGuard, InnerLock, LockClass, UpdateGuard, UpdateLock, check_lock_order,
    may_sleep, might_fault, might_sleep,
};
pub use counters::{CounterSnapshot, Counters, FaultSize, LatencyHistogram};
pub use device_pages::DevicePages;
pub use error::{Error, Result};
pub use fault::{
    Area, AreaKind, CpuPte, DEFAULT_FAULT_TIMEOUT, FaultRequest, FaultStats, FaultSteps,
    PageSource, entry, fault_and_program, fault_prepare_and_program, range_fault,
};
pub use mirror::{InFlight, Mirror, MirrorError, begin_work_retrying};
pub use notifier::{
    AtomicCtx, IntervalNotifierOps, InvalidateCtx, Invalidation, Notifier, NotifierStats, Pass,
    ReadSeq, Subscription, WouldBlock,
};
pub use range::{Event, NotifierRange, Owner, PAGE_SHIFT, PAGE_SIZE, Range};
pub use teardown::{Action, Teardown};
