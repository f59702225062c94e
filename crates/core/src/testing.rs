//! Test support: a scripted CPU page table and a minimal mirroring backend.
//!
//! Neither is a real part. [`ScriptedPageSource`] stands in for the process's page table where
//! the real one (svmirror-mm) cannot be driven deterministically: unit tests, loom models, doc
//! tests and the `range_fault` benchmark. [`TestMirror`] is the smallest backend that follows the
//! protocol, to exercise the notifier. Real backends live in their own crates.

use std::collections::BTreeMap;

use crate::context::UpdateLock;
use crate::error::{Error, Result};
use crate::fault::{
    Area, AreaKind, CpuPte, FaultRequest, FaultStats, PageSource, fault_and_program,
};
use crate::notifier::{IntervalNotifierOps, InvalidateCtx, Pass, Subscription, WouldBlock};
use crate::range::{Event, NotifierRange, Owner, PAGE_SHIFT, PAGE_SIZE, Range};
use crate::sync::{self, Mutex};

/// Frame number the scripted source gives the shared zero page.
pub const ZERO_PFN: u64 = 1;

#[derive(Default)]
struct Script {
    /// Areas by start: `(end, kind)`, never overlapping.
    areas: BTreeMap<u64, (u64, AreaKind)>,
    /// Page table by virtual page number.
    ptes: BTreeMap<u64, CpuPte>,
    next_pfn: u64,
    faults: u64,
    faults_do_nothing: bool,
}

impl Script {
    /// Removes `[start, end)` from the area map, splitting areas that straddle it.
    fn carve(&mut self, r: Range) {
        let overlapping: Vec<(u64, u64, AreaKind)> = self
            .areas
            .range(..r.end())
            .filter(|(_, (end, _))| *end > r.start())
            .map(|(&s, &(e, k))| (s, e, k))
            .collect();
        for (s, e, k) in overlapping {
            self.areas.remove(&s);
            if s < r.start() {
                self.areas.insert(s, (r.start(), k));
            }
            if e > r.end() {
                self.areas.insert(r.end(), (e, k));
            }
        }
    }

    fn kind_at(&self, addr: u64) -> Option<AreaKind> {
        self.areas
            .range(..=addr)
            .next_back()
            .filter(|(_, (end, _))| *end > addr)
            .map(|(_, (_, k))| *k)
    }

    fn fresh_pfn(&mut self) -> u64 {
        self.next_pfn += 1;
        self.next_pfn
    }
}

/// A CPU page table in memory, scripted by the test: areas with permissions, and page entries.
///
/// Faults behave like private anonymous memory: a read fault maps the zero page, a write fault
/// (or a write to the zero page or a read-only copy) maps a fresh frame. A test changes the table
/// directly with the methods below, bracketing the change with a notifier invalidation when the
/// real kernel would have sent one.
pub struct ScriptedPageSource {
    inner: Mutex<Script>,
}

impl Default for ScriptedPageSource {
    fn default() -> Self {
        Self::new()
    }
}

impl ScriptedPageSource {
    /// An empty address space.
    pub fn new() -> Self {
        ScriptedPageSource {
            inner: Mutex::new(Script {
                next_pfn: 0x1000,
                ..Script::default()
            }),
        }
    }

    /// Maps `range` with `kind`, replacing whatever was there (its pages are dropped).
    pub fn map_area(&self, range: Range, kind: AreaKind) {
        let mut s = sync::lock(&self.inner);
        s.carve(range);
        s.areas.insert(range.start(), (range.end(), kind));
        let vpns = range.start() >> PAGE_SHIFT..range.end() >> PAGE_SHIFT;
        s.ptes.retain(|v, _| !vpns.contains(v));
    }

    /// Unmaps `range`: no area, no pages.
    pub fn unmap(&self, range: Range) {
        let mut s = sync::lock(&self.inner);
        s.carve(range);
        let vpns = range.start() >> PAGE_SHIFT..range.end() >> PAGE_SHIFT;
        s.ptes.retain(|v, _| !vpns.contains(v));
    }

