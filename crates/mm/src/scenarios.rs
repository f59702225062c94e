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
//!
//! A backend that cannot do a scenario says so to [`run_all`] with its reason, which the
//! report prints ([`Outcome::Declined`]); nothing is left out silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use svmirror_core::testing::race;
use svmirror_core::{CpuPte, FaultSize, Mirror, MirrorError, PAGE_SIZE, PageSource, Range};

use crate::{ProcessMm, Protection};

/// The region a scenario's buffers live in (its mirror covers exactly this).
pub const REGION_LEN: u64 = 16 << 20;

/// Where the runner puts the regions: far from anything the kernel places by itself.
const REGION_BASE: u64 = 0x3e00_0000_0000;

/// Opens a backend's mirror over a range of an address space (the process's, or a fresh one a
/// scenario makes to release it).
pub type Open<'a> = dyn Fn(&Arc<ProcessMm>, Range) -> Result<Box<dyn Mirror>, MirrorError> + 'a;

/// What a scenario works with.
pub struct Rig<'a> {
    /// The process's address space.
    pub mm: &'a Arc<ProcessMm>,
    /// Opens another mirror of the backend under test.
    pub open: &'a Open<'a>,
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
        Scenario {
            name: RACING_FAULT,
            run: fault_races_munmap,
        },
        Scenario {
            name: "an SVM API munmap waits for device work in flight on the range",
            run: munmap_waits_for_work,
        },
        Scenario {
            name: HUGE_WHOLE,
            run: huge_whole,
        },
        Scenario {
            name: "the address space going away releases the mirror: nothing stays reachable",
            run: release,
        },
    ]
}

/// The name of the scenario that races a fault against an invalidation.
pub const RACING_FAULT: &str =
    "a fault that an SVM API munmap races between snapshot and program maps nothing stale";

/// The name of the huge-page scenario.
pub const HUGE_WHOLE: &str =
    "a fault in a transparent huge page maps it whole, and an unmap inside it takes its page away";

/// How one scenario went.
#[derive(Debug)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// It failed: what went wrong.
    Failed(String),
    /// The backend cannot do it, for this reason.
    Declined(&'static str),
}

/// Every scenario's outcome on one backend.
#[derive(Debug)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// Each scenario's name and outcome, in [`all`]'s order.
    pub results: Vec<(&'static str, Outcome)>,
}

impl Report {
    /// The failures, one line each (`name: what went wrong`).
    pub fn failures(&self) -> Vec<String> {
        self.results
            .iter()
            .filter_map(|(name, o)| match o {
                Outcome::Failed(e) => Some(format!("{name}: {e}")),
                _ => None,
            })
            .collect()
    }

    /// Whether nothing failed.
    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }
}

impl std::fmt::Display for Report {
    /// The list of scenarios the backend ran, each with its outcome, and a summary line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count =
            |want: fn(&Outcome) -> bool| self.results.iter().filter(|(_, o)| want(o)).count();
        for (name, o) in &self.results {
            match o {
                Outcome::Passed => writeln!(f, "  ok       {name}")?,
                Outcome::Failed(e) => writeln!(f, "  FAILED   {name}: {e}")?,
                Outcome::Declined(why) => writeln!(f, "  declined {name}: {why}")?,
            }
        }
        write!(
            f,
            "backend scenarios on {}: {} passed, {} failed, {} declined, of {}",
            self.backend,
            count(|o| matches!(o, Outcome::Passed)),
            count(|o| matches!(o, Outcome::Failed(_))),
            count(|o| matches!(o, Outcome::Declined(_))),
            self.results.len()
        )
    }
}

