//! The fault path of [`VfioMapper`]: walking a request chunk by chunk and mapping by run of
//! one mapping, under the core's fault loop; and [`DeviceAccess`], which holds a range mapped
//! for a device access.

use std::sync::atomic::Ordering;
use std::time::Instant;

use svmirror_core::MirrorError;
use svmirror_core::{
    AreaKind, FaultRequest, FaultSteps, PAGE_SIZE, Range, UpdateGuard, entry,
    fault_prepare_and_program,
};

use super::{Chunk, Inner, Piece, State, VfioMapper};
use crate::chunk::window;
use crate::conv::{ioctls_errno, map_error};
use crate::error::{Result, VfioError};
use crate::uapi;

/// What one fault of one run maps: planned under the update lock, mapped with no lock held,
/// then published under the update lock, or undone if an invalidation raced it.
#[derive(Debug)]
pub(super) struct Planned {
    key: u64,
    /// The chunk's IOVA base when planned.
    base: u64,
    pieces: Vec<Piece>,
    /// The pieces `map_planned` mapped (all of them, unless it failed).
    mapped: usize,
}

impl Inner {
    /// Plans the mapping of `run` (one mapping's pages inside the chunk at `key`) from fresh
    /// `entries`: the runs of valid pages no piece covers yet. Takes the update lock briefly
    /// (nothing in here can fault): reserves the chunk's IOVA window and the budget for the new
    /// pieces, and unmaps the read-only pieces that a writable one must replace (type1 cannot
    /// upgrade a mapping in place), once the device accesses in flight on them are done.
    fn plan(&self, key: u64, run: Range, entries: &[u64], write: bool) -> Result<Option<Planned>> {
        let mut guard = self.lock_state();
        let g = &mut *guard;
        if g.released {
            return Err(VfioError::Mirror(MirrorError::Core {
                op: "fault",
                range: run,
                source: svmirror_core::Error::Released,
            }));
        }
        if !g.chunks.contains_key(&key) {
            let iova = match g.alloc.as_mut() {
                Some(a) => a.alloc(self.granule, self.granule)?,
                None => key,
            };
            g.chunks.insert(
                key,
                Chunk {
                    iova,
                    pieces: Vec::new(),
                },
            );
        }
        let replaced = |p: &Piece| write && !p.write && p.overlaps(run);
        let upgrade: Vec<Range> = g.chunks[&key]
            .pieces
            .iter()
            .filter(|p| replaced(p))
            .filter_map(|p| Range::with_len(p.va, p.len).ok())
            .collect();
        if !upgrade.is_empty() {
            // Under the update lock, as an invalidation waits: no access holder needs it.
            self.drain(&upgrade, true);
            self.unmap_pieces(g, key, replaced);
        }
        let chunk = &g.chunks[&key];
        let covered = |va: u64| chunk.pieces.iter().any(|p| p.va <= va && va < p.va + p.len);
        let mut new: Vec<Piece> = Vec::new();
        for (i, &e) in entries.iter().enumerate() {
            let va = run.start() + i as u64 * PAGE_SIZE;
            if !entry::is_valid(e) || covered(va) {
                continue;
            }
            match new.last_mut() {
                Some(p) if p.va + p.len == va => p.len += PAGE_SIZE,
                _ => new.push(Piece {
                    va,
                    len: PAGE_SIZE,
                    write,
                }),
            }
        }
        if new.is_empty() {
            return Ok(None);
        }
        let n = new.len() as u32;
        if self.config.enforce_budget {
            g.budget.take(n)?;
        } else {
            g.budget.available = g.budget.available.saturating_sub(n);
            g.budget.used += n;
        }
        Ok(Some(Planned {
            key,
            base: chunk.iova,
            pieces: new,
            mapped: 0,
        }))
    }

