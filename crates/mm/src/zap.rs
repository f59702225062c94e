//! The madvise window, closed: a REMOVE invalidation is held open until the zap is done.
//!
//! A plain `madvise(MADV_DONTNEED | MADV_FREE | MADV_REMOVE)` of a registered range sends
//! UFFD_EVENT_REMOVE *before* it changes anything (mm/madvise.c `madvise_dontneed_free` calls
//! `userfaultfd_remove`, which drops the mmap lock and waits until the event is read), then
//! takes the lock again and zaps. Invalidating when the event is handled is therefore too
//! early: a device fault between the invalidation and the zap pins and maps the page the zap
//! then drops, and the device keeps it. So the handler starts the `Clear` invalidation and does
//! not end it: device faults on the range wait in `read_begin` (the kernel's
//! `mmu_interval_read_begin` semantics) until the handler has seen the zap done, page by page:
//!
//! - a page present when the event was read (the monitor's reader records the frames right
//!   after the read, before the caller can zap; the handler reads them itself for a range too
//!   large for its record) is done once it is **not present** (DONTNEED,
//!   REMOVE: zapped), or, where this process may read frame numbers (`CAP_SYS_ADMIN`), once its
//!   **frame changed** (zapped and touched again) or its frame is **lazy-free** (an anonymous
//!   page whose `KPF_SWAPBACKED` is clear: MADV_FREE marked it, mm/swap.c
//!   `folio_mark_lazyfree`, and a page a device then pins is never discarded). A page that
//!   was lazy-free already when the event was read (an earlier MADV_FREE, as allocators do
//!   before they give memory back for good) counts only once it is gone or its frame changed:
//!   its mark says nothing about this REMOVE, which may be a DONTNEED still to come.
//! - the event does not say which advice it was, nor which thread made the call, so a page
//!   neither dropped nor marked stays unexplained: after [`ZAP_WAIT`] without progress (a large
//!   zap that is still going resets the clock with every page it drops) the invalidation ends
//!   anyway (`MmStats::zap_timeouts`), and the pages still unexplained become **suspect**
//!   ([`Suspects`]): device faults that would report one of them wait until the handler sees it
//!   explained, for [`ZAP_SUSPECT_WAIT`] more; faults elsewhere go on. That happens to a
//!   MADV_FREE that marks nothing: a page not on the LRU yet (just faulted in: mm/swap.c
//!   `folio_mark_lazyfree` skips a folio still in a CPU's add batch), a page lazy-free
//!   already, a large folio it could not split, every MADV_FREE without `CAP_SYS_ADMIN`
//!   (coherent anyway: a page that stays is the CPU's page, and a pinned lazy-free page is
//!   never discarded); to a page touched again right after its zap when frame numbers are
//!   hidden, or that got the dropped frame back (it is new: nothing stale); and to a madvise
//!   whose caller was held off the CPU between the read and the zap. The window stays open
//!   only for that last one, when the caller is held off for longer than both limits
//!   together (`MmStats::zap_suspects_expired` counts the pages a fault may then have mapped).
//! - **absent pages**: a zap of a page that is not present changes nothing anyone can see, so
//!   a hold could not tell it was still to come, and a device fault between the read and the
//!   zap populated the page and mapped what the zap then dropped. So the monitor's reader,
//!   right after the read and only while the caller has not resumed (the kernel's
//!   `mmap_changing` is still raised: [`Uffd::mmap_changing`]), maps the zero page at each
//!   absent page of the range ([`MARK_MAX`] at most, private anonymous memory only) by reading
//!   it through /proc/self/mem, and records it as a **marker**. The zap drops a marker like
//!   any page; until then markers are suspect (device faults on them wait, faults elsewhere do
//!   not), for both limits together at most. A MADV_FREE keeps the zero page: once the hold
//!   sees a page above a marker dropped or marked, the caller's walk (in address order) has
//!   passed it and the marker is cleared (`MmStats::zap_markers_passed`); a marker above
//!   every present page waits out the limits (`MmStats::zap_markers_expired`). A marker
//!   mapped after the zap had passed (the caller resumed as the reader was marking) stays
//!   mapped, which changes no byte: only faults on it wait. Left open: an absent range larger
//!   than [`MARK_MAX`] pages, memory that is not private anonymous, a REMOVE read after its
//!   caller resumed, and two madvise calls over the same pages at once (the second zap of a
//!   page the first already dropped shows nothing); SVM API calls expect their own REMOVE
//!   ([`Expected`]) and so meet the last case only with a plain madvise over the same pages.
//! - a MADV_FREE's marks show only once the batch they went through drains on the CPU that
//!   made the call, which no system call does for another CPU: the handler visits each CPU it
//!   may run on and frees a page of its own there ([`drain_lru_batches`]) while pages wait.
//!
//! [`Suspects`]: crate::book::Suspects
//! [`Uffd::mmap_changing`]: crate::uffd::Uffd::mmap_changing
//! [`MARK_MAX`]: crate::queue::MARK_MAX
//! [`Expected`]: crate::book::Expected

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use svmirror_core::{Error, Event, Invalidation, NotifierRange, Range};

