//! The fault service of an [`IommuMirror`](super::IommuMirror): the [`Resolver`] answers the
//! device's page requests (and [`IommuMirror::fault`](super::IommuMirror::fault)) by picking the
//! run to map and running the core's fault loop over it (see "Fault path" in the
//! [module documentation](super)).

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use svmirror_core::MirrorError;
use svmirror_core::{
    AreaKind, CpuPte, FaultRequest, FaultSteps, PAGE_SIZE, PageSource, Range, Subscription,
    UpdateGuard, entry, fault_prepare_and_program,
};

use super::{Backing, MirrorInner, MirrorState, Prefetch, core_err};
use crate::dma::{Access, PageRequest, PageRequestHandler};
use crate::error::{IommuError, Result};
use crate::page_table::{IOVA_END, Perms, iova_space};
use crate::pin::Pin;

/// The driver side of page requests: the subscription and the CPU page table.
pub(super) struct Resolver {
    pub(super) inner: Arc<MirrorInner>,
    pub(super) sub: Subscription,
    pub(super) source: Arc<dyn PageSource + Send + Sync>,
    /// Faults in the windows ahead of a device sweeping memory (see [`Ahead`]).
    pub(super) ahead: Ahead,
}

/// A page request group that is one run over at least this many fault windows is a device
/// sweeping memory: its later windows are faulted in ahead of the device (see [`Ahead`]).
pub(crate) const AHEAD_MIN_WINDOWS: u64 = 4;

/// Faulting in ahead of a sweeping device. A command over many fault windows of first-touch
/// memory spends as long faulting the pages in (`range_fault`, the CPU's page faults) as the
/// device then spends writing them. Resolving the whole group before the command starts puts
/// the two one after the other. Instead the first window is resolved at once, and a thread of
/// the mirror's ("svmirror-ahead", started on first use) faults in the windows after it, in
/// order, while the device writes: each later window is then resolved when the device reaches
/// it (its own page request), and finds its pages there. The thread only does what a CPU
/// thread touching the memory would (`PageSource::fault`), and only on pages the command
/// touches (so [`Prefetch::Demand`] still holds); it maps nothing on the device, and a window
/// it could not fault in is faulted in, or refused with the reason, by the device's request.
#[derive(Default)]
pub(super) struct Ahead {
    tx: std::sync::Mutex<Option<std::sync::mpsc::Sender<(Range, bool)>>>,
}

impl Ahead {
    /// Queues `r` (pages the device will touch, `write` if it writes them) for the thread,
    /// starting it on first use. Returns whether it was queued.
    fn queue(
        &self,
        source: &Arc<dyn PageSource + Send + Sync>,
        win: u64,
        r: Range,
        write: bool,
    ) -> bool {
        let mut tx = self
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if tx.is_none() {
            let (sender, rx) = std::sync::mpsc::channel::<(Range, bool)>();
            let source = source.clone();
            let spawned = std::thread::Builder::new()
                .name("svmirror-ahead".into())
                .spawn(move || {
                    // Ends when the resolver drops its sender.
                    while let Ok((r, write)) = rx.recv() {
                        let mut at = r.start();
                        while at < r.end() {
                            let next = ((at & !(win - 1)) + win).min(r.end());
                            let Ok(w) = Range::new(at, next) else { break };
                            if let Err(e) = source.fault(w, write) {
                                tracing::debug!(range = %w, error = %e, "fault-in ahead stopped");
                                break;
                            }
                            at = next;
                        }
                    }
                });
            match spawned {
                Ok(_) => *tx = Some(sender),
                Err(e) => {
                    tracing::debug!(error = %e, "no fault-in-ahead thread");
                    return false;
                }
            }
        }
        tx.as_ref().is_some_and(|t| t.send((r, write)).is_ok())
    }
}

/// The pages `[iova, iova + len)` touches, if that is a range at all.
fn pages_of(iova: u64, len: u64) -> Option<Range> {
    let start = iova & !(PAGE_SIZE - 1);
    let end = iova.saturating_add(len.max(1)).next_multiple_of(PAGE_SIZE);
    Range::new(start, end).ok()
}