    /// Maps the planned pieces with **no lock held**: VFIO_IOMMU_MAP_DMA pins the pages, and a
    /// pin of a page living on a device faults into the userfaultfd monitor, which may be
    /// inside an invalidation waiting for the update lock. Stops at the first error;
    /// `undo_planned` unmaps what was mapped.
    fn map_planned(&self, p: &mut Planned) -> Result<()> {
        for piece in &p.pieces {
            let iova = p.base + (piece.va - p.key);
            self.map_one(iova, *piece)?;
            p.mapped += 1;
        }
        Ok(())
    }

    /// Releases a plan (a raced pass, or a failed map): unmaps what it mapped, gives its
    /// budget back, and drops a chunk it made that holds nothing (identity mode). Under the
    /// update lock.
    fn undo_planned(&self, g: &mut State, p: Planned) {
        for piece in &p.pieces[..p.mapped] {
            let iova = p.base + (piece.va - p.key);
            if let Err(u) = self.container.vfio_dma_unmap(iova, piece.len as usize) {
                self.unmap_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(iova, len = piece.len, error = %u, "VFIO unmap of a raced fault failed");
            }
        }
        g.budget.give(p.pieces.len() as u32);
        if let Some(chunk) = g.chunks.get(&p.key)
            && chunk.pieces.is_empty()
            && g.alloc.is_none()
        {
            g.chunks.remove(&p.key);
        }
    }

    /// Publishes a mapped plan, under the update lock, after `read_retry` said no
    /// invalidation ran since the entries were read (so the chunk and its IOVA are as
    /// planned: only an invalidation takes them away, and faults are serialized by
    /// `fault_lock`).
    #[expect(
        clippy::expect_used,
        reason = "read_retry said no invalidation ran since the plan, and only an invalidation \
                  removes a chunk"
    )]
    fn publish(&self, g: &mut State, p: Planned) -> (u64, Vec<Piece>) {
        let bytes: u64 = p.pieces.iter().map(|piece| piece.len).sum();
        let published = p.pieces.clone();
        let chunk = g
            .chunks
            .get_mut(&p.key)
            .expect("no invalidation ran since the plan");
        debug_assert_eq!(chunk.iova, p.base);
        chunk.pieces.extend(p.pieces);
        chunk.pieces.sort_unstable_by_key(|piece| piece.va);
        g.mapped_bytes += bytes;
        self.counters.record_map(bytes);
        (bytes, published)
    }

    fn map_one(&self, iova: u64, p: Piece) -> Result<()> {
        let _span = tracing::trace_span!("vfio.map", iova, len = p.len, write = p.write).entered();
        // The map pins with GUP: no lock an invalidation takes may be held.
        svmirror_core::might_fault("VFIO_IOMMU_MAP_DMA");
        if p.write {
            let len = usize::try_from(p.len).map_err(|_| VfioError::InvalidMapping {
                iova,
                len: p.len,
                vaddr: p.va,
            })?;
            // SAFETY: the pages lie in the mirrored range, which `VfioMapper::new`'s contract
            // opens to device reads and writes; they stay pinned until unmapped.
            let r = unsafe { self.container.vfio_dma_map(iova, len, p.va as *mut u8) };
            r.map_err(|e| map_error(ioctls_errno(&e), iova, p.len, p.va))
        } else {
            // SAFETY: as above, for device reads only.
            let r = unsafe { uapi::map_dma_read_only(self.fd, iova, p.len, p.va) };
            r.map_err(|e| map_error(e, iova, p.len, p.va))
        }
    }
}

/// Whether a fault failed because a page it was to map is not mapped (any more).
fn page_gone(e: &VfioError) -> bool {
    matches!(
        e,
        VfioError::BadAddress { .. }
            | VfioError::NotMapped { .. }
            | VfioError::Mirror(MirrorError::Core {
                source: svmirror_core::Error::BadAddress { .. },
                ..
            })
    )
}

/// A device access in flight on a mapped range (from [`VfioMapper::access`]): invalidations of
/// the range wait until it is dropped, so the mapping stays in place while the device uses it.
#[derive(Debug)]
pub struct DeviceAccess<'a> {
    inner: &'a Inner,
    id: u64,
    iova: u64,
    range: Range,
}

