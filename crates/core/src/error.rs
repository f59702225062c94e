//! The core's one error type.

use std::time::Duration;

use crate::range::Range;

/// Result with the core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the core can refuse or fail with. Variants carry the range or address involved as
/// fields; the message is a short sentence that does not repeat the source's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `start == end`.
    #[error("range {start:#x}..{end:#x} is empty")]
    EmptyRange {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
    },
    /// `start` or `end` is not a multiple of the page size.
    #[error("range {start:#x}..{end:#x} is not page aligned")]
    UnalignedRange {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
    },
    /// `end < start`.
    #[error("range {start:#x}..{end:#x} ends before it starts")]
    ReversedRange {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
    },
    /// `start + len` does not fit in 64 bits.
    #[error("range at {start:#x} with length {len:#x} overflows the address space")]
    RangeOverflow {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
    },
    /// The subscription was created by a different notifier than the one asked to remove it.
    #[error("subscription {range} belongs to another notifier")]
    ForeignSubscription {
        /// The subscription's range.
        range: Range,
    },
    /// The subscription was already removed (or its removal is in progress).
    #[error("subscription {range} is not subscribed")]
    NotSubscribed {
        /// The subscription's range.
        range: Range,
    },
    /// A fault was asked for outside the subscription whose sequence guards it: invalidations
    /// there would go unseen.
    #[error("range {range} is not inside subscription {subscription}")]
    OutsideSubscription {
        /// The requested range.
        range: Range,
        /// The subscription's range.
        subscription: Range,
    },
    /// The page source kept reporting a page as needing a fault after faulting it.
    #[error("faulting {addr:#x} made no progress")]
    NoProgress {
        /// The page that did not come in.
        addr: u64,
    },
    /// A [`ReadSeq`](crate::ReadSeq) from one subscription was checked against another.
    #[error("read sequence was taken from another subscription than {range}")]
    SeqFromOtherSubscription {
        /// The range of the subscription it was checked against.
        range: Range,
    },
    /// `read_retry` ran under a different update lock than the one `invalidate` used for
    /// `set_seq`: the retry check then protects nothing.
    #[error("read_retry for {range} is not under the update lock its invalidate uses")]
    WrongUpdateLock {
        /// The subscription's range.
        range: Range,
    },
    /// A call that waits for invalidations to finish was made from inside an invalidation
    /// callback, where it would wait for itself.
    #[error("{op} called from inside an invalidation callback (it would wait for itself)")]
    CalledFromCallback {
        /// The offending call.
        op: &'static str,
    },
    /// A non-blocking invalidation met a callback that needed to sleep. The invalidation has
    /// already been ended; do not end it again, and do not make the CPU change.
    #[error("invalidation of {range} would block")]
    WouldBlock {
        /// The range of the refused invalidation.
        range: Range,
    },
    /// The range was invalidated while it was being walked (EBUSY): take a new sequence with
    /// `read_begin` and walk again. The entries not yet walked still hold their input values.
    #[error("range {range} was invalidated during the walk")]
    Busy {
        /// The range being walked.
        range: Range,
    },
    /// The fault loop kept racing invalidations past its time limit.
    #[error("faulting {range} gave up after {retries} retries in {elapsed:?}")]
    Timeout {
        /// The range being faulted.
        range: Range,
        /// How many times the loop started over.
        retries: u64,
        /// How long it tried.
        elapsed: Duration,
    },
    /// A write fault was requested on a mapping without write permission (EPERM).
    #[error("write fault on read-only mapping at {addr:#x}")]
    WriteToReadOnly {
        /// First page that could not be made writable.
        addr: u64,
    },
    /// A fault was requested where there is no mapping a device may use: a hole, a PROT_NONE
    /// area, or an I/O / PFN-map area (EFAULT).
    #[error("no faultable mapping at {addr:#x}")]
    BadAddress {
        /// First page that could not be faulted.
        addr: u64,
    },
    /// The request asked for a write fault without a fault (`REQ_WRITE` without `REQ_FAULT`).
    #[error("request for {addr:#x} asks for a write without a fault")]
    InvalidRequest {
        /// The page whose request is malformed.
        addr: u64,
    },
    /// The entry slice does not have one entry per page of the range.
    #[error("{range} needs {expected} entries, got {got}")]
    EntryCount {
        /// The range.
        range: Range,
        /// Pages in the range.
        expected: u64,
        /// Entries given.
        got: usize,
    },
    /// The address space was released; no new subscriptions or faults.
    #[error("address space has been released")]
    Released,
    /// The page source (the CPU page-table provider) failed for a reason of its own.
    #[error("page source failed for {range}")]
    Source {
        /// The range being looked at.
        range: Range,
        /// What the source reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    /// The errno the kernel would return for the same condition, for callers that report
    /// errno-style codes (the dmirror device, C bindings).
    pub fn errno(&self) -> i32 {
        const EPERM: i32 = 1;
        const EFAULT: i32 = 14;
        const EBUSY: i32 = 16;
        const EINVAL: i32 = 22;
        const EAGAIN: i32 = 11;
        const EIO: i32 = 5;
        const EDEADLK: i32 = 35;
        const ESRCH: i32 = 3;
        match self {
            Error::WriteToReadOnly { .. } => EPERM,
            Error::BadAddress { .. } => EFAULT,
            Error::Busy { .. } | Error::Timeout { .. } => EBUSY,
            Error::WouldBlock { .. } => EAGAIN,
            Error::CalledFromCallback { .. } => EDEADLK,
            Error::Released => ESRCH,
            Error::Source { .. } => EIO,
            _ => EINVAL,
        }
    }
}
