//! What the DMA engine is told and what it reports: commands, completions, faults, page
//! requests, configuration and counters.

use std::fmt;
use std::time::Duration;

use crate::error::Result;

/// The kind of a device access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A read of memory.
    Read,
    /// A write (or atomic) to memory.
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// Why a device access faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// No translation for the address.
    NotMapped,
    /// A write through a read-only translation.
    ReadOnly,
    /// The address lies beyond the IOVA space.
    OutsideIovaSpace,
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultReason::NotMapped => "not mapped",
            FaultReason::ReadOnly => "read-only",
            FaultReason::OutsideIovaSpace => "outside the IOVA space",
        })
    }
}

/// One device fault, as logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// The address accessed.
    pub iova: u64,
    /// Read or write.
    pub access: Access,
    /// Why it faulted.
    pub reason: FaultReason,
    /// Whether a page request resolved it (the access was retried).
    pub resolved: bool,
}

/// What the device does on a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Raise a page request and retry once the driver answers.
    Recoverable,
    /// Abort the command.
    Unrecoverable,
}

/// A page request: the device asks the driver to map `iova` for `access`, and says how much of
/// the memory from there the access wants (a PCIe page request group, in one message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// The faulting address.
    pub iova: u64,
    /// Bytes from `iova` the access wants, at least 1: the rest of the command's transfer.
    /// The driver maps the pages of `[iova, iova + len)` it can, at least the first.
    pub len: u64,
    /// The access that faulted.
    pub access: Access,
    /// Why it faulted.
    pub reason: FaultReason,
}

/// The driver side of page requests. Called on the device thread, with no access in flight.
pub trait PageRequestHandler: Send + Sync {
    /// Resolves `req` (maps the page) and returns `Ok` for the device to retry, or the reason it
    /// cannot, which aborts the command.
    fn page_request(&self, req: &PageRequest) -> Result<()>;

    /// Resolves the page requests a command raised together, before it started (every run of
    /// its pages that missed, in address order): the driver may coalesce them and resolve each
    /// coalesced run once. Returns how many runs it resolved. Best effort: a request it cannot
    /// resolve is left for the access itself to raise again, one request at a time, and fail
    /// with the reason ([`page_request`](Self::page_request)). The default resolves each in
    /// turn.
    fn page_requests(&self, reqs: &[PageRequest]) -> u64 {
        reqs.iter().filter(|r| self.page_request(r).is_ok()).count() as u64
    }

    /// Called before the device uses a translation for `[iova, iova + len)`: returns once the
    /// CPU changes there that may already have returned are invalidated
    /// ([`svmirror_core::PageSource::settle`]). The default waits for nothing.
    /// Returns a position for [`changed_since`](Self::changed_since).
    fn settle(&self, iova: u64, len: u64) -> Result<u64> {
        let _ = (iova, len);
        Ok(0)
    }

    /// Whether a CPU change to `[iova, iova + len)` may have been made since [`settle`]
    /// returned `since` ([`svmirror_core::PageSource::changed_since`]): a read made through a
    /// translation meanwhile is retried. The default: never.
    ///
    /// [`settle`]: Self::settle
    fn changed_since(&self, iova: u64, len: u64, since: u64) -> bool {
        let _ = (iova, len, since);
        false
    }
}

/// Fault injection for tests of the failure paths (the role dmirror's FLAGS command plays).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injection {
    /// The device thread panics.
    Panic,
    /// The device thread sleeps, holding no access.
    Stall(Duration),
    /// The device reads `iova` and sleeps with the access in flight.
    StallDuringAccess {
        /// The address to hold.
        iova: u64,
        /// How long.
        duration: Duration,
    },
}

