//! How bytes move through pins: the staging memfd and the copy pipes, and the transfers
//! through them (see "How an access works" in the [module documentation](super)).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use io_uring::{opcode, squeue, types};
use svmirror_core::{PAGE_SIZE, might_sleep};

use super::pool::{PoolInner, RING_ENTRIES};
use super::{PinId, PinPool, Target};
use crate::error::{IommuError, Result};

/// The staging memfd's mapping. Owned by [`Staging`] and touched only under the pool's lock, so
/// the pointer may move between threads (STYLE.md rule 7).
struct StagingPtr(NonNull<u8>);

// SAFETY: the mapping is private to the pool; every access goes through `PoolInner`, which the
// pool's mutex serializes.
unsafe impl Send for StagingPtr {}

/// A memfd of `len` bytes mapped shared into the process: device-local memory the kernel copies
/// pinned pages into and out of.
pub(super) struct Staging {
    fd: OwnedFd,
    map: StagingPtr,
    len: usize,
}

impl Staging {
    pub(super) fn new(len: usize) -> io::Result<Staging> {
        // SAFETY: the name is a NUL-terminated literal; the returned descriptor is checked.
        let raw =
            unsafe { libc::memfd_create(c"svmirror-iommu-staging".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of our own memfd; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Staging {
            fd,
            map: StagingPtr(map),
            len,
        })
    }
}

/// A pipe that pin-to-pin copies go through, emptied by every copy that completes. After a
/// failed transfer it may hold bytes, so it is replaced.
pub(super) struct CopyPipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// The pipe's capacity: the most one linked pair moves.
    cap: usize,
}

impl CopyPipe {
    /// A pipe of about `want` bytes (as large as the kernel allows, at least a page).
    fn new(want: usize) -> io::Result<CopyPipe> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `pipe2` just created both descriptors; nothing else owns them.
        let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        // SAFETY: plain fcntl on a descriptor we own; a failure leaves the default size.
        unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
        // SAFETY: plain fcntl on a descriptor we own.
        let cap = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if cap < PAGE_SIZE as i32 {
            return Err(io::Error::last_os_error());
        }
        Ok(CopyPipe {
            rd,
            wr,
            cap: cap as usize,
        })
    }
}
/// `n` pipes of about `want` bytes, or none if one cannot be made.
pub(super) fn copy_pipes(n: usize, want: usize) -> Vec<CopyPipe> {
    let pipes: io::Result<Vec<CopyPipe>> = (0..n).map(|_| CopyPipe::new(want)).collect();
    pipes
        .inspect_err(|e| tracing::debug!(%e, "no copy pipes; copies use the staging memfd"))
        .unwrap_or_default()
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing refers to it any more.
        unsafe { libc::munmap(self.map.0.as_ptr().cast(), self.len) };
    }
}
fn io_err(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}
impl PinPool {
    /// Copies `dst.len()` bytes of pinned memory at `at` into device memory `dst`.
    pub fn read(&self, at: Target, dst: &mut [u8]) -> Result<()> {
        might_sleep("PinPool::read");
        let mut g = self.lock();
        let addr = g.resolve(at, dst.len() as u64)?;
        if !g.pipes.is_empty() {
            let r = g.read_through_pipe(at, addr, dst);
            if r.is_err() {
                g.replace_pipes();
            }
            return r;
        }
        let chunk = g.staging.len;
        let mut done = 0;
        while done < dst.len() {
            let n = (dst.len() - done).min(chunk);
            let e = opcode::WriteFixed::new(
                types::Fd(g.staging.fd.as_raw_fd()),
                (addr + done as u64) as *const u8,
                n as u32,
                at.pin.slot as u16,
            )
            .offset(0)
            .build();
            let [res, _] = g.submit(&[e])?;
            check("read", at.pin, res, n)?;
            // SAFETY: the staging mapping holds at least `chunk >= n` bytes, the kernel has
            // finished writing them (its completion was reaped), and `dst[done..done + n]` is
            // a distinct, valid slice.
            unsafe {
                std::ptr::copy_nonoverlapping(g.staging.map.0.as_ptr(), dst[done..].as_mut_ptr(), n)
            };
            done += n;
        }
        Ok(())
    }

