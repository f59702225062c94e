//! Faulting pages in: `madvise(MADV_POPULATE_READ / MADV_POPULATE_WRITE)` (Linux 5.14+), the
//! userspace form of the page-table walk with faults that `hmm_range_fault` does.
//!
//! The errno alone does not say what went wrong. The kernel answers EINVAL both for a write to
//! a read-only mapping and for a PROT_NONE (or I/O) area (GUP's VMA checks fail: "incompatible
//! mapping or permissions"; checked on 6.18), ENOMEM both for a hole and for running out of
//! memory, and never EPERM, which is what `hmm_range_fault` returns for the write case. So on
//! failure we look at the mappings of the range and report the first page that explains it, in
//! the terms of the core's table: no mapping, an I/O area or an unreadable one is
//! [`Error::BadAddress`]; a write to a mapping without write permission is
//! [`Error::WriteToReadOnly`]. Only when the mappings explain nothing does the errno decide:
//! EFAULT (the fault itself raised SIGBUS or SIGSEGV, e.g. past the end of a file) is
//! `BadAddress` at the first page that fails on its own; ENOMEM or EINVAL mean the mappings
//! changed while we faulted, reported as [`Error::Busy`] so the fault loop starts over; anything
//! else is [`Error::Source`].

use std::ffi::c_void;
use std::io;

use libc::{MADV_POPULATE_READ, MADV_POPULATE_WRITE};

use svmirror_core::{Error, PAGE_SIZE, Range};

use crate::maps::Maps;

/// Faults `range` in, writable if `write`.
pub(crate) fn populate(maps: &Maps, range: Range, write: bool) -> Result<(), Error> {
    let err = match madvise_populate(range, write) {
        Ok(()) => return Ok(()),
        Err(err) => err,
    };
    tracing::debug!(
        start = range.start(),
        end = range.end(),
        write,
        %err,
        "populate failed"
    );
    explain(maps, range, write, err)
}

/// The core error for a failed populate of `range` (see the module docs).
fn explain(maps: &Maps, range: Range, write: bool, err: io::Error) -> Result<(), Error> {
    let mut addr = range.start();
    while addr < range.end() {
        let vma = match maps.find(addr) {
            Ok(Some(vma)) if vma.start <= addr => vma,
            Ok(_) => return Err(Error::BadAddress { addr }),
            Err(e) => {
                return Err(Error::Source {
                    range,
                    source: Box::new(e),
                });
            }
        };
        if vma.io || !vma.read {
            return Err(Error::BadAddress { addr });
        }
        if write && !vma.write {
            return Err(Error::WriteToReadOnly { addr });
        }
        addr = vma.end;
    }
    match err.raw_os_error() {
        Some(libc::EFAULT) => {
            // The pages before the failing one are in by now, so this walk is cheap.
            let addr = (range.start()..range.end())
                .step_by(PAGE_SIZE as usize)
                .find(|&page| {
                    Range::with_len(page, PAGE_SIZE)
                        .is_ok_and(|one| madvise_populate(one, write).is_err())
                })
                .unwrap_or(range.start());
            Err(Error::BadAddress { addr })
        }
        // "No mapping" (or the mappings failed the kernel's checks) although every page is
        // mapped and allowed now: the address space changed while we faulted (a munmap and a
        // new mmap raced us). That is the walk's "try again", not a failure.
        Some(libc::ENOMEM | libc::EINVAL) => Err(Error::Busy { range }),
        _ => Err(Error::Source {
            range,
            source: Box::new(err),
        }),
    }
}

/// `madvise(MADV_POPULATE_WRITE)` over `range` if `write`, else `MADV_POPULATE_READ`.
fn madvise_populate(range: Range, write: bool) -> io::Result<()> {
    let advice = if write {
        MADV_POPULATE_WRITE
    } else {
        MADV_POPULATE_READ
    };
    let len =
        usize::try_from(range.len()).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: MADV_POPULATE_* only does what a CPU access to each page would: it faults pages
    // in (reading, or writing nothing), breaking copy-on-write where asked. It changes neither
    // the layout of the address space nor what any byte of memory holds, so no Rust object can
    // observe it; an address range with no mapping makes the call fail, not misbehave.
    let rc = unsafe { libc::madvise(range.start() as *mut c_void, len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