impl PageRequestHandler for Resolver {
    fn page_request(&self, req: &PageRequest) -> Result<()> {
        self.resolve(req.iova, req.len, req.access == Access::Write)
    }

    /// Each run (the device sends them in address order, each pages that missed) is resolved
    /// once per fault window it spans: one lookup, one `range_fault`, one pin and one map for
    /// the run's pages in that window, not one per access.
    fn page_requests(&self, reqs: &[PageRequest]) -> u64 {
        let win = self.inner.config.fault_window;
        if let [r] = reqs
            && r.len >= AHEAD_MIN_WINDOWS * win
            && let Some(rest) =
                Range::new((r.iova & !(win - 1)) + win, r.iova.saturating_add(r.len))
                    .ok()
                    .filter(|rest| {
                        self.ahead
                            .queue(&self.source, win, *rest, r.access == Access::Write)
                    })
        {
            // A device sweeping memory: the first window now, the rest faulted in ahead of it
            // (`Ahead`).
            let write = r.access == Access::Write;
            let runs = u64::from(self.resolve(r.iova, rest.start() - r.iova, write).is_ok());
            self.inner.stat(|s| {
                s.fault_batches += 1;
                s.batched_runs += runs;
                s.faulted_ahead += rest.len();
            });
            return runs;
        }
        let mut runs = 0;
        for r in reqs {
            let write = r.access == Access::Write;
            let end = r.iova.saturating_add(r.len);
            let mut at = r.iova;
            while at < end {
                let next = (at & !(win - 1)).saturating_add(win).min(end);
                match self.resolve(at, next - at, write) {
                    Ok(()) => runs += 1,
                    // The access that needs the page raises it again and fails with this.
                    Err(e) => {
                        tracing::debug!(iova = at, error = %e, "batched page request left to the access")
                    }
                }
                at = next;
            }
        }
        self.inner.stat(|s| {
            s.fault_batches += 1;
            s.batched_runs += runs;
        });
        runs
    }

    fn settle(&self, iova: u64, len: u64) -> Result<u64> {
        let Some(r) = pages_of(iova, len) else {
            // Outside any address a CPU change can name: the access faults and says why.
            return Ok(0);
        };
        self.source
            .settle(r)
            .map_err(core_err("settle before a device access", r))
    }

    fn changed_since(&self, iova: u64, len: u64, since: u64) -> bool {
        pages_of(iova, len).is_some_and(|r| self.source.changed_since(r, since))
    }
}