    /// Copies device memory `src` into pinned memory at `at`.
    pub fn write(&self, at: Target, src: &[u8]) -> Result<()> {
        might_sleep("PinPool::write");
        let mut g = self.lock();
        let addr = g.resolve(at, src.len() as u64)?;
        if !g.pipes.is_empty() {
            let r = g.write_through_pipe(at, addr, src);
            if r.is_err() {
                g.replace_pipes();
            }
            return r;
        }
        let chunk = g.staging.len;
        let mut done = 0;
        while done < src.len() {
            let n = (src.len() - done).min(chunk);
            // SAFETY: the staging mapping holds at least `chunk >= n` bytes and no I/O uses it
            // now (transfers complete under the lock we hold).
            unsafe {
                std::ptr::copy_nonoverlapping(src[done..].as_ptr(), g.staging.map.0.as_ptr(), n)
            };
            let e = opcode::ReadFixed::new(
                types::Fd(g.staging.fd.as_raw_fd()),
                (addr + done as u64) as *mut u8,
                n as u32,
                at.pin.slot as u16,
            )
            .offset(0)
            .build();
            let [res, _] = g.submit(&[e])?;
            check("write", at.pin, res, n)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `len` bytes of `value` at `at` (a fill): the staging memory is set to `value`
    /// once, and fixed-buffer reads of it land in the pinned pages, one submission for up to
    /// `RING_ENTRIES` staging lengths: one copy per byte, where [`write`](Self::write)
    /// through the pipe makes two.
    pub fn fill(&self, at: Target, len: u64, value: u8) -> Result<()> {
        might_sleep("PinPool::fill");
        let mut g = self.lock();
        let addr = g.resolve(at, len)?;
        let chunk = (g.staging.len as u64).min(len);
        if chunk == 0 {
            return Ok(());
        }
        // SAFETY: the staging mapping holds `staging.len >= chunk` bytes and no I/O uses it now
        // (transfers complete under the lock we hold).
        unsafe { std::ptr::write_bytes(g.staging.map.0.as_ptr(), value, chunk as usize) };
        let fd = g.staging.fd.as_raw_fd();
        let mut done = 0u64;
        while done < len {
            let mut entries = Vec::new();
            let mut want = Vec::new();
            while done < len && entries.len() < RING_ENTRIES as usize {
                let n = (len - done).min(chunk);
                entries.push(
                    opcode::ReadFixed::new(
                        types::Fd(fd),
                        (addr + done) as *mut u8,
                        n as u32,
                        at.pin.slot as u16,
                    )
                    .offset(0)
                    .build(),
                );
                want.push(n as usize);
                done += n;
            }
            let res = g.submit_all(&entries)?;
            for (r, n) in res.into_iter().zip(want) {
                check("fill", at.pin, r, n)?;
            }
        }
        Ok(())
    }

    /// Copies the pinned `(target, bytes)` parts, in order, into `dst` (their lengths add up to
    /// `dst.len()`): a gather. Through the pipe, a batch of parts is one submission, a
    /// fixed-buffer write of each part into the pipe, linked in order, then one read of them
    /// all out of it: the parts cost an SQE each, not a system call each. Without a pipe, part
    /// by part as [`read`](Self::read). Every part's pin is checked before anything moves.
    pub fn read_many(&self, parts: &[(Target, u64)], dst: &mut [u8]) -> Result<()> {
        might_sleep("PinPool::read_many");
        let piped = self.transfer_many("read", parts, dst.len(), |g, batch, at| {
            let (_, wr, rd) = g.first_pipe();
            let mut entries = Vec::with_capacity(batch.len() + 1);
            for &(addr, slot, n) in batch {
                entries.push(
                    opcode::WriteFixed::new(wr, addr as *const u8, n as u32, slot)
                        .offset(0)
                        .build()
                        .flags(squeue::Flags::IO_LINK),
                );
            }
            let total: u64 = batch.iter().map(|b| b.2).sum();
            let out = &mut dst[at..at + total as usize];
            // `out` is ours and outlives the submission (`submit_all` waits for every
            // completion).
            entries.push(
                opcode::Read::new(rd, out.as_mut_ptr(), total as u32)
                    .offset(0)
                    .build(),
            );
            let mut want: Vec<u64> = batch.iter().map(|b| b.2).collect();
            want.push(total);
            (entries, want)
        })?;
        if !piped {
            let mut at = 0;
            for &(t, n) in parts {
                self.read(t, &mut dst[at..at + n as usize])?;
                at += n as usize;
            }
        }
        Ok(())
    }

    /// Copies `src` into the pinned `(target, bytes)` parts, in order (their lengths add up to
    /// `src.len()`): a scatter. Through the pipe, a batch is one plain write of its bytes into
    /// the pipe linked to a fixed-buffer read out of it into each part, in order.
    pub fn write_many(&self, parts: &[(Target, u64)], src: &[u8]) -> Result<()> {
        might_sleep("PinPool::write_many");
        let piped = self.transfer_many("write", parts, src.len(), |g, batch, at| {
            let (_, wr, rd) = g.first_pipe();
            let total: u64 = batch.iter().map(|b| b.2).sum();
            let bytes = &src[at..at + total as usize];
            let mut entries = Vec::with_capacity(batch.len() + 1);
            entries.push(
                opcode::Write::new(wr, bytes.as_ptr(), total as u32)
                    .offset(0)
                    .build()
                    .flags(squeue::Flags::IO_LINK),
            );
            let last = batch.len() - 1;
            for (i, &(addr, slot, n)) in batch.iter().enumerate() {
                let e = opcode::ReadFixed::new(rd, addr as *mut u8, n as u32, slot)
                    .offset(0)
                    .build();
                entries.push(if i < last {
                    e.flags(squeue::Flags::IO_LINK)
                } else {
                    e
                });
            }
            let mut want = vec![total];
            want.extend(batch.iter().map(|b| b.2));
            (entries, want)
        })?;
        if !piped {
            let mut at = 0;
            for &(t, n) in parts {
                self.write(t, &src[at..at + n as usize])?;
                at += n as usize;
            }
        }
        Ok(())
    }

    /// What [`read_many`](Self::read_many) and [`write_many`](Self::write_many) share: checks
    /// every part, cuts them into batches that fit the ring and the pipe, and submits each
    /// batch `build` makes from `(address, buffer index, bytes)` pieces and the offset of the
    /// batch's first byte in the device memory (returning the entries and the result each
    /// must have). Returns false, having moved nothing, when there is no pipe.
    fn transfer_many(
        &self,
        op: &'static str,
        parts: &[(Target, u64)],
        total: usize,
        mut build: impl FnMut(&PoolInner, &[(u64, u16, u64)], usize) -> (Vec<squeue::Entry>, Vec<u64>),
    ) -> Result<bool> {
        let sum = parts.iter().try_fold(0u64, |s, p| s.checked_add(p.1));
        if sum != Some(total as u64) || parts.iter().any(|p| p.1 == 0) {
            return Err(IommuError::Transfer {
                op,
                pin: parts.first().map_or(
                    PinId {
                        slot: 0,
                        generation: 0,
                    },
                    |p| p.0.pin,
                ),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the parts must be non-empty and add up to the device buffer",
                ),
            });
        }
        let mut g = self.lock();
        // Every pin is checked before anything moves.
        let mut pieces = Vec::with_capacity(parts.len());
        for &(at, len) in parts {
            pieces.push((g.resolve(at, len)?, at.pin, len));
        }
        if g.pipes.is_empty() {
            // No pipe (`Transfer::Memfd`, or none could be made): the caller moves the parts
            // one at a time.
            return Ok(false);
        }
        let (chunk, _, _) = g.first_pipe();
        let slots = (chunk as u64 / PAGE_SIZE).max(1);
        // Pieces no longer than a quarter of the pipe; a batch holds at most `RING_ENTRIES - 1`
        // of them and needs at most as many pipe pages as the pipe has (a piece of `n` bytes
        // lands in at most `n / page + 2` of them: the kernel merges a small write into the
        // last page when it fits).
        let piece_max = (chunk as u64 / 4).max(1);
        let max_batch = RING_ENTRIES as usize - 1;
        let mut batch: Vec<(u64, u16, u64)> = Vec::with_capacity(max_batch);
        let mut pins: Vec<PinId> = Vec::with_capacity(max_batch);
        let (mut used, mut bytes, mut at) = (0u64, 0u64, 0usize);
        let mut pending = pieces.into_iter().flat_map(|(addr, pin, len)| {
            (0..len.div_ceil(piece_max)).map(move |i| {
                let off = i * piece_max;
                (addr + off, pin, (len - off).min(piece_max))
            })
        });
        let mut next = pending.next();
        while next.is_some() || !batch.is_empty() {
            if let Some((addr, pin, n)) = next {
                let pages = n / PAGE_SIZE + 2;
                // An empty pipe always takes one piece (it is no longer than the pipe).
                if batch.is_empty() || (batch.len() < max_batch && used + pages <= slots) {
                    batch.push((addr, pin.slot as u16, n));
                    pins.push(pin);
                    used += pages;
                    bytes += n;
                    next = pending.next();
                    continue;
                }
            }
            let (entries, want) = build(&g, &batch, at);
            let r = g.submit_all(&entries).and_then(|res| {
                for (i, (&got, &n)) in res.iter().zip(&want).enumerate() {
                    // The entry's pin, or the batch's first for the one plain transfer.
                    let pin = pins[i
                        .saturating_sub(usize::from(op == "write"))
                        .min(pins.len() - 1)];
                    check(op, pin, got, n as usize)?;
                }
                Ok(())
            });
            if r.is_err() {
                g.replace_pipes();
            }
            r?;
            at += bytes as usize;
            batch.clear();
            pins.clear();
            (used, bytes) = (0, 0);
        }
        Ok(true)
    }

    /// Copies `len` bytes of pinned memory from `src` to `dst` (which may be the same pin), in
    /// the kernel: each chunk is a fixed-buffer write into staging linked to a fixed-buffer read
    /// out of it.
    pub fn copy(&self, src: Target, dst: Target, len: u64) -> Result<()> {
        might_sleep("PinPool::copy");
        let mut g = self.lock();
        let from = g.resolve(src, len)?;
        let to = g.resolve(dst, len)?;
        if !g.pipes.is_empty() {
            let r = g.copy_through_pipes(src, dst, from, to, len);
            if r.is_err() {
                g.replace_pipes();
            }
            return r;
        }
        let chunk = g.staging.len as u64;
        let fd = types::Fd(g.staging.fd.as_raw_fd());
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk);
            let out = opcode::WriteFixed::new(
                fd,
                (from + done) as *const u8,
                n as u32,
                src.pin.slot as u16,
            )
            .offset(0)
            .build()
            .flags(squeue::Flags::IO_LINK);
            let back =
                opcode::ReadFixed::new(fd, (to + done) as *mut u8, n as u32, dst.pin.slot as u16)
                    .offset(0)
                    .build();
            let [r1, r2] = g.submit(&[out, back])?;
            check("copy", src.pin, r1, n as usize)?;
            check("copy", dst.pin, r2, n as usize)?;
            done += n;
        }
        Ok(())
    }
}