    /// Changes the permissions of the mapped parts of `range` (mprotect); present pages lose
    /// their write bit when the area is no longer writable.
    pub fn protect(&self, range: Range, read: bool, write: bool) {
        let mut s = sync::lock(&self.inner);
        let parts: Vec<(u64, u64)> = s
            .areas
            .range(..range.end())
            .filter(|(_, (end, _))| *end > range.start())
            .map(|(&st, &(e, _))| (st.max(range.start()), e.min(range.end())))
            .collect();
        for (st, e) in parts {
            let r = Range::new(st, e).expect("clamped part of a valid range");
            s.carve(r);
            s.areas.insert(st, (e, AreaKind::Mapped { read, write }));
        }
        if !write {
            let vpns = range.start() >> PAGE_SHIFT..range.end() >> PAGE_SHIFT;
            for (_, pte) in s.ptes.range_mut(vpns) {
                if let CpuPte::Present { write, .. } | CpuPte::DevicePrivate { write, .. } = pte {
                    *write = false;
                }
            }
        }
    }

    /// Drops the pages of `range` but keeps the mapping (madvise DONTNEED).
    pub fn clear(&self, range: Range) {
        let mut s = sync::lock(&self.inner);
        let vpns = range.start() >> PAGE_SHIFT..range.end() >> PAGE_SHIFT;
        s.ptes.retain(|v, _| !vpns.contains(v));
    }

    /// Sets the entry of the page at `addr`.
    pub fn set_pte(&self, addr: u64, pte: CpuPte) {
        sync::lock(&self.inner).ptes.insert(addr >> PAGE_SHIFT, pte);
    }

    /// The entry of the page at `addr`.
    pub fn pte(&self, addr: u64) -> CpuPte {
        sync::lock(&self.inner)
            .ptes
            .get(&(addr >> PAGE_SHIFT))
            .copied()
            .unwrap_or_default()
    }

    /// Makes every page of `range` present with fresh frames (writable if `write`), as if the CPU
    /// had touched them.
    pub fn populate(&self, range: Range, write: bool) {
        let mut s = sync::lock(&self.inner);
        for vpn in range.start() >> PAGE_SHIFT..range.end() >> PAGE_SHIFT {
            let pfn = s.fresh_pfn();
            s.ptes.insert(
                vpn,
                CpuPte::Present {
                    pfn,
                    write,
                    zero: false,
                    order: 0,
                },
            );
        }
    }

    /// Maps one huge page of `1 << order` base pages at `addr` (aligned to its size).
    pub fn map_huge(&self, addr: u64, order: u8, write: bool) {
        let mut s = sync::lock(&self.inner);
        let base = s.fresh_pfn() << order;
        s.next_pfn = base + (1 << order);
        let first = addr >> PAGE_SHIFT;
        for i in 0..1u64 << order {
            s.ptes.insert(
                first + i,
                CpuPte::Present {
                    pfn: base + i,
                    write,
                    zero: false,
                    order,
                },
            );
        }
    }

    /// Calls to [`PageSource::fault`] so far.
    pub fn fault_count(&self) -> u64 {
        sync::lock(&self.inner).faults
    }

    /// Makes faults succeed without changing anything (a page source that cannot make progress).
    pub fn set_faults_do_nothing(&self, on: bool) {
        sync::lock(&self.inner).faults_do_nothing = on;
    }
}

impl PageSource for ScriptedPageSource {
    fn area(&self, addr: u64, limit: u64) -> Result<Area> {
        let s = sync::lock(&self.inner);
        if let Some((_, &(end, kind))) = s
            .areas
            .range(..=addr)
            .next_back()
            .filter(|(_, (e, _))| *e > addr)
        {
            return Ok(Area {
                end: end.min(limit),
                kind,
            });
        }
        let next = s
            .areas
            .range(addr..)
            .next()
            .map_or(limit, |(&start, _)| start.min(limit));
        Ok(Area {
            end: next,
            kind: AreaKind::Hole,
        })
    }

