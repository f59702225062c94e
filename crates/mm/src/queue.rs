//! The queue between the monitor's reader and its handler: a ring of userfaultfd messages in a
//! mapping of its own (`buffers.rs`), which a message leaves only once it is handled, and
//! beside it the frames the reader recorded for each REMOVE right after the read (the madvise
//! hold's record, `zap.rs`). Whoever holds the queue's lock knows that every event read so far
//! is in the ring: a thread bringing a page back checks it ([`Queue::pending_change`]), a device
//! access settles on it ([`Queue::settle`]).
//!
//! The monitor's threads (`monitor.rs`) fill and empty it; [`Shared`](crate::shared::Shared)
//! owns it. Below both, it imports only `buffers.rs` and the kernel interfaces (the whole graph
//! is in `process.rs`).

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use svmirror_core::PAGE_SIZE;

use crate::buffers::PrivateMap;
use crate::pagemap::{PageFlags, lazy_free};
use crate::uffd::{self, UffdMsg};

/// Messages read per `read(2)`.
pub(crate) const BATCH: usize = 64;
/// Messages read and not yet handled, at most.
pub(crate) const RING: usize = 1024;
/// Pages the reader records, over all REMOVE events read and not yet handled (`zap.rs`): the
/// frames present when the event was read, before its caller can zap them.
const SNAP: usize = 8192;

/// The `event` of a ring entry that closes an empty read: no message, only the batch count.
pub(crate) const EMPTY_READ: u8 = 0;

/// Set on a recorded frame number whose page was lazy-free already when the REMOVE was read
/// (an earlier MADV_FREE marked it): that it is lazy-free says nothing about this REMOVE's own
/// zap, which may be a DONTNEED still to come. Frame numbers are below 2^55 (pagemap's PFN
/// field), so the top bit is free.
pub(crate) const LAZY_AT_READ: u64 = 1 << 63;

/// Set on a recorded frame number whose page was absent when the REMOVE was read: the reader
/// mapped the zero page there (a marker, [`ProcessPageSource::mark_absent`]) so that the zap
/// has something to drop that shows it came. Frame numbers are below 2^55.
///
/// [`ProcessPageSource::mark_absent`]: crate::ProcessPageSource::mark_absent
pub(crate) const MARKER: u64 = 1 << 62;

/// The flag bits [`LAZY_AT_READ`] and [`MARKER`], which are not part of the frame number.
pub(crate) const FRAME_FLAGS: u64 = LAZY_AT_READ | MARKER;

/// Absent pages of one REMOVE the reader marks, at most. It marks them between the read and the
/// caller's zap, which runs as soon as the caller is scheduled: marking more would lose that
/// race more often (a marker mapped after the zap stays, and faults on it wait for nothing),
/// and a larger absent range is left as before (see `zap.rs`, "absent pages").
pub(crate) const MARK_MAX: u64 = 512;

/// Calls `lazy(i)` for each `i < n` whose frame `frame(i)` is lazy-free now, reading the
/// flags of each run of consecutive frames (a huge page, a populated range) in one read. No
/// allocation: the monitor's reader calls it.
pub(crate) fn each_lazy(
    flags: &PageFlags,
    n: usize,
    frame: impl Fn(usize) -> u64,
    mut lazy: impl FnMut(usize),
) {
    const RUN: usize = 512;
    let mut buf = [0u64; RUN];
    let mut i = 0;
    while i < n {
        let first = frame(i);
        let mut len = 1;
        while len < RUN && i + len < n && frame(i + len) == first + len as u64 {
            len += 1;
        }
        let run = &mut buf[..len];
        // Frame 0 is what a hidden frame number reads as: nothing to look up.
        if first != 0 && flags.flags_run(first, run).is_ok() {
            for (k, &f) in run.iter().enumerate() {
                if lazy_free(f) {
                    lazy(i + k);
                }
            }
        }
        i += len;
    }
}

