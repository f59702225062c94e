//! The monitor: a reader thread that takes userfaultfd messages off the kernel's queue, and a
//! handler thread that turns them into invalidations and resolves page faults, in order.
//!
//! Reading an event completes it in the kernel: the munmap, madvise or mremap that caused it
//! goes on as soon as its message is read (fs/userfaultfd.c `userfaultfd_ctx_read` calls
//! `userfaultfd_event_complete`), before anything is handled. Reading and handling are
//! therefore two threads, so that reading never waits for handling. A handler waits for the
//! locks of the mirrors it invalidates, and the holder of such a lock may be waiting on an
//! allocator lock held by a thread that is itself blocked in `userfaultfd_event_wait_completion`
//! (glibc trims an arena with MADV_DONTNEED while it holds the arena's lock, and the trim raises
//! a REMOVE event if a device faulted anywhere in that arena): with one thread that reads and
//! handles, that was a deadlock; with a reader that only reads, the trim's event is read, the
//! arena lock is released, and the handler gets its lock.
//!
//! The reader never allocates, takes no lock but the queue's (and the progress counter's), and
//! never touches monitored memory: its read buffer and the queue's ring live in mappings of
//! its own that no device ever faults (so they are never registered). Messages stay in the
//! ring until handled, so a thread bringing a page back can see every event that has been read
//! and not yet handled ([`Queue::pending_change`](crate::queue::Queue::pending_change)). The
//! ring holds [`RING`] messages; every unhandled message has a thread waiting on it (a faulting
//! thread, or an event's thread until the read), so the ring fills only with that many threads
//! blocked at once, and then the reader waits for room.
//!
//! Above the event handling: the handler hands each message to `events.rs` (UNMAP, REMAP,
//! FORK, REMOVE), `zap.rs` (the REMOVE holds it keeps) or `fill.rs` (missing faults), and the
//! threads reach the queue and the shared state through [`Shared`]. Only the API
//! (`process.rs`) imports this module: it starts and stops the monitor. The whole graph is in
//! `process.rs`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use svmirror_core::PAGE_SIZE;

use crate::buffers::{Bounce, Buffers, PrivateMap};
use crate::error::MmError;
use crate::fill::Caller;
use crate::queue::{BATCH, EMPTY_READ, RING};
use crate::shared::Shared;
use crate::uffd::{self, UffdMsg};
use crate::zap::{PendingZap, SUSPECT_POLL};

/// How often the handler looks at pending zaps while no message arrives.
const ZAP_POLL: Duration = Duration::from_micros(100);

/// The reader's read buffer, in a mapping of its own.
struct ReadBuf(PrivateMap);

impl ReadBuf {
    fn new() -> io::Result<Self> {
        let len = (BATCH * std::mem::size_of::<UffdMsg>()).next_multiple_of(PAGE_SIZE as usize);
        PrivateMap::new(len).map(ReadBuf)
    }

    fn msgs(&mut self) -> &mut [UffdMsg] {
        // SAFETY: the mapping holds at least BATCH messages, page aligned, and only the reader
        // thread (which owns `self`) uses it; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.0.base.cast::<UffdMsg>(), BATCH) }
    }
}

/// The running monitor: its two threads and the eventfd that stops them.
pub(crate) struct Monitor {
    threads: Vec<JoinHandle<()>>,
    stop: OwnedFd,
    shared: Arc<Shared>,
    /// Threads that have left their loops for good.
    left_loop: Arc<AtomicUsize>,
}

