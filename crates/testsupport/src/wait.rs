//! Waiting for something another thread does: the userfaultfd monitor handles an event on its
//! own thread after the syscall that caused it has returned, so a test polls for the effect.

use std::time::{Duration, Instant};

/// How often [`eventually`] checks.
pub const POLL: Duration = Duration::from_millis(1);

/// How long a test waits for the monitor to handle an event it caused. The deadline only turns
/// a lost event into a failure: a handled event shows up within milliseconds.
pub const MONITOR_WAIT: Duration = Duration::from_secs(5);

/// Checks `cond` every `every` until it holds (true) or `timeout` has passed (false). `cond` is
/// checked first, without waiting, and once more after the last sleep before giving up.
///
/// ```
/// use std::time::Duration;
/// use svmirror_testsupport::poll_until;
///
/// let mut calls = 0;
/// assert!(poll_until(Duration::from_secs(5), Duration::ZERO, || {
///     calls += 1;
///     calls == 3
/// }));
/// assert_eq!(calls, 3);
/// assert!(!poll_until(Duration::ZERO, Duration::ZERO, || false));
/// ```
pub fn poll_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    // A timeout too long to add to the clock waits for ever.
    let deadline = Instant::now().checked_add(timeout);
    loop {
        if cond() {
            return true;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Waits up to `timeout` for `cond`, checking every [`POLL`]; fails the test, naming `what`,
/// if it never holds.
///
/// # Panics
///
/// When `timeout` passes with `cond` still false: this is a test assertion.
#[track_caller]
pub fn eventually(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, POLL, cond),
        "timed out after {timeout:?} waiting for {what}"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn poll_until_sees_a_change_made_by_another_thread() {
        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                flag.store(true, Ordering::SeqCst);
            })
        };
        let start = Instant::now();
        assert!(poll_until(MONITOR_WAIT, POLL, || flag.load(Ordering::SeqCst)));
        assert!(start.elapsed() >= Duration::from_millis(20));
        setter.join().unwrap();
    }

    #[test]
    fn poll_until_gives_up_after_the_timeout_having_checked_again() {
        let mut calls = 0;
        let start = Instant::now();
        let held = poll_until(Duration::from_millis(30), Duration::from_millis(5), || {
            calls += 1;
            false
        });
        assert!(!held);
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(calls >= 2, "{calls} checks");
    }

    #[test]
    fn poll_until_with_an_endless_timeout_returns_when_cond_holds() {
        let mut calls = 0;
        assert!(poll_until(Duration::MAX, Duration::ZERO, || {
            calls += 1;
            calls == 2
        }));
    }

    #[test]
    fn eventually_returns_once_cond_holds() {
        let mut calls = 0;
        eventually("the third call", MONITOR_WAIT, || {
            calls += 1;
            calls == 3
        });
        assert_eq!(calls, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for the page to go")]
    fn eventually_fails_naming_what_it_waited_for() {
        eventually("the page to go", Duration::from_millis(10), || false);
    }
}