fn check(op: &'static str, pin: PinId, res: i32, want: usize) -> Result<()> {
    if res < 0 {
        return Err(IommuError::Transfer {
            op,
            pin,
            source: io_err(res),
        });
    }
    if res as usize != want {
        return Err(IommuError::ShortTransfer {
            op,
            pin,
            done: res as u64,
            len: want as u64,
        });
    }
    Ok(())
}
impl PoolInner {
    /// [`PinPool::copy`] through the pipes: per pipe-full, a fixed-buffer write into a pipe
    /// linked to a fixed-buffer read out of it; up to one such chain per pipe at once, in
    /// parallel on io_uring's workers when there are several. `from` and `to` are the resolved
    /// addresses.
    fn copy_through_pipes(
        &mut self,
        src: Target,
        dst: Target,
        from: u64,
        to: u64,
        len: u64,
    ) -> Result<()> {
        let chunk = self.pipes.iter().map(|p| p.cap).min().unwrap_or(0) as u64;
        if chunk == 0 {
            return Ok(());
        }
        let mut done = 0;
        while done < len {
            let mut entries = Vec::with_capacity(2 * self.pipes.len());
            let mut sizes = Vec::with_capacity(self.pipes.len());
            let lanes = (len - done).div_ceil(chunk).min(self.pipes.len() as u64) as usize;
            for pipe in &self.pipes[..lanes] {
                let n = (len - done).min(chunk);
                let mut first = squeue::Flags::IO_LINK;
                if lanes > 1 {
                    first |= squeue::Flags::ASYNC;
                }
                entries.push(
                    opcode::WriteFixed::new(
                        types::Fd(pipe.wr.as_raw_fd()),
                        (from + done) as *const u8,
                        n as u32,
                        src.pin.slot as u16,
                    )
                    .offset(0)
                    .build()
                    .flags(first),
                );
                entries.push(
                    opcode::ReadFixed::new(
                        types::Fd(pipe.rd.as_raw_fd()),
                        (to + done) as *mut u8,
                        n as u32,
                        dst.pin.slot as u16,
                    )
                    .offset(0)
                    .build(),
                );
                sizes.push(n as usize);
                done += n;
            }
            let res = self.submit_all(&entries)?;
            for (i, n) in sizes.into_iter().enumerate() {
                check("copy", src.pin, res[2 * i], n)?;
                check("copy", dst.pin, res[2 * i + 1], n)?;
            }
        }
        Ok(())
    }