impl DeviceAccess<'_> {
    /// The IOVA of the range's first byte; the range is contiguous in IOVA space.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The virtual range.
    pub fn range(&self) -> Range {
        self.range
    }
}

impl Drop for DeviceAccess<'_> {
    fn drop(&mut self) {
        let mut f = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f.ranges.retain(|(id, _, _)| *id != self.id);
        drop(f);
        self.inner.inflight_cv.notify_all();
    }
}

impl VfioMapper {
    fn check(&self, addr: u64, len: u64) -> Result<Range> {
        // An empty or overflowing request is outside the mirror too.
        let outside = || {
            VfioError::Mirror(MirrorError::OutsideMirror {
                addr,
                range: self.inner.range,
            })
        };
        let r = Range::new(
            addr & !(PAGE_SIZE - 1),
            addr.checked_add(len)
                .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
                .ok_or_else(outside)?,
        )
        .map_err(|_| outside())?;
        if r.start() < self.inner.range.start() || r.end() > self.inner.range.end() {
            return Err(outside());
        }
        Ok(r)
    }

    /// Faults `[addr, addr + len)` in and maps every chunk it touches (writable if `write`),
    /// as a device fault would. Each chunk maps the whole run of its mapping around the
    /// request. Errors: outside the mirror, memory a device may not use, a write to read-only
    /// memory, the budget or the IOVA space exhausted, the kernel's refusal (typed), or
    /// [`VfioError::NestedAccess`] when the calling thread holds an access of this mapper.
    pub fn fault(&self, addr: u64, len: u64, write: bool) -> Result<()> {
        let r = self.check(addr, len)?;
        self.inner.not_nested()?;
        // A plain munmap, mremap or madvise returns once the monitor has read its event
        // (fs/userfaultfd.c: reading completes it), before anything is invalidated: wait until
        // every change over the range that was read is handled, so that neither the check
        // below nor the lookup and registration of the mappings uses what such a change ended.
        self.source.settle(r).map_err(|source| {
            VfioError::Mirror(MirrorError::Core {
                op: "settle",
                range: r,
                source,
            })
        })?;
        // Mapped already, the common case of an access: no mapping to look up. (A piece is
        // only made after its mapping was registered, and, settled, stays current.)
        if Self::mapped_in(&self.inner, &self.inner.lock_state(), r, write) {
            return Ok(());
        }
        let _span =
            tracing::trace_span!("vfio.fault", start = r.start(), end = r.end(), write).entered();
        let mut published = Vec::new();
        let mut at = r.start();
        while at < r.end() {
            let w = window(at, self.inner.granule, self.inner.range).ok_or(
                MirrorError::OutsideMirror {
                    addr: at,
                    range: self.inner.range,
                },
            )?;
            if let Err(e) = self.fault_window(w, r, write, &mut published) {
                // Roll back: the pieces this call mapped go, once any access another thread
                // took on them since is done; pieces mapped before stay.
                let inner = &*self.inner;
                let mut g = inner.lock_state();
                let ranges: Vec<Range> = published
                    .iter()
                    .filter_map(|p: &Piece| Range::with_len(p.va, p.len).ok())
                    .collect();
                inner.drain(&ranges, true);
                for p in &published {
                    inner.unmap_pieces(&mut g, inner.key(p.va), |q| q == p);
                }
                return Err(e);
            }
            at = w.end();
        }
        Ok(())
    }