impl Monitor {
    pub(crate) fn start(shared: Arc<Shared>) -> Result<Self, MmError> {
        let err = |source| MmError::Monitor { source };
        // SAFETY: eventfd takes plain integer arguments and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: eventfd just returned this fd; we own it.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_raw = stop.as_raw_fd();
        let read_buf = ReadBuf::new().map_err(err)?;
        let bufs = Buffers::new().map_err(err)?;
        let left_loop = Arc::new(AtomicUsize::new(0));
        let (reader_shared, reader_left) = (shared.clone(), left_loop.clone());
        let reader = std::thread::Builder::new()
            .name("svmirror-uffd".into())
            .spawn(move || {
                read_loop(&reader_shared, stop_raw, read_buf);
                reader_left.fetch_add(1, Ordering::AcqRel);
            })
            .map_err(err)?;
        let (handler_shared, handler_left) = (shared.clone(), left_loop.clone());
        let handler = std::thread::Builder::new()
            .name("svmirror-uffd-h".into())
            .spawn(move || {
                handle_loop(&handler_shared, bufs);
                handler_left.fetch_add(1, Ordering::AcqRel);
            });
        let handler = match handler {
            Ok(h) => h,
            Err(e) => {
                // The reader is running: stop it before giving up.
                let m = Monitor {
                    threads: vec![reader],
                    stop,
                    shared,
                    left_loop,
                };
                m.stop();
                return Err(err(e));
            }
        };
        Ok(Monitor {
            threads: vec![reader, handler],
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

    /// Stops the threads and waits for them.
    pub(crate) fn stop(mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let total = self.threads.len();
        // The threads' own exit may unmap or zap memory that a device fault registered (Rust's
        // signal stack for the thread, glibc trimming its arena or its stack), and that call
        // waits until someone reads its event. Once both threads have left their loops, read
        // and complete events here until they are gone. No allocation in this loop: an exiting
        // thread may hold an allocator lock while it waits.
        let bounce = Bounce::new().ok();
        let mut msgs = [UffdMsg::default(); 8];
        for t in std::mem::take(&mut self.threads) {
            let thread = t.into_pthread_t();
            loop {
                // SAFETY: `thread` is a monitor thread's handle, owned here since
                // `into_pthread_t`; a successful try-join ends the loop, so it is joined once.
                let rc = unsafe { libc::pthread_tryjoin_np(thread, std::ptr::null_mut()) };
                if rc != libc::EBUSY {
                    break;
                }
                let n = if self.left_loop.load(Ordering::Acquire) == total {
                    self.shared.uffd.read_msgs(&mut msgs).unwrap_or(0)
                } else {
                    0
                };
                for m in &msgs[..n] {
                    match &bounce {
                        Some(b) => drain(&self.shared, m, b.ptr()),
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

/// The reader: polls the userfaultfd and the stop eventfd, and moves every message it reads
/// into the queue. It reads under the queue's lock, so whoever holds that lock knows every
/// event read so far is in the ring.
fn read_loop(shared: &Shared, stop: i32, mut buf: ReadBuf) {
    let queue = &shared.queue;
    let uffd = shared.uffd.raw();
    let mut uffd_ok = true;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: uffd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let nfds = if uffd_ok { 2 } else { 1 };
        // SAFETY: `fds` is a valid array of at least `nfds` pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            queue.fail("polling the userfaultfd failed");
            uffd_ok = false;
            continue;
        }
        if fds[0].revents != 0 {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a local u64 from our eventfd.
            unsafe { libc::read(stop, (&mut v as *mut u64).cast(), 8) };
            if v >= INJECT_FAILURE {
                queue.fail("monitor failure injected");
                continue;
            }
            queue.close();
            return;
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            queue.fail("userfaultfd reported an error");
            uffd_ok = false;
            continue;
        }
        let mut st = queue.lock();
        while RING as u64 - (st.tail - st.head) < BATCH as u64 && !st.closed {
            st = queue.room.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        // Counted as read before the read: the thread whose event this read takes off the
        // queue wakes as the read completes, and must find the batch not yet handled.
        shared.batch_read();
        shared.read_gen.fetch_add(1, Ordering::AcqRel);
        let read_at = shared.read_clock();
        let read = shared.uffd.read_msgs(buf.msgs());
        let n = match read {
            Ok(n) => n,
            Err(_) => {
                queue.put(&mut st, &UffdMsg::default(), true);
                shared.read_gen.fetch_add(1, Ordering::AcqRel);
                drop(st);
                queue.fail("reading the userfaultfd failed");
                uffd_ok = false;
                continue;
            }
        };
        if n > 0 {
            shared.note_read(read_at);
        }
        if n == 0 {
            // Nothing after all (a faulting thread left on a signal): the batch still counts.
            queue.put(&mut st, &UffdMsg::default(), true);
        }
        // Events whose callers raise `mmap_changing` until they resume (fs/userfaultfd.c:
        // `userfaultfd_remove`, `userfaultfd_unmap_prep`, `mremap_userfaultfd_prep`,
        // `dup_userfaultfd`): a REMOVE is marked only when it is the one such event read.
        let changers = buf.msgs()[..n]
            .iter()
            .filter(|m| {
                matches!(
                    m.event,
                    uffd::EVENT_REMOVE | uffd::EVENT_UNMAP | uffd::EVENT_REMAP | uffd::EVENT_FORK
                )
            })
            .count();
        for (i, m) in buf.msgs()[..n].iter().enumerate() {
            queue.put(&mut st, m, i + 1 == n);
            if m.event == uffd::EVENT_REMOVE {
                let marked = queue.snapshot_remove(
                    &mut st,
                    &shared.source,
                    shared.page_flags.as_ref(),
                    &shared.uffd,
                    m,
                    changers == 1,
                );
                shared
                    .counters
                    .zap_markers
                    .fetch_add(marked, Ordering::Relaxed);
            }
        }
        shared.read_gen.fetch_add(1, Ordering::AcqRel);
        drop(st);
        queue.ready.notify_one();
    }
}

/// The handler: handles the queued messages in order. A message leaves the ring only once it
/// is handled. After a failure (a handler error, a panic, or the reader's report) it fails
/// closed and goes on answering every message (`drain`), so no thread stays blocked on one.
fn handle_loop(shared: &Shared, bufs: Buffers) {
    let mut draining = false;
    loop {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            handle_messages(shared, &bufs, &mut draining)
        }));
        match r {
            Ok(()) => return,
            Err(_) => {
                shared.fail("the monitor's handler panicked");
                draining = true;
                // The message it was handling is still at the head: it is drained next.
            }
        }
    }
}

fn handle_messages(shared: &Shared, bufs: &Buffers, draining: &mut bool) {
    let queue = &shared.queue;
    let page = bufs.page();
    // REMOVE invalidations held open until their zap is seen (`zap.rs`); ended on drop, so a
    // panic or a return ends them too.
    let mut zaps: Vec<PendingZap<'_>> = Vec::new();
    // The pending zaps are looked at every ZAP_POLL, the suspect pages (`zap.rs`) every
    // SUSPECT_POLL but never for more than a fifth of the handler's time: a burst of events
    // must not pay for a check each, and a large suspect set must not starve the events
    // (each of which a thread may be waiting on).
    let mut zaps_next = std::time::Instant::now();
    let mut suspects_next = std::time::Instant::now();
    let mut check = |zaps: &mut Vec<PendingZap<'_>>| {
        let now = std::time::Instant::now();
        if !zaps.is_empty() && now >= zaps_next {
            zaps.retain_mut(|z| !shared.zap_done(z));
            zaps_next = now + ZAP_POLL;
        }
        if now >= suspects_next && shared.suspects.any() {
            shared.check_suspects();
            suspects_next = std::time::Instant::now() + SUSPECT_POLL.max(now.elapsed() * 4);
        }
    };
    loop {
        check(&mut zaps);
        let (m, end, snap) = {
            let mut st = queue.lock();
            loop {
                if let Some(why) = st.failure.take() {
                    if !*draining {
                        drop(st);
                        zaps.clear();
                        shared.fail(why);
                        *draining = true;
                        st = queue.lock();
                    }
                    continue;
                }
                if st.head < st.tail {
                    break;
                }
                if st.closed {
                    return;
                }
                if zaps.is_empty() && !shared.suspects.any() {
                    st = queue.ready.wait(st).unwrap_or_else(PoisonError::into_inner);
                } else {
                    // Look at the pending zaps (and suspect pages) again soon.
                    let poll = if zaps.is_empty() {
                        SUSPECT_POLL
                    } else {
                        ZAP_POLL
                    };
                    st = queue
                        .ready
                        .wait_timeout(st, poll)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    drop(st);
                    check(&mut zaps);
                    st = queue.lock();
                }
            }
            let head = st.head;
            let (m, end) = queue.get(&st, head);
            let snap = (m.event == uffd::EVENT_REMOVE)
                .then(|| queue.take_snapshot(&mut st, head))
                .flatten();
            (m, end, snap)
        };
        // Every message is handled or answered, whatever happens to another: each was read, so
        // each has a thread waiting on it (a faulting thread until its page is resolved or
        // woken; an event's thread only until the read, but the devices must still lose what
        // it changed). The first failure fails closed at once (every mirror released, every
        // blocked faulter woken) and the rest is drained, not dropped.
        if m.event != EMPTY_READ {
            if !*draining && released_a_caller(&m) && !shared.api_call_waiting() {
                // The munmap or madvise that raised this event was let go by its read and is
                // runnable now; with few CPUs it often waits for the one this thread is on.
                // Its invalidation can wait a turn (a device access settles on the event
                // first, and pins keep the pages), so let it return first. Not when an SVM API
                // call waits for this handling (`Shared::wait_handled`): that one is served by
                // handling at once.
                // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
                unsafe { libc::sched_yield() };
            }
            if *draining {
                drain(shared, &m, page);
            } else if let Err(e) = handle(shared, &m, page, snap, &mut zaps) {
                zaps.clear();
                shared.fail(&e.to_string());
                *draining = true;
                if m.event == uffd::EVENT_PAGEFAULT {
                    // Its thread still waits: answer it as a failed monitor does.
                    drain(shared, &m, page);
                }
            }
        }
        queue.lock().head += 1;
        queue.room.notify_all();
        if end {
            shared.batch_handled();
        }
    }
}

/// Whether `m` is an event whose thread waited in the kernel for its read (and so was just let
/// go): a munmap's UNMAP, a madvise's REMOVE.
fn released_a_caller(m: &UffdMsg) -> bool {
    m.event == uffd::EVENT_UNMAP || m.event == uffd::EVENT_REMOVE
}

/// After a failure: complete events without invalidating (everything is already released),
/// and still resolve missing faults so no CPU thread hangs: bring the page back if its device
/// can, else give it a zero page, else wake it.
fn drain(shared: &Shared, m: &UffdMsg, page: *mut u8) {
    match m.event {
        uffd::EVENT_FORK => shared.handle_fork(m.arg[0] as u32),
        uffd::EVENT_PAGEFAULT
            if shared
                .handle_missing(m.arg[1], page, Caller::Monitor)
                .is_err() =>
        {
            let at = m.arg[1] & !(PAGE_SIZE - 1);
            let _ = shared.fill(at, None);
            if let Ok(r) = svmirror_core::Range::with_len(at, PAGE_SIZE) {
                let _ = shared.uffd.wake(r);
            }
        }
        _ => {}
    }
}

fn handle<'a>(
    shared: &'a Shared,
    m: &UffdMsg,
    page: *mut u8,
    snap: Option<Vec<(u64, u64)>>,
    zaps: &mut Vec<PendingZap<'a>>,
) -> Result<(), svmirror_core::Error> {
    match m.event {
        uffd::EVENT_PAGEFAULT => shared.handle_missing(m.arg[1], page, Caller::Monitor),
        uffd::EVENT_REMOVE => {
            zaps.extend(shared.handle_remove(m.arg[0], m.arg[1], snap)?);
            Ok(())
        }
        _ => shared.handle_event(m),
    }
}
