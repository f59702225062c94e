//! The DMA engine: a device thread working through a queue of commands, every access translated
//! by the [`Mmu`] and carried out through pins.
//!
//! # Commands and fences
//!
//! [`DmaEngine::submit`] queues a [`DmaCommand`] and returns a [`Fence`]; the device thread runs
//! commands in order and completes each fence with a [`Completion`] or an error. Each command
//! is split into accesses no longer than the leaves that translate them; each access is
//! translated and registered as in flight atomically, then done by the kernel through the pins
//! ([`PinPool`]), then ends.
//!
//! # Faults
//!
//! An access that misses (no translation) or breaks a permission is a device fault. It is
//! logged as a [`FaultRecord`]. In [`FaultMode::Recoverable`] the device raises a page request
//! (like PCIe PRI) to the driver's [`PageRequestHandler`], waits for the answer, and retries the
//! access; in [`FaultMode::Unrecoverable`], or when the driver cannot resolve it, the command
//! aborts with [`IommuError::DeviceFault`]. While it waits for an answer the device holds no
//! translation and no access is in flight, so an invalidation that waits for the device's work
//! ([`DmaEngine::wait_idle_range`]) never waits for a driver that waits for it.
//!
//! # Failing closed
//!
//! A device thread that panics, or makes no progress for longer than [`DmaConfig::watchdog`]
//! (outside page requests), fails the engine: every pending fence completes with
//! [`IommuError::DeviceDied`] or [`IommuError::DeviceHung`], new submissions are refused, and a
//! hung thread that wakes up again is refused every further access. The watchdog is checked by
//! whoever waits (fences, `wait_idle_range`, `submit`): there is no extra thread. A hung access
//! stays registered as in flight, so `wait_idle_range` reports the hang instead of declaring the
//! range idle, and the driver keeps those pins (DESIGN.md invariant 2).

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use svmirror_core::{Range, might_sleep};

pub use crate::command::{
    Access, Completion, DmaCommand, DmaConfig, DmaStats, FaultMode, FaultReason, FaultRecord,
    Injection, MAX_PARTS, PageRequest, PageRequestHandler,
};
use crate::error::{IommuError, Result};
use crate::mmu::{AccessGrant, Miss, Mmu};
use crate::page_table::IOVA_END;
use crate::pin::{PinPool, Target};

/// How often waiters wake to check the watchdog.
const POLL: Duration = Duration::from_millis(20);
/// Fault records kept; the count goes on past it.
const MAX_FAULT_RECORDS: usize = 1024;
/// Largest `Read` command (device memory it fills).
const MAX_READ: u64 = 1 << 30;
/// Bytes a `Fill` writes per access, at most (an invalidation of the range waits for one).
const FILL_CHUNK: u64 = 2 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Running,
    Stopped,
    Died,
    Hung(Duration),
}

impl Status {
    fn error(self) -> IommuError {
        match self {
            Status::Running | Status::Stopped => IommuError::EngineStopped,
            Status::Died => IommuError::DeviceDied,
            Status::Hung(stalled) => IommuError::DeviceHung { stalled },
        }
    }
}

/// Where a fence's result lands.
/// The handler that settled an access and the position it gave
/// ([`PageRequestHandler::changed_since`]).
type Settled = (Arc<dyn PageRequestHandler>, u64);

struct FenceSlot {
    result: Mutex<Option<Result<Completion>>>,
    done: Condvar,
    /// Set (after `result`) when the result is in: what a spinning waiter watches.
    ready: AtomicBool,
}

