//! The monitor thread: reads userfaultfd events and turns them into invalidations.
//!
//! It never touches memory it monitors: its message and page buffers live in a mapping of its
//! own that no device ever faults (so it is never registered), and it allocates nothing while it
//! handles an event that a device or the CPU could be waiting on. Reading an event completes it
//! in the kernel (the munmap or madvise that caused it goes on), so events are read in batches
//! and every one is handled; none is dropped under a burst.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use svmirror_core::PAGE_SIZE;

use crate::error::MmError;
use crate::fill::Caller;
use crate::process::Shared;
use crate::uffd::{self, UffdMsg};

/// Messages read per `read(2)`.
const BATCH: usize = 64;
/// Messages read per nested `read(2)` while a fill waits for queued events (`fill.rs`).
const NESTED: usize = 16;

/// A page-sized bounce buffer in a mapping of its own, for bringing a page back from a device
/// outside the monitor thread.
pub(crate) struct Bounce(Buffers);

impl Bounce {
    pub(crate) fn new() -> io::Result<Self> {
        Buffers::new().map(Bounce)
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.0.page()
    }
}

/// The running monitor: its thread and the eventfd that stops it.
pub(crate) struct Monitor {
    thread: Option<JoinHandle<()>>,
    stop: OwnedFd,
    shared: Arc<Shared>,
    /// Set by the thread once it has left its event loop for good.
    left_loop: Arc<AtomicBool>,
}

/// The monitor's private buffers, in a mapping of their own.
struct Buffers {
    base: *mut u8,
    len: usize,
}

// SAFETY: `Buffers` owns its private mapping outright (nothing else has the pointer), so
// moving it to the monitor thread moves sole ownership.
unsafe impl Send for Buffers {}

impl Buffers {
    fn new() -> io::Result<Self> {
        let len = PAGE_SIZE as usize + (BATCH + NESTED) * std::mem::size_of::<UffdMsg>();
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // A VMA flag its neighbours lack keeps the kernel from merging this mapping into an
        // adjacent anonymous one: merged, a device fault next door could register it with the
        // userfaultfd, and the monitor's own munmap of it would then wait for the monitor.
        // SAFETY: MADV_DONTFORK on our own fresh mapping changes a VMA flag, not its contents.
        let rc = unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: the mapping made above, unmapped once.
            unsafe { libc::munmap(p, len) };
            return Err(e);
        }
        Ok(Buffers {
            base: p.cast(),
            len,
        })
    }

    fn page(&self) -> *mut u8 {
        self.base
    }

    /// The batch buffer and the scratch buffer for nested reads, disjoint.
    fn msgs(&mut self) -> (&mut [UffdMsg], &mut [UffdMsg]) {
        let msgs = self.base.wrapping_add(PAGE_SIZE as usize).cast::<UffdMsg>();
        // SAFETY: the bytes after the first page hold BATCH + NESTED messages, are part of our
        // own mapping, suitably aligned (page aligned + 4096), and only this thread uses them;
        // `&mut self` makes the two slices the only views of them.
        let all = unsafe { std::slice::from_raw_parts_mut(msgs, BATCH + NESTED) };
        all.split_at_mut(BATCH)
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl Monitor {
    pub(crate) fn start(shared: Arc<Shared>) -> Result<Self, MmError> {
        // SAFETY: eventfd takes plain integer arguments and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(MmError::Monitor {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: eventfd just returned this fd; we own it.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_raw = stop.as_raw_fd();
        let bufs = Buffers::new().map_err(|source| MmError::Monitor { source })?;
        let left_loop = Arc::new(AtomicBool::new(false));
        let (thread_shared, thread_left) = (shared.clone(), left_loop.clone());
        let thread = std::thread::Builder::new()
            .name("svmirror-uffd".into())
            .spawn(move || {
                run(thread_shared, stop_raw, bufs);
                thread_left.store(true, Ordering::Release);
            })
            .map_err(|source| MmError::Monitor { source })?;
        Ok(Monitor {
            thread: Some(thread),
            stop,
            shared,
            left_loop,
        })
    }

    /// Makes the monitor fail as if its userfaultfd had (for tests of failing closed).
    pub(crate) fn inject_failure(&self) {
        let v: u64 = INJECT_FAILURE;
        // SAFETY: writes 8 bytes from a local u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&v as *const u64).cast(), 8) };
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            // The thread's own exit may unmap or zap memory that a device fault registered
            // (Rust's signal stack for the thread, glibc trimming its arena or its stack, when
            // the kernel merged them into a neighbouring mapping a device faulted), and that
            // call waits until someone reads its event. Once the thread has left its loop, read
            // and complete events here until it is gone. No allocation in this loop: the exiting
            // thread may hold an allocator lock while it waits.
            let thread = t.into_pthread_t();
            let bounce = Bounce::new().ok();
            let mut msgs = [UffdMsg::default(); 8];
            let mut scratch = [UffdMsg::default(); 8];
            loop {
                // SAFETY: `thread` is the monitor's handle, owned here since `into_pthread_t`;
                // a successful try-join ends the loop, so it is joined at most once.
                let rc = unsafe { libc::pthread_tryjoin_np(thread, std::ptr::null_mut()) };
                if rc != libc::EBUSY {
                    break;
                }
                let n = if self.left_loop.load(Ordering::Acquire) {
                    self.shared.uffd.read_msgs(&mut msgs).unwrap_or(0)
                } else {
                    0
                };
                for m in &msgs[..n] {
                    match &bounce {
                        Some(b) => drain(&self.shared, m, b.ptr(), &mut scratch),
                        None if m.event == uffd::EVENT_PAGEFAULT => {
                            let at = m.arg[1] & !(PAGE_SIZE - 1);
                            if self.shared.uffd.zero_page(at).is_err() {
                                if let Ok(r) = svmirror_core::Range::with_len(at, PAGE_SIZE) {
                                    let _ = self.shared.uffd.wake(r);
                                }
                            }
                        }
                        None => {}
                    }
                }
                if n == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }
}

/// Value written to the stop eventfd to make the monitor fail, for tests of failing closed.
pub(crate) const INJECT_FAILURE: u64 = 1 << 32;

fn run(shared: Arc<Shared>, stop: i32, mut bufs: Buffers) {
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        event_loop(&shared, stop, &mut bufs, false)
    }));
    match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => shared.fail(&e.to_string()),
        Err(_) => shared.fail("the monitor thread panicked"),
    }
    // Failed closed: keep reading events so no thread stays blocked on one, until stopped.
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
        event_loop(&shared, stop, &mut bufs, true)
    }));
}

