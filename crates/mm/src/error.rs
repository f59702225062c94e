//! svmirror-mm's one error type.

use std::io;

/// What setting up or reading the process's address space can fail with. Failures inside a
/// [`PageSource`](svmirror_core::PageSource) call reach the core as
/// [`Error::Source`](svmirror_core::Error::Source) with one of these as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MmError {
    /// /proc/self/status could not be read or lacks a field.
    #[error("cannot read {field} from /proc/self/status")]
    ProcStatus {
        /// The field.
        field: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// RLIMIT_MEMLOCK could not be read or changed.
    #[error("cannot change RLIMIT_MEMLOCK")]
    Rlimit {
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// A /proc file could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Probing a kernel interface failed in a way that is not "the kernel lacks it".
    #[error("probing {mechanism} failed")]
    Probe {
        /// The interface probed (`PROCMAP_QUERY`, `PAGEMAP_SCAN`, `pagemap`).
        mechanism: &'static str,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// The PROCMAP_QUERY ioctl failed.
    #[error("mapping query at {addr:#x} failed")]
    Query {
        /// The address asked about.
        addr: u64,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// /proc/self/maps or /proc/self/smaps could not be read.
    #[error("reading {path} failed")]
    ReadMaps {
        /// The file.
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A line of /proc/self/maps did not have the expected shape.
    #[error("unexpected line in /proc/self/maps: {line:?}")]
    ParseMaps {
        /// The line.
        line: String,
    },
    /// /proc/self/pagemap could not be read.
    #[error("reading pagemap at {addr:#x} failed")]
    ReadPagemap {
        /// The first address whose entry was asked for.
        addr: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The PAGEMAP_SCAN ioctl failed.
    #[error("pagemap scan of {start:#x}..{end:#x} failed")]
    Scan {
        /// Start of the scanned range.
        start: u64,
        /// End of the scanned range.
        end: u64,
        /// What the kernel answered (or why its answer was unusable).
        #[source]
        source: io::Error,
    },
    /// A userfaultfd operation failed.
    #[error("userfaultfd {op} failed")]
    Userfaultfd {
        /// The operation (`open`, `UFFDIO_API`, `UFFDIO_REGISTER`, ...).
        op: &'static str,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks a userfaultfd feature svmirror cannot work without.
    #[error("kernel lacks userfaultfd features {missing:?}")]
    MissingFeatures {
        /// The features' names.
        missing: Vec<&'static str>,
    },
    /// The monitor thread could not be started.
    #[error("cannot start the userfaultfd monitor thread")]
    Monitor {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A core error (an invalid range, a released notifier).
    #[error("invalid request")]
    Core(#[source] svmirror_core::Error),
    /// Part of the range is not mapped (a double unmap, an address never mapped).
    #[error("nothing is mapped at {addr:#x}")]
    NotMapped {
        /// The first unmapped page.
        addr: u64,
    },
    /// The range is already registered with the userfaultfd.
    #[error("{range} is already registered")]
    AlreadyRegistered {
        /// The registered span.
        range: svmirror_core::Range,
    },
    /// userfaultfd refused to register a mapping (a private file mapping, say).
    #[error("userfaultfd cannot register {range}")]
    Register {
        /// The mapping.
        range: svmirror_core::Range,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// A memory-management system call failed.
    #[error("{op} of {range} failed")]
    Syscall {
        /// The call (`munmap`, `mprotect`, ...).
        op: &'static str,
        /// The range.
        range: svmirror_core::Range,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// Only private anonymous memory can migrate to a device.
    #[error("{range} is shared or file-backed memory and cannot migrate")]
    CannotMigrate {
        /// The range.
        range: svmirror_core::Range,
    },
    /// The page is not in device memory.
    #[error("page {addr:#x} does not live on a device")]
    NotMigrated {
        /// The page.
        addr: u64,
    },
}

impl MmError {
    /// This error in the core's vocabulary, for callers that speak only the core's (a backend
    /// through `svmirror_core::AddressSpace`): a core error stays itself, anything else becomes
    /// [`Error::Source`](svmirror_core::Error::Source) for `range` with this error inside, so
    /// `downcast_ref::<MmError>()` on the source gets it back.
    pub fn into_core(self, range: svmirror_core::Range) -> svmirror_core::Error {
        match self {
            MmError::Core(e) => e,
            other => svmirror_core::Error::Source {
                range,
                source: Box::new(other),
            },
        }
    }
}
