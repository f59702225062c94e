//! The device work of one backend call: the [`Engine`] splits transfers at mirror and chunk
//! boundaries and moves them through edu's buffer and the staging page; [`Stores`] batches
//! the results written back by device DMA. The engine is the apps' [`Mover`] on edu.

use std::sync::atomic::{Ordering, fence};
use std::time::Instant;

use svmirror_edu::EduError;
use svmirror_vfio::{VfioError, VfioMapper};

use super::apps::Mover;
use super::{Device, MAX_TRANSFER, VfioBackend, is_refusal};
use crate::app::{Backend, DeviceWork};

/// The BFS's read cache line: aligned, so a line never leaves the page of the bytes asked for.
const LINE: u64 = 2048;

impl VfioBackend {
    pub(super) fn engine<'a>(&'a self, dev: &'a Device) -> Engine<'a> {
        Engine {
            mappers: &self.mappers,
            dev,
            work: DeviceWork::default(),
            started: Instant::now(),
            faults_before: self.counters().total_faults(),
        }
    }

    pub(super) fn finish(&self, e: Engine<'_>) -> DeviceWork {
        let mut work = e.work;
        work.elapsed = e.started.elapsed();
        work.page_requests = self
            .counters()
            .total_faults()
            .saturating_sub(e.faults_before);
        work
    }
}

/// One result for the device to write back: `bytes` at `addr`.
pub(super) struct Store {
    addr: u64,
    bytes: Vec<u8>,
}

/// One backend call's use of the device: transfers split at mirror and chunk boundaries, the
/// staging page, and the work done.
pub(super) struct Engine<'a> {
    mappers: &'a [VfioMapper],
    dev: &'a Device,
    work: DeviceWork,
    started: Instant,
    faults_before: u64,
}

impl Engine<'_> {
    /// The mapper holding `addr`, and how many of `len` bytes from it one transfer may move
    /// (to the end of the mirror or of the chunk, whichever comes first).
    pub(super) fn locate(
        &self,
        addr: u64,
        len: u64,
    ) -> std::result::Result<(&VfioMapper, u64), EduError> {
        let m = self
            .mappers
            .iter()
            .find(|m| m.range().start() <= addr && addr < m.range().end())
            .ok_or(EduError::Access {
                addr,
                len,
                source: VfioError::NotMapped { addr },
            })?;
        let g = m.granule();
        let chunk_end = (addr | (g - 1)).saturating_add(1);
        Ok((m, len.min(chunk_end.min(m.range().end()) - addr)))
    }

    /// The device reads `len` bytes at `addr` into its buffer at `offset`.
    pub(super) fn dma_in(
        &mut self,
        addr: u64,
        len: u64,
        offset: u64,
    ) -> std::result::Result<(), EduError> {
        let mut done = 0;
        while done < len {
            let (m, n) = self.locate(addr + done, len - done)?;
            self.dev
                .edu
                .copy_to_device(m, addr + done, n, offset + done)?;
            self.work.commands += 1;
            self.work.bytes_read += n;
            done += n;
        }
        Ok(())
    }

    /// The device writes `len` bytes of its buffer at `offset` to `addr`.
    pub(super) fn dma_out(
        &mut self,
        offset: u64,
        addr: u64,
        len: u64,
    ) -> std::result::Result<(), EduError> {
        let mut done = 0;
        while done < len {
            let (m, n) = self.locate(addr + done, len - done)?;
            self.dev
                .edu
                .copy_from_device(m, offset + done, addr + done, n)?;
            self.work.commands += 1;
            self.work.bytes_written += n;
            done += n;
        }
        // The CPU reads what the device wrote only after the transfer completed.
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The device fetches `out.len()` bytes at `addr` (through its buffer into the staging
    /// page, from which the CPU copies them).
    pub(super) fn fetch(&mut self, addr: u64, out: &mut [u8]) -> std::result::Result<(), EduError> {
        let staging = self.dev.staging.start();
        let mut done = 0usize;
        while done < out.len() {
            let n = (out.len() - done).min(MAX_TRANSFER as usize);
            self.dma_in(addr + done as u64, n as u64, 0)?;
            self.dma_out(0, staging, n as u64)?;
            // SAFETY: the staging page holds `n` <= 4095 bytes the device just wrote; no
            // transfer runs (the device is ours while `dev` is borrowed) and no Rust reference
            // covers the page.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    staging as usize as *const u8,
                    out[done..].as_mut_ptr(),
                    n,
                );
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `stores` back by device DMA: up to 4095 bytes of results at a time go from the
    /// staging page into the device's buffer (one transfer), then each to its own address.
    /// The outer error is the device failing; the inner ones say which stores were refused.
    pub(super) fn write_back(
        &mut self,
        stores: &[Store],
    ) -> std::result::Result<Vec<std::result::Result<(), EduError>>, EduError> {
        let staging = self.dev.staging.start();
        let mut out = Vec::with_capacity(stores.len());
        let mut i = 0;
        while i < stores.len() {
            let mut batch_end = i;
            let mut bytes = 0u64;
            while batch_end < stores.len()
                && bytes + stores[batch_end].bytes.len() as u64 <= MAX_TRANSFER
            {
                bytes += stores[batch_end].bytes.len() as u64;
                batch_end += 1;
            }
            if batch_end == i {
                return Err(EduError::DmaOutOfBounds {
                    offset: 0,
                    len: stores[i].bytes.len() as u64,
                    limit: MAX_TRANSFER,
                });
            }
            let mut at = 0u64;
            for s in &stores[i..batch_end] {
                // SAFETY: `at + len <= 4095`, inside the staging page, which no transfer uses
                // now and no Rust reference covers.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        s.bytes.as_ptr(),
                        (staging + at) as usize as *mut u8,
                        s.bytes.len(),
                    );
                }
                at += s.bytes.len() as u64;
            }
            fence(Ordering::SeqCst);
            self.dma_in(staging, bytes, 0)?;
            let mut off = 0u64;
            for s in &stores[i..batch_end] {
                let len = s.bytes.len() as u64;
                out.push(self.dma_out(off, s.addr, len));
                off += len;
            }
            i = batch_end;
        }
        Ok(out)
    }
}