    fn snapshot(&self, addr: u64, out: &mut [CpuPte]) -> Result<()> {
        let s = sync::lock(&self.inner);
        let first = addr >> PAGE_SHIFT;
        out.fill(CpuPte::None);
        for (&vpn, pte) in s.ptes.range(first..first + out.len() as u64) {
            out[(vpn - first) as usize] = *pte;
        }
        Ok(())
    }

    fn fault(&self, range: Range, write: bool) -> Result<()> {
        let mut s = sync::lock(&self.inner);
        s.faults += 1;
        let mut addr = range.start();
        while addr < range.end() {
            match s.kind_at(addr) {
                Some(AreaKind::Mapped {
                    read: true,
                    write: w,
                }) => {
                    if write && !w {
                        return Err(Error::WriteToReadOnly { addr });
                    }
                }
                _ => return Err(Error::BadAddress { addr }),
            }
            addr += PAGE_SIZE;
        }
        if s.faults_do_nothing {
            return Ok(());
        }
        for vpn in range.start() >> PAGE_SHIFT..range.end() >> PAGE_SHIFT {
            let cur = s.ptes.get(&vpn).copied().unwrap_or_default();
            let new = match cur {
                CpuPte::Present { write: true, .. } => cur,
                CpuPte::Present { order, .. } if write => CpuPte::Present {
                    pfn: s.fresh_pfn(),
                    write: true,
                    zero: false,
                    order,
                },
                CpuPte::Present { .. } => cur,
                CpuPte::None | CpuPte::DevicePrivate { .. } if write => CpuPte::Present {
                    pfn: s.fresh_pfn(),
                    write: true,
                    zero: false,
                    order: 0,
                },
                CpuPte::DevicePrivate { .. } => CpuPte::Present {
                    pfn: s.fresh_pfn(),
                    write: false,
                    zero: false,
                    order: 0,
                },
                CpuPte::None => CpuPte::Present {
                    pfn: ZERO_PFN,
                    write: false,
                    zero: true,
                    order: 0,
                },
            };
            s.ptes.insert(vpn, new);
        }
        Ok(())
    }
}

/// The device page table of a [`TestMirror`]: entries by page address, and what it was told.
#[derive(Debug, Default)]
pub struct MirrorTable {
    /// Device entries (range_fault output) by page address.
    pub entries: BTreeMap<u64, u64>,
    /// Every invalidation applied, in order.
    pub invalidations: Vec<(Range, Event)>,
}

/// The smallest backend that follows the protocol: a device page table under an update lock,
/// torn down on every invalidation except its own migrations.
pub struct TestMirror {
    /// The update lock and the state it guards.
    pub table: UpdateLock<MirrorTable>,
    /// This mirror's owner identity.
    pub owner: Owner,
    /// Answer [`Pass::Finish`] and tear down in `invalidate_finish` (the two-pass form).
    pub two_pass: bool,
}

impl TestMirror {
    /// An empty mirror with owner `owner`.
    pub fn new(owner: Owner) -> Self {
        TestMirror {
            table: UpdateLock::new(MirrorTable::default()),
            owner,
            two_pass: false,
        }
    }

    /// Runs the full driver fault loop for `range` and copies the valid entries into the table.
    pub fn fault<S: PageSource + ?Sized>(
        &self,
        sub: &Subscription,
        source: &S,
        range: Range,
        write: bool,
    ) -> Result<FaultStats> {
        let mut entries = vec![0u64; range.pages() as usize];
        let mut req = FaultRequest::fault_all(range, &mut entries, write).with_owner(self.owner);
        let ((), stats) = fault_and_program(
            sub,
            &self.table,
            source,
            &mut req,
            crate::fault::DEFAULT_FAULT_TIMEOUT,
            |t, req| {
                for (i, &e) in req.entries.iter().enumerate() {
                    let addr = req.range.start() + ((i as u64) << PAGE_SHIFT);
                    if crate::fault::entry::is_valid(e) {
                        t.entries.insert(addr, e);
                    }
                }
            },
        )?;
        Ok(stats)
    }