impl FenceSlot {
    fn new() -> Arc<FenceSlot> {
        Arc::new(FenceSlot {
            result: Mutex::new(None),
            done: Condvar::new(),
            ready: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Result<Completion>>> {
        self.result.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the result unless one was set already (a fence failed closed keeps its error).
    fn complete(&self, r: Result<Completion>) -> bool {
        let mut g = self.lock();
        let first = g.is_none();
        if first {
            *g = Some(r);
        }
        drop(g);
        self.ready.store(true, Ordering::Release);
        self.done.notify_all();
        first
    }
}

struct Job {
    cmd: DmaCommand,
    fence: Arc<FenceSlot>,
}

/// The queue and the engine's status, under one lock.
///
/// `status` moves from `Running` to one of the others, once. `current` is the fence of the
/// command the device thread runs; failing closed completes it and every queued fence.
struct State {
    queue: VecDeque<Job>,
    current: Option<Arc<FenceSlot>>,
    status: Status,
}

struct Shared {
    mmu: Arc<Mmu>,
    pins: Arc<PinPool>,
    config: DmaConfig,
    state: Mutex<State>,
    /// Signalled on new work, on each command's end and when the status changes.
    changed: Condvar,
    /// Commands submitted so far: what the device thread watches while it spins idle.
    submitted: AtomicU64,
    handler: Mutex<Option<Arc<dyn PageRequestHandler>>>,
    epoch: Instant,
    /// Nanoseconds since `epoch` of the device's last progress.
    progress: AtomicU64,
    in_page_request: AtomicBool,
    faults: Mutex<VecDeque<FaultRecord>>,
    stats: Mutex<DmaStats>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn touch(&self) {
        let ns = self.epoch.elapsed().as_nanos() as u64;
        self.progress.store(ns, Ordering::Relaxed);
    }

    fn stat(&self, f: impl FnOnce(&mut DmaStats)) {
        f(&mut relock(&self.stats));
    }

    /// Moves the engine out of `Running` and completes every pending fence with the error.
    fn fail_closed(&self, status: Status) {
        let mut st = relock(&self.state);
        if st.status != Status::Running {
            return;
        }
        st.status = status;
        let queued: Vec<Job> = st.queue.drain(..).collect();
        let current = st.current.clone();
        drop(st);
        if !matches!(status, Status::Stopped) {
            tracing::error!(?status, "DMA engine failed closed");
        }
        for job in queued {
            job.fence.complete(Err(status.error()));
        }
        if let (Some(f), false) = (current, status == Status::Stopped) {
            f.complete(Err(status.error()));
        }
        self.changed.notify_all();
    }

    /// Declares the device hung if it has run one command without progress for too long.
    fn check_watchdog(&self) {
        let st = relock(&self.state);
        if st.status != Status::Running
            || st.current.is_none()
            || self.in_page_request.load(Ordering::Relaxed)
        {
            return;
        }
        drop(st);
        let now = self.epoch.elapsed().as_nanos() as u64;
        let stalled =
            Duration::from_nanos(now.saturating_sub(self.progress.load(Ordering::Relaxed)));
        if stalled > self.config.watchdog {
            self.fail_closed(Status::Hung(stalled));
        }
    }

    fn status(&self) -> Status {
        relock(&self.state).status
    }

    /// Ends the current command with `r`: the device is free for the next one.
    fn finish(&self, fence: &FenceSlot, r: Result<Completion>) {
        relock(&self.state).current = None;
        let ok = r.is_ok();
        if fence.complete(r) {
            self.stat(|s| if ok { s.completed += 1 } else { s.failed += 1 });
        }
        self.changed.notify_all();
    }

    /// Runs the command of `fence` on the calling thread if it is next and the device is idle
    /// (no command running, the engine healthy): what a waiter does instead of handing the
    /// command to the device thread and sleeping until it hands the result back, two thread
    /// wake-ups that cost tens of microseconds on a loaded machine. The device keeps its
    /// contract: one command at a time (the waiter holds `current`, which the device thread
    /// respects), in submission order (only the head of the queue), under the watchdog (which
    /// watches `current`), failing closed if the command panics. Injected faults always run
    /// on the device thread, whose failures they exist to test. Returns whether it ran it.
    fn run_if_next(&self, fence: &Arc<FenceSlot>) -> bool {
        let job = {
            let mut st = relock(&self.state);
            let next = st.status == Status::Running
                && st.current.is_none()
                && st.queue.front().is_some_and(|j| {
                    Arc::ptr_eq(&j.fence, fence) && !matches!(j.cmd, DmaCommand::Inject(_))
                });
            if !next {
                return false;
            }
            let Some(job) = st.queue.pop_front() else {
                return false;
            };
            st.current = Some(job.fence.clone());
            job
        };
        self.touch();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.execute(job.cmd)));
        match r {
            Ok(r) => {
                self.stat(|s| s.run_by_waiter += 1);
                self.finish(&job.fence, r);
            }
            Err(_) => {
                // As if the device thread had died: every pending fence, this one included,
                // completes with the error.
                self.fail_closed(Status::Died);
                relock(&self.state).current = None;
            }
        }
        true
    }

    fn record(&self, miss: Miss, resolved: bool) {
        let mut log = relock(&self.faults);
        if log.len() == MAX_FAULT_RECORDS {
            log.pop_front();
        }
        log.push_back(FaultRecord {
            iova: miss.iova,
            access: miss.access,
            reason: miss.reason,
            resolved,
        });
        drop(log);
        self.stat(|s| s.faults += 1);
    }

    /// Translates and claims an access, raising page requests on faults as the mode allows.
    fn access(
        &self,
        reqs: &[(u64, Access)],
        max_len: u64,
        c: &mut Completion,
    ) -> Result<AccessGrant<'_>> {
        self.access_settled(reqs, max_len, c).map(|(g, _)| g)
    }

    /// [`access`](Self::access), also returning the driver's settle position for the first
    /// request, taken before the grant (for [`PageRequestHandler::changed_since`]) and the
    /// handler that gave it.
    fn access_settled(
        &self,
        reqs: &[(u64, Access)],
        max_len: u64,
        c: &mut Completion,
    ) -> Result<(AccessGrant<'_>, Option<Settled>)> {
        let mut tries = 0;
        loop {
            if let s @ (Status::Died | Status::Hung(_)) = self.status() {
                return Err(s.error());
            }
            // No translation is used that a CPU change which already returned has ended: the
            // driver waits for its invalidations of such changes first (svmirror-mm learns of
            // a munmap only after it returns). A change returning after this point overlaps
            // the access, which is then ordered before it.
            let settled = self.settle(reqs, max_len)?;
            let miss = match self.mmu.begin_access(reqs, max_len) {
                Ok(g) => return Ok((g, settled)),
                Err(miss) => miss,
            };
            let fault = |source| IommuError::DeviceFault {
                iova: miss.iova,
                access: miss.access,
                reason: miss.reason,
                source,
            };
            let handler = (self.config.fault_mode == FaultMode::Recoverable
                && miss.reason != FaultReason::OutsideIovaSpace
                && tries < self.config.max_page_requests)
                .then(|| relock(&self.handler).clone())
                .flatten();
            let Some(handler) = handler else {
                self.record(miss, false);
                return Err(fault(None));
            };
            tries += 1;
            c.page_requests += 1;
            self.stat(|s| s.page_requests += 1);
            self.in_page_request.store(true, Ordering::Relaxed);
            let r = handler.page_request(&PageRequest {
                iova: miss.iova,
                len: max_len,
                access: miss.access,
                reason: miss.reason,
            });
            self.touch();
            self.in_page_request.store(false, Ordering::Relaxed);
            self.record(miss, r.is_ok());
            if let Err(e) = r {
                return Err(fault(Some(Box::new(e))));
            }
        }
    }

    /// Waits, through the handler, for the CPU changes over the requests that may already
    /// have returned (see [`access_settled`](Self::access_settled)); returns the handler and
    /// the position its first request settled at.
    fn settle(&self, reqs: &[(u64, Access)], max_len: u64) -> Result<Option<Settled>> {
        let Some(h) = relock(&self.handler).clone() else {
            return Ok(None);
        };
        let mut first = None;
        for &(iova, access) in reqs {
            let since = h
                .settle(iova, max_len)
                .map_err(|e| IommuError::DeviceFault {
                    iova,
                    access,
                    reason: FaultReason::NotMapped,
                    source: Some(Box::new(e)),
                })?;
            first.get_or_insert(since);
        }
        Ok(first.map(|since| (h, since)))
    }

    /// Claims the next pieces of a gather's or scatter's `parts` from `cur` on: at most
    /// [`MANY_BATCH`] pieces and [`MANY_BYTES`] bytes, each translated, settled and registered
    /// in flight as a single access is.
    ///
    /// Nothing that may wait for an invalidation runs while a piece is in flight, because an
    /// invalidation waits for the device's accesses in flight on its range: the batch's parts
    /// are settled first, with nothing claimed (settling waits until the monitor has handled
    /// the CPU changes over them, svmirror-mm's `Queue::settle`), and only the first piece may
    /// raise page requests (see "Faults" in the module documentation). A later piece that
    /// misses ends the batch (it is moved, its accesses end, and the next batch starts with
    /// the miss); so does a first piece that raised one, whose wait may have let CPU changes
    /// over the other parts return.
    fn claim_batch(
        &self,
        parts: &[(u64, u64)],
        cur: &mut Cursor,
        access: Access,
        c: &mut Completion,
    ) -> Result<Vec<Piece<'_>>> {
        let first = cur.part;
        let settled = parts[first..]
            .iter()
            .take(MANY_BATCH)
            .enumerate()
            .map(|(i, &(a, len))| {
                let done = if i == 0 { cur.done } else { 0 };
                self.settle(&[(a + done, access)], len - done)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut batch: Vec<Piece<'_>> = Vec::new();
        let mut bytes = 0;
        while cur.part < first + settled.len() && batch.len() < MANY_BATCH && bytes < MANY_BYTES {
            let (addr, len) = parts[cur.part];
            let (iova, want) = (addr + cur.done, len - cur.done);
            let mut alone = false;
            let (grant, settled) = if batch.is_empty() {
                let asked = c.page_requests;
                let claimed = self.access_settled(&[(iova, access)], want, c)?;
                alone = c.page_requests != asked;
                claimed
            } else {
                match self.mmu.begin_access(&[(iova, access)], want) {
                    Ok(g) => (g, settled[cur.part - first].clone()),
                    Err(_) => break,
                }
            };
            let n = grant.len;
            batch.push(Piece {
                grant,
                iova,
                off: cur.off,
                settled,
            });
            bytes += n;
            cur.off += n as usize;
            cur.done += n;
            if cur.done == len {
                cur.part += 1;
                cur.done = 0;
            }
            if alone {
                break;
            }
        }
        Ok(batch)
    }

    /// Reads `data.len()` bytes at `src` into `data` (the `Read` command's work).
    fn read_into(&self, src: u64, data: &mut [u8], c: &mut Completion) -> Result<()> {
        let len = data.len() as u64;
        let mut done = 0;
        while done < len {
            let (at, want) = (src + done, len - done);
            let (g, settled) = self.access_settled(&[(at, Access::Read)], want, c)?;
            let part = &mut data[done as usize..(done + g.len) as usize];
            self.pins.read(g.target(0), part)?;
            let n = g.len;
            drop(g);
            // A read that overlapped a CPU change the driver learns of only after it is
            // made (mremap moves the page, then tells) may have seen the page after the
            // move, through its new address: read again, after the change.
            if settled.is_some_and(|(h, since)| h.changed_since(at, n, since)) {
                self.stat(|s| s.reads_retried += 1);
                continue;
            }
            done += n;
            self.touch();
        }
        Ok(())
    }

    /// The page request group of a command (PCIe PRI's "page request group": several pages in
    /// one message): before a command that spans more than one page starts, the device walks
    /// its page table over every page the command will touch and raises the runs that miss
    /// (or are read-only for a write) together, in address order, for the driver to resolve
    /// in one batch ([`PageRequestHandler::page_requests`]). Best effort: what the batch left
    /// unmapped faults as before, one access at a time, and reports its error there. Asks
    /// for nothing the command does not touch.
    fn prefault(&self, extents: &[(u64, u64, Access)], c: &mut Completion) {
        const PAGE: u64 = svmirror_core::PAGE_SIZE;
        /// Pages walked per hold of the page-level lock.
        const WALK: usize = 512;
        if self.config.fault_mode != FaultMode::Recoverable {
            return;
        }
        let one_page = |&(a, len, _): &(u64, u64, Access)| (a + len - 1) / PAGE == a / PAGE;
        if extents.len() == 1 && one_page(&extents[0]) {
            // A single-page access faults on its own: nothing to batch.
            return;
        }
        let Some(h) = relock(&self.handler).clone() else {
            return;
        };
        let mut pages = extents.iter().flat_map(|&(a, len, access)| {
            let end = a.saturating_add(len).min(IOVA_END);
            (a / PAGE..end.div_ceil(PAGE)).map(move |p| (p * PAGE, access))
        });
        let mut reqs: Vec<PageRequest> = Vec::new();
        loop {
            let chunk: Vec<(u64, Access)> = pages.by_ref().take(WALK).collect();
            if chunk.is_empty() {
                break;
            }
            self.mmu.with(|s| {
                let pt = s.page_table();
                for (p, access) in chunk {
                    let reason = match pt.translate(p) {
                        None => FaultReason::NotMapped,
                        Some(t) if access == Access::Write && !t.perms.writable() => {
                            FaultReason::ReadOnly
                        }
                        Some(_) => continue,
                    };
                    match reqs.last_mut() {
                        Some(l) if l.access == access && l.iova + l.len == p => l.len += PAGE,
                        Some(l) if l.access == access && l.iova <= p && p < l.iova + l.len => {}
                        _ => reqs.push(PageRequest {
                            iova: p,
                            len: PAGE,
                            access,
                            reason,
                        }),
                    }
                }
            });
        }
        if reqs.is_empty() {
            return;
        }
        // Parts come in any order: address order, runs that meet or overlap merged.
        reqs.sort_by_key(|r| (r.iova, r.access == Access::Read));
        let mut merged: Vec<PageRequest> = Vec::with_capacity(reqs.len());
        for r in reqs {
            match merged.last_mut() {
                Some(l) if l.access == r.access && r.iova <= l.iova + l.len => {
                    l.len = l.len.max(r.iova + r.len - l.iova);
                }
                _ => merged.push(r),
            }
        }
        let n = merged.len() as u64;
        c.page_requests += n as u32;
        self.stat(|s| {
            s.page_requests += n;
            s.page_request_batches += 1;
            s.page_requests_batched += n;
        });
        self.in_page_request.store(true, Ordering::Relaxed);
        h.page_requests(&merged);
        self.touch();
        self.in_page_request.store(false, Ordering::Relaxed);
        // Each request is a device fault, logged with whether the driver mapped its first page.
        for r in merged {
            let resolved = self.mmu.with(|s| {
                s.page_table()
                    .translate(r.iova)
                    .is_some_and(|t| r.access == Access::Read || t.perms.writable())
            });
            let miss = Miss {
                iova: r.iova,
                access: r.access,
                reason: r.reason,
            };
            self.record(miss, resolved);
        }
    }

    fn execute(&self, cmd: DmaCommand) -> Result<Completion> {
        let mut c = Completion::default();
        let extents: Vec<(u64, u64, Access)> = match &cmd {
            DmaCommand::Copy { src, dst, len } => {
                vec![(*src, *len, Access::Read), (*dst, *len, Access::Write)]
            }
            DmaCommand::Fill { dst, len, .. } => vec![(*dst, *len, Access::Write)],
            DmaCommand::Read { src, len } => vec![(*src, *len, Access::Read)],
            DmaCommand::Write { dst, data } => vec![(*dst, data.len() as u64, Access::Write)],
            DmaCommand::Gather { parts } => {
                parts.iter().map(|&(a, l)| (a, l, Access::Read)).collect()
            }
            DmaCommand::Scatter { parts, .. } => {
                parts.iter().map(|&(a, l)| (a, l, Access::Write)).collect()
            }
            DmaCommand::AtomicAdd { .. } | DmaCommand::Inject(_) => Vec::new(),
        };
        if !extents.is_empty() {
            self.prefault(&extents, &mut c);
        }
        match cmd {
            DmaCommand::Copy { src, dst, len } => {
                let mut done = 0;
                while done < len {
                    let g = self.access(
                        &[(src + done, Access::Read), (dst + done, Access::Write)],
                        len - done,
                        &mut c,
                    )?;
                    self.pins.copy(g.target(0), g.target(1), g.len)?;
                    done += g.len;
                    self.touch();
                }
            }
            DmaCommand::Fill { dst, len, value } => {
                let mut done = 0;
                while done < len {
                    let max = (len - done).min(FILL_CHUNK);
                    let g = self.access(&[(dst + done, Access::Write)], max, &mut c)?;
                    self.pins.fill(g.target(0), g.len, value)?;
                    done += g.len;
                    self.touch();
                }
            }
            DmaCommand::Read { src, len } => {
                let mut data = vec![0u8; len as usize];
                self.read_into(src, &mut data, &mut c)?;
                c.data = data;
            }
            DmaCommand::Gather { parts } => {
                // Parts close together in one page are read as one span (one claim, one
                // transfer), then handed out in the parts' order.
                let (spans, place) = coalesce(&parts);
                let total: u64 = spans.iter().map(|p| p.1).sum();
                let mut data = vec![0u8; total as usize];
                let mut cur = Cursor::default();
                while cur.part < spans.len() {
                    let batch = self.claim_batch(&spans, &mut cur, Access::Read, &mut c)?;
                    let targets: Vec<(Target, u64)> = batch
                        .iter()
                        .map(|p| (p.grant.target(0), p.grant.len))
                        .collect();
                    let from = batch.first().map_or(0, |p| p.off);
                    self.pins.read_many(&targets, &mut data[from..cur.off])?;
                    // Every access of the batch ends before any is read again (a re-read may
                    // raise a page request).
                    let again: Vec<(u64, usize, u64, Option<Settled>)> = batch
                        .into_iter()
                        .map(|p| (p.iova, p.off, p.grant.len, p.settled))
                        .collect();
                    for (iova, off, n, settled) in again {
                        // As for `Read`: a piece that overlapped a CPU change the driver
                        // learns of only after it is made is read again, after the change.
                        if settled.is_some_and(|(h, since)| h.changed_since(iova, n, since)) {
                            self.stat(|s| s.reads_retried += 1);
                            self.read_into(iova, &mut data[off..off + n as usize], &mut c)?;
                        }
                    }
                    self.touch();
                }
                let mut out = Vec::with_capacity(parts.iter().map(|p| p.1 as usize).sum());
                for (&(_, len), &at) in parts.iter().zip(&place) {
                    out.extend_from_slice(&data[at..at + len as usize]);
                }
                c.data = out;
            }
            DmaCommand::Scatter { parts, data } => {
                let mut cur = Cursor::default();
                while cur.part < parts.len() {
                    let batch = self.claim_batch(&parts, &mut cur, Access::Write, &mut c)?;
                    let targets: Vec<(Target, u64)> = batch
                        .iter()
                        .map(|p| (p.grant.target(0), p.grant.len))
                        .collect();
                    let from = batch.first().map_or(0, |p| p.off);
                    self.pins.write_many(&targets, &data[from..cur.off])?;
                    drop(batch);
                    self.touch();
                }
            }
            DmaCommand::Write { dst, data } => {
                let len = data.len() as u64;
                let mut done = 0;
                while done < len {
                    let g = self.access(&[(dst + done, Access::Write)], len - done, &mut c)?;
                    self.pins
                        .write(g.target(0), &data[done as usize..(done + g.len) as usize])?;
                    done += g.len;
                    self.touch();
                }
            }
            DmaCommand::AtomicAdd { addr, value } => {
                let g = self.access(&[(addr, Access::Write)], 8, &mut c)?;
                let mut old = [0u8; 8];
                self.pins.read(g.target(0), &mut old)?;
                let old = u64::from_ne_bytes(old);
                self.pins
                    .write(g.target(0), &old.wrapping_add(value).to_ne_bytes())?;
                c.old_value = Some(old);
            }
            DmaCommand::Inject(Injection::Panic) => panic!("svmirror-iommu: injected device crash"),
            DmaCommand::Inject(Injection::Stall(d)) => std::thread::sleep(d),
            DmaCommand::Inject(Injection::StallDuringAccess { iova, duration }) => {
                let _g = self.access(&[(iova, Access::Read)], 1, &mut c)?;
                std::thread::sleep(duration);
            }
        }
        Ok(c)
    }
}

fn validate(cmd: &DmaCommand) -> Result<()> {
    let bad = |iova, reason| Err(IommuError::InvalidCommand { iova, reason });
    let span = |a: u64, len: u64| len > 0 && a.checked_add(len).is_some();
    match *cmd {
        DmaCommand::Copy { src, dst, len } if !span(src, len) || !span(dst, len) => {
            bad(src, "empty or overflowing copy")
        }
        DmaCommand::Fill { dst, len, .. } if !span(dst, len) => {
            bad(dst, "empty or overflowing fill")
        }
        DmaCommand::Read { src, len } if !span(src, len) || len > MAX_READ => {
            bad(src, "read must be 1 byte to 1 GiB")
        }
        DmaCommand::Write { dst, ref data } if !span(dst, data.len() as u64) => {
            bad(dst, "empty or overflowing write")
        }
        DmaCommand::Gather { ref parts } => validate_parts(parts, None),
        DmaCommand::Scatter {
            ref parts,
            ref data,
        } => validate_parts(parts, Some(data.len() as u64)),
        DmaCommand::AtomicAdd { addr, .. } if addr % 8 != 0 => bad(addr, "atomic is not 8-aligned"),
        _ => Ok(()),
    }
}

/// Checks a gather's or scatter's parts: 1 to [`MAX_PARTS`] parts, none empty or overflowing,
/// at most [`MAX_READ`] bytes in all and, for a scatter, as many as it carries.
fn validate_parts(parts: &[(u64, u64)], carried: Option<u64>) -> Result<()> {
    let bad = |iova, reason| Err(IommuError::InvalidCommand { iova, reason });
    if parts.is_empty() || parts.len() > MAX_PARTS {
        return bad(0, "a gather or scatter names 1 to MAX_PARTS parts");
    }
    let mut total = 0u64;
    for &(a, len) in parts {
        if len == 0 || a.checked_add(len).is_none() {
            return bad(a, "empty or overflowing part");
        }
        total = total.saturating_add(len);
    }
    if total > MAX_READ {
        return bad(parts[0].0, "a gather or scatter moves at most 1 GiB");
    }
    if carried.is_some_and(|n| n != total) {
        return bad(
            parts[0].0,
            "the scatter's data is not the parts' total length",
        );
    }
    Ok(())
}

/// Largest gap between two parts of a gather that are read as one span.
const COALESCE_GAP: u64 = 256;

/// A gather's parts as spans to read, in address order: parts in one page no more than
/// [`COALESCE_GAP`] bytes apart (or overlapping) become one span; a part that crosses a page
/// stays its own. A span reads nothing outside the pages its parts touch, so it needs no
/// translation the parts do not. Returns the spans and, for each part in order, the offset of
/// its bytes in the spans read one after the other.
fn coalesce(parts: &[(u64, u64)]) -> (Vec<(u64, u64)>, Vec<usize>) {
    const PAGE: u64 = svmirror_core::PAGE_SIZE;
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_unstable_by_key(|&i| parts[i].0);
    let mut spans: Vec<(u64, u64)> = Vec::new();
    // For each part: its span and its offset in it.
    let mut within = vec![(0usize, 0u64); parts.len()];
    for i in order {
        let (a, len) = parts[i];
        let end = a + len;
        let one_page = (end - 1) / PAGE == a / PAGE;
        let n = spans.len();
        match spans.last_mut() {
            Some((s, l))
                if one_page
                    && (*s + *l - 1) / PAGE == *s / PAGE
                    && a / PAGE == *s / PAGE
                    && a <= *s + *l + COALESCE_GAP =>
            {
                *l = (*l).max(end - *s);
                within[i] = (n - 1, a - *s);
            }
            _ => {
                within[i] = (n, 0);
                spans.push((a, len));
            }
        }
    }
    let mut starts = Vec::with_capacity(spans.len());
    let mut at = 0usize;
    for &(_, l) in &spans {
        starts.push(at);
        at += l as usize;
    }
    let place = within
        .into_iter()
        .map(|(span, off)| starts[span] + off as usize)
        .collect();
    (spans, place)
}

/// Where a gather or scatter is: the part, the bytes of it done, the offset in the device
/// memory.
#[derive(Default)]
struct Cursor {
    part: usize,
    done: u64,
    off: usize,
}

/// One claimed piece of a gather or scatter.
struct Piece<'a> {
    grant: AccessGrant<'a>,
    iova: u64,
    off: usize,
    settled: Option<Settled>,
}

/// Pieces one batch of a gather or scatter claims at most.
const MANY_BATCH: usize = 256;
/// Bytes one batch of a gather or scatter claims at most (it may end one piece past).
const MANY_BYTES: u64 = 4 << 20;

/// Spins for up to `limit` until `done` holds; returns whether it did. Every few dozen spins it
/// checks the clock and yields the CPU: on an idle machine the yield returns at once and the
/// CPU stays awake, on a busy one the thread this one waits for (or any other) runs instead of
/// waiting for the spin to end. (Spinning without yielding made a 4 KiB fault 20 times slower
/// than parking on a 2-core machine under a load of 6.)
fn spin_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    if limit.is_zero() {
        return done();
    }
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= limit {
            return done();
        }
        std::thread::yield_now();
    }
}