/// Runs every scenario on mirrors made by `open` (one per scenario, over the range it is
/// given), except those `declined` names with the backend's reason; returns the report.
pub fn run_all(
    backend: &str,
    mm: &Arc<ProcessMm>,
    open: &Open<'_>,
    declined: &[(&str, &'static str)],
) -> Report {
    let results = all()
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            if let Some((_, why)) = declined.iter().find(|(n, _)| *n == s.name) {
                return (s.name, Outcome::Declined(why));
            }
            let region = Range::with_len(REGION_BASE + i as u64 * (REGION_LEN << 1), REGION_LEN)
                .expect("a region inside the user address space");
            let outcome = open(mm, region)
                .map_err(|e| format!("opening the mirror: {e}"))
                .and_then(|mirror| {
                    let rig = Rig {
                        mm,
                        open,
                        mirror: &*mirror,
                        region,
                    };
                    let r = (s.run)(&rig);
                    // A hook the scenario armed and never reached goes with it.
                    race::disarm();
                    // Whatever the scenario left mapped in its region goes.
                    let _ = unmap(region.start(), region.len());
                    r
                });
            match outcome {
                Ok(()) => (s.name, Outcome::Passed),
                Err(e) => (s.name, Outcome::Failed(e)),
            }
        })
        .collect();
    Report {
        backend: backend.to_string(),
        results,
    }
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
    mapped_on(rig.mirror, r, writable, when)
}

