//! Test support: a page source that lets a test race a CPU change against a page request.
//!
//! The anonymous mapping that tests keep DMA buffers in, `AnonMap`, is
//! `svmirror_mm::testing::AnonMap`: the app and the benchmarks use it too, and every crate
//! above svmirror-mm can reach it there.

/// Test double: a page source (this process's real page table, say svmirror-mm's
/// `ProcessPageSource`) with `hook` run once, right after the first snapshot of a fault loop:
/// the moment where a CPU change races a page request (an invalidation through the notifier, a
/// munmap behind its back). A fault loop always looks the mapping up (`area`) before its
/// snapshot; a snapshot with no lookup before it (the mirror's look at the faulting page for a
/// huge page) does not fire the hook. Everything else is passed through unchanged.
pub struct RaceAfterSnapshot<S: svmirror_core::PageSource, F: Fn() + Send + Sync> {
    inner: S,
    hook: F,
    armed: std::sync::atomic::AtomicBool,
    fired: std::sync::atomic::AtomicBool,
}

impl<S: svmirror_core::PageSource, F: Fn() + Send + Sync> RaceAfterSnapshot<S, F> {
    /// Wraps `inner` with `hook`.
    pub fn new(inner: S, hook: F) -> Self {
        RaceAfterSnapshot {
            inner,
            hook,
            armed: std::sync::atomic::AtomicBool::new(false),
            fired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the hook has run.
    pub fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<S: svmirror_core::PageSource, F: Fn() + Send + Sync> svmirror_core::PageSource
    for RaceAfterSnapshot<S, F>
{
    fn area(&self, addr: u64, limit: u64) -> svmirror_core::Result<svmirror_core::Area> {
        self.armed.store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.area(addr, limit)
    }

    fn snapshot(&self, addr: u64, out: &mut [svmirror_core::CpuPte]) -> svmirror_core::Result<()> {
        self.inner.snapshot(addr, out)?;
        if self.armed.load(std::sync::atomic::Ordering::Relaxed)
            && !self.fired.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            (self.hook)();
        }
        Ok(())
    }

    fn fault(&self, range: svmirror_core::Range, write: bool) -> svmirror_core::Result<()> {
        self.inner.fault(range, write)
    }
}

/// A hook for [`RaceAfterSnapshot`]: a `Clear` invalidation of `range` through `notifier`, as if
/// the CPU dropped the pages while a page request was being resolved.
pub fn clear_through(
    notifier: &svmirror_core::Notifier,
    range: svmirror_core::Range,
) -> impl Fn() + Send + Sync + use<> {
    let notifier = notifier.clone();
    move || {
        let nr = svmirror_core::NotifierRange::new(range, svmirror_core::Event::Clear);
        notifier
            .invalidate_range_start(nr)
            .expect("test invalidation starts")
            .end();
    }
}
