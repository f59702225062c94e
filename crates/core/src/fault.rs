//! `range_fault`: snapshot a range of the CPU page table and fault pages in where asked
//! (the kernel's `hmm_range_fault`), and the driver loop around it.
//!
//! # Entries
//!
//! One `u64` per page. On output: [`entry::VALID`] (with [`entry::WRITE`] if the CPU may write)
//! and the page's frame number in the low bits, or [`entry::ERROR`] for a page no device may use
//! (a hole, a PROT_NONE or I/O area), or 0 for a page that is not present but could be faulted.
//! A huge page gives every covered entry its order. svmirror adds two output bits the kernel
//! reports through `struct page` instead: [`entry::ZERO`] for the shared zero page and
//! [`entry::DEVICE_PRIVATE`] for a page in the caller's own device memory.
//!
//! On input, `VALID` means "fault it in" ([`entry::REQ_FAULT`]) and `WRITE` means "fault it in
//! writable" ([`entry::REQ_WRITE`], only together with `REQ_FAULT`). The request for a page is
//! `(entry & pfn_flags_mask) | default_flags`; most drivers set `pfn_flags_mask = 0` and ask
//! for the same thing everywhere through `default_flags`.

use std::time::{Duration, Instant};

use crate::context::{UpdateGuard, UpdateLock, might_fault, might_sleep};
use crate::error::{Error, Result};
use crate::notifier::{ReadSeq, Subscription};
use crate::range::{Owner, PAGE_SHIFT, PAGE_SIZE, Range};

/// Bits of a `range_fault` entry.
pub mod entry {
    /// Output: the page is mapped and its frame number is in [`PFN_MASK`]. Input: fault it in.
    pub const VALID: u64 = 1 << 63;
    /// Output: the CPU may write the page. Input (with `REQ_FAULT`): fault it in writable.
    pub const WRITE: u64 = 1 << 62;
    /// Output: no device may use this page (hole, PROT_NONE, I/O or PFN-map area).
    pub const ERROR: u64 = 1 << 61;
    /// Shift of the 5-bit order field: log2 of the CPU mapping's size in pages.
    pub const ORDER_SHIFT: u32 = 56;
    /// The order field.
    pub const ORDER_MASK: u64 = 0x1f << ORDER_SHIFT;
    /// Output (svmirror): the page lives in device memory owned by the caller.
    pub const DEVICE_PRIVATE: u64 = 1 << 55;
    /// Output (svmirror): the page is the shared zero page.
    pub const ZERO: u64 = 1 << 54;
    /// The frame number.
    pub const PFN_MASK: u64 = ZERO - 1;
    /// Input: fault the page in if it is not present.
    pub const REQ_FAULT: u64 = VALID;
    /// Input: fault the page in writable.
    pub const REQ_WRITE: u64 = WRITE;

    /// The order field of an entry.
    pub const fn order(e: u64) -> u32 {
        ((e & ORDER_MASK) >> ORDER_SHIFT) as u32
    }

    /// The frame number of an entry.
    pub const fn pfn(e: u64) -> u64 {
        e & PFN_MASK
    }

    /// Whether an output entry is a usable page.
    pub const fn is_valid(e: u64) -> bool {
        e & VALID != 0
    }

    /// Whether an output entry is a usable, writable page.
    pub const fn is_writable(e: u64) -> bool {
        e & (VALID | WRITE) == VALID | WRITE
    }
}

/// What the CPU page table holds for one base page, as a [`PageSource`] reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuPte {
    /// No page: never touched, swapped out, or in the middle of a migration.
    #[default]
    None,
    /// A page in RAM.
    Present {
        /// Frame number (0 when the process may not read frame numbers).
        pfn: u64,
        /// The CPU may write it without a fault (not read-only, not shared copy-on-write).
        write: bool,
        /// It is the shared zero page.
        zero: bool,
        /// log2 of the CPU mapping's size in base pages: 0, 9 (2 MiB), 18 (1 GiB).
        order: u8,
    },
    /// A page migrated to a device's private memory.
    DevicePrivate {
        /// The device page's frame number.
        pfn: u64,
        /// The driver whose memory it is.
        owner: Owner,
        /// Writable once faulted back or accessed by its owner.
        write: bool,
    },
}

