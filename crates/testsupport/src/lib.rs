//! svmirror-testsupport: the helpers every svmirror test suite used to carry its own copy of,
//! written once. A dev-dependency only (`publish = false`): no library or app binary of the
//! workspace links it (the VFIO guest test binary does, behind svmirror-edu's `guest-tests`).
//!
//! | item | what it is |
//! |---|---|
//! | [`serial`] | the test binary's one lock: tests that change the process take it first |
//! | [`poll_until`], [`eventually`] | wait for something the userfaultfd monitor does on its own thread |
//! | [`hugetlb`] | the 2 MiB hugetlb pool grown for a test and shrunk back on drop; a hugetlb mapping |
//! | [`volatile`] | volatile reads and writes of test memory at an address |
//! | [`Rng`] | splitmix64, a small seeded generator for randomized tests |
//! | [`GatedSub`] | a notifier subscriber that holds the monitor's handler: an event read, not handled |
//!
//! The private anonymous mapping guard that tests and benchmarks put device buffers in is
//! `svmirror_mm::testing::AnonMap`, not here: the app's simulated backend uses it too, and the
//! app must not link a test crate.
//!
//! # What is the caller's job
//!
//! - **Take [`serial`] in every test of a binary that changes process-wide state** (mappings at
//!   fixed addresses, the pinned-page count, the userfaultfd monitor, fork). It orders the tests
//!   of one binary; `cargo test` runs binaries one after another.
//! - **Keep device-visible memory out of Rust references** (STYLE.md rule 6): the [`volatile`]
//!   functions are `unsafe` and take addresses for exactly that reason.
//! - **Drop a [`hugetlb::HugetlbPool`] after the mappings that use its pages**: the pool can only
//!   shrink back by pages that are free again.

use std::sync::{Mutex, MutexGuard, PoisonError};

mod gate;
pub mod hugetlb;
mod rng;
pub mod volatile;
mod wait;

pub use gate::GatedSub;
pub use rng::Rng;
pub use wait::{MONITOR_WAIT, POLL, eventually, poll_until};

/// The lock behind [`serial`]: one per test binary, since each binary links its own copy of this
/// crate.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the test binary's lock, so that tests which change process-wide state run one at a
/// time: one test's mmap cannot land in a hole another punched, the pinned-page count
/// (`VmPin`) moves for one test only, and no fork happens while another test holds a lock.
///
/// One lock per test binary (each links its own copy of this crate): the semantics of the
/// per-file copies it replaces. A test that fails while holding it does not poison it for the
/// others; they take it anyway.
///
/// ```
/// let _serial = svmirror_testsupport::serial();
/// // ... change the address space ...
/// ```
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn serial_lets_one_holder_in_at_a_time() {
        static INSIDE: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..50 {
                        let _s = serial();
                        let now = INSIDE.fetch_add(1, Ordering::SeqCst) + 1;
                        MOST.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        INSIDE.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(MOST.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn serial_is_taken_again_after_a_holder_panicked() {
        let r = std::thread::spawn(|| {
            let _s = serial();
            panic!("a failing test");
        })
        .join();
        assert!(r.is_err());
        assert!(SERIAL.is_poisoned());
        drop(serial());
    }
}
