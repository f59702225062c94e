//! The fixture the svmirror-mm integration tests share: a process mm with a `TestMirror`
//! subscribed to a buffer and faulted in, raw syscalls on test memory, and a gated subscriber
//! that holds the monitor's handler. Included with `#[path]` by each test file that uses it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use svmirror_core::testing::TestMirror;
use svmirror_core::{Event, Owner, PAGE_SIZE, Range};
use svmirror_mm::{ProcessMm, Protection};
use svmirror_testsupport::{MONITOR_WAIT, POLL, poll_until, volatile};

pub const PAGE: u64 = PAGE_SIZE;

/// A process mm, a buffer of private anonymous pages, a mirror subscribed to it and faulted in
/// writable (which registers the buffer's VMA for events).
pub struct Fixture {
    pub mm: ProcessMm,
    pub buf: Range,
    pub mirror: Arc<TestMirror>,
    pub sub: svmirror_core::Subscription,
}

pub fn fixture(pages: u64) -> Fixture {
    let mm = ProcessMm::new().expect("userfaultfd available");
    let buf = mm
        .mmap_anonymous(pages * PAGE, Protection::READ_WRITE)
        .unwrap();
    fixture_with(mm, buf)
}

/// A fixture whose buffer sits at `hint`, far below everything else the process maps, with
/// nothing mapped for as long again after it (so it can grow in place).
pub fn fixture_far(pages: u64, hint: u64) -> Fixture {
    let mm = ProcessMm::new().expect("userfaultfd available");
    let p = sys_mmap(
        hint,
        pages * PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_FIXED_NOREPLACE,
    );
    assert_eq!(p, hint, "address {hint:#x} is free in a test process");
    let buf = Range::with_len(hint, pages * PAGE).unwrap();
    let after = Range::with_len(buf.end(), buf.len()).unwrap();
    let next = svmirror_mm::ProcessPageSource::new()
        .unwrap()
        .mapping(after.start())
        .unwrap();
    assert!(
        next.is_none_or(|m| m.range.start() >= after.end()),
        "room after the buffer: {next:?}"
    );
    fixture_with(mm, buf)
}

pub fn fixture_with(mm: ProcessMm, buf: Range) -> Fixture {
    assert_eq!(
        sys_madvise(buf.start(), buf.len(), libc::MADV_NOHUGEPAGE),
        0
    );
    let mirror = Arc::new(TestMirror::new(Owner(0x5eed)));
    let sub = mm.notifier().insert(buf, mirror.clone()).unwrap();
    mirror.fault(&sub, &mm, buf, true).unwrap();
    assert_eq!(mirror.table.lock().entries.len() as u64, buf.pages());
    Fixture {
        mm,
        buf,
        mirror,
        sub,
    }
}

impl Fixture {
    /// Faults the whole buffer into the mirror again, then forgets every invalidation seen so
    /// far: the state in which a later change must reach the device.
    pub fn refault_and_forget(&self) {
        self.mirror
            .fault(&self.sub, &self.mm, self.buf, true)
            .unwrap();
        let mut t = self.mirror.table.lock();
        assert_eq!(t.entries.len() as u64, self.buf.pages());
        t.invalidations.clear();
    }
}

/// `madvise` on test memory, which Rust code only touches through raw pointers.
pub fn sys_madvise(addr: u64, len: u64, advice: i32) -> i32 {
    // SAFETY: test buffers hold no Rust objects and nothing refers into them.
    unsafe { libc::madvise(addr as *mut _, len as usize, advice) }
}

/// `munmap` of test memory, which Rust code only touches through raw pointers.
pub fn sys_munmap(addr: u64, len: u64) -> i32 {
    // SAFETY: as for `sys_madvise`.
    unsafe { libc::munmap(addr as *mut _, len as usize) }
}