/// What kind of mapping covers part of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AreaKind {
    /// No mapping at all.
    Hole,
    /// An I/O or PFN-map mapping (`VM_IO`/`VM_PFNMAP`): no pages a device may mirror.
    Io,
    /// Ordinary memory with the mapping's permissions.
    Mapped {
        /// The mapping is readable (false for PROT_NONE).
        read: bool,
        /// The mapping is writable.
        write: bool,
    },
}

/// A stretch `[addr, end)` with one [`AreaKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    /// End of the stretch (exclusive, page aligned), at most the `limit` asked for.
    pub end: u64,
    /// What covers it.
    pub kind: AreaKind,
}

/// The CPU page table of one address space, as `range_fault` walks it. svmirror-mm implements
/// it for the real process (PROCMAP_QUERY, PAGEMAP_SCAN, MADV_POPULATE_*);
/// `testing::ScriptedPageSource` (feature `testing`) is the test double.
pub trait PageSource {
    /// The mapping at page-aligned `addr`, reported up to at most `limit` (`addr < limit`);
    /// `end` must be above `addr`.
    fn area(&self, addr: u64, limit: u64) -> Result<Area>;

    /// Fills `out[i]` with the state of page `addr + i * PAGE_SIZE`. The pages lie in one
    /// [`AreaKind::Mapped`] area returned by [`area`](Self::area).
    fn snapshot(&self, addr: u64, out: &mut [CpuPte]) -> Result<()>;

    /// Faults `range` in, writable if `write` (MADV_POPULATE_READ/WRITE). Errors:
    /// [`Error::WriteToReadOnly`], [`Error::BadAddress`], or [`Error::Source`].
    fn fault(&self, range: Range, write: bool) -> Result<()>;

    /// Returns once every change to `range` that the CPU may already consider done has been
    /// invalidated: a page source that learns of changes after they happen (svmirror-mm reads
    /// userfaultfd events, and the kernel lets the munmap, mremap or madvise return as soon as
    /// its event is read) waits here until its invalidations for them have run. A device that
    /// calls this before it uses a translation (the simulated IOMMU does, per access; a runtime
    /// does it before it submits work) never uses one that a returned munmap or mremap ended.
    /// The default, for sources whose invalidations run before the change returns: nothing to
    /// wait for.
    ///
    /// Returns a position in the source's stream of changes, for
    /// [`changed_since`](Self::changed_since).
    fn settle(&self, range: Range) -> Result<u64> {
        let _ = range;
        Ok(0)
    }

    /// Whether a change to `range` may have been made (and learned of) since [`settle`]
    /// returned `since`. A device that read through a translation checks this after the read:
    /// a read that overlapped a change the source learns of only after it is made (mremap
    /// moves a page, then tells) may have seen the page's contents from after the move, at its
    /// new address, and is retried. May answer `true` spuriously, never `false` wrongly. The
    /// default: changes are invalidated before they are made, so never.
    ///
    /// [`settle`]: Self::settle
    fn changed_since(&self, range: Range, since: u64) -> bool {
        let _ = (range, since);
        false
    }

    /// Called by a backend right before it pins `range` for a device (kernel pins are taken
    /// for writing: io_uring buffers, VFIO, host-pointer imports). A source that write-protects
    /// pages for its own ends (svmirror-mm's write tracking) lifts that protection from whole
    /// huge pages here, so the pin's write fault does not split them. Returns the huge pages
    /// of `range` as mapped now, to hand to [`after_pin`](Self::after_pin). The default:
    /// nothing to do, nothing to check.
    fn before_pin(&self, range: Range) -> Result<Vec<Range>> {
        let _ = range;
        Ok(Vec::new())
    }

    /// Called once the pin of [`before_pin`](Self::before_pin)'s range was tried, with what
    /// `before_pin` returned: a source that counts huge pages split for a device checks here
    /// which of them the pin split (a pin must break copy-on-write sharing, and the kernel
    /// does that to a huge page by splitting it). The default does nothing.
    fn after_pin(&self, huge: &[Range]) {
        let _ = huge;
    }
}

/// A shared page source is a page source: a backend can take `Box::new(Arc::clone(&mm))` where
/// the same `ProcessMm` also feeds its notifier.
impl<T: PageSource + ?Sized> PageSource for std::sync::Arc<T> {
    fn area(&self, addr: u64, limit: u64) -> Result<Area> {
        (**self).area(addr, limit)
    }

    fn snapshot(&self, addr: u64, out: &mut [CpuPte]) -> Result<()> {
        (**self).snapshot(addr, out)
    }

