//! [`Nvme`]: a running controller: the admin queue pair, Identify, one I/O queue pair, and
//! Read/Write of the caller's memory at its own addresses, by polling.
//!
//! # Memory
//!
//! The queues, the PRP list page and the Identify buffer are one page-aligned heap allocation
//! ([`DmaRegion`]): ordinary process memory, mirrored by the caller's [`VfioMapper`] like any
//! other. The caller passes one mapper or several (one per usable IOVA range, so that IOVA =
//! the process address everywhere; a single mapper over the whole address space must use
//! allocated IOVAs where the IOMMU's ranges have a hole, such as the MSI window); each piece of
//! memory goes through the mapper whose range holds it. Each queue fits one page, so it is
//! contiguous in IOVA space whatever the mapper's IOVA mode (the I/O queues are created physically contiguous, PC = 1). Every command holds
//! device accesses ([`Held`]) on that region and on its data buffer from before its doorbell
//! until its completion is read, taken together (one [`VfioMapper::access_many`] per
//! mapper): an invalidation of either waits for it, and a fault maps again whatever an
//! earlier invalidation took away (a neighbour's munmap in the same chunk, say). Between
//! commands the controller touches no host memory.
//!
//! # Commands
//!
//! One command at a time (`&mut self`): write the entry at the submission tail, ring the tail
//! doorbell, poll the completion entry at the head until its phase tag flips ("Completion
//! Queue Entry": the tag inverts on each pass through the queue), ring the head doorbell. A
//! command that does not complete within the timeout disables the controller before the
//! error returns, so it can no longer write the caller's memory; the `Nvme` then answers
//! [`NvmeError::Halted`].

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use svmirror_vfio::VfioMapper;

use crate::device::NvmeDevice;
use crate::dma::{DmaRegion, Held};
use crate::error::{NvmeError, Result};
use crate::prp::{self, Prp2};
use crate::regs::{CQE, Command, Completion, ControllerInfo, NamespaceInfo, PAGE, SQE, admin, io};

/// Pages of the driver's DMA region, by use.
mod page {
    pub(super) const ADMIN_SQ: usize = 0;
    pub(super) const ADMIN_CQ: usize = 1;
    pub(super) const IO_SQ: usize = 2;
    pub(super) const IO_CQ: usize = 3;
    pub(super) const PRP_LIST: usize = 4;
    pub(super) const IDENTIFY: usize = 5;
    pub(super) const COUNT: usize = 6;
}

/// Entries of the admin queues.
const ADMIN_ENTRIES: u32 = 32;
/// Entries of the I/O queues: one page of submission entries.
const IO_ENTRIES: u32 = (PAGE as usize / SQE) as u32;
/// The I/O queue pair's identifier.
const IO_QID: u16 = 1;

/// How to start a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeConfig {
    /// The namespace to use.
    pub nsid: u32,
    /// How long one command may take before the controller is reset.
    pub command_timeout: Duration,
    /// Whether [`Nvme::write`] may overwrite the namespace of a controller that is not
    /// QEMU's emulated one (see [`ControllerInfo::is_qemu`]). Off by default: a write to a
    /// real drive is refused with [`NvmeError::WriteRefused`].
    pub allow_write: bool,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            nsid: 1,
            command_timeout: Duration::from_secs(5),
            allow_write: false,
        }
    }
}

/// One queue pair's host-side state.
#[derive(Debug)]
struct QueuePair {
    qid: u16,
    entries: u16,
    sq: u64,
    cq: u64,
    sq_tail: u16,
    cq_head: u16,
    /// The phase tag a new completion carries; the CQ starts zeroed, so 1 on the first pass.
    phase: bool,
}

impl QueuePair {
    fn new(qid: u16, entries: u32, sq: u64, cq: u64) -> QueuePair {
        QueuePair {
            qid,
            entries: entries as u16,
            sq,
            cq,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        }
    }
}

/// Counts of what an [`Nvme`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeStats {
    /// Commands completed (admin and I/O).
    pub commands: u64,
    /// Bytes read by the device into memory.
    pub bytes_read: u64,
    /// Bytes written from memory by the device.
    pub bytes_written: u64,
}