use crate::queue::{FRAME_FLAGS, LAZY_AT_READ, MARKER, each_lazy};
use crate::shared::{Shared, bump};

/// How long a REMOVE invalidation waits for its zap to be seen, at most, after it last saw a
/// page of it zapped.
pub const ZAP_WAIT: Duration = Duration::from_millis(20);

/// How long device faults on a page a hold left unexplained wait for it, at most, after the
/// hold's own limit ended it: faults that would report such a page wait until the monitor sees
/// it zapped, replaced or marked lazy-free, for this long at most.
pub const ZAP_SUSPECT_WAIT: Duration = Duration::from_millis(50);

/// How often the monitor's handler looks at the suspect pages again.
pub(crate) const SUSPECT_POLL: Duration = Duration::from_millis(1);

/// While pages stay unexplained, the per-CPU LRU batches are drained at most this often (see
/// [`drain_lru_batches`]), so a MADV_FREE's lazy-free mark becomes visible.
const DRAIN_AFTER: Duration = Duration::from_millis(1);

/// A REMOVE whose invalidation is open until its zap is seen done.
pub(crate) struct PendingZap<'a> {
    _inv: Invalidation<'a>,
    /// Pages present when the event was handled, not yet seen zapped: (address, frame).
    pages: Vec<(u64, u64)>,
    deadline: Instant,
    /// The markers the reader mapped at the absent pages of the range (suspect meanwhile).
    markers: Vec<u64>,
    /// The highest address of `pages` as recorded: once every page is seen done, the caller's
    /// walk (in address order) has passed every marker below it.
    highest: u64,
    /// A page was seen marked lazy-free: the advice was MADV_FREE, which drops no marker.
    saw_lazy: bool,
}

/// Asks for every CPU's LRU folio batches to be drained, at most every [`DRAIN_AFTER`] (the
/// holds and the suspects of every `ProcessMm` together). MADV_FREE marks a folio lazy-free
/// through the calling CPU's `lru_lazyfree` batch (mm/swap.c `folio_mark_lazyfree`), and its
/// `KPF_SWAPBACKED` is cleared only when that batch drains, which no system call does for
/// another CPU on 6.18 (`mlock` no longer calls `lru_add_drain_all`). A batch drains when its
/// own CPU runs `lru_add_drain()`, which freeing a page does: so a thread visits each CPU and
/// frees a page of its own there ([`visit_cpus_and_drain`]).
///
/// The visits are made by a thread of their own ("svmirror-drain", one per process, started on
/// first use), which the handler only asks: a CPU that a real-time task keeps busy delays the
/// visit (the drainer runs there only when that task lets it), and must not delay the events.
fn drain_lru_batches() {
    static DRAIN: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());
    static START: std::sync::Once = std::sync::Once::new();
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < DRAIN_AFTER) {
            return;
        }
        *last = Some(Instant::now());
    }
    START.call_once(|| {
        let started = std::thread::Builder::new()
            .name("svmirror-drain".into())
            .spawn(|| {
                loop {
                    let mut asked = DRAIN.0.lock().unwrap_or_else(PoisonError::into_inner);
                    while !*asked {
                        asked = DRAIN.1.wait(asked).unwrap_or_else(PoisonError::into_inner);
                    }
                    *asked = false;
                    drop(asked);
                    visit_cpus_and_drain();
                }
            });
        if let Err(e) = started {
            tracing::warn!(%e, "no LRU drain thread: MADV_FREE marks show later");
        }
    });
    *DRAIN.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
    DRAIN.1.notify_one();
}

