//! One list of mirror scenarios, written once against the core's [`Mirror`] contract and run
//! on every backend: the simulated IOMMU and Vulkan (lavapipe) in the workspace's tests, VFIO
//! inside the `cargo xtask vfio-vm` guest. Behind the `scenarios` feature.
//!
//! Each scenario gets the process's [`ProcessMm`], a fresh mirror over a region of its own (at
//! a fixed, far address, so that no other thread's mapping lands in it) and maps its buffers
//! inside that region. It checks what the device can reach ([`Mirror::translation`]) after
//! each CPU change, made through libc (seen through userfaultfd events, settled with
//! [`PageSource::settle`]) and through the SVM API (seen before the call returns). Returning
//! `Err` names what went wrong; the runner reports every scenario, and the caller checks that
//! nothing stayed pinned once the mirrors are gone.

use std::sync::Arc;

use svmirror_core::{Mirror, MirrorError, PAGE_SIZE, PageSource, Range};

use crate::{ProcessMm, Protection};

/// The region a scenario's buffers live in (its mirror covers exactly this).
pub const REGION_LEN: u64 = 16 << 20;

/// Where the runner puts the regions: far from anything the kernel places by itself.
const REGION_BASE: u64 = 0x3e00_0000_0000;

/// What a scenario works with.
pub struct Rig<'a> {
    /// The process's address space.
    pub mm: &'a Arc<ProcessMm>,
    /// The mirror under test, over [`region`](Rig::region).
    pub mirror: &'a dyn Mirror,
    /// The scenario's region.
    pub region: Range,
}

/// One scenario.
pub struct Scenario {
    /// Its name, for the report.
    pub name: &'static str,
    /// It.
    pub run: fn(&Rig<'_>) -> Result<(), String>,
}

/// Every scenario.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "a fault maps the pages at the process address",
            run: fault_maps,
        },
        Scenario {
            name: "a plain munmap takes the translations away",
            run: plain_munmap,
        },
        Scenario {
            name: "an SVM API munmap takes them away before it returns",
            run: api_munmap,
        },
        Scenario {
            name: "a plain madvise(DONTNEED) takes them away, and the device faults again",
            run: plain_madvise,
        },
        Scenario {
            name: "an SVM API mprotect(READ) leaves nothing writable, and a write fault is refused",
            run: api_mprotect,
        },
        Scenario {
            name: "an SVM API mremap that moves leaves nothing at the old address",
            run: api_mremap,
        },
        Scenario {
            name: "a munmap and a new mapping at the same address: the device sees the new page",
            run: remap_same_address,
        },
        Scenario {
            name: "evict_all drops everything and the next fault maps again",
            run: evict_all,
        },
        Scenario {
            name: "an address outside the mirror is refused",
            run: outside,
        },
    ]
}

/// Runs every scenario on mirrors made by `open` (one per scenario, over the range it is
/// given); returns each scenario's name and outcome.
pub fn run_all(
    mm: &Arc<ProcessMm>,
    open: &dyn Fn(Range) -> Result<Box<dyn Mirror>, MirrorError>,
) -> Vec<(&'static str, Result<(), String>)> {
    all()
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let region = Range::with_len(REGION_BASE + i as u64 * (REGION_LEN << 1), REGION_LEN)
                .expect("a region inside the user address space");
            let outcome = open(region)
                .map_err(|e| format!("opening the mirror: {e}"))
                .and_then(|mirror| {
                    let rig = Rig {
                        mm,
                        mirror: &*mirror,
                        region,
                    };
                    let r = (s.run)(&rig);
                    // Whatever the scenario left mapped in its region goes.
                    let _ = unmap(region.start(), region.len());
                    r
                });
            (s.name, outcome)
        })
        .collect()
}

