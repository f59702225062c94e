//! Regression tests against the real kernel for the event-path defects of issue 15 that are
//! about the monitor and pages coming back from a device: a failing message leaving the other
//! blocked faulters unanswered (defect 2), and a page brought back from a device while an event
//! is queued (defect 1). The event path's records are tested in `event_path.rs`, the madvise
//! hold (defect 8) in `madvise_hold.rs`.
//!
//! Every test here was run on the code before the fixes (c326c91) and the failure it gave there
//! is quoted in its documentation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use svmirror_core::{Error, Event, PageSource, Range};
use svmirror_testsupport::{eventually, serial};

#[path = "support/fixture.rs"]
mod fixture;
use fixture::*;

#[path = "support/vram.rs"]
mod vram;
use vram::FakeVram;

/// Defect 2 (issue 15): one failing message does not leave the others unanswered.
///
/// Two pages migrate to a `FakeVram` whose `copy_back` then fails; two CPU threads read one
/// page each and block in a MISSING fault. The first fault the monitor handles fails (the
/// device cannot give the page back): the monitor must fail closed (`is_failed`, every mirror
/// released, later faults refused with `Error::Released`) and still answer every blocked
/// faulter, the one whose message failed included. Both threads must come back; as the
/// monitor's `drain` documents, a page whose device cannot give it back is answered with a zero
/// page, and the device keeps its copy (nothing is discarded).
///
/// The test does not force the two faults into one read: in every interleaving both threads
/// must return (a fault read after the failure is drained; one read before it is woken by the
/// failure or drained in turn), so the outcome is deterministic.
///
/// Seen failing on the old code (c326c91): `every CPU thread blocked on a page that could not
/// come back was answered: Timeout` (after 10 s: the monitor returned on the failing message
/// without waking its thread and dropped the rest of its batch).
#[test]
fn a_failing_copy_back_fails_closed_and_answers_every_blocked_fault() {
    let _s = serial();
    let f = fixture(2);
    for i in 0..2 {
        write_byte(f.buf.start() + i * PAGE + 5, 0x60 + i as u8);
    }
    let vram = Arc::new(FakeVram::default());
    assert_eq!(f.mm.migrate_to_device(f.buf, vram.clone()).unwrap(), 2);
    vram.fail_copy_back.store(true, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    let threads: Vec<_> = (0..2u64)
        .map(|i| {
            let tx = tx.clone();
            let addr = f.buf.start() + i * PAGE + 5;
            std::thread::spawn(move || {
                let v = read_byte(addr);
                let _ = tx.send((i, v));
            })
        })
        .collect();
    let mut got = Vec::new();
    for _ in 0..2 {
        let r = rx.recv_timeout(Duration::from_secs(10));
        let r = r.map_err(|e| format!("{e:?}"));
        let r = r.unwrap_or_else(|e| {
            panic!("every CPU thread blocked on a page that could not come back was answered: {e}")
        });
        got.push(r);
    }
    for t in threads {
        t.join().unwrap();
    }
    got.sort();
    assert_eq!(got, vec![(0, 0), (1, 0)], "answered with zero pages");
    assert!(
        f.mm.is_failed(),
        "a failing copy back fails the monitor closed"
    );
    assert!(
        f.mirror
            .table
            .lock()
            .invalidations
            .contains(&(Range::FULL, Event::Release)),
        "every mirror released"
    );
    assert!(matches!(
        f.mm.area(f.buf.start(), f.buf.end()),
        Err(Error::Released)
    ));
    assert_eq!(vram.len(), 2);
    assert!(
        (0..2).all(|i| vram.holds(f.buf.start() + i * PAGE)),
        "the device kept both pages"
    );
}

/// Defect 1 (issue 15): a page brought back from a device while another thread's munmap event
/// is queued keeps its bytes, and the mm stays up.
///
/// The monitor's handler is held on one munmap's UNMAP (a gated subscriber); a second munmap is
/// made meanwhile, so its event is queued; then `migrate_to_ram` brings a migrated page back.
/// The kernel refuses UFFDIO_COPY with EAGAIN while an event is queued unread
/// (fs/userfaultfd.c, `mmap_changing`). Now the monitor's reader takes the event off the queue
/// at once, and a copy that still meets EAGAIN releases nothing and tries again; the device
/// copy is released only after the copy landed.
///
/// Seen failing on the old code (c326c91), where the one monitor thread was stuck in the
/// handler and never read the second event, and `bring_back` freed the device copy before the
/// copy: "brought back while an event was queued", `left: Err(Core(Source { range:
/// 0x280000005000..0x280000006000, source: Os { code: 11, kind: WouldBlock, .. } }))`, with the
/// device copy already released.
#[test]
fn a_page_brought_back_while_an_event_is_queued_keeps_its_bytes() {
    let _s = serial();
    let f = fixture_far(8, 0x2800_0000_0000);
    let migrated = page(f.buf, 5, 1);
    write_byte(migrated.start() + 9, 0x5a);
    let vram = Arc::new(FakeVram::default());
    assert_eq!(f.mm.migrate_to_device(migrated, vram.clone()).unwrap(), 1);

    let held = hold_handler(&f.mm, page(f.buf, 0, 1));
    // The second munmap, from another thread: its event is queued while the handler waits.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    let second = page(f.buf, 2, 1);
    let t = std::thread::spawn(move || {
        // SAFETY: gettid takes no arguments.
        let _ = tid_tx.send(unsafe { libc::gettid() });
        let _ = done_tx.send(sys_munmap(second.start(), PAGE));
    });
    let tid = tid_rx.recv().unwrap();
    // Either the munmap returned (its event was read) or its thread waits for the read.
    let mut returned = None;
    eventually(
        "the second munmap to return or wait for its read",
        Duration::from_secs(10),
        || {
            returned = returned.or_else(|| done.try_recv().ok());
            returned.is_some() || wchan(tid).contains("userfaultfd_event_wait_completion")
        },
    );

    let back = f.mm.migrate_to_ram(migrated);
    held.release();
    let rc = returned.unwrap_or_else(|| done.recv_timeout(Duration::from_secs(10)).unwrap());
    assert_eq!(rc, 0);
    t.join().unwrap();
    assert_eq!(
        back.map_err(|e| format!("{e:?}")),
        Ok(1),
        "brought back while an event was queued"
    );
    assert_eq!(
        read_byte(migrated.start() + 9),
        0x5a,
        "the page kept its bytes"
    );
    assert!(
        !vram.holds(migrated.start()),
        "the device copy was released"
    );
    assert!(!f.mm.is_failed());
}