fn event_loop(
    shared: &Shared,
    stop: i32,
    bufs: &mut Buffers,
    draining: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let uffd = shared.uffd.raw();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if fds[1].revents != 0 {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a local u64 from our eventfd.
            unsafe { libc::read(stop, (&mut v as *mut u64).cast(), 8) };
            if v >= INJECT_FAILURE && !draining {
                return Err("monitor failure injected".into());
            }
            return Ok(());
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err("userfaultfd reported an error".into());
        }
        loop {
            let page = bufs.page();
            let (msgs, scratch) = bufs.msgs();
            // Counted as read before the read: the thread whose event this read takes off the
            // queue wakes as the read completes, and must find the batch not yet handled.
            shared.batch_read();
            shared.read_gen.fetch_add(1, Ordering::AcqRel);
            let read = shared.uffd.read_msgs(msgs);
            shared.read_gen.fetch_add(1, Ordering::AcqRel);
            let n = match read {
                Ok(n) => n,
                Err(e) => {
                    shared.batch_handled();
                    return Err(e.into());
                }
            };
            if n == 0 {
                shared.batch_handled();
                break;
            }
            // Every message of the batch is handled or answered, whatever happens to one of
            // them: each was read, so each has a thread waiting on it (a faulting thread until
            // its page is resolved or woken; an event's thread only until the read, but the
            // devices must still lose what it changed). The first failure fails closed at once
            // (every mirror released, every blocked faulter woken) and the rest of the batch is
            // drained, not dropped.
            let mut failure = None;
            for m in &msgs[..n] {
                if draining || failure.is_some() {
                    drain(shared, m, page, scratch);
                    continue;
                }
                if let Err(e) = handle(shared, m, page, scratch) {
                    shared.fail(&e.to_string());
                    if m.event == uffd::EVENT_PAGEFAULT {
                        // Its thread still waits: answer it as a failed monitor does.
                        drain(shared, m, page, scratch);
                    }
                    failure = Some(e);
                }
            }
            shared.batch_handled();
            if let Some(e) = failure {
                return Err(e.into());
            }
        }
    }
}

/// After a failure: complete events without invalidating (everything is already released),
/// and still resolve missing faults so no CPU thread hangs: bring the page back if its device
/// can, else give it a zero page, else wake it.
fn drain(shared: &Shared, m: &UffdMsg, page: *mut u8, scratch: &mut [UffdMsg]) {
    match m.event {
        uffd::EVENT_FORK => shared.handle_fork(m.arg[0] as u32),
        uffd::EVENT_PAGEFAULT
            if shared
                .handle_missing(m.arg[1], page, &mut Caller::Reader(scratch))
                .is_err() =>
        {
            let at = m.arg[1] & !(PAGE_SIZE - 1);
            let _ = shared.fill(at, None, &mut Caller::Reader(scratch));
            if let Ok(r) = svmirror_core::Range::with_len(at, PAGE_SIZE) {
                let _ = shared.uffd.wake(r);
            }
        }
        _ => {}
    }
}

fn handle(
    shared: &Shared,
    m: &UffdMsg,
    page: *mut u8,
    scratch: &mut [UffdMsg],
) -> Result<(), svmirror_core::Error> {
    match m.event {
        uffd::EVENT_PAGEFAULT => {
            shared.handle_missing(m.arg[1], page, &mut Caller::Reader(scratch))
        }
        _ => shared.handle_event(m),
    }
}