/// The queue between the reader and the handler: a ring of messages in a mapping of its own.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when messages arrive, or the queue closes or fails.
    pub(crate) ready: Condvar,
    /// Signalled (to all) when the handler is done with a message: the reader waits for room,
    /// [`Queue::settle`] for the changes it found.
    pub(crate) room: Condvar,
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
    pub(crate) head: u64,
    /// Where the next message read goes.
    pub(crate) tail: u64,
    /// The reader has stopped: nothing more will arrive.
    pub(crate) closed: bool,
    /// The reader saw the userfaultfd fail (or a failure was injected): the handler fails
    /// closed. Static, so the reader never allocates.
    pub(crate) failure: Option<&'static str>,
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

    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueState> {
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
    pub(crate) fn get(&self, _held: &QueueState, i: u64) -> (UffdMsg, bool) {
        let (m, e) = self.slot(i);
        // SAFETY: `slot` points into our ring mapping, aligned (page aligned base, whole
        // messages); the lock (proved by `_held`) orders this read after the reader's write.
        let msg = unsafe { m.read() };
        // SAFETY: as above, for the entry's end-of-batch byte.
        let end = unsafe { e.read() };
        (msg, end != 0)
    }

    /// Stores an entry at `tail`; the caller holds the lock and made sure there is room.
    pub(crate) fn put(&self, st: &mut QueueState, m: &UffdMsg, end: bool) {
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
    pub(crate) fn snapshot_remove(
        &self,
        st: &mut QueueState,
        source: &crate::ProcessPageSource,
        flags: Option<&crate::pagemap::PageFlags>,
        uffd: &uffd::Uffd,
        m: &UffdMsg,
        sole: bool,
    ) -> u64 {
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
        let mut marked = 0;
        if ok {
            if let Some(flags) = flags {
                self.mark_lazy_at_read(flags, start, len);
            }
            if let (true, Ok(r)) = (sole, svmirror_core::Range::new(m.arg[0], m.arg[1])) {
                marked = self.mark_gaps(st, source, uffd, r, start, len);
            }
            len += marked;
            st.snap_tail = start + len;
        }
        let rf = SnapRef {
            start,
            len: if ok { len as u32 } else { 0 },
            ok: u32::from(ok),
        };
        // SAFETY: the reference slot of message `slot`, inside our mapping; under the lock.
        unsafe { self.snap_ref(slot).write(rf) };
        marked
    }

    /// On the reader, for the REMOVE of `r` whose present pages were just recorded as the
    /// pairs `start .. start + len` (in address order): maps the zero page at the absent pages
    /// of `r` ([`MARK_MAX`] at most) and records what is present there now with [`MARKER`],
    /// after the pairs. Returns how many it recorded. The caller holds the lock. No allocation.
    ///
    /// Why: a DONTNEED's zap of a page that is absent changes nothing anyone can see, so the
    /// REMOVE's hold had no way to know it was still to come; a device fault in between
    /// populated the page and mapped what the zap then dropped. A marker is dropped by the zap
    /// like any page (mm/memory.c `zap_pte_range` clears every present entry, the zero page's
    /// too), and until then faults on it wait (`zap.rs`).
    fn mark_gaps(
        &self,
        st: &QueueState,
        source: &crate::ProcessPageSource,
        uffd: &uffd::Uffd,
        r: svmirror_core::Range,
        start: u64,
        len: u64,
    ) -> u64 {
        let absent = r.pages().saturating_sub(len);
        let room = SNAP as u64 - (start + len - st.snap_head);
        // Asked after the page table was read: if `mmap_changing` is still raised, and this
        // REMOVE's caller is the only one that can be raising it (no other event of the batch
        // changes the address space, which `snapshot_remove` was told, and none is queued
        // unread), this REMOVE has zapped nothing so far, and a page absent in the record was
        // absent before the madvise. Otherwise an absent page
        // may be its zap done already, and a marker there would stay for good (faults on it
        // waiting for nothing): none are mapped then. A caller that raised it and queued
        // nothing yet can still mislead this (it raises it first): a wasted wait, never a
        // missed one.
        if absent == 0
            || absent > MARK_MAX
            || absent > room
            || !uffd.mmap_changing()
            || uffd.readable()
        {
            return 0;
        }
        let mut extra = 0u64;
        let mut cursor = r.start();
        for j in start..=start + len {
            let next = if j < start + len {
                // SAFETY: a pair written above under the lock the caller holds.
                let [addr, _] = unsafe { self.snap_pair(j).read() };
                addr
            } else {
                r.end()
            };
            if next > cursor {
                let Ok(gap) = svmirror_core::Range::new(cursor, next) else {
                    return extra;
                };
                if !source.mark_absent(gap) {
                    return extra;
                }
                let at = start + len;
                let _ = source.each_present(gap, |addr, pfn| {
                    if extra < room {
                        // SAFETY: a pair inside our snapshot mapping, past the pairs recorded
                        // and free (`extra < room`); under the queue lock.
                        unsafe { self.snap_pair(at + extra).write([addr, pfn | MARKER]) };
                        extra += 1;
                    }
                });
            }
            cursor = next + PAGE_SIZE;
        }
        extra
    }

    /// Sets [`LAZY_AT_READ`] on the snapshot pairs `start .. start + len` whose frames are
    /// lazy-free now. The caller holds the lock. No allocation.
    fn mark_lazy_at_read(&self, flags: &crate::pagemap::PageFlags, start: u64, len: u64) {
        each_lazy(
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
    pub(crate) fn take_snapshot(&self, st: &mut QueueState, head: u64) -> Option<Vec<(u64, u64)>> {
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

    pub(crate) fn fail(&self, why: &'static str) {
        self.lock().failure = Some(why);
        self.ready.notify_all();
    }

    pub(crate) fn close(&self) {
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