/// Fails the engine if the device thread unwinds.
struct DeathWatch(Arc<Shared>);

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail_closed(Status::Died);
        }
    }
}

fn device_thread(shared: Arc<Shared>) {
    let watch = DeathWatch(shared);
    let sh = &*watch.0;
    loop {
        let job = {
            let mut st = relock(&sh.state);
            let mut spun = false;
            loop {
                if st.status != Status::Running {
                    return;
                }
                // A waiter running the head command itself holds `current`: commands run
                // one at a time, in order, whoever runs them.
                if st.current.is_none() {
                    if let Some(job) = st.queue.pop_front() {
                        st.current = Some(job.fence.clone());
                        break job;
                    }
                }
                if spun {
                    st = sh.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                    spun = false;
                    continue;
                }
                // Idle: spin a little for the next command before parking (see
                // `DmaConfig::spin`). A submission during the spin is seen by the counter; one
                // after it finds the thread parked and wakes it (it queues under the lock).
                let seen = sh.submitted.load(Ordering::Acquire);
                drop(st);
                spin_until(sh.config.spin, || {
                    sh.submitted.load(Ordering::Acquire) != seen
                });
                spun = true;
                st = relock(&sh.state);
            }
        };
        sh.touch();
        let r = sh.execute(job.cmd);
        sh.finish(&job.fence, r);
    }
}