/// A command for the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DmaCommand {
    /// Copies `len` bytes from `src` to `dst` (overlapping ranges give unspecified bytes).
    Copy {
        /// Source address.
        src: u64,
        /// Destination address.
        dst: u64,
        /// Bytes.
        len: u64,
    },
    /// Sets `len` bytes at `dst` to `value`.
    Fill {
        /// Destination address.
        dst: u64,
        /// Bytes.
        len: u64,
        /// The byte.
        value: u8,
    },
    /// Adds `value` to the u64 at `addr` (8-aligned) and returns the old value. Atomic with
    /// respect to other device commands, not to the CPU.
    AtomicAdd {
        /// Address of the u64.
        addr: u64,
        /// The addend (wrapping).
        value: u64,
    },
    /// Reads `len` bytes at `src` into device memory, returned in [`Completion::data`].
    Read {
        /// Source address.
        src: u64,
        /// Bytes (at most 1 GiB).
        len: u64,
    },
    /// Writes `data` from device memory to `dst`.
    Write {
        /// Destination address.
        dst: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Reads the `(address, length)` parts, independent of each other, into one block of
    /// device memory, returned in [`Completion::data`] in the parts' order (a gather: `load_many`).
    /// The device takes the page requests of every part that misses in one batch before it
    /// starts, and moves the parts in a few transfers rather than one each. Parts may overlap;
    /// at most [`MAX_PARTS`] parts and 1 GiB in all.
    Gather {
        /// `(address, bytes)`, each at least 1 byte.
        parts: Vec<(u64, u64)>,
    },
    /// Writes `data` to the `(address, length)` parts in order (a scatter: `store_many`): the
    /// first part's length of `data` to the first address, and so on; the lengths add up to
    /// `data.len()`. Page requests and transfers are batched as for [`DmaCommand::Gather`].
    /// Parts that overlap are written in order (the later one wins).
    Scatter {
        /// `(address, bytes)`, each at least 1 byte.
        parts: Vec<(u64, u64)>,
        /// The bytes, part after part.
        data: Vec<u8>,
    },
    /// Fault injection.
    Inject(Injection),
}

/// Most parts one [`DmaCommand::Gather`] or [`DmaCommand::Scatter`] may name.
pub const MAX_PARTS: usize = 1 << 20;

impl DmaCommand {
    /// The command's name, as logs and spans print it.
    pub const fn name(&self) -> &'static str {
        match self {
            DmaCommand::Copy { .. } => "copy",
            DmaCommand::Fill { .. } => "fill",
            DmaCommand::AtomicAdd { .. } => "atomic-add",
            DmaCommand::Read { .. } => "read",
            DmaCommand::Write { .. } => "write",
            DmaCommand::Gather { .. } => "gather",
            DmaCommand::Scatter { .. } => "scatter",
            DmaCommand::Inject(_) => "inject",
        }
    }
}

/// What a finished command reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Page requests it raised (and the driver resolved).
    pub page_requests: u32,
    /// The old value, for `AtomicAdd`.
    pub old_value: Option<u64>,
    /// The bytes read, for `Read`.
    pub data: Vec<u8>,
}

/// How to build a [`DmaEngine`](crate::DmaEngine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaConfig {
    /// Recoverable (page requests) or unrecoverable faults.
    pub fault_mode: FaultMode,
    /// How long the device may make no progress (outside page requests) before it is declared
    /// hung.
    pub watchdog: Duration,
    /// Page requests one access may raise before the command gives up.
    pub max_page_requests: u32,
    /// How long the device thread, once idle, and a thread waiting on a fence spin before they
    /// park. Parking costs a wake-up per hand-off, which on a VM whose other vCPUs halt when
    /// idle is tens of microseconds; spinning a little keeps back-to-back commands and short
    /// waits off that path. Zero parks at once.
    pub spin: Duration,
}

impl Default for DmaConfig {
    fn default() -> Self {
        DmaConfig {
            fault_mode: FaultMode::Recoverable,
            watchdog: Duration::from_secs(10),
            max_page_requests: 8,
            spin: Duration::from_micros(50),
        }
    }
}

/// Counters of a [`DmaEngine`](crate::DmaEngine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Commands submitted.
    pub submitted: u64,
    /// Commands completed successfully.
    pub completed: u64,
    /// Commands that failed.
    pub failed: u64,
    /// Device faults (each logged as a record).
    pub faults: u64,
    /// Page requests raised.
    pub page_requests: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Reads made again because a CPU change the driver learns of only after it is made
    /// overlapped them ([`PageRequestHandler::changed_since`]).
    pub reads_retried: u64,
    /// Batches of page requests a command raised before it started
    /// ([`PageRequestHandler::page_requests`]): `page_requests_batched / page_request_batches`
    /// is the page requests per batch.
    pub page_request_batches: u64,
    /// Page requests raised in those batches (also counted in `page_requests`).
    pub page_requests_batched: u64,
    /// Commands the waiter of their fence ran itself, the device being idle
    /// ([`Fence::wait`](crate::Fence::wait)): no hand-off to the device thread and back.
    pub run_by_waiter: u64,
}