fn mmap_at(addr: u64, len: u64, prot: i32) -> Result<Range, String> {
    // SAFETY: a new private anonymous mapping at an address inside the scenario's region,
    // which nothing else uses (MAP_FIXED_NOREPLACE refuses to replace anything).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as u64 != addr {
        return Err(format!(
            "mmap at {addr:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Range::with_len(addr, len).map_err(|e| e.to_string())
}

fn unmap(addr: u64, len: u64) -> Result<(), String> {
    // SAFETY: unmaps part of the scenario's own region, which holds no Rust objects.
    let rc = unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
    if rc != 0 {
        return Err(format!("munmap: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn poke(addr: u64, v: u8) {
    // SAFETY: `addr` is a byte of a writable buffer of the scenario, touched only through raw
    // pointers.
    unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
}

/// A buffer of `pages` at the start of the region, written by the CPU.
fn buffer(rig: &Rig<'_>, pages: u64) -> Result<Range, String> {
    let b = mmap_at(
        rig.region.start(),
        pages * PAGE_SIZE,
        libc::PROT_READ | libc::PROT_WRITE,
    )?;
    for i in 0..pages {
        poke(b.start() + i * PAGE_SIZE, i as u8 + 1);
    }
    Ok(b)
}

fn pages(r: Range) -> impl Iterator<Item = u64> {
    (r.start()..r.end()).step_by(PAGE_SIZE as usize)
}

fn expect_mapped(rig: &Rig<'_>, r: Range, writable: bool, when: &str) -> Result<(), String> {
    for p in pages(r) {
        match rig.mirror.translation(p) {
            Some(w) if w || !writable => {}
            other => {
                return Err(format!(
                    "{when}: the device should reach {p:#x}{} but holds {other:?}",
                    if writable { " for writing" } else { "" }
                ));
            }
        }
    }
    Ok(())
}

fn expect_gone(rig: &Rig<'_>, r: Range, when: &str) -> Result<(), String> {
    for p in pages(r) {
        if let Some(w) = rig.mirror.translation(p) {
            return Err(format!(
                "{when}: the device still holds a translation of {p:#x} (writable: {w})"
            ));
        }
    }
    Ok(())
}

/// Waits until the monitor has handled every change of `r` it has read: what a runtime does
/// before it lets a device use `r` after a plain munmap/madvise/mremap returned.
fn settle(rig: &Rig<'_>, r: Range) -> Result<(), String> {
    rig.mm
        .settle(r)
        .map(|_| ())
        .map_err(|e| format!("settle: {e}"))
}

fn fault(rig: &Rig<'_>, r: Range, write: bool) -> Result<(), String> {
    rig.mirror
        .fault(r, write)
        .map_err(|e| format!("fault of {r} (write: {write}): {e}"))
}

fn fault_maps(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    fault(rig, b, false)?;
    expect_mapped(rig, b, false, "after a read fault")?;
    fault(rig, b, true)?;
    expect_mapped(rig, b, true, "after a write fault")?;
    let c = rig.mirror.counters();
    if c.total_faults() == 0 || c.bytes_mapped < b.len() {
        return Err(format!("the counters missed the faults: {c:?}"));
    }
    Ok(())
}

fn plain_munmap(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    fault(rig, b, true)?;
    unmap(b.start(), b.len())?;
    settle(rig, b)?;
    expect_gone(rig, b, "after a plain munmap, settled")
}

fn api_munmap(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    fault(rig, b, true)?;
    // SAFETY: the buffer holds no Rust objects.
    unsafe { rig.mm.munmap(b) }.map_err(|e| format!("munmap: {e}"))?;
    expect_gone(rig, b, "when the SVM API munmap returned")
}

fn plain_madvise(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    fault(rig, b, true)?;
    // SAFETY: the buffer holds no Rust objects; its contents may go.
    let rc = unsafe {
        libc::madvise(
            b.start() as *mut libc::c_void,
            b.len() as usize,
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        return Err(format!("madvise: {}", std::io::Error::last_os_error()));
    }
    settle(rig, b)?;
    expect_gone(rig, b, "after a plain madvise(DONTNEED), settled")?;
    fault(rig, b, true)?;
    expect_mapped(rig, b, true, "after faulting again")
}

fn api_mprotect(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    fault(rig, b, true)?;
    rig.mm
        .mprotect(b, Protection::READ)
        .map_err(|e| format!("mprotect: {e}"))?;
    for p in pages(b) {
        if rig.mirror.translation(p) == Some(true) {
            return Err(format!("after mprotect(READ): {p:#x} is still writable"));
        }
    }
    if rig.mirror.fault(b, true).is_ok() {
        return Err("a write fault on a read-only mapping succeeded".into());
    }
    for p in pages(b) {
        if rig.mirror.translation(p) == Some(true) {
            return Err(format!("after a refused write fault: {p:#x} is writable"));
        }
    }
    Ok(())
}

fn api_mremap(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    fault(rig, b, true)?;
    // A neighbour right after the buffer, so that growing has to move it.
    let blocker = mmap_at(b.end(), PAGE_SIZE, libc::PROT_READ)?;
    // SAFETY: the buffer holds no Rust objects; it moves as a whole.
    let moved =
        unsafe { rig.mm.mremap(b, 2 * b.len(), true) }.map_err(|e| format!("mremap: {e}"))?;
    let result = (|| {
        if moved.start() == b.start() {
            return Err("the mremap did not move the buffer".to_string());
        }
        expect_gone(rig, b, "when the SVM API mremap returned")
    })();
    let _ = unmap(moved.start(), moved.len());
    let _ = unmap(blocker.start(), blocker.len());
    result
}

fn remap_same_address(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 4)?;
    fault(rig, b, true)?;
    let old: Vec<Option<bool>> = pages(b).map(|p| rig.mirror.translation(p)).collect();
    unmap(b.start(), b.len())?;
    let n = mmap_at(b.start(), b.len(), libc::PROT_READ | libc::PROT_WRITE)?;
    poke(n.start(), 0x77);
    settle(rig, n)?;
    expect_gone(rig, n, "after munmap and a new mapping at the same address")?;
    fault(rig, n, true)?;
    expect_mapped(rig, n, true, "after faulting the new mapping")?;
    if old.iter().any(Option::is_none) {
        return Err("the first fault left pages unmapped".into());
    }
    Ok(())
}

fn evict_all(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    fault(rig, b, true)?;
    rig.mirror.evict_all();
    expect_gone(rig, b, "after evict_all")?;
    fault(rig, b, false)?;
    expect_mapped(rig, b, false, "after faulting again")
}

fn outside(rig: &Rig<'_>) -> Result<(), String> {
    let past = Range::with_len(rig.region.end(), PAGE_SIZE).map_err(|e| e.to_string())?;
    match rig.mirror.fault(past, false) {
        Err(MirrorError::OutsideMirror { .. }) => Ok(()),
        other => Err(format!(
            "a fault past the mirror gave {other:?}, not OutsideMirror"
        )),
    }
}