    fn fault(&self, range: Range, write: bool) -> Result<()> {
        (**self).fault(range, write)
    }

    fn settle(&self, range: Range) -> Result<u64> {
        (**self).settle(range)
    }

    fn changed_since(&self, range: Range, since: u64) -> bool {
        (**self).changed_since(range, since)
    }

    fn before_pin(&self, range: Range) -> Result<Vec<Range>> {
        (**self).before_pin(range)
    }

    fn after_pin(&self, huge: &[Range]) {
        (**self).after_pin(huge)
    }
}

/// The input and output of one [`range_fault`] (the kernel's `struct hmm_range`).
#[derive(Debug)]
pub struct FaultRequest<'a> {
    /// The range to snapshot; must lie inside the subscription.
    pub range: Range,
    /// One entry per page: requests in, results out.
    pub entries: &'a mut [u64],
    /// Flags requested for every page.
    pub default_flags: u64,
    /// Which bits of each input entry add to `default_flags`.
    pub pfn_flags_mask: u64,
    /// Device-private pages of this owner are reported without faulting them back.
    pub dev_private_owner: Option<Owner>,
}

impl<'a> FaultRequest<'a> {
    /// A request that asks the same for every page: `REQ_FAULT` (+ `REQ_WRITE` if `write`).
    pub fn fault_all(range: Range, entries: &'a mut [u64], write: bool) -> Self {
        FaultRequest {
            range,
            entries,
            default_flags: entry::REQ_FAULT | if write { entry::REQ_WRITE } else { 0 },
            pfn_flags_mask: 0,
            dev_private_owner: None,
        }
    }

    /// A request that faults nothing and only reports what is there (a snapshot).
    pub fn snapshot(range: Range, entries: &'a mut [u64]) -> Self {
        FaultRequest {
            range,
            entries,
            default_flags: 0,
            pfn_flags_mask: 0,
            dev_private_owner: None,
        }
    }

    /// Reports device-private pages of `owner` instead of faulting them back.
    pub fn with_owner(mut self, owner: Owner) -> Self {
        self.dev_private_owner = Some(owner);
        self
    }
}

/// What one `range_fault` or fault loop did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Walk passes (one plus one per fault).
    pub passes: u64,
    /// Calls to [`PageSource::fault`].
    pub faults: u64,
    /// Times the fault loop started over because an invalidation raced it.
    pub retries: u64,
}

