//! svmirror-mm's one error type.

use std::io;

/// What setting up or reading the process's address space can fail with. Failures inside a
/// [`PageSource`](svmirror_core::PageSource) call reach the core as
/// [`Error::Source`](svmirror_core::Error::Source) with one of these as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MmError {
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
}