/// Anonymous `mmap` with `flags` added to MAP_PRIVATE | MAP_ANONYMOUS at `hint`; returns the
/// address or `u64::MAX`.
pub fn sys_mmap(hint: u64, len: u64, prot: i32, flags: i32) -> u64 {
    // SAFETY: a new mapping; with MAP_FIXED_NOREPLACE (or no MAP_FIXED) it replaces nothing.
    let p = unsafe {
        libc::mmap(
            hint as *mut _,
            len as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        u64::MAX
    } else {
        p as u64
    }
}

pub fn write_byte(addr: u64, v: u8) {
    // SAFETY: test buffers are mapped read-write and touched only through raw pointers.
    unsafe { volatile::write(addr, v) }
}

pub fn read_byte(addr: u64) -> u8 {
    // SAFETY: as above, for reads.
    unsafe { volatile::read(addr) }
}

/// Waits until the mirror has seen `n` invalidations (events are handled on the monitor thread
/// after the syscall returns; the deadline only turns a lost event into a failure), then
/// returns them.
pub fn invalidations(m: &TestMirror, n: usize) -> Vec<(Range, Event)> {
    poll_until(MONITOR_WAIT, POLL, || {
        m.table.lock().invalidations.len() >= n
    });
    // Give a duplicate the chance to show up before we say "exactly".
    std::thread::sleep(Duration::from_millis(20));
    m.table.lock().invalidations.clone()
}

pub fn page(r: Range, i: u64, n: u64) -> Range {
    Range::with_len(r.start() + i * PAGE, n * PAGE).unwrap()
}

/// A subscriber whose invalidation reports that it started, then waits until it is opened: a
/// driver whose invalidation waits for a lock that another thread holds.
struct GatedSub {
    entered: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl svmirror_core::IntervalNotifierOps for GatedSub {
    fn invalidate(
        &self,
        _ctx: &svmirror_core::InvalidateCtx<'_>,
        _range: &svmirror_core::NotifierRange,
    ) -> Result<svmirror_core::Pass, svmirror_core::WouldBlock> {
        if let Some(tx) = self.entered.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        while !*open {
            open = self
                .opened
                .wait(open)
                .unwrap_or_else(PoisonError::into_inner);
        }
        Ok(svmirror_core::Pass::Done)
    }
}

/// The monitor's handler, held inside an invalidation until [`HeldHandler::release`] (or
/// drop).
pub struct HeldHandler {
    gated: Arc<GatedSub>,
    _sub: svmirror_core::Subscription,
}

impl HeldHandler {
    /// Lets the handler go on.
    pub fn release(&self) {
        *self
            .gated
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.gated.opened.notify_all();
    }
}

impl Drop for HeldHandler {
    fn drop(&mut self) {
        self.release();
    }
}

/// Holds `mm`'s monitor handler: subscribes a gated subscriber to `page` (one page of a
/// registered mapping), munmaps the page with plain libc, and returns once the handler of
/// that UNMAP waits in the subscriber. Events read from then on are queued behind it.
pub fn hold_handler(mm: &ProcessMm, page: Range) -> HeldHandler {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let gated = Arc::new(GatedSub {
        entered: Mutex::new(Some(entered_tx)),
        open: Mutex::new(false),
        opened: std::sync::Condvar::new(),
    });
    let sub = mm.notifier().insert(page, gated.clone()).unwrap();
    assert_eq!(sys_munmap(page.start(), page.len()), 0);
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the UNMAP reached the gated subscriber");
    HeldHandler { gated, _sub: sub }
}

/// Returns once the monitor has handled every event read so far.
pub fn settle(mm: &ProcessMm) {
    mm.sync_events();
}

/// Drains the calling CPU's LRU folio batches: freeing a page does (mm/swap_state.c
/// `free_pages_and_swap_cache` begins with `lru_add_drain`). Other CPUs' batches stay.
pub fn drain_this_cpu() {
    let scratch = sys_mmap(
        0,
        PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_POPULATE,
    );
    assert_eq!(sys_munmap(scratch, PAGE), 0);
}

/// `len` bytes of populated 4 KiB pages at the fixed address `hint` (no huge pages).
pub fn populated_at(hint: u64, len: u64) -> Range {
    let p = sys_mmap(
        hint,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_FIXED_NOREPLACE,
    );
    assert_eq!(p, hint, "a mapping at {hint:#x}");
    assert_eq!(sys_madvise(hint, len, libc::MADV_NOHUGEPAGE), 0);
    assert_eq!(sys_madvise(hint, len, libc::MADV_POPULATE_WRITE), 0);
    Range::with_len(hint, len).unwrap()
}

/// The kernel wait channel of thread `tid` of this process.
pub fn wchan(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default()
}