/// A running NVMe controller: admin queues, one I/O queue pair, one namespace. See the
/// [crate documentation](crate) and the module notes in `controller.rs`.
pub struct Nvme {
    // Drop disables the controller first (`Drop::drop`); then the fields go in this order:
    // the queue memory, the mappers, the device (registers, then the fd).
    mem: Option<DmaRegion>,
    mappers: Vec<Arc<VfioMapper>>,
    dev: NvmeDevice,
    admin: QueuePair,
    io: Option<QueuePair>,
    controller: Option<ControllerInfo>,
    namespace: Option<NamespaceInfo>,
    max_transfer: u64,
    timeout: Duration,
    next_cid: u16,
    halted: bool,
    allow_write: bool,
    stats: NvmeStats,
}

impl std::fmt::Debug for Nvme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvme")
            .field("path", &self.dev.path())
            .field("controller", &self.controller)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl NvmeDevice {
    /// Starts the controller: its queues in ordinary heap memory that `mappers` mirror (their
    /// ranges must hold the heap and every buffer later passed to [`Nvme::read`] and
    /// [`Nvme::write`]; its container must be the one the device was opened in), enable,
    /// Identify Controller and Namespace `config.nsid`, and one I/O queue pair.
    pub fn start(self, mappers: Vec<Arc<VfioMapper>>, config: NvmeConfig) -> Result<Nvme> {
        let mem = DmaRegion::new(page::COUNT)?;
        let admin_entries = ADMIN_ENTRIES.min(self.cap.max_entries);
        let admin = QueuePair::new(
            0,
            admin_entries,
            mem.page(page::ADMIN_SQ),
            mem.page(page::ADMIN_CQ),
        );
        let mut nvme = Nvme {
            mem: Some(mem),
            mappers,
            dev: self,
            admin,
            io: None,
            controller: None,
            namespace: None,
            max_transfer: prp::MAX_COMMAND_BYTES,
            timeout: config.command_timeout,
            next_cid: 0,
            halted: false,
            allow_write: config.allow_write,
            stats: NvmeStats::default(),
        };
        // From here on a failure drops `nvme`, which disables the controller.
        nvme.bring_up(config.nsid, admin_entries)?;
        Ok(nvme)
    }
}

impl Nvme {
    fn mem(&self) -> Result<&DmaRegion> {
        self.mem.as_ref().ok_or(NvmeError::Halted)
    }

    fn bring_up(&mut self, nsid: u32, admin_entries: u32) -> Result<()> {
        let (addr, len) = (self.mem()?.addr(), self.mem()?.len());
        let mapper = self.mapper_for(addr, len)?;
        {
            // The admin queues' bus addresses go into ASQ/ACQ; map them before enabling.
            let held = Held::new(&mapper, addr, len, true)?;
            let asq = self.queue_iova(&held, self.admin.sq)?;
            let acq = self.queue_iova(&held, self.admin.cq)?;
            self.dev.enable(asq, acq, admin_entries)?;
        }
        let page_min = self.dev.cap.page_min;
        let id = self.identify(admin::CNS_CONTROLLER, 0)?;
        let ctrl = ControllerInfo::parse(&id, page_min);
        if ctrl.namespaces < nsid || nsid == 0 {
            return Err(NvmeError::Unsupported {
                what: "the namespace asked for (Identify Controller NN)",
            });
        }
        let id = self.identify(admin::CNS_NAMESPACE, nsid)?;
        let ns = NamespaceInfo::parse(nsid, &id).ok_or(NvmeError::Unsupported {
            what: "the namespace's LBA format (FLBAS/LBAF)",
        })?;
        if ns.metadata != 0 || ns.blocks == 0 {
            return Err(NvmeError::Unsupported {
                what: "namespaces with metadata or no blocks",
            });
        }
        self.max_transfer = ctrl
            .max_transfer
            .map_or(prp::MAX_COMMAND_BYTES, |m| m.min(prp::MAX_COMMAND_BYTES));
        if self.max_transfer < ns.lba_size {
            return Err(NvmeError::Unsupported {
                what: "a transfer size of at least one block (MDTS)",
            });
        }
        tracing::debug!(
            path = %self.dev.path().display(),
            model = %ctrl.model,
            serial = %ctrl.serial,
            blocks = ns.blocks,
            lba_size = ns.lba_size,
            max_transfer = self.max_transfer,
            "nvme controller identified"
        );
        self.controller = Some(ctrl);
        self.namespace = Some(ns);
        // One I/O queue pair ("Create I/O Completion Queue", then "Create I/O Submission
        // Queue" bound to it): physically contiguous (one page), no interrupts.
        let entries = IO_ENTRIES.min(self.dev.cap.max_entries);
        let (sq, cq) = (self.mem()?.page(page::IO_SQ), self.mem()?.page(page::IO_CQ));
        let (sq_iova, cq_iova) = {
            let held = Held::new(&mapper, addr, len, true)?;
            (self.queue_iova(&held, sq)?, self.queue_iova(&held, cq)?)
        };
        let qsize = (entries - 1) << 16 | u32::from(IO_QID);
        self.admin_command(Command {
            opcode: admin::CREATE_CQ,
            prp1: cq_iova,
            cdw10: qsize,
            cdw11: 1, // PC = 1, IEN = 0
            ..Command::default()
        })?;
        self.admin_command(Command {
            opcode: admin::CREATE_SQ,
            prp1: sq_iova,
            cdw10: qsize,
            cdw11: u32::from(IO_QID) << 16 | 1, // CQID, PC = 1
            ..Command::default()
        })?;
        self.io = Some(QueuePair::new(IO_QID, entries, sq, cq));
        Ok(())
    }