/// The DMA device. See the [module documentation](self). Dropping it shuts it down.
pub struct DmaEngine {
    handle: DmaHandle,
    thread: Option<JoinHandle<()>>,
}

/// A shared handle on a [`DmaEngine`] for drivers: wait for work in flight, check health.
#[derive(Clone)]
pub struct DmaHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for DmaEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.handle.fmt(f)
    }
}

impl fmt::Debug for DmaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaEngine")
            .field("status", &self.shared.status())
            .field("stats", &self.stats())
            .finish()
    }
}

impl DmaEngine {
    /// Starts the device thread over `mmu` and `pins`.
    pub fn new(mmu: Arc<Mmu>, pins: Arc<PinPool>, config: DmaConfig) -> Result<DmaEngine> {
        let shared = Arc::new(Shared {
            mmu,
            pins,
            config,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                current: None,
                status: Status::Running,
            }),
            changed: Condvar::new(),
            submitted: AtomicU64::new(0),
            handler: Mutex::new(None),
            epoch: Instant::now(),
            progress: AtomicU64::new(0),
            in_page_request: AtomicBool::new(false),
            faults: Mutex::new(VecDeque::new()),
            stats: Mutex::new(DmaStats::default()),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("svmirror-dma".into())
            .spawn(move || device_thread(s))
            .map_err(|source| IommuError::Spawn { source })?;
        Ok(DmaEngine {
            handle: DmaHandle { shared },
            thread: Some(thread),
        })
    }