/// On the drain thread: visits every CPU the process may run on and drains its LRU batches
/// there. The thread is ours alone, so it is left wherever the last visit put it.
fn visit_cpus_and_drain() {
    thread_local! {
        static CPUS: Vec<usize> = {
            // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // The process's main thread's mask, not this thread's: the thread that started the
            // drainer may have been pinned, and the caller of a madvise may run anywhere.
            // SAFETY: getpid takes no arguments.
            let pid = unsafe { libc::getpid() };
            // SAFETY: writes the main thread's mask into the local set, of the size given.
            let rc = unsafe {
                libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
            };
            if rc != 0 {
                Vec::new()
            } else {
                // SAFETY: CPU_ISSET reads one bit of the local set, below its size.
                (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
            }
        };
    }
    CPUS.with(|cpus| {
        if cpus.len() < 2 {
            // One CPU (or the mask unknown): the caller's batch is ours, drained by one unmap.
            unmap_one_page();
            return;
        }
        for &cpu in cpus {
            // SAFETY: as above.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: sets one bit below the set's size.
            unsafe { libc::CPU_SET(cpu, &mut one) };
            // SAFETY: moves the calling thread onto `cpu`, from a local set of the size given.
            if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) }
                == 0
            {
                unmap_one_page();
            }
        }
    });
}

/// Maps, populates and unmaps one page: freeing the page drains this CPU's LRU batches
/// (mm/swap_state.c `free_pages_and_swap_cache` begins with `lru_add_drain`). A new mapping
/// never merges into a registered one (a VMA's userfaultfd context must match to merge), and
/// it is gone before anyone could register it.
fn unmap_one_page() {
    // SAFETY: a fresh private mapping of our own, replacing nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if p != libc::MAP_FAILED {
        // SAFETY: unmaps exactly the page mapped above, which nothing refers to.
        unsafe { libc::munmap(p, 4096) };
    }
}

