//! The VFIO scenarios, run for real inside the QEMU guest that `cargo xtask vfio-vm` boots
//! (q35, emulated Intel IOMMU, QEMU's edu device bound to vfio-pci). Needs root, /dev/vfio and
//! an edu device: anywhere else every scenario fails with the reason.
//!
//! Prints one `PASS name` or `FAIL name: why` line per scenario, `BENCH` lines with the
//! measurements, and exits non-zero if any scenario failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use svmirror_core::MirrorError;
use svmirror_core::{Event, PAGE_SIZE, Range};
use svmirror_edu::{Direction, EduError};
use svmirror_mm::{Advice, Protection};
use svmirror_vfio::{IovaMode, MapperConfig, VfioError, VfioMapper};

mod support;

use support::{
    Env, dmar_faults, err, expect_dmar_fault, fill, pattern, qemu_exit, read, status_bytes,
    wait_for,
};

type Res = Result<(), String>;

/// A scenario: its name and body.
type Scenario = (&'static str, fn(&Env) -> Res);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

mod nvme;

/// A mirrored buffer is read and written by edu DMA at its own virtual address.
fn dma_at_own_virtual_address(env: &Env) -> Res {
    let buf = env.buffer(4 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    ensure!(
        m.is_identity(),
        "IOVA ranges {:x?} do not hold {buf}",
        m.iommu_info().iova_ranges
    );
    ensure!(m.granule() == 2 << 20, "granule {:#x}", m.granule());
    let src = buf.start() + 0x1000;
    let dst = buf.start() + (2 << 20) - 1000; // crosses into the second chunk
    let want = pattern(src, 3000, 7);
    fill(dst, 3000, 0);
    env.edu
        .copy_to_device(&m, src, 3000, 0)
        .map_err(err("copy to device"))?;
    env.edu
        .copy_from_device(&m, 0, dst, 3000)
        .map_err(err("copy from device"))?;
    ensure!(
        read(dst, 3000) == want,
        "data written by the device differs from the CPU's"
    );
    ensure!(
        m.translate(src, false) == Some(src),
        "IOVA of {src:#x} is not its address"
    );
    let s = m.stats();
    ensure!(s.chunks_mapped == 2, "chunks mapped: {}", s.chunks_mapped);
    let c = m.counters();
    ensure!(
        c.total_faults() >= 2,
        "faults counted: {}",
        c.total_faults()
    );
    Ok(())
}

/// munmap through the SVM API: the chunk is unmapped before the call returns, a DMA to the old
/// address is blocked by the IOMMU, and new memory at the same address is untouched.
fn munmap_blocks_dma(env: &Env) -> Res {
    let buf = env.buffer(4 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    let a = buf.start() + 0x3000;
    let other = buf.start() + (2 << 20);
    let p1 = pattern(a, 2048, 1);
    let p2 = pattern(other, 2048, 99);
    env.edu
        .copy_to_device(&m, a, 2048, 0)
        .map_err(err("map chunk"))?;
    let iova = m.translate(a, true).ok_or("chunk not mapped")?;
    let first = Range::with_len(buf.start(), 2 << 20).expect("chunk");
    // SAFETY: nothing refers to the first chunk.
    unsafe { env.mm.munmap(first) }.map_err(err("munmap"))?;
    ensure!(
        m.translate(a, false).is_none(),
        "chunk still mapped after munmap"
    );
    // New memory at the same address, as a later mmap would place it.
    // SAFETY: the range was just unmapped and nothing else lives there.
    let p = unsafe {
        libc::mmap(
            first.start() as *mut libc::c_void,
            first.len() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    ensure!(
        p as u64 == first.start(),
        "remap at {:#x} failed",
        first.start()
    );
    fill(first.start(), first.len(), 0x5a);
    let before = dmar_faults().len();
    // The device writes its buffer to the stale IOVA.
    // SAFETY: the IOVA is unmapped: the IOMMU blocks it, nothing is written.
    unsafe { env.edu.transfer_iova(Direction::FromDevice, iova, 0, 2048) }
        .map_err(err("stale DMA"))?;
    let line = expect_dmar_fault(before, iova, "Write")?;
    println!("DMAR (munmap, device write): {line}");
    ensure!(
        read(first.start(), first.len()).iter().all(|&b| b == 0x5a),
        "a DMA to the unmapped chunk reached memory"
    );
    // And a device read of the stale IOVA does not see the old page (which, had the chunk
    // stayed mapped, would still be pinned there with `p1` in it). QEMU fills the buffer of a
    // blocked read with what the failed bus access returned, so the buffer is not `p2` either.
    env.edu
        .copy_to_device(&m, other, 2048, 0)
        .map_err(err("load buffer"))?;
    let before = dmar_faults().len();
    // SAFETY: a device read writes no memory.
    unsafe { env.edu.transfer_iova(Direction::ToDevice, iova, 0, 2048) }
        .map_err(err("stale read"))?;
    let line = expect_dmar_fault(before, iova, "Read")?;
    println!("DMAR (munmap, device read): {line}");
    let out = other + 0x10000;
    env.edu
        .copy_from_device(&m, 0, out, 2048)
        .map_err(err("read back"))?;
    let got = read(out, 2048);
    ensure!(
        got != p1,
        "a device read of the unmapped chunk saw the old page"
    );
    ensure!(p1 != p2, "patterns must differ");
    // SAFETY: the test's own mapping.
    unsafe { libc::munmap(first.start() as *mut libc::c_void, first.len() as usize) };
    Ok(())
}

/// madvise(DONTNEED) made behind svmirror's back, seen through userfaultfd: the chunk goes,
/// a DMA to it is blocked, memory is unchanged, and the next fault maps it again.
fn dontneed_via_userfaultfd(env: &Env) -> Res {
    let buf = env.buffer(2 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    let a = buf.start() + 0x8000;
    let want = pattern(a, 1024, 3);
    env.edu
        .copy_to_device(&m, a, 1024, 0)
        .map_err(err("map chunk"))?;
    let iova = m.translate(a, true).ok_or("chunk not mapped")?;
    let clears = m.counters().invalidations[Event::Clear.index()];
    // SAFETY: the page is ours; its contents may go.
    let rc = unsafe {
        libc::madvise(
            a as *mut libc::c_void,
            PAGE_SIZE as usize,
            libc::MADV_DONTNEED,
        )
    };
    ensure!(rc == 0, "madvise failed");
    wait_for("the REMOVE event to unmap the chunk", || {
        m.translate(a, false).is_none()
    })?;
    ensure!(
        m.counters().invalidations[Event::Clear.index()] > clears,
        "no Clear invalidation counted"
    );
    fill(a, 1024, 0x77);
    let before = dmar_faults().len();
    // SAFETY: the IOVA is unmapped: the IOMMU blocks it.
    unsafe { env.edu.transfer_iova(Direction::FromDevice, iova, 0, 1024) }
        .map_err(err("stale DMA"))?;
    let line = expect_dmar_fault(before, iova, "Write")?;
    println!("DMAR (madvise DONTNEED via userfaultfd, device write): {line}");
    ensure!(
        read(a, 1024).iter().all(|&b| b == 0x77),
        "blocked DMA changed memory"
    );
    // Remap after invalidation: the same transfer through the mapper lands.
    env.edu
        .copy_from_device(&m, 0, a, 1024)
        .map_err(err("remap"))?;
    ensure!(read(a, 1024) == want, "remapped DMA data wrong");
    ensure!(
        m.translate(a, true) == Some(iova),
        "remapped at another IOVA"
    );
    Ok(())
}

/// An invalidation of one page unmaps its whole chunk and nothing else; the next fault maps
/// the chunk again; a protection change to read-only remaps it read-only for the device.
fn partial_invalidation_and_remap(env: &Env) -> Res {
    let buf = env.buffer(4 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    m.fault(buf.start(), buf.len(), true)
        .map_err(err("fault"))?;
    let avail0 = env.dma_avail(&m)?;
    ensure!(m.stats().mappings == 2, "mappings {}", m.stats().mappings);
    let far = buf.start() + (2 << 20) - PAGE_SIZE;
    let second = buf.start() + (2 << 20);
    let page = Range::with_len(buf.start() + 0x10000, PAGE_SIZE).expect("page");
    // SAFETY: the page's contents may go.
    unsafe { env.mm.madvise(page, Advice::DontNeed) }.map_err(err("madvise"))?;
    ensure!(
        m.translate(far, false).is_none(),
        "rest of the chunk still mapped"
    );
    ensure!(
        m.translate(second, false) == Some(second),
        "the other chunk was unmapped"
    );
    ensure!(
        env.dma_avail(&m)? == avail0 + 1,
        "kernel still holds the chunk's mapping"
    );
    m.fault(far, 8, true).map_err(err("refault"))?;
    ensure!(
        m.translate(page.start(), true).is_some(),
        "chunk not remapped whole"
    );
    ensure!(
        env.dma_avail(&m)? == avail0,
        "remap did not take one mapping"
    );
    // Read-only: the device may read, its writes are blocked.
    let ro = Range::with_len(buf.start(), 2 << 20).expect("chunk");
    let a = ro.start() + 0x4000;
    let want = pattern(a, 512, 42);
    env.mm
        .mprotect(ro, Protection::READ)
        .map_err(err("mprotect"))?;
    ensure!(
        m.translate(a, false).is_none(),
        "mprotect did not unmap the chunk"
    );
    match m.fault(a, 512, true) {
        Err(VfioError::Mirror(MirrorError::Core {
            source: svmirror_core::Error::WriteToReadOnly { .. },
            ..
        })) => {}
        r => return Err(format!("write fault on read-only memory: {r:?}")),
    }
    env.edu
        .copy_to_device(&m, a, 512, 0)
        .map_err(err("read-only map"))?;
    let iova = m.translate(a, false).ok_or("not mapped for reading")?;
    ensure!(
        m.translate(a, true).is_none(),
        "read-only memory mapped writable"
    );
    let target = a + 0x1000;
    let untouched = read(target, 512);
    ensure!(untouched != want, "patterns must differ");
    // SAFETY: the IOVA is mapped read-only: the IOMMU blocks the write. (QEMU reports no
    // DMAR fault when the translation comes from its IOTLB, filled by the read above: the
    // check is that memory is unchanged.)
    unsafe {
        env.edu
            .transfer_iova(Direction::FromDevice, iova + 0x1000, 0, 512)
    }
    .map_err(err("write to read-only"))?;
    ensure!(
        read(target, 512) == untouched,
        "a device write reached read-only memory"
    );
    env.edu
        .copy_from_device(&m, 0, second, 512)
        .map_err(err("read back"))?;
    ensure!(
        read(second, 512) == want,
        "device read of read-only memory wrong"
    );
    env.mm
        .mprotect(ro, Protection::READ_WRITE)
        .map_err(err("mprotect back"))?;
    Ok(())
}

/// IOVAs from the allocator when IOVA = virtual address is not wanted.
fn allocated_iovas(env: &Env) -> Res {
    let buf = env.buffer(4 << 20)?;
    let cfg = MapperConfig {
        iova: IovaMode::Allocated,
        ..MapperConfig::default()
    };
    let m = env.mapper(buf, cfg)?;
    ensure!(!m.is_identity(), "allocator mode is identity");
    let src = buf.start() + 0x2000;
    let dst = buf.start() + (2 << 20) + 0x100;
    let want = pattern(src, 4000, 9);
    env.edu
        .copy_to_device(&m, src, 4000, 0)
        .map_err(err("to device"))?;
    env.edu
        .copy_from_device(&m, 0, dst, 4000)
        .map_err(err("from device"))?;
    ensure!(
        read(dst, 4000) == want,
        "data differs through allocated IOVAs"
    );
    let iova = m.translate(src, false).ok_or("not mapped")?;
    ensure!(
        iova != src && iova % (2 << 20) == 0x2000,
        "IOVA {iova:#x} for {src:#x}"
    );
    // Clear keeps the chunk's IOVA window for the refault; Unmap frees it.
    let first = Range::with_len(buf.start(), 2 << 20).expect("chunk");
    // SAFETY: the contents may go.
    unsafe { env.mm.madvise(first, Advice::DontNeed) }.map_err(err("madvise"))?;
    ensure!(
        m.translate(src, false).is_none(),
        "madvise left the chunk mapped"
    );
    ensure!(
        m.iova_of(src) == Some(iova),
        "Clear released the IOVA window"
    );
    // SAFETY: nothing refers to it.
    unsafe { env.mm.munmap(first) }.map_err(err("munmap"))?;
    ensure!(m.iova_of(src).is_none(), "Unmap kept the IOVA window");
    ensure!(
        m.iova_of(dst).is_some(),
        "Unmap of one chunk released the other's window"
    );
    Ok(())
}

/// An invalidation waits for a device access in flight on its range: the DMA completes into
/// the memory, and only then is the chunk unmapped (no DMAR fault).
fn invalidation_waits_for_dma_in_flight(env: &Env) -> Res {
    let buf = env.buffer(2 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    let src = buf.start() + 0x1000;
    let dst = buf.start() + 0x20000;
    let want = pattern(src, 2000, 17);
    fill(dst, 2000, 0);
    env.edu
        .copy_to_device(&m, src, 2000, 0)
        .map_err(err("load buffer"))?;
    let before = dmar_faults().len();
    let result = std::thread::scope(|s| {
        let t = s.spawn(|| env.edu.copy_from_device(&m, 0, dst, 2000));
        // The transfer takes ~100 ms of virtual time: invalidate once it holds its access.
        let held = wait_for("the DMA to hold its access", || m.accesses_in_flight() == 1);
        let started = Instant::now();
        let r = env.mm.mprotect(buf, Protection::READ);
        let waited = started.elapsed();
        // Read before joining: the invalidation returned, so the DMA must have completed.
        let landed = read(dst, 2000) == want;
        let dma = match t.join() {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("DMA thread panicked".to_owned()),
        };
        held.and(dma)
            .and(r.map_err(|e| format!("mprotect: {e}")))
            .map(|()| (waited, landed))
    });
    let (waited, landed) = result?;
    println!(
        "mprotect waited {:.1} ms for the DMA in flight",
        waited.as_secs_f64() * 1e3
    );
    ensure!(
        landed,
        "the invalidation returned before the DMA in flight completed into memory"
    );
    ensure!(
        m.translate(dst, false).is_none(),
        "mprotect left the chunk mapped"
    );
    let after = dmar_faults();
    ensure!(
        after.len() == before,
        "the DMA in flight was cut off: {:?}",
        &after[before.min(after.len())..]
    );
    env.mm
        .mprotect(buf, Protection::READ_WRITE)
        .map_err(err("mprotect back"))?;
    Ok(())
}

/// Runs an edu DMA from the device into `dst` (2000 bytes loaded from `src` first) and, once
/// it holds its access, `invalidate` from this thread; returns whether the DMA landed and the
/// DMAR fault lines logged meanwhile.
fn dma_across(
    env: &Env,
    m: &VfioMapper,
    src: u64,
    dst: u64,
    invalidate: impl FnOnce() -> Res,
) -> Result<(bool, Vec<String>), String> {
    let want = pattern(src, 2000, 23);
    fill(dst, 2000, 0);
    env.edu
        .copy_to_device(m, src, 2000, 0)
        .map_err(err("load buffer"))?;
    let before = dmar_faults().len();
    std::thread::scope(|s| {
        let t = s.spawn(|| env.edu.copy_from_device(m, 0, dst, 2000));
        // The transfer takes ~100 ms of virtual time: invalidate once it holds its access.
        let held = wait_for("the DMA to hold its access", || m.accesses_in_flight() == 1);
        let inv = held.and_then(|()| invalidate());
        let dma = match t.join() {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("DMA thread panicked".to_owned()),
        };
        inv.and(dma)
    })?;
    let after = dmar_faults();
    Ok((
        read(dst, 2000) == want,
        after[before.min(after.len())..].to_vec(),
    ))
}

/// An invalidation of pages the device is not using, in the same type1 mapping (one VMA's run
/// in a chunk) as a DMA in flight, waits for the DMA: type1 unmaps a mapping whole, so
/// unmapping it at once would cut the DMA off.
///
/// Seen failing before the fix (the teardown waited only for accesses on the invalidated range
/// itself, then unmapped the whole chunk): "the DMA in flight did not land in memory". The
/// NVMe churn met it as a Write command that read zeros from a slot: the IOMMU blocked its DMA
/// (a DMAR read fault at the slot) and QEMU's NVMe still completed the command as a success.
fn dma_survives_an_invalidation_elsewhere_in_its_mapping(env: &Env) -> Res {
    let buf = env.buffer(2 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    let far = Range::new(buf.start() + (1 << 20), buf.end()).map_err(err("range"))?;
    let (landed, dmar) = dma_across(env, &m, buf.start() + 0x1000, buf.start() + 0x20000, || {
        env.mm
            .mprotect(far, Protection::READ)
            .map_err(err("mprotect"))
    })?;
    env.mm
        .mprotect(far, Protection::READ_WRITE)
        .map_err(err("mprotect back"))?;
    ensure!(
        dmar.is_empty(),
        "the invalidation of pages the DMA did not use cut it off: {dmar:?}"
    );
    ensure!(landed, "the DMA in flight did not land in memory");
    Ok(())
}

/// An invalidation of another mapping in the same chunk leaves a DMA in flight alone: its own
/// mapping stays (only the pieces the range touches are unmapped), and the DMA lands.
///
/// Seen failing before the fix, which unmapped the whole chunk under the DMA: "the DMA in
/// flight did not land in memory".
fn dma_is_left_alone_by_an_invalidation_of_another_mapping(env: &Env) -> Res {
    let buf = env.buffer(2 << 20)?;
    let second = Range::new(buf.start() + (1 << 20), buf.end()).map_err(err("range"))?;
    // Two VMAs in one chunk: a plain mprotect splits the buffer before anything is mapped.
    // SAFETY: the buffer is this scenario's; nothing refers into it.
    let rc = unsafe {
        libc::mprotect(
            second.start() as usize as *mut libc::c_void,
            second.len() as usize,
            libc::PROT_READ,
        )
    };
    ensure!(rc == 0, "mprotect: {}", std::io::Error::last_os_error());
    let m = env.mapper(buf, MapperConfig::default())?;
    m.fault(second.start(), PAGE_SIZE, false)
        .map_err(err("fault the second mapping"))?;
    let dst = buf.start() + 0x20000;
    let (landed, dmar) = dma_across(env, &m, buf.start() + 0x1000, dst, || {
        env.mm
            .mprotect(second, Protection::READ_WRITE)
            .map_err(err("mprotect"))
    })?;
    ensure!(
        dmar.is_empty(),
        "the invalidation of another mapping cut the DMA off: {dmar:?}"
    );
    ensure!(landed, "the DMA in flight did not land in memory");
    ensure!(
        m.translate(dst, true).is_some(),
        "the invalidation of another mapping unmapped the DMA's own"
    );
    ensure!(
        m.translate(second.start(), false).is_none(),
        "the invalidated mapping is still mapped"
    );
    Ok(())
}

/// A fault maps the whole run of the request's mapping in its chunk, looked up first; a page
/// of that run outside the request, unmapped by another thread before the run is faulted in,
/// must not refuse the request: the fault looks again and maps what was asked for.
///
/// Seen failing before the fix: "fault refused: fault of <the chunk> failed in the core"; the
/// NVMe churn met it as a device read refused on a read-write slot, whose neighbour slot the
/// CPU thread was freeing (about one run of 8 rounds in 20).
fn a_change_next_to_the_request_does_not_refuse_it(env: &Env) -> Res {
    let buf = env.buffer(2 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    let asked = buf.start() + (1 << 20);
    let first = buf.start();
    let mut once = true;
    m.set_fault_hook(Some(Box::new(move |run: Range| {
        if once && run.start() <= first && first < run.end() {
            once = false;
            // SAFETY: the buffer's first page is this scenario's and nothing refers into it.
            let rc =
                unsafe { libc::munmap(first as usize as *mut libc::c_void, PAGE_SIZE as usize) };
            assert_eq!(rc, 0, "munmap: {}", std::io::Error::last_os_error());
        }
    })));
    let r = m.fault(asked, PAGE_SIZE, true);
    m.set_fault_hook(None);
    r.map_err(err("fault refused"))?;
    ensure!(
        m.translate(asked, true).is_some(),
        "the page asked for is not mapped"
    );
    ensure!(
        m.translate(first, false).is_none(),
        "the unmapped page is mapped"
    );
    Ok(())
}

/// A thread that holds an access of a mapper and asks it for another (or faults through it) is
/// refused with a typed error instead of risking a hang (the second call could wait for the
/// update lock while an invalidation holds it waiting for the first access); another thread
/// is not, nor is the same thread once it dropped the access; `access_many` takes several at
/// once.
fn a_nested_access_is_refused(env: &Env) -> Res {
    let buf = env.buffer(2 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    let (a, b) = (buf.start(), buf.start() + (1 << 20));
    let held = m.access(a, PAGE_SIZE, false).map_err(err("access"))?;
    let nested = m.access(b, PAGE_SIZE, false).map(drop);
    ensure!(
        matches!(nested, Err(VfioError::NestedAccess { .. })),
        "a second access by the holder: {nested:?}"
    );
    let fault = m.fault(b, PAGE_SIZE, false);
    ensure!(
        matches!(fault, Err(VfioError::NestedAccess { .. })),
        "a fault by the holder: {fault:?}"
    );
    let other = std::thread::scope(|s| {
        s.spawn(|| m.access(b, PAGE_SIZE, false).map(drop))
            .join()
            .map_err(|_| "the other thread panicked".to_owned())
    })?;
    other.map_err(err("an access by another thread"))?;
    drop(held);
    let both = m
        .access_many(&[(a, PAGE_SIZE, false), (b, PAGE_SIZE, true)])
        .map_err(err("access_many"))?;
    ensure!(both.len() == 2, "access_many held {} ranges", both.len());
    Ok(())
}

/// A plain munmap of a page the device has mapped returns once its UNMAP is read, before the
/// monitor invalidates (its handler is held here by a gated subscriber, busy with an earlier
/// event): the mapper's translation is still there. A device access asked for after the
/// munmap returned must not be granted on it: it waits until the UNMAP is handled, then finds
/// the page gone. The simulated IOMMU's `settle.rs` test, on the VFIO backend.
///
/// Seen failing before the mapper settled its faults: the access was granted at once, on the
/// unmapped page's old frame ("an access asked for after the munmap returned did not wait").
fn an_access_after_a_plain_munmap_returned_never_uses_the_old_translation(env: &Env) -> Res {
    let buf = env.buffer(2 << 20)?;
    let (first, victim) = (buf.start(), buf.start() + 2 * PAGE_SIZE);
    fill(buf.start(), 4 * PAGE_SIZE, 7);
    // The victim in a mapping of its own (a PROT_NONE page between), so that the first
    // page's UNMAP unmaps nothing of the victim's (type1 unmaps a mapping whole).
    // SAFETY: a page of this scenario's buffer that nothing refers to.
    let rc = unsafe {
        libc::mprotect(
            (first + PAGE_SIZE) as usize as *mut libc::c_void,
            PAGE_SIZE as usize,
            libc::PROT_NONE,
        )
    };
    ensure!(rc == 0, "mprotect: {}", std::io::Error::last_os_error());
    let m = env.mapper(buf, MapperConfig::default())?;
    m.fault(victim, PAGE_SIZE, false).map_err(err("fault"))?;
    ensure!(m.translate(victim, false).is_some(), "the victim is mapped");
    let (gated, gate, entered) = svmirror_testsupport::GatedSub::new();
    let first_page = Range::with_len(first, PAGE_SIZE).map_err(err("range"))?;
    let _gated_sub = env
        .mm
        .notifier()
        .insert(first_page, gated)
        .map_err(err("subscribe"))?;
    let held = gate
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: pages of this scenario's buffer that nothing refers to.
    let unmap =
        |a: u64| unsafe { libc::munmap(a as usize as *mut libc::c_void, PAGE_SIZE as usize) };
    ensure!(
        unmap(first) == 0,
        "munmap: {}",
        std::io::Error::last_os_error()
    );
    entered
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the first UNMAP never reached the gated subscriber".to_owned())?;
    // Its UNMAP is read (so this returns) and queued behind the first.
    ensure!(
        unmap(victim) == 0,
        "munmap: {}",
        std::io::Error::last_os_error()
    );
    ensure!(
        m.translate(victim, false).is_some(),
        "the handler has not reached the victim's UNMAP yet"
    );
    let m = &m;
    let (early, result) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let _ = tx.send(m.access(victim, PAGE_SIZE, false).map(drop));
        });
        // The access must wait for the victim's UNMAP to be handled, which the gate holds.
        let early = rx.recv_timeout(Duration::from_secs(2)).ok();
        drop(held);
        match early {
            Some(r) => (true, Some(r)),
            None => (false, rx.recv_timeout(Duration::from_secs(10)).ok()),
        }
    });
    ensure!(
        !early,
        "an access asked for after the munmap returned did not wait: {result:?}"
    );
    match result {
        Some(
            Err(VfioError::Mirror(MirrorError::Core { .. })) | Err(VfioError::NotMapped { .. }),
        ) => {}
        other => return Err(format!("the access to the unmapped page: {other:?}")),
    }
    ensure!(
        m.translate(victim, false).is_none(),
        "the victim is still mapped"
    );
    Ok(())
}

/// The mapping budget: a fault the budget cannot hold is refused before the kernel sees it and
/// rolls back the chunks it mapped; with the check off the kernel's ENOSPC comes back typed.
fn budget_refused_cleanly(env: &Env) -> Res {
    let buf = env.buffer(64 << 10)?;
    let cfg = MapperConfig {
        granule: Some(PAGE_SIZE),
        ..MapperConfig::default()
    };
    let start = env.dma_avail_now()?;
    ensure!(start > 16, "dma_avail {start}");
    // Leave room for exactly 3 mappings: a helper mapper takes the rest with 4 KiB chunks.
    let hog_len = (start as u64 - 3) * PAGE_SIZE;
    let hog_buf = env.buffer(hog_len.next_multiple_of(2 << 20))?;
    let hog_range = Range::with_len(hog_buf.start(), hog_len).expect("hog");
    let hog = env.mapper(hog_range, cfg)?;
    hog.fault(hog_range.start(), hog_len, true)
        .map_err(err("hog fault"))?;
    let m = env.mapper(buf, cfg)?;
    ensure!(
        env.dma_avail(&m)? == 3,
        "kernel dma_avail {} after the hog",
        env.dma_avail(&m)?
    );
    ensure!(
        m.stats().budget_available == 3,
        "budget {}",
        m.stats().budget_available
    );
    m.fault(buf.start(), 2 * PAGE_SIZE, true)
        .map_err(err("two chunks"))?;
    let locked = status_bytes("VmLck:");
    match m.fault(buf.start() + 2 * PAGE_SIZE, 2 * PAGE_SIZE, true) {
        Err(VfioError::BudgetExhausted {
            needed: 1,
            available: 0,
        }) => {}
        r => return Err(format!("fault past the budget: {r:?}")),
    }
    // The refused fault mapped one chunk first, then rolled it back.
    ensure!(
        env.dma_avail(&m)? == 1,
        "rollback left kernel dma_avail at {}",
        env.dma_avail(&m)?
    );
    ensure!(
        m.stats().mappings == 2,
        "mapper holds {} mappings",
        m.stats().mappings
    );
    ensure!(
        status_bytes("VmLck:") == locked,
        "rollback left pages locked"
    );
    drop(m);
    // With the check off, the kernel refuses with ENOSPC and it comes back typed.
    let loose = MapperConfig {
        enforce_budget: false,
        ..cfg
    };
    let m = env.mapper(buf, loose)?;
    m.fault(buf.start(), 2 * PAGE_SIZE, true)
        .map_err(err("two chunks"))?;
    // Two more chunks with one entry left: the first maps, the kernel refuses the second, and
    // the fault unmaps the first again.
    match m.fault(buf.start() + 2 * PAGE_SIZE, 2 * PAGE_SIZE, true) {
        Err(VfioError::NoMappingEntries { .. }) => {}
        r => return Err(format!("kernel past its limit: {r:?}")),
    }
    ensure!(
        env.dma_avail(&m)? == 1,
        "rollback after ENOSPC left dma_avail at {}",
        env.dma_avail(&m)?
    );
    ensure!(
        m.stats().mappings == 2,
        "mapper holds {} mappings",
        m.stats().mappings
    );
    drop(m);
    drop(hog);
    ensure!(env.dma_avail_now()? == start, "budget not returned");
    Ok(())
}

/// The mapper's budget is the kernel's `dma_avail`, read through VFIO_IOMMU_GET_INFO.
fn budget_read_from_the_kernel(env: &Env) -> Res {
    let buf = env.buffer(PAGE_SIZE)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    let info = m.iommu_info();
    ensure!(
        info.dma_avail == Some(TEST_LIMIT),
        "dma_avail {:?}",
        info.dma_avail
    );
    ensure!(
        m.stats().budget_available == TEST_LIMIT,
        "budget {:?}",
        m.stats()
    );
    ensure!(
        info.page_sizes & (2 << 20) != 0,
        "page sizes {:#x}",
        info.page_sizes
    );
    println!(
        "IOMMU: page sizes {:#x}, IOVA ranges {:x?}, dma_avail {:?}",
        info.page_sizes, info.iova_ranges, info.dma_avail
    );
    Ok(())
}

/// What type1 charges: locked memory (VmLck), exactly the bytes mapped, and not VmPin; all of
/// it returned when the mapper goes, with no mapping left in the container.
fn teardown_leaves_nothing(env: &Env) -> Res {
    let (lck0, pin0) = (status_bytes("VmLck:"), status_bytes("VmPin:"));
    let avail0 = env.dma_avail_now()?;
    let buf = env.buffer(8 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    m.fault(buf.start(), buf.len(), true)
        .map_err(err("fault"))?;
    let lck = status_bytes("VmLck:");
    ensure!(
        lck - lck0 == buf.len(),
        "VmLck grew by {} bytes for {} mapped",
        lck - lck0,
        buf.len()
    );
    ensure!(status_bytes("VmPin:") == pin0, "type1 charged VmPin");
    ensure!(
        env.dma_avail(&m)? == avail0 - 4,
        "4 chunks, kernel says {}",
        env.dma_avail(&m)?
    );
    let stats = m.close().map_err(err("close"))?;
    ensure!(
        stats.mappings == 0 && stats.mapped_bytes == 0,
        "left {stats:?}"
    );
    ensure!(
        stats.unmap_errors == 0,
        "unmap errors: {}",
        stats.unmap_errors
    );
    ensure!(
        status_bytes("VmLck:") == lck0,
        "VmLck not back: {} != {lck0}",
        status_bytes("VmLck:")
    );
    ensure!(status_bytes("VmPin:") == pin0, "VmPin moved");
    ensure!(
        env.dma_avail_now()? == avail0,
        "container still holds mappings"
    );
    Ok(())
}

/// Bad input gets typed errors.
fn bad_input(env: &Env) -> Res {
    let buf = env.buffer(64 << 10)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    ensure!(
        matches!(
            m.fault(buf.end(), 1, true),
            Err(VfioError::Mirror(MirrorError::OutsideMirror { .. }))
        ),
        "fault past the end"
    );
    ensure!(
        matches!(
            m.fault(u64::MAX - 10, 100, true),
            Err(VfioError::Mirror(MirrorError::OutsideMirror { .. }))
        ),
        "overflowing fault"
    );
    ensure!(
        matches!(
            env.edu.copy_to_device(&m, buf.start(), 4096, 0),
            Err(EduError::DmaOutOfBounds { .. })
        ),
        "a 4096-byte transfer was accepted"
    );
    let hole = Range::with_len(buf.start(), PAGE_SIZE).expect("page");
    // SAFETY: nothing refers to it.
    unsafe { env.mm.munmap(hole) }.map_err(err("munmap"))?;
    ensure!(
        matches!(
            m.fault(buf.start(), 8, true),
            Err(VfioError::NotMapped { .. })
        ),
        "fault on a hole"
    );
    Ok(())
}

/// Map/unmap cost per chunk size and fault-to-mapped latency, printed as BENCH lines.
fn benchmarks(env: &Env) -> Res {
    let buf = env.buffer(32 << 20)?;
    let m = env.mapper(buf, MapperConfig::default())?;
    // Populate once so the ioctls measure pinning and IOMMU programming, not page faults.
    m.fault(buf.start(), buf.len(), true)
        .map_err(err("populate"))?;
    m.unmap_all();
    for size in [4u64 << 10, 64 << 10, 2 << 20] {
        let n = (buf.len() / size).min(256);
        let (mut map, mut unmap) = (Duration::ZERO, Duration::ZERO);
        for i in 0..n {
            let va = buf.start() + i * size;
            let t = Instant::now();
            // SAFETY: the buffer is touched through raw pointers only; mapped at its own
            // address, unmapped right after.
            unsafe { env.container.vfio_dma_map(va, size as usize, va as *mut u8) }
                .map_err(err("map"))?;
            map += t.elapsed();
            let t = Instant::now();
            env.container
                .vfio_dma_unmap(va, size as usize)
                .map_err(err("unmap"))?;
            unmap += t.elapsed();
        }
        println!(
            "BENCH vfio map {:>5} KiB: {:>8.1} us   unmap: {:>8.1} us   ({} runs)",
            size >> 10,
            map.as_secs_f64() * 1e6 / n as f64,
            unmap.as_secs_f64() * 1e6 / n as f64,
            n
        );
    }
    // Fault to mapped, one 2 MiB chunk, memory already present / not yet touched.
    let mut warm = Duration::ZERO;
    for i in 0..16 {
        let va = buf.start() + i * (2 << 20);
        let t = Instant::now();
        m.fault(va, 8, true).map_err(err("fault"))?;
        warm += t.elapsed();
    }
    drop(m);
    let cold_buf = env.buffer(32 << 20)?;
    let m = env.mapper(cold_buf, MapperConfig::default())?;
    let mut cold = Duration::ZERO;
    for i in 0..16 {
        let va = cold_buf.start() + i * (2 << 20);
        let t = Instant::now();
        m.fault(va, 8, true).map_err(err("fault"))?;
        cold += t.elapsed();
    }
    println!(
        "BENCH fault-to-mapped, one 2 MiB chunk: {:.1} us populated, {:.1} us first touch (16 runs each)",
        warm.as_secs_f64() * 1e6 / 16.0,
        cold.as_secs_f64() * 1e6 / 16.0
    );
    let c = m.counters();
    if let Some(p50) = c.fault_latency.median() {
        println!(
            "BENCH first-touch mapper counters: {} faults, median latency {:?} (histogram bucket)",
            c.total_faults(),
            p50
        );
    }
    Ok(())
}

/// The backend scenario suite every mirror passes (`svmirror_mm::scenarios`), on VFIO mappers
/// over the edu device's container: the same list the simulated IOMMU and Vulkan run.
fn backend_contract(env: &Env) -> Result<(), String> {
    backend_suite("VFIO", &env.mm, &env.container)
}

/// The backend scenario suite on VFIO mappers over `container`.
pub(crate) fn backend_suite(
    name: &str,
    mm: &Arc<svmirror_mm::ProcessMm>,
    container: &Arc<svmirror_vfio::VfioContainer>,
) -> Result<(), String> {
    let open = |mm: &Arc<svmirror_mm::ProcessMm>,
                range: Range|
     -> Result<Box<dyn svmirror_core::Mirror>, svmirror_core::MirrorError> {
        // SAFETY: the scenarios touch their buffers through raw pointers only.
        let m = unsafe {
            VfioMapper::new(
                mm.notifier(),
                mm.clone(),
                container.clone(),
                range,
                MapperConfig::default(),
            )
        }?;
        Ok(Box::new(m))
    };
    // Without PAGEMAP_SCAN (Linux before 6.7; the guest runs Debian 12's 6.1) the page source
    // reads every page as order 0: no backend sees a huge page there, let alone maps it whole.
    let declined: &[(&str, &'static str)] = if mm.features().page_source.pagemap_scan {
        &[]
    } else {
        &[(
            svmirror_mm::scenarios::HUGE_WHOLE,
            "the kernel has no PAGEMAP_SCAN (before Linux 6.7): the page source cannot see huge pages",
        )]
    };
    let report = svmirror_mm::scenarios::run_all(name, mm, &open, declined);
    println!("{report}");
    if report.passed() {
        Ok(())
    } else {
        Err(report.failures().join("; "))
    }
}

/// The type1 module parameter that sets each new container's `dma_avail`.
pub(crate) const DMA_ENTRY_LIMIT: &str = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit";
/// The budget the scenarios run with, so that exhausting it takes a few dozen mappings.
const TEST_LIMIT: u32 = 64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--qemu-exit") {
        qemu_exit(args.get(1).and_then(|c| c.parse().ok()).unwrap_or(1));
    }
    let started = Instant::now();
    let default_limit = std::fs::read_to_string(DMA_ENTRY_LIMIT).unwrap_or_default();
    println!(
        "dma_entry_limit: {} (set to {TEST_LIMIT} for the scenarios)",
        default_limit.trim()
    );
    if let Err(e) = std::fs::write(DMA_ENTRY_LIMIT, TEST_LIMIT.to_string()) {
        println!("FAIL setup: writing {DMA_ENTRY_LIMIT}: {e}");
        println!("RESULT: FAIL");
        std::process::exit(1);
    }
    let env = match Env::open() {
        Ok(e) => e,
        Err(e) => {
            println!("FAIL setup: {e}");
            println!("RESULT: FAIL");
            std::process::exit(1);
        }
    };
    let scenarios: &[Scenario] = &[
        ("budget_read_from_the_kernel", budget_read_from_the_kernel),
        ("dma_at_own_virtual_address", dma_at_own_virtual_address),
        ("munmap_blocks_dma", munmap_blocks_dma),
        ("dontneed_via_userfaultfd", dontneed_via_userfaultfd),
        (
            "partial_invalidation_and_remap",
            partial_invalidation_and_remap,
        ),
        ("allocated_iovas", allocated_iovas),
        (
            "invalidation_waits_for_dma_in_flight",
            invalidation_waits_for_dma_in_flight,
        ),
        (
            "dma_survives_an_invalidation_elsewhere_in_its_mapping",
            dma_survives_an_invalidation_elsewhere_in_its_mapping,
        ),
        (
            "dma_is_left_alone_by_an_invalidation_of_another_mapping",
            dma_is_left_alone_by_an_invalidation_of_another_mapping,
        ),
        (
            "a_change_next_to_the_request_does_not_refuse_it",
            a_change_next_to_the_request_does_not_refuse_it,
        ),
        ("a_nested_access_is_refused", a_nested_access_is_refused),
        (
            "an_access_after_a_plain_munmap_returned_never_uses_the_old_translation",
            an_access_after_a_plain_munmap_returned_never_uses_the_old_translation,
        ),
        ("budget_refused_cleanly", budget_refused_cleanly),
        ("bad_input", bad_input),
        ("backend_contract", backend_contract),
        ("teardown_leaves_nothing", teardown_leaves_nothing),
        ("benchmarks", benchmarks),
    ];
    let mut failed = 0;
    for (name, f) in scenarios {
        let t = Instant::now();
        match f(&env) {
            Ok(()) => println!("PASS {name} ({:.0} ms)", t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    // Later programs in the guest, and the NVMe container opened next, get the kernel's
    // default budget back.
    if let Err(e) = std::fs::write(DMA_ENTRY_LIMIT, default_limit.trim()) {
        println!("FAIL restoring {DMA_ENTRY_LIMIT}: {e}");
        failed += 1;
    }
    drop(env);
    let (nvme_ran, nvme_failed) = nvme::run();
    failed += nvme_failed;
    let total = scenarios.len() + nvme_ran;
    println!(
        "{} of {} scenarios passed in {:.1} s",
        total - failed,
        total,
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        println!("RESULT: PASS");
    } else {
        println!("RESULT: FAIL");
        std::process::exit(1);
    }
}