    /// [`PinPool::read`] through the first pipe: per pipe-full, a fixed-buffer write of the
    /// pinned pages into the pipe linked to a plain read out of it into `dst`, both issued
    /// inline by this thread. `addr` is `at` resolved.
    fn read_through_pipe(&mut self, at: Target, addr: u64, dst: &mut [u8]) -> Result<()> {
        let (chunk, wr, rd) = self.first_pipe();
        let mut done = 0;
        while done < dst.len() {
            let n = (dst.len() - done).min(chunk);
            let into = opcode::WriteFixed::new(
                wr,
                (addr + done as u64) as *const u8,
                n as u32,
                at.pin.slot as u16,
            )
            .offset(0)
            .build()
            .flags(squeue::Flags::IO_LINK);
            let out = opcode::Read::new(rd, dst[done..].as_mut_ptr(), n as u32)
                .offset(0)
                .build();
            // `dst[done..done + n]` is ours and outlives the submission (`submit` waits for
            // both completions).
            let [r1, r2] = self.submit(&[into, out])?;
            check("read", at.pin, r1, n)?;
            check("read", at.pin, r2, n)?;
            done += n;
        }
        Ok(())
    }

    /// [`PinPool::write`] through the first pipe: per pipe-full, a plain write of `src` into
    /// the pipe linked to a fixed-buffer read out of it into the pinned pages.
    fn write_through_pipe(&mut self, at: Target, addr: u64, src: &[u8]) -> Result<()> {
        let (chunk, wr, rd) = self.first_pipe();
        let mut done = 0;
        while done < src.len() {
            let n = (src.len() - done).min(chunk);
            let into = opcode::Write::new(wr, src[done..].as_ptr(), n as u32)
                .offset(0)
                .build()
                .flags(squeue::Flags::IO_LINK);
            let out = opcode::ReadFixed::new(
                rd,
                (addr + done as u64) as *mut u8,
                n as u32,
                at.pin.slot as u16,
            )
            .offset(0)
            .build();
            let [r1, r2] = self.submit(&[into, out])?;
            check("write", at.pin, r1, n)?;
            check("write", at.pin, r2, n)?;
            done += n;
        }
        Ok(())
    }