impl Shared {
    /// Handles a REMOVE of `[start, end)` that no SVM API call expected: takes the range from
    /// every device now (`Clear`) and returns the invalidation, open, to be ended by
    /// [`Shared::zap_done`] once the zap is seen, or `None` if it is already.
    pub(crate) fn handle_remove_open(
        &self,
        start: u64,
        end: u64,
        read_frames: Option<Vec<(u64, u64)>>,
    ) -> Result<Option<PendingZap<'_>>, Error> {
        let range = Range::new(start, end)?;
        let mut marked = Vec::new();
        let widened = self.widen(range);
        let inv = self
            .notifier
            .invalidate_range_start(NotifierRange::new(widened, Event::Clear))?;
        // The pages are being dropped: any that lived on a device are discarded with them.
        self.discard_migrated(start, end);
        // The reader recorded the frames right after the read, before the madvise's caller
        // could zap (and anyone touch the pages again). Without that record (too many pages
        // pending) they are read now: a page zapped and touched again before this is new, and
        // waiting for it is only a wasted wait (to the time limit), never a missed one.
        let pages = match read_frames {
            Some(mut p) => {
                // Markers go to the suspects at once (before the invalidation can end): device
                // faults on them wait until the zap drops them, faults elsewhere do not.
                let markers: Vec<(u64, u64)> =
                    p.iter().filter(|x| x.1 & MARKER != 0).copied().collect();
                if !markers.is_empty() {
                    p.retain(|x| x.1 & MARKER == 0);
                    let until = Instant::now() + ZAP_WAIT + ZAP_SUSPECT_WAIT;
                    let mut suspects = self.suspects.lock();
                    for &(addr, frame) in &markers {
                        suspects.insert(addr, (frame, until));
                    }
                    drop(suspects);
                    marked = markers.into_iter().map(|(a, _)| a).collect();
                }
                p
            }
            None => match self.source.present_frames(range) {
                // Read late: a page lazy-free now may have been so before the event (then this
                // may be a DONTNEED still to come) or be this REMOVE's own MADV_FREE done: the
                // first is a stale translation, the second only a wait to the time limit.
                Ok(p) => self.mark_lazy(p),
                Err(e) => {
                    tracing::warn!(%range, %e, "pagemap unreadable: REMOVE invalidation not held");
                    return Ok(None);
                }
            },
        };
        if pages.is_empty() {
            return Ok(None);
        }
        bump(&self.counters.zap_waits);
        let now = Instant::now();
        let highest = pages.iter().map(|p| p.0).max().unwrap_or(0);
        let mut z = PendingZap {
            _inv: inv,
            pages,
            deadline: now + ZAP_WAIT,
            markers: marked,
            highest,
            saw_lazy: false,
        };
        Ok((!self.zap_done(&mut z)).then_some(z))
    }

    /// `pages` with [`LAZY_AT_READ`] set on those whose frames are lazy-free now.
    fn mark_lazy(&self, mut pages: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        if let Some(flags) = self.page_flags.as_ref() {
            let frames: Vec<u64> = pages.iter().map(|&(_, f)| f).collect();
            each_lazy(
                flags,
                frames.len(),
                |i| frames[i],
                |i| {
                    pages[i].1 |= LAZY_AT_READ;
                },
            );
        }
        pages
    }

    /// Whether every page of `z` has been seen zapped (or the time is up: counted). Drops the
    /// pages seen done from `z`.
    pub(crate) fn zap_done(&self, z: &mut PendingZap<'_>) -> bool {
        // Drained again (at most every DRAIN_AFTER) while pages are unexplained: the caller may
        // mark its pages lazy-free only after an earlier drain (it runs when it is scheduled).
        if self.page_flags.is_some() {
            drain_lru_batches();
        }
        let before = z.pages.len();
        let Some((done, lazy)) = self.explained_how(&z.pages) else {
            return true;
        };
        z.saw_lazy |= lazy;
        let mut i = 0;
        z.pages.retain(|_| {
            i += 1;
            !done[i - 1]
        });
        if z.pages.is_empty() {
            self.markers_passed(z);
            return true;
        }
        let now = Instant::now();
        if z.pages.len() < before {
            // The zap is under way (a large one takes many milliseconds): wait on.
            z.deadline = now + ZAP_WAIT;
        }
        if now >= z.deadline {
            bump(&self.counters.zap_timeouts);
            tracing::debug!(
                pages = z.pages.len(),
                "REMOVE zap not seen in time; invalidation ended, pages suspect"
            );
            // Recorded before the invalidation ends (the caller drops `z`), so no fault can
            // report one of them in between.
            let until = now + ZAP_SUSPECT_WAIT;
            let mut suspects = self.suspects.lock();
            for &(addr, frame) in &z.pages {
                suspects.insert(addr, (frame, until));
            }
            self.counters
                .zap_suspects
                .fetch_add(z.pages.len() as u64, std::sync::atomic::Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Every page of `z` is seen done, so the caller's madvise has walked past the highest of
    /// them: it handles a VMA's range in address order (mm/madvise.c `madvise_dontneed_free`
    /// zaps it with `zap_page_range_single`, `madvise_free_single_vma` walks it with
    /// `walk_page_range_vma`), and a REMOVE covers one VMA. The markers below it are what that
    /// walk left: dropped (a DONTNEED) or kept (a MADV_FREE skips the zero page): either way no
    /// zap is still to come for them, and faults on them need not wait. If a page was seen
    /// marked lazy-free, the advice was MADV_FREE, which zaps nothing: no marker of the range
    /// waits, above the highest page either.
    fn markers_passed(&self, z: &PendingZap<'_>) {
        if z.markers.is_empty() {
            return;
        }
        let mut suspects = self.suspects.lock();
        let mut passed = 0u64;
        for a in z.markers.iter().filter(|&&a| z.saw_lazy || a < z.highest) {
            if suspects.get(a).is_some_and(|&(f, _)| f & MARKER != 0) {
                suspects.remove(a);
                passed += 1;
            }
        }
        drop(suspects);
        if passed > 0 {
            self.counters
                .zap_markers_passed
                .fetch_add(passed, std::sync::atomic::Ordering::Relaxed);
            self.suspects.cleared.notify_all();
        }
    }

    /// For each recorded `(address, frame)` (in address order), whether its zap is seen done:
    /// the page is gone, has another frame, or (frames visible, not lazy-free already at the
    /// read) is marked lazy-free now. `None` if the page tables cannot be read (the caller
    /// stops waiting). Reads pagemap once per run of consecutive pages and kpageflags once per
    /// run of consecutive frames, so a huge page costs two reads, not 512.
    fn explained(&self, pages: &[(u64, u64)]) -> Option<Vec<bool>> {
        self.explained_how(pages).map(|(done, _)| done)
    }

    /// [`Shared::explained`], and whether any page was explained by a lazy-free mark (a
    /// MADV_FREE's doing).
    fn explained_how(&self, pages: &[(u64, u64)]) -> Option<(Vec<bool>, bool)> {
        let frames = self.source.frames_visible();
        // Present frame of each page now (0: not present).
        let mut now = vec![0u64; pages.len()];
        let mut present = vec![false; pages.len()];
        let mut k = 0;
        while k < pages.len() {
            let start = pages[k].0;
            let mut n = 1;
            while k + n < pages.len()
                && pages[k + n].0 == start + n as u64 * svmirror_core::PAGE_SIZE
            {
                n += 1;
            }
            let run = Range::with_len(start, n as u64 * svmirror_core::PAGE_SIZE).ok()?;
            self.source
                .each_present(run, |a, f| {
                    let i = k + ((a - start) / svmirror_core::PAGE_SIZE) as usize;
                    now[i] = f;
                    present[i] = true;
                })
                .ok()?;
            k += n;
        }
        let mut done: Vec<bool> = pages
            .iter()
            .enumerate()
            .map(|(i, &(_, old))| !present[i] || (frames && now[i] != old & !FRAME_FLAGS))
            .collect();
        let mut lazy = false;
        // MADV_FREE: the frame stays, marked lazy-free (not for a page lazy-free already at
        // the read: only its going away says this REMOVE's zap is done).
        if let (true, Some(flags)) = (frames, self.page_flags.as_ref()) {
            let candidates: Vec<usize> = (0..pages.len())
                .filter(|&i| !done[i] && pages[i].1 & LAZY_AT_READ == 0)
                .collect();
            each_lazy(
                flags,
                candidates.len(),
                |c| now[candidates[c]],
                |c| {
                    done[candidates[c]] = true;
                    lazy = true;
                },
            );
        }
        Some((done, lazy))
    }

    /// On the handler, every [`SUSPECT_POLL`] while any page is suspect: drops the suspects
    /// seen explained (gone, replaced, marked lazy-free: as [`Shared::zap_done`] decides) or
    /// expired, and wakes the faults waiting for them.
    pub(crate) fn check_suspects(&self) {
        let (pages, deadlines): (Vec<(u64, u64)>, Vec<Instant>) = self
            .suspects
            .lock()
            .iter()
            .map(|(&a, &(f, d))| ((a, f), d))
            .unzip();
        if pages.is_empty() {
            return;
        }
        if self.page_flags.is_some() {
            // A MADV_FREE's marks show only once its CPU's batch drains.
            drain_lru_batches();
        }
        let explained = self.explained(&pages);
        let now = Instant::now();
        let mut done = Vec::new();
        let (mut expired, mut markers_expired) = (0u64, 0u64);
        for (k, (&(addr, frame), &deadline)) in pages.iter().zip(&deadlines).enumerate() {
            if explained.as_ref().is_none_or(|e| e[k]) {
                done.push(addr);
            } else if now >= deadline {
                if frame & MARKER != 0 {
                    markers_expired += 1;
                } else {
                    expired += 1;
                }
                done.push(addr);
            }
        }
        if markers_expired > 0 {
            self.counters
                .zap_markers_expired
                .fetch_add(markers_expired, std::sync::atomic::Ordering::Relaxed);
        }
        if done.is_empty() {
            return;
        }
        let mut suspects = self.suspects.lock();
        for a in done {
            suspects.remove(&a);
        }
        drop(suspects);
        if expired > 0 {
            self.counters
                .zap_suspects_expired
                .fetch_add(expired, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(pages = expired, "suspect pages expired unexplained");
        }
        self.suspects.cleared.notify_all();
    }
}