    /// The device entry for `addr`, if any.
    pub fn entry(&self, addr: u64) -> Option<u64> {
        self.table.lock().entries.get(&addr).copied()
    }

    fn tear_down(table: &mut MirrorTable, ctx: &InvalidateCtx<'_>, range: &NotifierRange) {
        if let Some(r) = range.range.intersect(&ctx.subscription_range()) {
            let doomed: Vec<u64> = table
                .entries
                .range(r.start()..r.end())
                .map(|(&a, _)| a)
                .collect();
            for a in doomed {
                table.entries.remove(&a);
            }
        }
        table.invalidations.push((range.range, range.event));
    }
}

impl IntervalNotifierOps for TestMirror {
    fn invalidate(
        &self,
        ctx: &InvalidateCtx<'_>,
        range: &NotifierRange,
    ) -> Result<Pass, WouldBlock> {
        if range.is_own(self.owner) {
            return Ok(Pass::Done);
        }
        let mut t = ctx.lock_update(&self.table)?;
        if self.two_pass {
            return Ok(Pass::Finish);
        }
        Self::tear_down(&mut t, ctx, range);
        Ok(Pass::Done)
    }

    fn invalidate_finish(&self, ctx: &InvalidateCtx<'_>, range: &NotifierRange) {
        let mut t = self.table.lock();
        Self::tear_down(&mut t, ctx, range);
    }
}

/// A hook into the core's fault loop that lets a test force the interleaving the sequence
/// protocol exists for: an invalidation that lands after a fault has snapshotted the CPU page
/// table and prepared the device's pages, and before it takes the update lock to program them
/// (the window `mmu_interval_read_begin` / `mmu_interval_read_retry` close in the kernel).
///
/// Every backend's fault goes through [`fault_prepare_and_program`](crate::fault_prepare_and_program),
/// so one hook reaches all of them; it exists only with the `testing` feature. Arming is
/// process-wide and one-shot; an unarmed hook costs one atomic load per fault pass.
pub mod race {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::range::Range;

    type Hook = Box<dyn FnOnce(Range) + Send>;

    static ARMED: AtomicBool = AtomicBool::new(false);
    static HOOK: Mutex<Option<(Range, Hook)>> = Mutex::new(None);
    static FIRED: AtomicBool = AtomicBool::new(false);

    /// Arms the hook: the next fault pass over a range that overlaps `range` calls `f` with
    /// the pass's range once it has snapshotted and prepared, before it takes the update lock.
    /// `f` runs on the faulting thread with no svmirror lock held, so it may change the
    /// address space (an SVM API munmap, say). Replaces a hook that has not fired.
    pub fn arm(range: Range, f: impl FnOnce(Range) + Send + 'static) {
        let mut h = HOOK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *h = Some((range, Box::new(f)));
        FIRED.store(false, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
    }

    /// Disarms the hook; returns whether it fired since it was armed.
    pub fn disarm() -> bool {
        ARMED.store(false, Ordering::SeqCst);
        HOOK.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        FIRED.load(Ordering::SeqCst)
    }

    /// Called by the fault loop between *prepare* and taking the update lock.
    pub(crate) fn before_program(pass: Range) {
        if !ARMED.load(Ordering::Acquire) {
            return;
        }
        let hook = {
            let mut h = HOOK
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match h.as_ref() {
                Some((r, _)) if r.overlaps(&pass) => {
                    ARMED.store(false, Ordering::SeqCst);
                    h.take()
                }
                _ => None,
            }
        };
        if let Some((_, f)) = hook {
            f(pass);
            FIRED.store(true, Ordering::SeqCst);
        }
    }
}