    /// Maps the runs of each mapping in window `w` that overlap `want`; adds what it mapped to
    /// `published`.
    ///
    /// A run is the whole of its mapping's pages in the chunk, looked up before they are
    /// faulted in; the pages around the request are mapped for later accesses, not because
    /// the device asked for them. So when the run fails because its mapping changed since the
    /// lookup (another thread unmapped part of it: the core, or the map's pin, finds a page
    /// gone), the window is looked at again and only what was asked for is faulted: a change
    /// next to the request must not refuse it.
    fn fault_window(
        &self,
        w: Range,
        want: Range,
        write: bool,
        published: &mut Vec<Piece>,
    ) -> Result<()> {
        let core =
            |op, range| move |source| VfioError::Mirror(MirrorError::Core { op, range, source });
        let mut at = w.start();
        let mut only_asked = false;
        while at < w.end() {
            let area = self.source.area(at, w.end()).map_err(core("fault", w))?;
            let whole = Range::new(at, area.end).map_err(core("fault", w))?;
            let Some(need) = whole.intersect(&want) else {
                at = area.end;
                continue;
            };
            let run = if only_asked { need } else { whole };
            if let Some(hook) = self
                .inner
                .fault_hook
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_mut()
            {
                hook(run);
            }
            let vma_write = match area.kind {
                AreaKind::Mapped { read: true, write } => write,
                _ => return Err(VfioError::NotMapped { addr: need.start() }),
            };
            if write && !vma_write {
                return Err(VfioError::Mirror(MirrorError::Core {
                    op: "fault",
                    range: need,
                    source: svmirror_core::Error::WriteToReadOnly { addr: need.start() },
                }));
            }
            if self.run_mapped(run, vma_write) {
                at = area.end;
                continue;
            }
            match self.fault_run(run, vma_write) {
                Ok(p) => published.extend(p),
                Err(e) if !only_asked && run != need && page_gone(&e) => {
                    only_asked = true;
                    continue;
                }
                Err(e) => return Err(e),
            }
            at = area.end;
        }
        Ok(())
    }

    /// Whether every page of `run` is mapped (writable if `write`).
    fn run_mapped(&self, run: Range, write: bool) -> bool {
        let g = self.inner.lock_state();
        let key = self.inner.key(run.start());
        let Some(c) = g.chunks.get(&key) else {
            return false;
        };
        let mut at = run.start();
        for p in &c.pieces {
            if p.va <= at && at < p.va + p.len && (p.write || !write) {
                at = p.va + p.len;
            }
        }
        at >= run.end()
    }