    /// Installs the driver that answers page requests (recoverable mode).
    pub fn set_page_request_handler(&self, handler: Arc<dyn PageRequestHandler>) {
        *relock(&self.handle.shared.handler) = Some(handler);
    }

    /// A shared handle for drivers.
    pub fn handle(&self) -> DmaHandle {
        self.handle.clone()
    }

    /// Queues `cmd`. Errors: [`IommuError::InvalidCommand`]; the engine's failure
    /// ([`IommuError::DeviceDied`], [`IommuError::DeviceHung`]) or [`IommuError::EngineStopped`].
    pub fn submit(&self, cmd: DmaCommand) -> Result<Fence> {
        validate(&cmd)?;
        let sh = &self.handle.shared;
        let _span = tracing::trace_span!("dma.submit", cmd = cmd.name()).entered();
        sh.check_watchdog();
        let fence = FenceSlot::new();
        let mut st = relock(&sh.state);
        if st.status != Status::Running {
            return Err(st.status.error());
        }
        st.queue.push_back(Job {
            cmd,
            fence: fence.clone(),
        });
        sh.submitted.fetch_add(1, Ordering::Release);
        drop(st);
        sh.stat(|s| s.submitted += 1);
        sh.changed.notify_all();
        Ok(Fence {
            slot: fence,
            shared: sh.clone(),
        })
    }

