//! READ and WRITE: the copy loop, which copies what the device can reach and faults the rest
//! in chunks of [`FAULT_CHUNK_PAGES`] pages.

use svmirror_core::MirrorError;
use svmirror_core::{CpuPte, DevicePages, PAGE_SIZE, PageSource, Range};
use svmirror_iommu::{DmaCommand, IommuError};

use crate::{Dmirror, DmirrorCmd, DmirrorError, FAULT_CHUNK_PAGES, check};

/// Read or write, for the copy loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl Dir {
    const fn op(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}
impl Dmirror {
    /// The device reads `npages` at `addr` into `buf` (at least `npages` pages long).
    /// `buf` is left untouched on error.
    pub fn read(&self, addr: u64, npages: u64, buf: &mut [u8]) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.read", addr, npages).entered();
        let range = check(addr, npages, buf.len() as u64, PAGE_SIZE)?;
        let mut bounce = vec![0u8; range.len() as usize];
        let faults = self.copy(range, Dir::Read, &mut bounce)?;
        buf[..bounce.len()].copy_from_slice(&bounce);
        Ok(DmirrorCmd {
            cpages: npages,
            faults,
        })
    }

    /// The device writes the first `npages` pages of `buf` to `npages` at `addr`. Needs write
    /// permission: a read-only mapping is EPERM.
    pub fn write(&self, addr: u64, npages: u64, buf: &[u8]) -> Result<DmirrorCmd, DmirrorError> {
        let _span = tracing::debug_span!("dmirror.write", addr, npages).entered();
        let range = check(addr, npages, buf.len() as u64, PAGE_SIZE)?;
        let mut data = buf[..range.len() as usize].to_vec();
        let faults = self.copy(range, Dir::Write, &mut data)?;
        Ok(DmirrorCmd {
            cpages: npages,
            faults,
        })
    }
    /// The copy loop of READ and WRITE: copy from the start; where a page is missing, fault the
    /// rest of the range in chunks (one fault pass) and go on from there. Returns the fault
    /// passes, plus any page requests the device raised because an invalidation overtook a pass.
    fn copy(&self, range: Range, dir: Dir, data: &mut [u8]) -> Result<u64, DmirrorError> {
        let mut faults = 0;
        let mut at = range.start();
        let max_passes = 16 + 4 * range.pages().div_ceil(FAULT_CHUNK_PAGES);
        loop {
            let own = self.own_pages(range, dir == Dir::Write)?;
            let (missing, requests) = self.copy_present(range, at, dir, data, &own)?;
            faults += requests;
            let Some(page) = missing else {
                return Ok(faults);
            };
            if faults >= max_passes {
                return Err(DmirrorError::NoProgress {
                    op: dir.op(),
                    addr: page,
                    passes: faults,
                });
            }
            self.fault(range, page, dir == Dir::Write, &own)
                .map_err(|source| DmirrorError::Iommu {
                    op: dir.op(),
                    range,
                    source,
                })?;
            faults += 1;
            at = page;
        }
    }

    /// For each page of `range`, the frame number of this device's copy of it (migrated or
    /// exclusive) where the device may use that copy, as the address space reports it (a page
    /// moved by mremap keeps its copy). Reads no page table when the device holds no page.
    ///
    /// For a `write`, a copy whose device-private entry is read-only (migrated from a read-only
    /// page, or write-protected since) is not usable: the write faults, which a read-only
    /// mapping refuses (EPERM) and a writable one answers by bringing the page home.
    fn own_pages(&self, range: Range, write: bool) -> Result<Vec<Option<u64>>, DmirrorError> {
        let n = range.pages() as usize;
        if self.memory.len() == 0 && self.exclusive.len() == 0 {
            return Ok(vec![None; n]);
        }
        let mut ptes = vec![CpuPte::None; n];
        self.mm
            .snapshot(range.start(), &mut ptes)
            .map_err(MirrorError::refused("device access", range))?;
        let mine = [self.owner(), self.exclusive.owner()];
        Ok(ptes
            .iter()
            .map(|p| match p {
                CpuPte::DevicePrivate {
                    owner,
                    pfn,
                    write: w,
                } if mine.contains(owner)
                    && (*w || !write)
                    && (self.memory.usable(*pfn) || self.exclusive.usable(*pfn)) =>
                {
                    Some(*pfn)
                }
                _ => None,
            })
            .collect())
    }

    /// Copies from `from` up to the first page the device cannot reach without a fault, which
    /// it returns, with the page requests the DMA raised. `own` is [`own_pages`](Self::own_pages).
    fn copy_present(
        &self,
        range: Range,
        from: u64,
        dir: Dir,
        data: &mut [u8],
        own: &[Option<u64>],
    ) -> Result<(Option<u64>, u64), DmirrorError> {
        let mmu = self.mirror.mmu();
        let write = dir == Dir::Write;
        let idx = |p: u64| ((p - range.start()) / PAGE_SIZE) as usize;
        let mapped = |p: u64| {
            own[idx(p)].is_none()
                && mmu
                    .translate(p)
                    .is_some_and(|t| !write || t.perms.writable())
        };
        let off = |p: u64| (p - range.start()) as usize;
        let mut requests = 0;
        let mut p = from;
        while p < range.end() {
            let page = &mut data[off(p)..off(p) + PAGE_SIZE as usize];
            let on_device = own[idx(p)].is_some_and(|pfn| match dir {
                Dir::Read => self.memory.read(pfn, page) || self.exclusive.read(pfn, page),
                Dir::Write => self.memory.write(pfn, page) || self.exclusive.write(pfn, page),
            });
            if on_device {
                p += PAGE_SIZE;
                continue;
            }
            let mut q = p;
            while q < range.end() && mapped(q) {
                q += PAGE_SIZE;
            }
            if q == p {
                return Ok((Some(p), requests));
            }
            let iommu = |source| DmirrorError::Iommu {
                op: dir.op(),
                range,
                source,
            };
            let cmd = match dir {
                Dir::Read => DmaCommand::Read { src: p, len: q - p },
                Dir::Write => DmaCommand::Write {
                    dst: p,
                    data: data[off(p)..off(q)].to_vec(),
                },
            };
            let done = self
                .mirror
                .submit(cmd)
                .and_then(|f| f.wait())
                .map_err(iommu)?;
            if dir == Dir::Read {
                data[off(p)..off(q)].copy_from_slice(&done.data);
            }
            requests += u64::from(done.page_requests);
            p = q;
        }
        Ok((None, requests))
    }

    /// One fault pass over `[from, range.end())`: the pages the device cannot use from its own
    /// memory (`own`, as [`own_pages`](Self::own_pages)), in chunks of [`FAULT_CHUNK_PAGES`].
    fn fault(
        &self,
        range: Range,
        from: u64,
        write: bool,
        own: &[Option<u64>],
    ) -> Result<(), IommuError> {
        let end = range.end();
        let on_device = |p: u64| own[((p - range.start()) / PAGE_SIZE) as usize].is_some();
        let mut chunk = from;
        while chunk < end {
            let chunk_end = (chunk + FAULT_CHUNK_PAGES * PAGE_SIZE).min(end);
            let mut p = chunk;
            while p < chunk_end {
                if on_device(p) {
                    p += PAGE_SIZE;
                    continue;
                }
                let mut q = p + PAGE_SIZE;
                while q < chunk_end && !on_device(q) {
                    q += PAGE_SIZE;
                }
                self.mirror.fault(p, q - p, write)?;
                p = q;
            }
            chunk = chunk_end;
        }
        Ok(())
    }
}
