//! svmirror-iommu: the simulated IOMMU, svmirror's embedded default backend. svmirror's test
//! device (the role `lib/test_hmm.c` plays for the kernel) is built on it, in svmirror-dmirror.
//!
//! | piece | module | what it is |
//! |---|---|---|
//! | [`PageTable`] | `page_table` | 4-level IO page table, 48-bit IOVA, 4 KiB / 2 MiB / 1 GiB leaves, R/RW |
//! | [`Iotlb`] | `iotlb` | bounded translation cache (clock), range flushes, checking mode |
//! | [`Mmu`] | `mmu` | both under one page-level lock, plus the device accesses in flight |
//! | [`PinPool`] | `pin` | physical access through io_uring registered buffers (kernel pins) |
//! | [`DmaEngine`] | `dma` | a device thread running copy / fill / atomic commands, with fences, faults and page requests |
//! | [`IommuMirror`] | `mirror` | the backend: subscribes a range to the core's notifier, resolves page requests, invalidates |
//!
//! # What it guarantees
//!
//! - **The device never reaches memory through an address.** Every device access goes through a
//!   pin, so a page the CPU unmapped or replaced behind the notifier's back stays allocated and
//!   the device keeps seeing the old page, never the new one (DESIGN.md invariant 2).
//! - **Invalidations are complete when they return.** Entries are torn down and the IOTLB is
//!   flushed in one page-level section, then the device's accesses in flight on the range are
//!   waited for, and only then are pins released.
//! - **Missing flushes are caught.** In checking mode every IOTLB hit is compared with the page
//!   table; a stale translation is recorded as a [`Violation`].
//! - **Nothing leaks.** Page-table pages, IOTLB entries and pins are counted; dropping an
//!   [`IommuMirror`] brings `VmPin` back to where it was (invariant 7).
//! - **The device fails closed.** A device thread that dies or hangs completes every pending
//!   fence with an error and refuses new work.
//!
//! # What is the caller's job
//!
//! - **Treat device-written memory as DMA memory** ([`IommuMirror::new`] and [`PinPool::pin`] are
//!   `unsafe` for this): touch it through raw pointers, never through Rust references, while the
//!   device may write it (STYLE.md rule 6).
//! - **Give it the address space, and feed its notifier.** [`IommuMirror::new`] takes the
//!   [`AddressSpace`] it mirrors (svmirror-mm's `ProcessMm` is this process's, its notifier fed
//!   by a userfaultfd monitor and the SVM API); [`IommuMirror::with_page_source`] takes a
//!   notifier and a page source apart (a notifier fed by hand, in tests). The mirror is only as
//!   coherent as the invalidations it is sent: a change made without one is memory-safe (pins)
//!   but the device sees the old page until the invalidation arrives.
//! - **Let io_uring pin.** io_uring must be enabled (`kernel.io_uring_disabled` = 0). Root has
//!   `CAP_IPC_LOCK` and no limit; any other user has every pinned page charged to
//!   RLIMIT_MEMLOCK, so `ulimit -l` must cover everything pinned at once (this crate's tests pin
//!   up to about 10 MiB at a time: give them at least 16 MiB, e.g. `ulimit -l 16384` or a
//!   `memlock` line in /etc/security/limits.conf). A pin past the limit fails with
//!   [`IommuError::MemlockLimit`]; svmirror-mm's `raise_memlock_limit` raises the soft limit
//!   up to the hard one, and its `vm_pinned_bytes` reads what is pinned.
//! - **Mirror what io_uring can pin.** Pins are long-term and taken for writing: anonymous,
//!   shmem/memfd and hugetlbfs memory work; a read-only mapping cannot be mirrored by this
//!   backend ([`IommuError::ReadOnlyMemory`]), nor can a file mapping whose filesystem tracks
//!   dirty pages ([`IommuError::PinFailed`]).
//!
//! ```
//! use svmirror_core::{Event, Notifier, NotifierRange, Range};
//! use svmirror_mm::testing::AnonMap;
//! use svmirror_iommu::{DmaCommand, IommuMirror, MirrorConfig};
//! use svmirror_mm::ProcessPageSource;
//!
//! // A notifier fed by hand and this process's page table, read raw (a `ProcessMm` is both, its
//! // notifier fed by its userfaultfd monitor: `IommuMirror::new(mm, range, config)`).
//! let notifier = Notifier::new();
//! let source = Box::new(ProcessPageSource::new()?);
//! let buf = AnonMap::new(2 * 4096)?;
//! buf.fill(0xab);
//! let range = Range::with_len(buf.addr(), 2 * 4096)?;
//! // SAFETY: `buf` is touched only through raw pointers.
//! let mirror = unsafe {
//!     IommuMirror::with_page_source(&notifier, range, MirrorConfig::checked(), source)
//! }?;
//!
//! // The device reads the buffer at its own address: a page request maps it first.
//! let done = mirror.submit(DmaCommand::Read { src: buf.addr(), len: 16 })?.wait()?;
//! assert_eq!(done.data, vec![0xab; 16]);
//! assert_eq!(done.page_requests, 1);
//!
//! // munmap through the notifier: the device loses the mapping first.
//! notifier.invalidate_range_start(NotifierRange::new(range, Event::Unmap))?.end();
//! assert!(mirror.mmu().translate(buf.addr()).is_none());
//! assert_eq!(mirror.pins().live(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg(target_os = "linux")]
// Library code reports what can fail as an error value (STYLE.md rule 4); an unwrap or expect
// that stays names its invariant in an `#[expect(.., reason = "..")]` on the smallest item.
// Unit tests (cfg(test)) and the integration tests in tests/, crates of their own, may unwrap.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod command;
pub mod dma;
mod error;
pub mod iotlb;
pub mod kernel;
pub mod mirror;
pub mod mmu;
pub mod page_table;
pub mod pin;
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support (DMA buffers, race hooks), used only by tests"
)]
pub mod testing;

pub use dma::{
    Access, Completion, DmaCommand, DmaConfig, DmaEngine, DmaHandle, DmaStats, FaultMode,
    FaultReason, FaultRecord, Fence, Injection, MAX_PARTS, PageRequest, PageRequestHandler,
};
pub use error::{IommuError, Result};
pub use iotlb::{DEFAULT_IOTLB_ENTRIES, Iotlb, IotlbStats, Violation};
pub use kernel::{
    DeviceKernel, KernelCtx, KernelError, KernelResult, KernelRun, KernelStats, Pending,
};
pub use mirror::{FaultTimes, IommuMirror, MirrorConfig, MirrorStats, Prefetch};
pub use mmu::{Mmu, MmuConfig, MmuState};
pub use page_table::{
    IOVA_BITS, IOVA_END, LeafSize, PageTable, PageTableStats, Perms, Translation, Unmapped,
};
pub use pin::{
    MAX_PIN_LEN, MAX_SLOTS, Pin, PinId, PinPool, PinPoolConfig, PinStats, Target, Transfer,
};
#[doc(no_inline)]
pub use svmirror_core::AddressSpace;
