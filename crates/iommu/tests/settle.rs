//! A device never uses a translation that a returned CPU change ended: the kernel lets a plain
//! munmap (or mremap, or madvise) return as soon as the userfaultfd monitor has *read* its
//! event (fs/userfaultfd.c: reading completes the event), before the monitor has invalidated
//! anything, so the simulated IOMMU settles each access first (`PageSource::settle`): it waits
//! until every change over the access's range that the monitor has read is handled.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::{PAGE, mm_mirror};
use svmirror_core::{IntervalNotifierOps, InvalidateCtx, NotifierRange, Pass, Range, WouldBlock};
use svmirror_iommu::testing::AnonMap;
use svmirror_iommu::{DmaCommand, MirrorConfig};
use svmirror_mm::ProcessMm;

/// A subscriber whose invalidation reports that it started, then waits for `gate`: it holds
/// the monitor's handler, as a driver waiting for a lock would.
struct GatedSub {
    entered: Mutex<Option<mpsc::Sender<()>>>,
    gate: Arc<Mutex<()>>,
}

impl IntervalNotifierOps for GatedSub {
    fn invalidate(
        &self,
        _ctx: &InvalidateCtx<'_>,
        _range: &NotifierRange,
    ) -> Result<Pass, WouldBlock> {
        if let Some(tx) = self.entered.lock().unwrap().take() {
            let _ = tx.send(());
        }
        drop(self.gate.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(Pass::Done)
    }
}

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
    let b = AnonMap::aligned(4 * PAGE as usize, 4 * PAGE as usize).unwrap();
    b.fill(7);
    let (first, victim) = (b.addr(), b.addr() + 2 * PAGE);
    let read = |addr| m.submit(DmaCommand::Read { src: addr, len: 4 });
    assert_eq!(read(victim).unwrap().wait().unwrap().data, vec![7; 4]);
    assert!(m.mmu().translate(victim).is_some());

    let gate = Arc::new(Mutex::new(()));
    let (entered_tx, entered) = mpsc::channel();
    let gated = Arc::new(GatedSub {
        entered: Mutex::new(Some(entered_tx)),
        gate: gate.clone(),
    });
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