/// Results to write back, split so that each fits one transfer.
#[derive(Default)]
pub(super) struct Stores(pub(super) Vec<Store>);

impl Stores {
    pub(super) fn push(&mut self, addr: u64, bytes: &[u8]) {
        for (k, part) in bytes.chunks(MAX_TRANSFER as usize).enumerate() {
            self.0.push(Store {
                addr: addr + (k as u64) * MAX_TRANSFER,
                bytes: part.to_vec(),
            });
        }
    }
}

/// The apps through edu: fetches by DMA into the staging page, stores by DMA back out
/// ([`Engine::write_back`]).
impl Mover for Engine<'_> {
    type Error = EduError;
    const BLOCK: u64 = LINE;
    const SAXPY_BYTES: u64 = MAX_TRANSFER;

    fn fetch(&mut self, addr: u64, out: &mut [u8]) -> std::result::Result<(), EduError> {
        Engine::fetch(self, addr, out)
    }

    unsafe fn store(
        &mut self,
        stores: &[(u64, &[u8])],
    ) -> std::result::Result<Vec<std::result::Result<(), EduError>>, EduError> {
        let mut parts = Stores::default();
        let mut counts = Vec::with_capacity(stores.len());
        for &(addr, bytes) in stores {
            let before = parts.0.len();
            parts.push(addr, bytes);
            counts.push(parts.0.len() - before);
        }
        let mut written = self.write_back(&parts.0)?.into_iter();
        // A store split over several transfers fails with its first part that failed.
        Ok(counts
            .into_iter()
            .map(|c| {
                let parts: Vec<_> = written.by_ref().take(c).collect();
                parts.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
            })
            .collect())
    }

    fn refused(e: &EduError) -> bool {
        is_refusal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_are_split_to_fit_one_transfer() {
        let mut s = Stores::default();
        s.push(0x1000, &vec![7u8; 5000]);
        assert_eq!(s.0.len(), 2);
        assert_eq!(s.0[0].bytes.len(), 4095);
        assert_eq!(s.0[1].addr, 0x1000 + 4095);
        assert_eq!(s.0[1].bytes.len(), 905);
    }
}
