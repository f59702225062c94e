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
//! and not yet handled ([`Queue::pending_change`]). The ring holds [`RING`] messages; every
//! unhandled message has a thread waiting on it (a faulting thread, or an event's thread until
//! the read), so the ring fills only with that many threads blocked at once, and then the
//! reader waits for room.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use svmirror_core::PAGE_SIZE;

use crate::error::MmError;
use crate::fill::Caller;
use crate::process::Shared;
use crate::uffd::{self, UffdMsg};
use crate::zap::{LAZY_AT_READ, PendingZap, SUSPECT_POLL};

/// How often the handler looks at pending zaps while no message arrives.
const ZAP_POLL: Duration = Duration::from_micros(100);

/// Messages read per `read(2)`.
const BATCH: usize = 64;
/// Messages read and not yet handled, at most.
pub(crate) const RING: usize = 1024;
/// Pages the reader records, over all REMOVE events read and not yet handled (`zap.rs`): the
/// frames present when the event was read, before its caller can zap them.
const SNAP: usize = 8192;

/// The `event` of a ring entry that closes an empty read: no message, only the batch count.
const EMPTY_READ: u8 = 0;

/// A private anonymous mapping of `len` bytes that the kernel never merges into a neighbour
/// (so a device fault next door, which registers its whole VMA, never registers it).
struct PrivateMap {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned outright (nothing else has the pointer); what is stored in it is
// accessed under the rules of its owner (`Buffers`: one thread; `Queue`: its mutex).
unsafe impl Send for PrivateMap {}
// SAFETY: as above; shared access goes through `Queue`'s mutex.
unsafe impl Sync for PrivateMap {}

impl PrivateMap {
    fn new(len: usize) -> io::Result<Self> {
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
        Ok(PrivateMap {
            base: p.cast(),
            len,
        })
    }
}

impl Drop for PrivateMap {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The queue between the reader and the handler: a ring of messages in a mapping of its own.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when messages arrive, or the queue closes or fails.
    ready: Condvar,
    /// Signalled (to all) when the handler is done with a message: the reader waits for room,
    /// [`Queue::settle`] for the changes it found.
    room: Condvar,
    /// `RING` messages, then `RING` bytes: whether the message ends a read's batch.
    ring: PrivateMap,
    /// `RING` snapshot references (one per message slot), then `SNAP` (address, frame) pairs.
    snaps: PrivateMap,
}

/// Where a REMOVE message's page snapshot lies in the snapshot ring.
#[derive(Clone, Copy, Debug, Default)]
struct SnapRef {
    start: u64,
    len: u32,
    /// 1 if the snapshot was taken (it did not fit, or pagemap failed, otherwise).
    ok: u32,
}

pub(crate) struct QueueState {
    /// The oldest message not yet handled (it may be being handled now).
    head: u64,
    /// Where the next message read goes.
    tail: u64,
    /// The reader has stopped: nothing more will arrive.
    closed: bool,
    /// The reader saw the userfaultfd fail (or a failure was injected): the handler fails
    /// closed. Static, so the reader never allocates.
    failure: Option<&'static str>,
    /// The snapshot ring's oldest entry still owned by an unhandled message, and its end.
    snap_head: u64,
    snap_tail: u64,
}

impl Queue {
    pub(crate) fn new() -> io::Result<Self> {
        let len = RING * (std::mem::size_of::<UffdMsg>() + 1);
        Ok(Queue {
            state: Mutex::new(QueueState {
                head: 0,
                tail: 0,
                closed: false,
                failure: None,
                snap_head: 0,
                snap_tail: 0,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            ring: PrivateMap::new(len.next_multiple_of(PAGE_SIZE as usize))?,
            snaps: PrivateMap::new(
                (RING * std::mem::size_of::<SnapRef>() + SNAP * 16)
                    .next_multiple_of(PAGE_SIZE as usize),
            )?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot(&self, i: u64) -> (*mut UffdMsg, *mut u8) {
        let i = (i % RING as u64) as usize;
        let msgs = self.ring.base.cast::<UffdMsg>();
        let ends = self
            .ring
            .base
            .wrapping_add(RING * std::mem::size_of::<UffdMsg>());
        (msgs.wrapping_add(i), ends.wrapping_add(i))
    }

    /// The entry at `i`; the caller holds the lock and `head <= i < tail`.
    fn get(&self, _held: &QueueState, i: u64) -> (UffdMsg, bool) {
        let (m, e) = self.slot(i);
        // SAFETY: `slot` points into our ring mapping, aligned (page aligned base, whole
        // messages); the lock (proved by `_held`) orders this read after the reader's write.
        let msg = unsafe { m.read() };
        // SAFETY: as above, for the entry's end-of-batch byte.
        let end = unsafe { e.read() };
        (msg, end != 0)
    }

    /// Stores an entry at `tail`; the caller holds the lock and made sure there is room.
    fn put(&self, st: &mut QueueState, m: &UffdMsg, end: bool) {
        let (p, e) = self.slot(st.tail);
        // SAFETY: as in `get`; the slot at `tail` is free (`tail - head < RING`).
        unsafe { p.write(*m) };
        // SAFETY: as above, for the entry's end-of-batch byte.
        unsafe { e.write(u8::from(end)) };
        st.tail += 1;
    }

    fn snap_ref(&self, i: u64) -> *mut SnapRef {
        let i = (i % RING as u64) as usize;
        self.snaps.base.cast::<SnapRef>().wrapping_add(i)
    }

    fn snap_pair(&self, j: u64) -> *mut [u64; 2] {
        let j = (j % SNAP as u64) as usize;
        self.snaps
            .base
            .wrapping_add(RING * std::mem::size_of::<SnapRef>())
            .cast::<[u64; 2]>()
            .wrapping_add(j)
    }

    /// On the reader, for the REMOVE just stored at `tail - 1`: records the frames present in
    /// its range now, before the thread the read released can zap them. No allocation.
    ///
    /// Where frame flags are readable, a page that is lazy-free already (an earlier MADV_FREE
    /// marked it) is recorded with [`LAZY_AT_READ`]: being lazy-free then says nothing about
    /// this REMOVE's zap, which may be a DONTNEED still to come.
    fn snapshot_remove(
        &self,
        st: &mut QueueState,
        source: &crate::ProcessPageSource,
        flags: Option<&crate::pagemap::PageFlags>,
        m: &UffdMsg,
    ) {
        let slot = st.tail - 1;
        let start = st.snap_tail;
        let mut len = 0u64;
        let mut fits = true;
        // A range with more pages than there is room for is not read at all (the handler
        // reads it when it gets to it).
        let room = SNAP as u64 - (st.snap_tail - st.snap_head);
        let r = svmirror_core::Range::new(m.arg[0], m.arg[1])
            .ok()
            .filter(|r| r.pages() <= room)
            .ok_or(svmirror_core::Error::EmptyRange {
                start: m.arg[0],
                end: m.arg[1],
            });
        let read = r.map_err(|_| ()).and_then(|r| {
            source
                .each_present(r, |addr, pfn| {
                    if start + len - st.snap_head >= SNAP as u64 {
                        fits = false;
                        return;
                    }
                    // SAFETY: a pair inside our snapshot mapping, aligned; under the queue
                    // lock (held by the caller), and free (`snap_tail - snap_head < SNAP`).
                    unsafe { self.snap_pair(start + len).write([addr, pfn]) };
                    len += 1;
                })
                .map_err(|_| ())
        });
        let ok = read.is_ok() && fits;
        if ok {
            if let Some(flags) = flags {
                self.mark_lazy_at_read(flags, start, len);
            }
            st.snap_tail = start + len;
        }
        let rf = SnapRef {
            start,
            len: if ok { len as u32 } else { 0 },
            ok: u32::from(ok),
        };
        // SAFETY: the reference slot of message `slot`, inside our mapping; under the lock.
        unsafe { self.snap_ref(slot).write(rf) };
    }

    /// Sets [`LAZY_AT_READ`] on the snapshot pairs `start .. start + len` whose frames are
    /// lazy-free now. The caller holds the lock. No allocation.
    fn mark_lazy_at_read(&self, flags: &crate::pagemap::PageFlags, start: u64, len: u64) {
        crate::zap::each_lazy(
            flags,
            len as usize,
            // SAFETY: pairs written just now under the lock the caller holds.
            |i| unsafe { self.snap_pair(start + i as u64).read() }[1],
            |i| {
                let pair = self.snap_pair(start + i as u64);
                // SAFETY: as above; the pair is ours to rewrite under the lock.
                unsafe { (*pair)[1] |= LAZY_AT_READ };
            },
        );
    }

    /// On the handler, for the REMOVE at `head`: its snapshot (`None` if it was not taken),
    /// and the snapshot space it held given back. The caller holds the lock.
    fn take_snapshot(&self, st: &mut QueueState, head: u64) -> Option<Vec<(u64, u64)>> {
        // SAFETY: the reference slot of message `head`, written by the reader under the lock.
        let rf = unsafe { self.snap_ref(head).read() };
        if rf.ok == 0 {
            return None;
        }
        let pages = (rf.start..rf.start + u64::from(rf.len))
            .map(|j| {
                // SAFETY: pairs the reader wrote under the lock, still owned by this message.
                let [a, f] = unsafe { self.snap_pair(j).read() };
                (a, f)
            })
            .collect();
        st.snap_head = rf.start + u64::from(rf.len);
        Some(pages)
    }

    /// Whether a message read and not yet handled (the one being handled included) changes
    /// what is mapped at `page`: an UNMAP or REMOVE over it, or a REMAP of it. A page coming
    /// back from a device must not land there: the change was already made (or is being made)
    /// by the thread the read released. The caller holds the lock.
    pub(crate) fn pending_change(&self, st: &QueueState, page: u64) -> bool {
        (st.head..st.tail).any(|i| changes(&self.get(st, i).0, page, page + PAGE_SIZE))
    }

    /// Locks the queue: while held, the reader reads nothing, so every event that has been
    /// read is in the ring.
    pub(crate) fn hold(&self) -> MutexGuard<'_, QueueState> {
        self.lock()
    }

    /// Waits until no message read and not yet handled changes what is mapped in `[start,
    /// end)` (an UNMAP or REMOVE over part of it, or a REMAP of part of it), or the queue
    /// closed. A change read after this returns is one whose syscall had not returned when
    /// this was called.
    ///
    /// Returns the count of messages read so far, for [`Queue::changed_since`].
    pub(crate) fn settle(&self, start: u64, end: u64) -> (u64, bool) {
        let mut st = self.lock();
        let mut waited = false;
        loop {
            let last = (st.head..st.tail)
                .rev()
                .find(|&i| changes(&self.get(&st, i).0, start, end));
            let Some(last) = last else {
                return (st.tail, waited);
            };
            waited = true;
            while st.head <= last && !st.closed {
                st = self.room.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if st.closed {
                return (st.tail, waited);
            }
        }
    }

    /// Whether a message read since `since` (a count from [`Queue::settle`]) changes what is
    /// mapped in `[start, end)`. Handled messages stay readable in the ring until it wraps;
    /// past that the answer is a conservative `true`.
    pub(crate) fn changed_since(&self, since: u64, start: u64, end: u64) -> bool {
        let st = self.lock();
        if st.tail.saturating_sub(since) > RING as u64 - BATCH as u64 {
            return true;
        }
        (since..st.tail).any(|i| changes(&self.get(&st, i).0, start, end))
    }

    fn fail(&self, why: &'static str) {
        self.lock().failure = Some(why);
        self.ready.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.room.notify_all();
    }
}

/// Whether `m` changes what is mapped in `[start, end)`: an UNMAP or REMOVE over part of it,
/// or a REMAP of part of it.
fn changes(m: &UffdMsg, start: u64, end: u64) -> bool {
    match m.event {
        uffd::EVENT_UNMAP | uffd::EVENT_REMOVE => m.arg[0] < end && start < m.arg[1],
        uffd::EVENT_REMAP => m.arg[0] < end && start < m.arg[0].saturating_add(m.arg[2]),
        _ => false,
    }
}

/// The handler's page-sized bounce buffer, in a mapping of its own.
struct Buffers(PrivateMap);

impl Buffers {
    fn new() -> io::Result<Self> {
        PrivateMap::new(PAGE_SIZE as usize).map(Buffers)
    }

    fn page(&self) -> *mut u8 {
        self.0.base
    }
}

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

/// A page-sized bounce buffer in a mapping of its own, for bringing a page back from a device
/// outside the monitor.
pub(crate) struct Bounce(Buffers);

impl Bounce {
    pub(crate) fn new() -> io::Result<Self> {
        Buffers::new().map(Bounce)
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.0.page()
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
        if n == 0 {
            // Nothing after all (a faulting thread left on a signal): the batch still counts.
            queue.put(&mut st, &UffdMsg::default(), true);
        }
        for (i, m) in buf.msgs()[..n].iter().enumerate() {
            queue.put(&mut st, m, i + 1 == n);
            if m.event == uffd::EVENT_REMOVE {
                queue.snapshot_remove(&mut st, &shared.source, shared.page_flags.as_ref(), m);
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