    /// The first pipe's chunk (its capacity, at most the staging size) and its two ends.
    fn first_pipe(&self) -> (usize, types::Fd, types::Fd) {
        let p = &self.pipes[0];
        (
            p.cap.min(self.staging.len),
            types::Fd(p.wr.as_raw_fd()),
            types::Fd(p.rd.as_raw_fd()),
        )
    }

    /// Replaces the copy pipes after a failed transfer (they may hold bytes); without new ones,
    /// copies fall back to the staging memfd.
    fn replace_pipes(&mut self) {
        let want = self.pipes.first().map_or(0, |p| p.cap);
        self.pipes = copy_pipes(self.pipes.len(), want);
    }
    /// Submits one or two entries (the second linked to the first) and waits for all of them.
    /// Returns each one's result in order (the unused second is 0).
    fn submit(&mut self, entries: &[squeue::Entry]) -> Result<[i32; 2]> {
        debug_assert!(!entries.is_empty() && entries.len() <= 2);
        let r = self.submit_all(entries)?;
        Ok([r[0], r.get(1).copied().unwrap_or(0)])
    }

    /// Submits `entries` (at most the ring's size) and waits for all of them. Returns each
    /// one's result in order.
    fn submit_all(&mut self, entries: &[squeue::Entry]) -> Result<Vec<i32>> {
        debug_assert!(!entries.is_empty() && entries.len() <= RING_ENTRIES as usize);
        let mut sq = self.ring.submission();
        for (i, e) in entries.iter().enumerate() {
            let e = e.clone().user_data(i as u64);
            // SAFETY: the buffers the entries name are registered buffers (pinned by the kernel)
            // and the staging mapping, which outlives the submission: we wait for every
            // completion below, under the pool lock.
            unsafe { sq.push(&e) }.map_err(|_| IommuError::Transfer {
                op: "submit",
                pin: PinId {
                    slot: 0,
                    generation: 0,
                },
                source: io::Error::from_raw_os_error(libc::EBUSY),
            })?;
        }
        drop(sq);
        let mut res = vec![0i32; entries.len()];
        let mut seen = 0;
        while seen < entries.len() {
            if let Err(source) = self.ring.submit_and_wait(entries.len() - seen) {
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(IommuError::Transfer {
                    op: "submit",
                    pin: PinId {
                        slot: 0,
                        generation: 0,
                    },
                    source,
                });
            }
            for cqe in self.ring.completion() {
                if let Some(r) = res.get_mut(cqe.user_data() as usize) {
                    *r = cqe.result();
                    seen += 1;
                }
            }
        }
        self.stats.submissions += 1;
        Ok(res)
    }
}