    /// The bus address of a queue page. The registers hold it for the controller's life, so
    /// it must not move: it is the process address in identity mode, and an allocated IOVA
    /// window lasts as long as its virtual range (which the region holds).
    fn queue_iova(&self, held: &Held<'_>, va: u64) -> Result<u64> {
        held.iova(va).ok_or(NvmeError::Unsupported {
            what: "queue memory outside the mapper's range",
        })
    }

    /// What Identify Controller reported.
    pub fn controller(&self) -> Option<&ControllerInfo> {
        self.controller.as_ref()
    }

    /// The namespace in use.
    pub fn namespace(&self) -> Result<NamespaceInfo> {
        self.namespace.ok_or(NvmeError::Halted)
    }

    /// Most bytes one command moves (MDTS, and one PRP list page); longer transfers are cut.
    pub fn max_transfer(&self) -> u64 {
        self.max_transfer
    }

    /// The mappers the controller's memory goes through.
    pub fn mappers(&self) -> &[Arc<VfioMapper>] {
        &self.mappers
    }

    /// The mapper whose range holds `[addr, addr + len)`.
    pub fn mapper_for(&self, addr: u64, len: u64) -> Result<Arc<VfioMapper>> {
        let end = addr.checked_add(len);
        self.mappers
            .iter()
            .find(|m| {
                let r = m.range();
                r.start() <= addr && end.is_some_and(|e| e <= r.end())
            })
            .cloned()
            .ok_or(NvmeError::NoMapper { addr, len })
    }

    /// The device.
    pub fn device(&self) -> &NvmeDevice {
        &self.dev
    }

    /// Sets how long one command may take before the controller is reset.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether the controller was reset after a failure (every command then answers
    /// [`NvmeError::Halted`]).
    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// What the controller did so far.
    pub fn stats(&self) -> NvmeStats {
        self.stats
    }

