//! A device never uses a translation that a returned CPU change ended: the kernel lets a plain
//! munmap (or mremap, or madvise) return as soon as the userfaultfd monitor has *read* its
//! event (fs/userfaultfd.c: reading completes the event), before the monitor has invalidated
//! anything, so the simulated IOMMU settles each access first (`PageSource::settle`): it waits
//! until every change over the access's range that the monitor has read is handled.

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::{PAGE, mm_mirror};
use svmirror_core::Range;
use svmirror_iommu::{DmaCommand, MirrorConfig};
use svmirror_mm::ProcessMm;
use svmirror_mm::testing::AnonMap;
use svmirror_testsupport::GatedSub;

/// A plain munmap of a page the device has mapped returns while the monitor's handler is
/// still busy with an earlier event (held here by a gated subscriber), so its UNMAP is read
/// and not handled: the device translation is still there. A device read of the page issued
/// after the munmap returned must not use it: it waits until the UNMAP is handled and then
/// faults on the unmapped page.
///
/// Seen failing without the settle step in the DMA engine: the read completed at once with
/// the unmapped page's old bytes ("a read issued after the munmap returned waited for its
/// invalidation: Ok([7, 7, 7, 7])").
#[test]
fn a_device_read_after_a_plain_munmap_returned_never_uses_the_old_translation() {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let m = mm_mirror(&mm, MirrorConfig::checked());
    // At a fixed address far from everything the kernel places: the holes this test punches
    // are never taken by another thread's mapping, which `b`'s drop would then unmap.
    let b = AnonMap::at(0x2b00_0000_0000, 4 * PAGE as usize).unwrap();
    b.fill(7);
    let (first, victim) = (b.addr(), b.addr() + 2 * PAGE);
    let read = |addr| m.submit(DmaCommand::Read { src: addr, len: 4 });
    assert_eq!(read(victim).unwrap().wait().unwrap().data, vec![7; 4]);
    assert!(m.mmu().translate(victim).is_some());

    let (gated, gate, entered) = GatedSub::new();
    let _gated_sub = mm
        .notifier()
        .insert(Range::with_len(first, PAGE).unwrap(), gated)
        .unwrap();
    let held = gate.lock().unwrap();
    // SAFETY: a page of our own mapping that nothing refers to; the handler of its UNMAP then
    // waits in the gated subscriber.
    let rc = unsafe { libc::munmap(first as *mut libc::c_void, PAGE as usize) };
    assert_eq!(rc, 0);
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the first UNMAP reached the gated subscriber");
    // SAFETY: as above. Its UNMAP is read (so this returns) and queued behind the first.
    let rc = unsafe { libc::munmap(victim as *mut libc::c_void, PAGE as usize) };
    assert_eq!(rc, 0);
    assert!(
        m.mmu().translate(victim).is_some(),
        "the handler has not reached the victim's UNMAP yet"
    );

    let fence = read(victim).unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(fence.wait().map(|c| c.data));
    });
    // The read must wait for the victim's UNMAP to be handled, which the gate holds back.
    let early = rx.recv_timeout(Duration::from_secs(2));
    drop(held);
    let result = match early {
        Ok(r) => {
            panic!("a read issued after the munmap returned waited for its invalidation: {r:?}")
        }
        Err(_) => rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the read completes once the UNMAP is handled"),
    };
    waiter.join().unwrap();
    assert!(
        result.is_err(),
        "read the old page of a returned munmap: {result:?}"
    );
    assert!(m.mmu().translate(victim).is_none());
    assert_eq!(m.violations().1, 0);
}

/// A mremap moves the page first and tells afterwards (mm/mremap.c: `move_vma`, then the REMAP
/// event in `mremap_userfaultfd_complete`), so a device read in flight across it may see the
/// page's contents written after the move, through its new address. The DMA engine therefore
/// asks, after each read, whether a change over the range was learned of since it settled
/// (`changed_since`), and reads again if so. This checks the answer against the real kernel:
/// an unrelated change is not reported, a mremap of the range is, as soon as it returned.
///
/// Seen failing with the trait's default (`changed_since` always false): "the mremap that
/// returned after settle is reported". Before the re-read, the coherence torture test (seed 2,
/// plain mremap in the mix) saw device reads return tags that were never live at the address
/// read ("stale-read-pruned").
#[test]
fn a_mremap_after_settle_is_reported_as_a_change() {
    use svmirror_core::PageSource;
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    // Fixed and far, as in the test above: the moved-away range stays a hole nobody takes.
    let b = AnonMap::at(0x2c00_0000_0000, 8 * PAGE as usize).unwrap();
    b.fill(1);
    let (watched, other) = (
        Range::with_len(b.addr(), 4 * PAGE).unwrap(),
        Range::with_len(b.addr() + 6 * PAGE, PAGE).unwrap(),
    );
    // Registered for events, as a device fault would.
    mm.area(watched.start(), b.addr() + b.len() as u64).unwrap();
    let since = mm.settle(watched).unwrap();
    assert!(!mm.changed_since(watched, since), "nothing changed yet");
    // SAFETY: a page of our own mapping that nothing refers to.
    let rc = unsafe { libc::munmap(other.start() as *mut libc::c_void, PAGE as usize) };
    assert_eq!(rc, 0);
    let _ = mm.settle(other).unwrap();
    assert!(
        !mm.changed_since(watched, since),
        "a munmap beside the range is not a change to it"
    );
    let dest = AnonMap::at(0x2c10_0000_0000, 4 * PAGE as usize).unwrap();
    // SAFETY: moves our own pages over `dest`'s mapping, which nothing refers to; `dest` is
    // forgotten (its range holds the moved pages now) and unmapped below.
    let p = unsafe {
        libc::mremap(
            watched.start() as *mut libc::c_void,
            watched.len() as usize,
            watched.len() as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dest.addr() as *mut libc::c_void,
        )
    };
    assert_eq!(p as u64, dest.addr());
    let moved = dest.addr();
    std::mem::forget(dest);
    assert!(
        mm.changed_since(watched, since),
        "the mremap that returned after settle is reported"
    );
    // SAFETY: the moved pages are ours and nothing refers to them.
    let rc = unsafe { libc::munmap(moved as *mut libc::c_void, watched.len() as usize) };
    assert_eq!(rc, 0);
}