    /// The core's fault loop over one run of one mapping inside one chunk: plan, map with no
    /// lock held, publish (`fault_prepare_and_program`). Faults of one mapper are serialized
    /// (`fault_lock`, which no invalidation takes), so two never plan the same pieces.
    /// Returns the pieces it mapped.
    fn fault_run(&self, run: Range, write: bool) -> Result<Vec<Piece>> {
        let started = Instant::now();
        let key = self.inner.key(run.start());
        let mut entries = vec![0u64; run.pages() as usize];
        let mut req =
            FaultRequest::fault_all(run, &mut entries, write).with_owner(self.inner.owner);
        let inner = &*self.inner;
        let _serial = inner.fault_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (res, stats) = fault_prepare_and_program(
            &self.sub,
            &inner.state,
            &*self.source,
            &mut req,
            inner.config.fault_timeout,
            FaultSteps {
                prepare: |req: &FaultRequest<'_>| match inner.plan(key, run, req.entries, write)? {
                    None => Ok(None),
                    Some(mut p) => match inner.map_planned(&mut p) {
                        Ok(()) => Ok(Some(p)),
                        Err(e) => {
                            inner.undo_planned(&mut inner.lock_state(), p);
                            Err(e)
                        }
                    },
                },
                undo: |g: &mut UpdateGuard<'_, State>, prepared: Result<Option<Planned>>| {
                    if let Ok(Some(p)) = prepared {
                        inner.undo_planned(g, p);
                    }
                },
                program: |g: &mut UpdateGuard<'_, State>, _: &FaultRequest<'_>, prepared| {
                    match prepared {
                        Ok(Some(p)) => Ok(inner.publish(g, p)),
                        Ok(None) => Ok((0, Vec::new())),
                        Err(e) => Err(e),
                    }
                },
            },
        )
        .map_err(MirrorError::refused("fault", run))?;
        inner.counters.record_retries(stats.retries);
        let (bytes, published) = res?;
        inner.counters.record_fault(bytes, started.elapsed());
        Ok(published)
    }

    /// Faults `[addr, addr + len)` in and holds it mapped for a device access: invalidations
    /// of the range wait until the returned guard is dropped. The range must be contiguous in
    /// IOVA space: anywhere in identity mode, within one chunk otherwise. The calling thread
    /// must hold no other access of this mapper (see [`VfioMapper::access_many`]).
    pub fn access(&self, addr: u64, len: u64, write: bool) -> Result<DeviceAccess<'_>> {
        let mut v = self.access_many(&[(addr, len, write)])?;
        v.pop().ok_or(VfioError::Mirror(MirrorError::InvalidConfig {
            reason: "no access was asked for",
        }))
    }

    /// [`VfioMapper::access`] for several `(addr, len, write)` ranges at once, as one command
    /// needs them (its data and its queue memory, say): each is faulted in, then all are
    /// checked mapped and taken in one update-lock section, or none is.
    ///
    /// This is how a command must take what it needs: a thread holding an access that then
    /// asks the same mapper for another could wait for the update lock while an invalidation
    /// holds it waiting for the first access (type1 unmaps a mapping whole, so an invalidation
    /// of a neighbour page waits for every access on its mapping). The kernel's GPU drivers
    /// keep the same rule: a job's user pages are checked under the notifier lock once, and
    /// their invalidation callbacks wait for the job's fences under it.
    pub fn access_many(&self, ranges: &[(u64, u64, bool)]) -> Result<Vec<DeviceAccess<'_>>> {
        let mut checked = Vec::with_capacity(ranges.len());
        for &(addr, len, write) in ranges {
            let r = self.check(addr, len)?;
            if !self.inner.identity && self.inner.key(r.start()) != self.inner.key(r.last()) {
                return Err(VfioError::Mirror(MirrorError::InvalidConfig {
                    reason: "an access through allocated IOVAs must stay within one chunk",
                }));
            }
            checked.push((addr, len, r, write));
        }
        let started = Instant::now();
        loop {
            for &(addr, len, _, write) in &checked {
                self.fault(addr, len, write)?;
            }
            let g = self.inner.lock_state();
            if checked
                .iter()
                .all(|&(_, _, r, write)| Self::mapped_in(&self.inner, &g, r, write))
            {
                let mut f = self
                    .inner
                    .inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let mut held = Vec::with_capacity(checked.len());
                let me = std::thread::current().id();
                for &(addr, _, r, _) in &checked {
                    let key = self.inner.key(addr);
                    let iova = g.chunks[&key].iova + (addr - key);
                    let id = f.next;
                    f.next += 1;
                    f.ranges.push((id, r, me));
                    held.push(DeviceAccess {
                        inner: &self.inner,
                        id,
                        iova,
                        range: r,
                    });
                }
                return Ok(held);
            }
            drop(g);
            if started.elapsed() > self.inner.config.fault_timeout {
                let r = checked.first().map_or(self.inner.range, |c| c.2);
                return Err(VfioError::Mirror(MirrorError::Core {
                    op: "access",
                    range: r,
                    source: svmirror_core::Error::Timeout {
                        range: r,
                        retries: 0,
                        elapsed: started.elapsed(),
                    },
                }));
            }
        }
    }

    /// Whether every page of `r` is mapped now (writable if `write`).
    fn mapped_in(inner: &Inner, g: &State, r: Range, write: bool) -> bool {
        let mut at = r.start();
        while at < r.end() {
            let Some(c) = g.chunks.get(&inner.key(at)) else {
                return false;
            };
            match c
                .pieces
                .iter()
                .find(|p| p.va <= at && at < p.va + p.len && (p.write || !write))
            {
                Some(p) => at = p.va + p.len,
                None => return false,
            }
        }
        true
    }
}