    /// See [`DmaHandle::wait_idle_range`].
    pub fn wait_idle_range(&self, range: Range) -> Result<()> {
        self.handle.wait_idle_range(range)
    }

    /// Waits until the queue is empty and no command runs. May sleep.
    pub fn wait_idle(&self) -> Result<()> {
        might_sleep("DmaEngine::wait_idle");
        let sh = &self.handle.shared;
        let mut st = relock(&sh.state);
        loop {
            match st.status {
                Status::Running if st.queue.is_empty() && st.current.is_none() => return Ok(()),
                Status::Running => {}
                s => return Err(s.error()),
            }
            st = sh
                .changed
                .wait_timeout(st, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            drop(st);
            sh.check_watchdog();
            st = relock(&sh.state);
        }
    }

    /// Device faults logged (the last 1024).
    pub fn faults(&self) -> Vec<FaultRecord> {
        relock(&self.handle.shared.faults).iter().copied().collect()
    }

    /// The counters.
    pub fn stats(&self) -> DmaStats {
        self.handle.stats()
    }

    /// Stops taking commands, fails the queued ones with [`IommuError::EngineStopped`], lets the
    /// running one finish and joins the device thread (unless it hung: then it is left behind,
    /// with the pins it may still use). Idempotent.
    pub fn shutdown(&mut self) {
        let sh = &self.handle.shared;
        sh.fail_closed(Status::Stopped);
        if let Some(t) = self.thread.take() {
            if matches!(sh.status(), Status::Hung(_)) {
                tracing::error!("DMA device thread hung; leaving it behind");
            } else {
                // A panic was already turned into `Died`.
                let _ = t.join();
            }
        }
        relock(&sh.handler).take();
    }
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl DmaHandle {
    /// Waits until no device access in flight touches `range` (what an invalidation does before
    /// it releases pins). A command waiting on a page request has none in flight. Errors:
    /// [`IommuError::DeviceHung`] when the device stops making progress with an access in the
    /// range still in flight (its pins must then be kept).
    pub fn wait_idle_range(&self, range: Range) -> Result<()> {
        might_sleep("DmaHandle::wait_idle_range");
        let sh = &self.shared;
        loop {
            if sh.mmu.wait_drained(range, Instant::now() + POLL) {
                return Ok(());
            }
            sh.check_watchdog();
            if let Status::Hung(stalled) = sh.status() {
                return Err(IommuError::DeviceHung { stalled });
            }
        }
    }

    /// Whether the engine failed (died or hung).
    pub fn has_failed(&self) -> bool {
        matches!(self.shared.status(), Status::Died | Status::Hung(_))
    }

    /// The counters.
    pub fn stats(&self) -> DmaStats {
        *relock(&self.shared.stats)
    }
}

/// Completion of one submitted command.
#[must_use = "a fence reports whether the command worked"]
pub struct Fence {
    slot: Arc<FenceSlot>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fence")
            .field("done", &self.is_done())
            .finish()
    }
}

impl Fence {
    /// Whether the command finished (or the engine failed).
    pub fn is_done(&self) -> bool {
        self.slot.lock().is_some()
    }

    /// Waits for the command and returns its result. May sleep; checks the watchdog while it
    /// waits, so a hung device fails this fence instead of blocking forever.
    pub fn wait(self) -> Result<Completion> {
        might_sleep("Fence::wait");
        // An idle device: run the command here rather than wake the device thread for it.
        self.shared.run_if_next(&self.slot);
        // Short commands finish within the spin (see `DmaConfig::spin`): no wake-up needed.
        spin_until(self.shared.config.spin, || {
            self.slot.ready.load(Ordering::Acquire)
        });
        loop {
            let g = self.slot.lock();
            let (mut g, _) = self
                .slot
                .done
                .wait_timeout_while(g, POLL, |r| r.is_none())
                .unwrap_or_else(|p| p.into_inner());
            if let Some(r) = g.take() {
                return r;
            }
            drop(g);
            self.shared.check_watchdog();
        }
    }
}

#[cfg(test)]
#[path = "dma_tests.rs"]
mod tests;