    /// Identify with CNS `cns` into the driver's Identify page; returns a copy.
    fn identify(&mut self, cns: u32, nsid: u32) -> Result<[u8; 4096]> {
        let buf = self.mem()?.page(page::IDENTIFY);
        let (addr, len) = (self.mem()?.addr(), self.mem()?.len());
        let mapper = self.mapper_for(addr, len)?;
        // The Identify page lies in the region: one hold for the command.
        let held = Held::new(&mapper, addr, len, true)?;
        let prp1 = self.queue_iova(&held, buf)?;
        self.execute(
            false,
            Command {
                opcode: admin::IDENTIFY,
                nsid,
                prp1,
                cdw10: cns,
                ..Command::default()
            },
        )?;
        drop(held);
        let mut out = [0u8; 4096];
        // SAFETY: the Identify page lies in the driver's region, which lives while `self`
        // does; the command completed, so the controller no longer writes it; a raw copy, no
        // reference to the page is made.
        unsafe { std::ptr::copy_nonoverlapping(buf as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(out)
    }

    /// An admin command that uses no memory but the driver's region.
    fn admin_command(&mut self, cmd: Command) -> Result<Completion> {
        let (addr, len) = (self.mem()?.addr(), self.mem()?.len());
        let mapper = self.mapper_for(addr, len)?;
        let _held = Held::new(&mapper, addr, len, true)?;
        self.execute(false, cmd)
    }

    /// Submits `cmd` on the admin queue (`io` false) or the I/O queue and waits for its
    /// completion. The caller holds the driver's region and the command's data mapped around
    /// the call, taken together ([`Held::many`]).
    fn execute(&mut self, io: bool, cmd: Command) -> Result<Completion> {
        if self.halted {
            return Err(NvmeError::Halted);
        }
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        let q = if io {
            self.io.as_mut().ok_or(NvmeError::Halted)?
        } else {
            &mut self.admin
        };
        let entry = cmd.encode(cid);
        let slot = (q.sq + u64::from(q.sq_tail) * SQE as u64) as *mut u32;
        for (i, d) in entry.iter().enumerate() {
            // SAFETY: `slot` is entry `sq_tail` of the submission queue, inside the driver's
            // region (one page of `entries * 64` bytes at most), held mapped; volatile because
            // the device reads it; the controller reads it only after the doorbell below.
            unsafe { slot.wrapping_add(i).write_volatile(*d) };
        }
        q.sq_tail = (q.sq_tail + 1) % q.entries;
        let (qid, tail) = (q.qid, q.sq_tail);
        // The entry (and the PRP list, and the data of a write) must be in memory before the
        // controller sees the new tail.
        fence(Ordering::SeqCst);
        self.dev.sq_doorbell(qid, tail);
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let q = if io {
                self.io.as_mut().ok_or(NvmeError::Halted)?
            } else {
                &mut self.admin
            };
            let at = (q.cq + u64::from(q.cq_head) * CQE as u64) as *const u32;
            // SAFETY: entry `cq_head` of the completion queue, inside the driver's region,
            // held mapped; volatile because the device writes it.
            let dw3 = unsafe { at.wrapping_add(3).read_volatile() };
            if (dw3 >> 16) & 1 == u32::from(q.phase) {
                // Read the rest of the entry, and the data, only after the phase tag.
                fence(Ordering::Acquire);
                // SAFETY: as above.
                let dw2 = unsafe { at.wrapping_add(2).read_volatile() };
                let c = Completion::parse(dw2, dw3);
                q.cq_head += 1;
                if q.cq_head == q.entries {
                    q.cq_head = 0;
                    q.phase = !q.phase;
                }
                let (qid, head) = (q.qid, q.cq_head);
                self.dev.cq_doorbell(qid, head);
                if c.cid != cid {
                    // A completion for no command of ours: the queue state is lost.
                    self.halt();
                    return Err(NvmeError::UnexpectedCompletion {
                        cid: c.cid,
                        expected: cid,
                    });
                }
                self.stats.commands += 1;
                if !c.ok() {
                    return Err(NvmeError::CommandFailed {
                        opcode: cmd.opcode,
                        sct: c.sct,
                        sc: c.sc,
                    });
                }
                return Ok(c);
            }
            if started.elapsed() > self.timeout {
                self.halt();
                return Err(NvmeError::CommandTimeout {
                    opcode: cmd.opcode,
                    cid,
                    millis: self.timeout.as_millis() as u64,
                });
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// Resets the controller after a failure, so it no longer touches host memory; if even
    /// that fails, the queue memory is leaked rather than freed under a live controller.
    fn halt(&mut self) {
        self.halted = true;
        if let Err(e) = self.dev.disable() {
            tracing::error!(path = %self.dev.path().display(), error = %e,
                "NVMe controller did not reset: leaking its queue memory");
            if let Some(m) = self.mem.take() {
                m.leak();
            }
        }
    }

    /// Reads `buf.len()` bytes from logical block `lba` of the namespace into `buf`: the
    /// device writes the caller's memory at its own address (IOVA = the process address in
    /// identity mode), mapped on demand through the mapper. Errors: an empty buffer, a length
    /// not a whole number of blocks, blocks past the namespace, a buffer not 4-byte aligned,
    /// memory the mapper cannot map, a failed or timed-out command (typed).
    pub fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<()> {
        let (addr, len) = (buf.as_mut_ptr() as u64, buf.len() as u64);
        self.transfer(io::READ, lba, addr, len)?;
        self.stats.bytes_read += len;
        Ok(())
    }

    /// Writes `buf` to the namespace from logical block `lba`: the device reads the caller's
    /// memory at its own address. Errors as for [`Nvme::read`].
    pub fn write(&mut self, lba: u64, buf: &[u8]) -> Result<()> {
        let (addr, len) = (buf.as_ptr() as u64, buf.len() as u64);
        self.write_at(lba, addr, len)
    }

    /// [`Nvme::read`] into memory the caller names by address rather than lends as a slice:
    /// the device writes `[addr, addr + len)` of this process at its own address. Memory
    /// that is not mapped, or not writable, is refused by the mapper with a typed error.
    ///
    /// # Safety
    ///
    /// Nothing else reads or writes `[addr, addr + len)` during the call (the device writes
    /// it at an unknown moment), and whatever lives there is valid for any bytes.
    pub unsafe fn read_raw(&mut self, lba: u64, addr: *mut u8, len: usize) -> Result<()> {
        let (addr, len) = (addr as u64, len as u64);
        self.transfer(io::READ, lba, addr, len)?;
        self.stats.bytes_read += len;
        Ok(())
    }

    /// [`Nvme::write`] from memory the caller names by address: the device reads
    /// `[addr, addr + len)` of this process at its own address. Memory that is not mapped,
    /// or not readable, is refused by the mapper with a typed error; no Rust reference to
    /// the memory is made, so other threads may write it meanwhile (the blocks then hold some
    /// mix of old and new bytes). Refused like [`Nvme::write`] on a real drive without
    /// [`NvmeConfig::allow_write`].
    pub fn write_raw(&mut self, lba: u64, addr: *const u8, len: usize) -> Result<()> {
        self.write_at(lba, addr as u64, len as u64)
    }

    /// Whether writes to the namespace are allowed: the controller is QEMU's emulated one, or
    /// the caller set [`NvmeConfig::allow_write`].
    pub fn writes_allowed(&self) -> bool {
        self.allow_write
            || self
                .controller
                .as_ref()
                .is_some_and(ControllerInfo::is_qemu)
    }

    fn write_at(&mut self, lba: u64, addr: u64, len: u64) -> Result<()> {
        if !self.writes_allowed() {
            let c = self.controller.as_ref();
            return Err(NvmeError::WriteRefused {
                model: c.map(|c| c.model.clone()).unwrap_or_default(),
                serial: c.map(|c| c.serial.clone()).unwrap_or_default(),
            });
        }
        self.transfer(io::WRITE, lba, addr, len)?;
        self.stats.bytes_written += len;
        Ok(())
    }

    /// **A driver bug on purpose, for the scenario that shows the IOMMU blocking a device whose
    /// memory went away; not for production use.** Reads one page or less from block `lba`
    /// into `[addr, addr + len)` (page-aligned `addr`) through a bus address taken while the
    /// buffer was mapped but **not held** during the command: `between` runs after the hold is
    /// dropped and before the doorbell, so the CPU may unmap the buffer (through the SVM API,
    /// whose invalidation the mapper no longer has to wait for) and the device then writes an
    /// IOVA the IOMMU no longer maps. Returns what the controller reported.
    ///
    /// # Safety
    ///
    /// The device writes whatever pages the IOMMU maps at the buffer's IOVA when it runs the
    /// command: the caller must make sure that is the buffer itself or nothing.
    #[doc(hidden)]
    pub unsafe fn read_unheld(
        &mut self,
        lba: u64,
        addr: u64,
        len: u64,
        between: impl FnOnce(),
    ) -> Result<()> {
        let ns = self.namespace()?;
        prp::check(&ns, lba, addr, len)?;
        if addr % PAGE != 0 || len > PAGE {
            return Err(NvmeError::Unsupported {
                what: "an unheld read of more than one aligned page",
            });
        }
        let mapper = self.mapper_for(addr, len)?;
        let prp1 = {
            let held = Held::new(&mapper, addr, len, true)?;
            held.iova(addr).ok_or(NvmeError::NoMapper { addr, len })?
        };
        between();
        let (region, region_len) = (self.mem()?.addr(), self.mem()?.len());
        let region_mapper = self.mapper_for(region, region_len)?;
        let _region = Held::new(&region_mapper, region, region_len, true)?;
        self.execute(
            true,
            Command {
                opcode: io::READ,
                nsid: ns.nsid,
                prp1,
                prp2: 0,
                cdw10: lba as u32,
                cdw11: (lba >> 32) as u32,
                cdw12: (len / ns.lba_size - 1) as u32,
            },
        )?;
        self.stats.bytes_read += len;
        Ok(())
    }

    /// Reads (`opcode` READ) or writes `len` bytes of memory at `addr`.
    ///
    /// The memory is the caller's `&mut [u8]` (read) or `&[u8]` (write), borrowed for the
    /// whole call: nothing else touches it while the device does, and the device is done with
    /// it before this returns (completed, or the controller reset).
    fn transfer(&mut self, opcode: u8, lba: u64, addr: u64, len: u64) -> Result<()> {
        let ns = self.namespace()?;
        prp::check(&ns, lba, addr, len)?;
        let _span = tracing::trace_span!("nvme.transfer", opcode, lba, addr, len).entered();
        let list = self.mem()?.page(page::PRP_LIST);
        let (region, region_len) = (self.mem()?.addr(), self.mem()?.len());
        let region_mapper = self.mapper_for(region, region_len)?;
        let mapper = self.mapper_for(addr, len)?;
        for piece in prp::split(lba, addr, len, ns.lba_size, self.max_transfer) {
            // The data (a read command has the device write it) and the region (queues, PRP
            // list), taken together; the data first, so errors name it.
            let held = Held::many(&[
                (&*mapper, piece.addr, piece.len, opcode == io::READ),
                (&*region_mapper, region, region_len, true),
            ])?;
            let mut missing = None;
            let prps = prp::build(piece.addr, piece.len, |va| {
                held.iova(va).unwrap_or_else(|| {
                    missing = Some(va);
                    0
                })
            })?;
            if let Some(va) = missing {
                return Err(NvmeError::Access {
                    addr: va,
                    len: PAGE,
                    source: svmirror_vfio::VfioError::NotMapped { addr: va },
                });
            }
            let prp2 = match prps.prp2 {
                Prp2::Unused => 0,
                Prp2::Page(p) => p,
                Prp2::List(entries) => {
                    for (i, e) in entries.iter().enumerate() {
                        // SAFETY: entry `i` of the PRP list page (at most PAGE / 8 entries:
                        // `prp::build` refuses more), inside the driver's region; volatile
                        // because the device reads it; the doorbell comes after a fence.
                        unsafe { (list as *mut u64).wrapping_add(i).write_volatile(*e) };
                    }
                    // The list page lies in the region, held with the data.
                    self.queue_iova(&held, list)?
                }
            };
            let blocks = piece.len / ns.lba_size;
            self.execute(
                true,
                Command {
                    opcode,
                    nsid: ns.nsid,
                    prp1: prps.prp1,
                    prp2,
                    cdw10: piece.lba as u32,
                    cdw11: (piece.lba >> 32) as u32,
                    // NLB, 0-based (NVM Command Set spec, "Read command": CDW12 bits 15:0).
                    cdw12: (blocks - 1) as u32,
                },
            )?;
            drop(held);
        }
        Ok(())
    }
}

impl Drop for Nvme {
    fn drop(&mut self) {
        if self.halted && self.mem.is_none() {
            return;
        }
        // Controller reset on drop: shut down (flushes a volatile write cache), then disable,
        // so nothing touches the queue memory freed next.
        if let Err(e) = self.dev.shutdown() {
            tracing::error!(path = %self.dev.path().display(), error = %e,
                "NVMe controller did not reset on drop: leaking its queue memory");
            if let Some(m) = self.mem.take() {
                m.leak();
            }
        }
    }
}