impl Resolver {
    /// Maps the run of pages at `iova` that is not mapped (or not writable, for a write): the
    /// pages of `[iova, iova + len)` in the fault window, widened as [`Prefetch`] says.
    pub(super) fn resolve(&self, iova: u64, len: u64, write: bool) -> Result<()> {
        let inner = &*self.inner;
        let requested = Instant::now();
        let _span = tracing::trace_span!("iommu.fault", iova, write).entered();
        let page = iova & !(PAGE_SIZE - 1);
        let outside = || {
            IommuError::Mirror(MirrorError::OutsideMirror {
                addr: iova,
                range: inner.range,
            })
        };
        if !inner.range.contains(page) || page >= IOVA_END {
            return Err(outside());
        }
        let win = inner.config.fault_window;
        let window = Range::with_len(page & !(win - 1), win)
            .ok()
            .and_then(|w| self.mirrored(w))
            .ok_or_else(outside)?;
        let demand = {
            let end = iova.saturating_add(len.max(1)).min(window.end());
            Range::new(page, end.next_multiple_of(PAGE_SIZE)).map_err(|_| outside())?
        };
        let bounds = match inner.config.prefetch {
            Prefetch::Window if !self.window_brings_back(window, demand) => window,
            _ => demand,
        };
        let bounds = match self.huge_page_at(page, bounds, write) {
            Some(h) => Range::new(h.start().min(bounds.start()), h.end().max(bounds.end()))
                .map_err(|_| outside())?,
            None => bounds,
        };
        let mut vma = self.vma_run(bounds, page, write)?;
        let started = Instant::now();
        let lookup = started - requested;
        let (pin_time, map_time) = (Cell::new(Duration::ZERO), Cell::new(Duration::ZERO));
        let mut retries = 0;
        loop {
            let run = inner.mmu.with(|s| {
                let pt = s.page_table();
                let needs = |p: u64| pt.translate(p).is_none_or(|t| write && !t.perms.writable());
                if !needs(page) {
                    return None;
                }
                let (mut s, mut e) = (page, page + PAGE_SIZE);
                while s > vma.start() && needs(s - PAGE_SIZE) {
                    s -= PAGE_SIZE;
                }
                while e < vma.end() && needs(e) {
                    e += PAGE_SIZE;
                }
                Range::new(s, e).ok()
            });
            let Some(run) = run else {
                return Ok(());
            };
            let left = inner.config.fault_timeout.saturating_sub(started.elapsed());
            if retries > 0 && left.is_zero() {
                let elapsed = started.elapsed();
                return Err(core_err("fault", run)(svmirror_core::Error::Timeout {
                    range: run,
                    retries,
                    elapsed,
                }));
            }
            let mut entries = vec![0u64; run.pages() as usize];
            let mut req = FaultRequest::fault_all(run, &mut entries, write).with_owner(inner.owner);
            // The core's loop: snapshot and fault, pin outside the update lock (see the module
            // documentation), then publish under it unless an invalidation raced the pass.
            let steps = FaultSteps {
                prepare: |_: &FaultRequest<'_>| {
                    let t = Instant::now();
                    // The page source first makes the run's huge pages pinnable whole (the pin
                    // is taken for writing, even for a device that only reads: see
                    // `PageSource::before_pin`).
                    let huge = self
                        .source
                        .before_pin(run)
                        .map_err(core_err("fault", run))?;
                    // SAFETY: `IommuMirror::new`'s contract covers device writes anywhere in
                    // the mirrored range, which `run` lies in.
                    let pinned = unsafe { inner.pins.pin(run.start(), run.len()) };
                    self.source.after_pin(&huge);
                    pin_time.set(pin_time.get() + t.elapsed());
                    pinned
                },
                undo: |_: &mut UpdateGuard<'_, MirrorState>, pin: Result<Pin>| drop(pin),
                program: |g: &mut UpdateGuard<'_, MirrorState>,
                          req: &FaultRequest<'_>,
                          pin: Result<Pin>| {
                    let pin = pin?;
                    let t = Instant::now();
                    drop(std::mem::take(&mut g.deferred));
                    let r = self.program(g, pin, run, req.entries, write);
                    map_time.set(map_time.get() + t.elapsed());
                    r
                },
            };
            let outcome = fault_prepare_and_program(
                &self.sub,
                &inner.state,
                &*self.source,
                &mut req,
                left,
                steps,
            );
            let raced = svmirror_core::FaultStats::retries_in(&outcome);
            inner.counters.record_retries(raced);
            retries += raced;
            match outcome {
                Ok((Ok(()), _)) => {}
                // The run was cut to the mapping as it was before the fault; a neighbour
                // munmapped or protected since (its event may still be on its way) makes the
                // run fail (its fault, or its pin) where the faulting page would not: cut it
                // again and retry.
                Ok((Err(e), _)) if self.vma_moved(bounds, page, write, &mut vma) => {
                    tracing::debug!(%run, error = %e, "mapping changed under a pin: retrying");
                    retries += 1;
                    inner.counters.record_retry();
                    continue;
                }
                Ok((Err(e), _)) => return Err(e),
                Err(e @ svmirror_core::Error::Timeout { .. }) => {
                    return Err(core_err("fault", run)(e));
                }
                Err(e) if self.vma_moved(bounds, page, write, &mut vma) => {
                    tracing::debug!(%run, error = %e, "mapping changed under a fault: retrying");
                    retries += 1;
                    inner.counters.record_retry();
                    continue;
                }
                Err(e) => return Err(core_err("fault", run)(e)),
            }
            let total = requested.elapsed();
            let (pin, map) = (pin_time.get(), map_time.get());
            inner.stat(|s| {
                s.faults += 1;
                s.fault_retries += retries;
                let t = &mut s.fault_times;
                t.total += total;
                t.lookup += lookup;
                t.pin += pin;
                t.map += map;
                t.range_fault += started.elapsed().saturating_sub(pin + map);
            });
            inner.counters.record_fault(run.len(), requested.elapsed());
            return Ok(());
        }
    }

    /// Whether prefetching `window` around `demand` would bring home pages that live in
    /// another device's memory: a fault brings back only the pages the device asked for (the
    /// kernel's `migrate_to_ram` moves the one faulting page, lib/test_hmm.c
    /// `dmirror_devmem_fault`), so the window is used only where it is all in RAM (or
    /// absent, or this mirror's own). When unsure (the snapshot failed), it would.
    fn window_brings_back(&self, window: Range, demand: Range) -> bool {
        if demand.start() <= window.start() && window.end() <= demand.end() {
            // Nothing beyond what the device asked for: no snapshot to take.
            return false;
        }
        let mut ptes = vec![CpuPte::None; window.pages() as usize];
        if self.source.snapshot(window.start(), &mut ptes).is_err() {
            return true;
        }
        ptes.iter().enumerate().any(|(i, p)| {
            let addr = window.start() + i as u64 * PAGE_SIZE;
            !demand.contains(addr)
                && matches!(p, CpuPte::DevicePrivate { owner, .. } if *owner != self.inner.owner)
        })
    }

    /// `r` cut to the mirrored range and the IOVA space.
    fn mirrored(&self, r: Range) -> Option<Range> {
        r.intersect(&self.inner.range)?.intersect(&iova_space())
    }

    /// The CPU's huge page around `page`, cut to the mirrored range, when the CPU maps `page`
    /// huge and `bounds` does not already cover the 2 MiB around it ([`Prefetch`]'s huge-page
    /// extension). Looks before the run is looked up (so registered): registering part of a
    /// huge mapping would split it. A page not present is faulted in first (the fault loop
    /// would fault it anyway), so that a THP or hugetlb area gets its huge page now. A hint
    /// only: the fault loop checks what it maps.
    fn huge_page_at(&self, page: u64, bounds: Range, write: bool) -> Option<Range> {
        const PMD: u64 = 2 << 20;
        // What the extension could add is cut to the mirror: nothing when `bounds` covers that.
        let pmd = self.mirrored(Range::with_len(page & !(PMD - 1), PMD).ok()?)?;
        if bounds.start() <= pmd.start() && pmd.end() <= bounds.end() {
            return None;
        }
        let mut pte = [CpuPte::None];
        self.source.snapshot(page, &mut pte).ok()?;
        if pte[0] == CpuPte::None {
            let one = Range::with_len(page, PAGE_SIZE).ok()?;
            // An error (a hole, a protection) is the fault loop's to report.
            self.source.fault(one, write).ok()?;
            self.source.snapshot(page, &mut pte).ok()?;
        }
        match pte[0] {
            CpuPte::Present { order, .. } if order > 0 => {
                let size = PAGE_SIZE.checked_shl(u32::from(order))?;
                self.mirrored(Range::with_len(page & !(size - 1), size).ok()?)
            }
            _ => None,
        }
    }

    /// Whether the mapping at `page` no longer covers exactly `vma` (and, if so, makes `vma`
    /// what it covers now). False when it cannot be looked up: the caller's error stands.
    fn vma_moved(&self, window: Range, page: u64, write: bool, vma: &mut Range) -> bool {
        match self.vma_run(window, page, write) {
            Ok(now) if now != *vma => {
                *vma = now;
                true
            }
            _ => false,
        }
    }

    /// The part of `window` covered by the mapping at `page`, which must be one the device may
    /// use for `write`. Looks up (so has the page source register) the mappings from the start
    /// of `window` to the end of that one.
    fn vma_run(&self, window: Range, page: u64, write: bool) -> Result<Range> {
        let mut at = window.start();
        loop {
            let a = self
                .source
                .area(at, window.end())
                .map_err(core_err("fault", window))?;
            if page < a.end {
                return match a.kind {
                    AreaKind::Mapped {
                        read: true,
                        write: true,
                    } => Range::new(at, a.end).map_err(core_err("fault", window)),
                    AreaKind::Mapped { read: true, .. } if write => Err(core_err("fault", window)(
                        svmirror_core::Error::WriteToReadOnly { addr: page },
                    )),
                    AreaKind::Mapped { read: true, .. } => {
                        Err(IommuError::ReadOnlyMemory { iova: page })
                    }
                    _ => Err(core_err("fault", window)(
                        svmirror_core::Error::BadAddress { addr: page },
                    )),
                };
            }
            at = a.end;
        }
    }

    /// Maps `run` from the current `entries` through `pin`, under the update lock.
    fn program(
        &self,
        g: &mut UpdateGuard<'_, MirrorState>,
        pin: Pin,
        run: Range,
        entries: &[u64],
        write: bool,
    ) -> Result<()> {
        let inner = &*self.inner;
        let want = |e: u64| {
            if entry::is_writable(e) {
                Some(Perms::ReadWrite)
            } else if entry::is_valid(e) {
                Some(Perms::Read)
            } else {
                None
            }
        };
        // Pages to (re)map: (start, end, perms). Read-only leaves are replaced for a write.
        let outcome = inner.mmu.with(|s| {
            let pt = s.page_table_mut();
            let mut pieces: Vec<(u64, u64, Perms, bool)> = Vec::new();
            for (i, &e) in entries.iter().enumerate() {
                let p = run.start() + i as u64 * PAGE_SIZE;
                let Some(perms) = want(e) else { continue };
                let replace = match pt.translate(p) {
                    None => false,
                    Some(t) if write && !t.perms.writable() && perms.writable() => true,
                    Some(_) => continue,
                };
                match pieces.last_mut() {
                    Some(l) if l.1 == p && l.2 == perms && l.3 == replace => l.1 += PAGE_SIZE,
                    _ => pieces.push((p, p + PAGE_SIZE, perms, replace)),
                }
            }
            let mut removed = Vec::new();
            let mut mapped = 0;
            let mut result = Ok(());
            for &(s0, e0, perms, replace) in &pieces {
                #[expect(
                    clippy::expect_used,
                    reason = "a piece is one or more whole pages of `run`, built just above"
                )]
                let r = Range::new(s0, e0).expect("page-aligned piece");
                if replace {
                    removed.extend(pt.unmap_present(r, false));
                }
                #[expect(
                    clippy::expect_used,
                    reason = "`pin` covers `run` exactly (`prepare` pinned it) and the piece lies in `run`"
                )]
                let t = pin.target_of(s0).expect("piece lies in the pinned run");
                // Both locks are held and every page was checked free: a failure is a bug,
                // reported without leaving a leaf on a pin that is not tracked.
                result = pt.map(s0, e0 - s0, t, perms);
                if result.is_err() {
                    break;
                }
                mapped += e0 - s0;
            }
            for u in &removed {
                #[expect(
                    clippy::expect_used,
                    reason = "what the page table unmapped is leaves, merged: whole pages, never empty"
                )]
                let r = Range::with_len(u.iova, u.len).expect("unmapped piece");
                s.iotlb_mut().invalidate_range(r);
            }
            (removed, mapped, result)
        });
        let (removed, mapped, result) = outcome;
        inner.counters.record_map(mapped);
        inner
            .counters
            .record_unmap(removed.iter().map(|u| u.len).sum());
        if mapped > 0 {
            g.pins.insert(pin.id(), Backing { pin, mapped });
        }
        let freed = g.unback(&removed);
        if !freed.is_empty() {
            inner.release_after_drain(g, run, freed);
        }
        result
    }
}