fn mapped_on(m: &dyn Mirror, r: Range, writable: bool, when: &str) -> Result<(), String> {
    for p in pages(r) {
        match m.translation(p) {
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
    gone_on(rig.mirror, r, when)
}

fn gone_on(m: &dyn Mirror, r: Range, when: &str) -> Result<(), String> {
    for p in pages(r) {
        if let Some(w) = m.translation(p) {
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

/// The sequence protocol itself: a fault that snapshotted the CPU page table and prepared the
/// device's pages, then loses the race to an invalidation before it takes the update lock, must
/// see the change in `read_retry` and start over, finding the hole. The core's fault-loop hook
/// ([`race`]) forces the interleaving on every backend (each faults through the core's loop).
/// Seen failing, on the simulated IOMMU and on Vulkan, with the core's `set_seq` removed from
/// the notifier's invalidation: the fault programmed the unmapped pages and returned `Ok`.
fn fault_races_munmap(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    let mm = Arc::clone(rig.mm);
    race::arm(b, move |_| {
        // SAFETY: the buffer holds no Rust objects; the scenario never touches it again.
        if let Err(e) = unsafe { mm.munmap(b) } {
            tracing::error!(error = %e, "the racing munmap failed");
        }
    });
    let r = rig.mirror.fault(b, true);
    if !race::disarm() {
        return Err(
            "the fault never reached the core's fault loop (the race hook did not fire)".into(),
        );
    }
    expect_gone(rig, b, "after a fault raced an SVM API munmap of its range")?;
    match r {
        Ok(()) => Err("the fault succeeded over a range unmapped under it".into()),
        Err(_) => Ok(()),
    }
}

/// An invalidation that may sleep returns only once the device can no longer use the old
/// pages: an SVM API munmap of a range with device work in flight ([`Mirror::begin_work`])
/// does not return before that work ends. (A plain munmap cannot be held: the kernel lets it
/// return once its userfaultfd event is read, which is why a device settles before use.)
fn munmap_waits_for_work(rig: &Rig<'_>) -> Result<(), String> {
    let b = buffer(rig, 8)?;
    let work = rig
        .mirror
        .begin_work(b, true)
        .map_err(|e| format!("begin_work: {e}"))?;
    expect_mapped(rig, b, true, "while device work is in flight")?;
    let returned = AtomicBool::new(false);
    let mm = rig.mm;
    std::thread::scope(|s| {
        let unmapper = s.spawn(|| {
            // SAFETY: the buffer holds no Rust objects; the scenario never touches it again.
            let r = unsafe { mm.munmap(b) };
            returned.store(true, Ordering::SeqCst);
            r
        });
        std::thread::sleep(Duration::from_millis(100));
        let early = returned.load(Ordering::SeqCst);
        drop(work);
        let r = unmapper
            .join()
            .map_err(|_| "the unmapping thread panicked".to_string())?;
        r.map_err(|e| format!("munmap: {e}"))?;
        if early {
            return Err(
                "the SVM API munmap returned while device work on the range was in flight".into(),
            );
        }
        expect_gone(rig, b, "once the work ended and the munmap returned")
    })
}

/// Transparent huge pages reach the device whole (as `hmm_range_fault` reports a PMD-mapped
/// page with its order and a driver maps it with one large entry): a fault of one 4 KiB page
/// inside a THP maps all 2 MiB in one fault. Then an SVM API munmap of one page inside it
/// (which splits it on the CPU) takes that page away from the device.
fn huge_whole(rig: &Rig<'_>) -> Result<(), String> {
    const HUGE: u64 = 2 << 20;
    let start = (rig.region.start() + HUGE - 1) & !(HUGE - 1);
    let h = mmap_at(start, HUGE, libc::PROT_READ | libc::PROT_WRITE)?;
    // SAFETY: advice on the scenario's own mapping.
    let rc = unsafe {
        libc::madvise(
            h.start() as *mut libc::c_void,
            h.len() as usize,
            libc::MADV_HUGEPAGE,
        )
    };
    if rc != 0 {
        return Err(format!(
            "madvise(MADV_HUGEPAGE): {}",
            std::io::Error::last_os_error()
        ));
    }
    poke(h.start(), 1);
    let mut pte = [CpuPte::None];
    rig.mm
        .snapshot(h.start(), &mut pte)
        .map_err(|e| format!("snapshot: {e}"))?;
    if !matches!(pte[0], CpuPte::Present { order: 9, .. }) {
        return Err(format!(
            "the kernel did not back the 2 MiB with a transparent huge page ({:?}): \
             /sys/kernel/mm/transparent_hugepage/enabled must allow madvise",
            pte[0]
        ));
    }
    let before = rig.mirror.counters();
    let one = Range::with_len(h.start() + 100 * PAGE_SIZE, PAGE_SIZE).map_err(|e| e.to_string())?;
    fault(rig, one, true)?;
    expect_mapped(rig, h, true, "after a fault of one page of a huge page")?;
    let d = rig.mirror.counters().since(&before);
    if d.total_faults() != 1 || d.faults[FaultSize::UpTo2M as usize] != 1 {
        return Err(format!(
            "the huge page took {} faults ({:?} by size) instead of one of 2 MiB",
            d.total_faults(),
            d.faults
        ));
    }
    let hole = Range::with_len(h.start() + 7 * PAGE_SIZE, PAGE_SIZE).map_err(|e| e.to_string())?;
    // SAFETY: one page of the scenario's mapping, holding no Rust objects.
    unsafe { rig.mm.munmap(hole) }.map_err(|e| format!("munmap inside the huge page: {e}"))?;
    expect_gone(
        rig,
        hole,
        "after an SVM API munmap of one page of the huge page",
    )
}

/// When the address space goes away (`Notifier::release`, what the kernel's
/// `mmu_notifier_release` does at exit and what svmirror-mm runs when its monitor dies), every
/// mirror of it drops every translation and refuses faults from then on. Made on an address
/// space of its own, so the process's stays.
fn release(rig: &Rig<'_>) -> Result<(), String> {
    let mm = Arc::new(ProcessMm::new().map_err(|e| format!("a second ProcessMm: {e}"))?);
    let mirror = (rig.open)(&mm, rig.region).map_err(|e| format!("opening the mirror: {e}"))?;
    let b = buffer(rig, 8)?;
    mirror
        .fault(b, true)
        .map_err(|e| format!("fault before the release: {e}"))?;
    mapped_on(&*mirror, b, true, "before the release")?;
    mm.notifier()
        .release()
        .map_err(|e| format!("release: {e}"))?;
    gone_on(&*mirror, b, "after the address space was released")?;
    if mirror.fault(b, false).is_ok() {
        return Err("a fault after the release succeeded".into());
    }
    gone_on(&*mirror, b, "after a refused fault")?;
    drop(mirror);
    drop(mm);
    Ok(())
}