impl FaultStats {
    /// The passes an invalidation raced in the outcome of a fault loop
    /// ([`fault_prepare_and_program`]), whether it succeeded or ran out of time.
    pub fn retries_in<R>(outcome: &Result<(R, FaultStats)>) -> u64 {
        match outcome {
            Ok((_, stats)) => stats.retries,
            Err(Error::Timeout { retries, .. }) => *retries,
            Err(_) => 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    None,
    Read,
    Write,
}

/// Pages snapshot per call to the source, at most. Each call costs the source a few system calls
/// whatever its length (svmirror-mm: a VMA lookup, pagemap reads, a PAGEMAP_SCAN), so batches are
/// large: 4096 pages (16 MiB of 4 KiB pages, a 96 KiB buffer, allocated once per `range_fault` and
/// no larger than the range). Unit tests use small batches, so that their ranges of a few hundred
/// pages cross batch boundaries.
#[cfg(not(test))]
const BATCH: usize = 4096;
#[cfg(test)]
const BATCH: usize = 64;
/// Faults of the same page in a row, with no invalidation in between, before giving up.
const MAX_FAULTS_WITHOUT_PROGRESS: u32 = 8;

fn request(req: &FaultRequest<'_>, i: usize, addr: u64) -> Result<u64> {
    let r = (req.entries[i] & req.pfn_flags_mask) | req.default_flags;
    if r & entry::REQ_WRITE != 0 && r & entry::REQ_FAULT == 0 {
        return Err(Error::InvalidRequest { addr });
    }
    Ok(r)
}

fn need_for(r: u64, present: bool, writable: bool) -> Need {
    if r & entry::REQ_FAULT == 0 {
        Need::None
    } else if r & entry::REQ_WRITE != 0 && !writable {
        Need::Write
    } else if !present {
        Need::Read
    } else {
        Need::None
    }
}

/// The output entry for a page and whether the request needs a fault first.
fn classify(pte: CpuPte, r: u64, owner: Option<Owner>) -> (u64, Need) {
    match pte {
        CpuPte::None => (0, need_for(r, false, false)),
        CpuPte::Present {
            pfn,
            write,
            zero,
            order,
        } => {
            let mut e = (pfn & entry::PFN_MASK)
                | entry::VALID
                | ((u64::from(order) << entry::ORDER_SHIFT) & entry::ORDER_MASK);
            if write {
                e |= entry::WRITE;
            }
            if zero {
                e |= entry::ZERO;
            }
            (e, need_for(r, true, write))
        }
        CpuPte::DevicePrivate {
            pfn,
            owner: o,
            write,
        } if Some(o) == owner => {
            let mut e = (pfn & entry::PFN_MASK) | entry::VALID | entry::DEVICE_PRIVATE;
            if write {
                e |= entry::WRITE;
            }
            (e, Need::None)
        }
        // Someone else's device memory: as good as absent; a fault brings it back to RAM.
        CpuPte::DevicePrivate { .. } => (0, need_for(r, false, false)),
    }
}

/// Snapshots `req.range` of the CPU page table and faults pages in where the request asks
/// (the kernel's `hmm_range_fault`), under the sequence `seq` from `sub.read_begin()`.
///
/// Returns [`Error::Busy`] as soon as an invalidation of the subscription has run since `seq`:
/// take a new sequence and call again (or use [`fault_and_program`], which does). On `Busy`, the
/// entries already walked hold output and the rest still hold input.
///
/// ```
/// use std::sync::Arc;
/// use svmirror_core::testing::{ScriptedPageSource, TestMirror};
/// use svmirror_core::{entry, range_fault, AreaKind, Error, FaultRequest, Notifier, Owner, Range};
///
/// let cpu = ScriptedPageSource::new();
/// let r = Range::new(0x10000, 0x12000).unwrap();
/// cpu.map_area(r, AreaKind::Mapped { read: true, write: false });
/// let notifier = Notifier::new();
/// let sub = notifier.insert(r, Arc::new(TestMirror::new(Owner(1)))).unwrap();
/// let mut entries = [0u64; 2];
///
/// // A read fault of a read-only anonymous area maps the zero page.
/// let seq = sub.read_begin().unwrap();
/// range_fault(&sub, seq, &cpu, &mut FaultRequest::fault_all(r, &mut entries, false)).unwrap();
/// assert!(entries.iter().all(|&e| entry::is_valid(e) && e & entry::ZERO != 0));
///
/// // A write fault there is EPERM.
/// let err = range_fault(&sub, seq, &cpu, &mut FaultRequest::fault_all(r, &mut entries, true));
/// assert!(matches!(err, Err(Error::WriteToReadOnly { addr: 0x10000 })));
/// ```
pub fn range_fault<S: PageSource + ?Sized>(
    sub: &Subscription,
    seq: ReadSeq,
    source: &S,
    req: &mut FaultRequest<'_>,
) -> Result<FaultStats> {
    might_sleep("range_fault");
    let range = req.range;
    if req.entries.len() as u64 != range.pages() {
        return Err(Error::EntryCount {
            range,
            expected: range.pages(),
            got: req.entries.len(),
        });
    }
    let subscription = sub.range();
    if range.start() < subscription.start() || range.end() > subscription.end() {
        return Err(Error::OutsideSubscription {
            range,
            subscription,
        });
    }
    let _span =
        tracing::trace_span!("range_fault", start = range.start(), end = range.end()).entered();
    walk(sub, seq, source, req).map_err(|e| match e {
        // An error seen while an invalidation overtook the walk (a fault into a mapping that was
        // being replaced, say) describes a page table that no longer exists: start over.
        Error::Busy { .. } => e,
        _ if sub.check_retry(seq) => Error::Busy { range },
        _ => e,
    })
}

/// The walk of [`range_fault`], on validated input.
fn walk<S: PageSource + ?Sized>(
    sub: &Subscription,
    seq: ReadSeq,
    source: &S,
    req: &mut FaultRequest<'_>,
) -> Result<FaultStats> {
    let range = req.range;
    let mut stats = FaultStats::default();
    let mut addr = range.start();
    let mut stuck_at = (u64::MAX, 0u32);
    let mut buf = vec![CpuPte::None; BATCH.min(req.entries.len())];
    'pass: loop {
        if sub.check_retry(seq) {
            return Err(Error::Busy { range });
        }
        stats.passes += 1;
        while addr < range.end() {
            let area = source.area(addr, range.end())?;
            let area_end = area.end.min(range.end());
            if area_end <= addr || area_end % PAGE_SIZE != 0 {
                return Err(Error::Source {
                    range,
                    source: format!("page source reported area end {:#x} at {addr:#x}", area.end)
                        .into(),
                });
            }
            let first = ((addr - range.start()) >> PAGE_SHIFT) as usize;
            let count = ((area_end - addr) >> PAGE_SHIFT) as usize;
            let vma_write = match area.kind {
                AreaKind::Mapped { read: true, write } => write,
                // Holes, I/O areas and PROT_NONE: EFAULT if any page asks for a fault, else ERROR.
                _ => {
                    for i in first..first + count {
                        let page = range.start() + ((i as u64) << PAGE_SHIFT);
                        if request(req, i, page)? & entry::REQ_FAULT != 0 {
                            return Err(Error::BadAddress { addr: page });
                        }
                    }
                    req.entries[first..first + count].fill(entry::ERROR);
                    addr = area_end;
                    continue;
                }
            };
            let mut done = 0;
            while done < count {
                let n = (count - done).min(buf.len());
                let batch_addr = addr + ((done as u64) << PAGE_SHIFT);
                source.snapshot(batch_addr, &mut buf[..n])?;
                for j in 0..n {
                    let i = first + done + j;
                    let page = batch_addr + ((j as u64) << PAGE_SHIFT);
                    let (out, need) =
                        classify(buf[j], request(req, i, page)?, req.dev_private_owner);
                    if need == Need::None {
                        req.entries[i] = out;
                        continue;
                    }
                    if need == Need::Write && !vma_write {
                        return Err(Error::WriteToReadOnly { addr: page });
                    }
                    // Fault the whole run of following pages that need the same kind of fault,
                    // snapshotting past this batch if the run goes on (the walk restarts at
                    // `page` afterwards, so the buffer may be reused).
                    let run = fault_run(source, req, &mut buf, (j, n), page, area_end, need)?;
                    stuck_at = if stuck_at.0 == page {
                        (page, stuck_at.1 + 1)
                    } else {
                        (page, 1)
                    };
                    if stuck_at.1 > MAX_FAULTS_WITHOUT_PROGRESS {
                        return Err(Error::NoProgress { addr: page });
                    }
                    let fault_range = Range::with_len(page, (run as u64) << PAGE_SHIFT)?;
                    might_fault("range_fault: populating the range (PageSource::fault)");
                    source.fault(fault_range, need == Need::Write)?;
                    stats.faults += 1;
                    addr = page;
                    continue 'pass;
                }
                done += n;
            }
            addr = area_end;
        }
        return Ok(stats);
    }
}

/// Length in pages of the run starting at `page` (index `j` of the `n` pages in `buf`) whose pages
/// all need the fault `need`, up to `area_end`.
fn fault_run<S: PageSource + ?Sized>(
    source: &S,
    req: &FaultRequest<'_>,
    buf: &mut [CpuPte],
    (mut j, mut n): (usize, usize),
    page: u64,
    area_end: u64,
    need: Need,
) -> Result<usize> {
    let first = ((page - req.range.start()) >> PAGE_SHIFT) as usize;
    let mut run = 1;
    loop {
        j += 1;
        let addr = page + ((run as u64) << PAGE_SHIFT);
        if addr >= area_end {
            return Ok(run);
        }
        if j == n {
            n = (((area_end - addr) >> PAGE_SHIFT) as usize).min(buf.len());
            source.snapshot(addr, &mut buf[..n])?;
            j = 0;
        }
        let r = request(req, first + run, addr)?;
        if classify(buf[j], r, req.dev_private_owner).1 != need {
            return Ok(run);
        }
        run += 1;
    }
}

/// The default time limit of [`fault_and_program`], as the kernel's `HMM_RANGE_DEFAULT_TIMEOUT`.
pub const DEFAULT_FAULT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The whole driver-side fault loop: `read_begin` → [`range_fault`] → take the update lock →
/// `read_retry` → `program`, starting over whenever an invalidation raced it, for at most
/// `timeout` ([`DEFAULT_FAULT_TIMEOUT`] is the kernel's choice).
///
/// `program` runs under the update lock with entries that are guaranteed current: no
/// invalidation of the subscription has run since they were read (DESIGN.md invariant 1).
/// Inputs are restored before each retry when `pfn_flags_mask` makes them matter.
pub fn fault_and_program<S, T, R>(
    sub: &Subscription,
    lock: &UpdateLock<T>,
    source: &S,
    req: &mut FaultRequest<'_>,
    timeout: Duration,
    program: impl FnOnce(&mut UpdateGuard<'_, T>, &FaultRequest<'_>) -> R,
) -> Result<(R, FaultStats)>
where
    S: PageSource + ?Sized,
{
    fault_prepare_and_program(
        sub,
        lock,
        source,
        req,
        timeout,
        FaultSteps {
            prepare: |_: &FaultRequest<'_>| (),
            undo: |_: &mut UpdateGuard<'_, T>, ()| (),
            program: |g: &mut UpdateGuard<'_, T>, req: &FaultRequest<'_>, ()| program(g, req),
        },
    )
}

/// The backend's three steps of [`fault_prepare_and_program`].
#[derive(Debug)]
pub struct FaultSteps<Prep, Undo, Prog> {
    /// With no lock held, after each [`range_fault`] pass: pin, import or map what the entries
    /// say. Its result goes to `program`, or to `undo` if the pass raced an invalidation.
    pub prepare: Prep,
    /// Under the update lock: releases what `prepare` made for a raced pass.
    pub undo: Undo,
    /// Under the update lock, entries current: publishes what `prepare` made.
    pub program: Prog,
}

/// [`fault_and_program`] with a *prepare* step outside the update lock: `read_begin` →
/// [`range_fault`] → `prepare` (no lock held: pin, import or map the pages for the device, the
/// work that can fault into the userfaultfd monitor) → take the update lock → `read_retry` →
/// `program` with what `prepare` made, or `undo` it (under the lock) and start over when an
/// invalidation raced. The same retry and timeout policy as [`fault_and_program`].
///
/// No lock an invalidation takes is held across `prepare` (the lock order in [`crate::context`]:
/// the monitor may be inside an invalidation waiting for the update lock while `prepare`'s pin
/// waits for the monitor). What `prepare` makes is not visible to the device through the
/// backend's published state until `program` publishes it; `undo` must release it all.
/// `prepare` sees the entries of this pass only: it runs again after a retry.
pub fn fault_prepare_and_program<S, T, P, R, Prep, Undo, Prog>(
    sub: &Subscription,
    lock: &UpdateLock<T>,
    source: &S,
    req: &mut FaultRequest<'_>,
    timeout: Duration,
    steps: FaultSteps<Prep, Undo, Prog>,
) -> Result<(R, FaultStats)>
where
    S: PageSource + ?Sized,
    Prep: FnMut(&FaultRequest<'_>) -> P,
    Undo: FnMut(&mut UpdateGuard<'_, T>, P),
    Prog: FnOnce(&mut UpdateGuard<'_, T>, &FaultRequest<'_>, P) -> R,
{
    let FaultSteps {
        mut prepare,
        mut undo,
        program,
    } = steps;
    let started = Instant::now();
    let input: Option<Vec<u64>> = (req.pfn_flags_mask != 0).then(|| req.entries.to_vec());
    let mut total = FaultStats::default();
    loop {
        let seq = sub.read_begin()?;
        match range_fault(sub, seq, source, req) {
            Ok(s) => {
                total.passes += s.passes;
                total.faults += s.faults;
                crate::context::might_fault("the prepare step of a device fault");
                let prepared = prepare(req);
                #[cfg(feature = "testing")]
                crate::testing::race::before_program(req.range);
                let mut guard = lock.lock();
                match sub.read_retry(&guard, seq) {
                    Ok(false) => {
                        let r = program(&mut guard, req, prepared);
                        return Ok((r, total));
                    }
                    Ok(true) => undo(&mut guard, prepared),
                    Err(e) => {
                        undo(&mut guard, prepared);
                        return Err(e);
                    }
                }
            }
            Err(Error::Busy { .. }) => {}
            Err(e) => return Err(e),
        }
        total.retries += 1;
        let elapsed = started.elapsed();
        if elapsed > timeout {
            return Err(Error::Timeout {
                range: req.range,
                retries: total.retries,
                elapsed,
            });
        }
        if let Some(input) = &input {
            req.entries.copy_from_slice(input);
        }
    }
}

#[cfg(all(test, not(loom)))]
#[path = "fault_tests.rs"]
mod tests;
