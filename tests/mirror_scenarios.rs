//! Scenarios across the core through the `svmirror` facade: the README's tour, several devices
//! mirroring one address space, and real threads racing faults against invalidations.
//!
//! These exercise the core's protocol on its own, so the CPU page table is the core's scripted
//! test double (`svmirror_core::testing`, feature `testing`): a test changes it between a
//! fault's steps at will, which the real process's page table does not allow. The same
//! scenarios on the real address space, through every backend, are tests/backend_contract.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use svmirror::core::testing::{ScriptedPageSource, TestMirror};
use svmirror::core::{
    AreaKind, CpuPte, Error, Event, Notifier, NotifierRange, Owner, PAGE_SIZE, Range, entry,
};

#[test]
fn readme_tour_runs() -> Result<(), Error> {
    let cpu = ScriptedPageSource::new();
    let buf = Range::new(0x10_0000, 0x10_4000)?;
    cpu.map_area(
        buf,
        AreaKind::Mapped {
            read: true,
            write: true,
        },
    );

    let notifier = Notifier::new();
    let mirror = Arc::new(TestMirror::new(Owner(1)));
    let sub = notifier.insert(buf, mirror.clone())?;
    mirror.fault(&sub, &cpu, buf, true)?;
    assert_eq!(mirror.table.lock().entries.len(), 4);

    let inv = notifier.invalidate_range_start(NotifierRange::new(buf, Event::Unmap))?;
    assert!(mirror.table.lock().entries.is_empty());
    cpu.unmap(buf);
    inv.end();
    assert!(matches!(
        mirror.fault(&sub, &cpu, buf, false),
        Err(Error::BadAddress { addr: 0x10_0000 })
    ));
    Ok(())
}

#[test]
fn every_device_loses_the_range_before_the_change() {
    let cpu = ScriptedPageSource::new();
    let buf = Range::with_len(0x20_0000, 16 * PAGE_SIZE).unwrap();
    cpu.map_area(
        buf,
        AreaKind::Mapped {
            read: true,
            write: true,
        },
    );
    let notifier = Notifier::new();
    let devices: Vec<Arc<TestMirror>> = (1..=3)
        .map(|i| Arc::new(TestMirror::new(Owner(i))))
        .collect();
    let subs: Vec<_> = devices
        .iter()
        .map(|d| notifier.insert(buf, d.clone()).unwrap())
        .collect();
    for (d, s) in devices.iter().zip(&subs) {
        d.fault(s, &cpu, buf, true).unwrap();
    }
    let half = Range::with_len(0x20_0000, 8 * PAGE_SIZE).unwrap();
    let inv = notifier
        .invalidate_range_start(NotifierRange::new(half, Event::Clear))
        .unwrap();
    for d in &devices {
        let t = d.table.lock();
        assert_eq!(t.entries.len(), 8, "only the invalidated half is gone");
        assert!(t.entries.keys().all(|&a| !half.contains(a)));
    }
    cpu.clear(half);
    inv.end();
}

/// A faulter thread keeps faulting while the main thread keeps replacing the CPU pages. At the
/// end, every device entry names the page the CPU has now.
#[test]
fn racing_threads_never_leave_a_stale_entry() {
    let cpu = Arc::new(ScriptedPageSource::new());
    let buf = Range::with_len(0x40_0000, 8 * PAGE_SIZE).unwrap();
    cpu.map_area(
        buf,
        AreaKind::Mapped {
            read: true,
            write: true,
        },
    );
    let notifier = Notifier::new();
    let mirror = Arc::new(TestMirror::new(Owner(9)));
    let sub = Arc::new(notifier.insert(buf, mirror.clone()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));

    let faulter = {
        let (cpu, mirror, sub, stop) = (cpu.clone(), mirror.clone(), sub.clone(), stop.clone());
        thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                mirror.fault(&sub, &*cpu, buf, true).unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    for i in 0..2000u64 {
        let page = Range::with_len(buf.start() + (i % 8) * PAGE_SIZE, PAGE_SIZE).unwrap();
        let inv = notifier
            .invalidate_range_start(NotifierRange::new(page, Event::Clear))
            .unwrap();
        cpu.clear(page);
        cpu.populate(page, true);
        inv.end();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(faulter.join().unwrap() > 0);
    for (&addr, &e) in &mirror.table.lock().entries {
        let CpuPte::Present { pfn, .. } = cpu.pte(addr) else {
            panic!("CPU page at {addr:#x} missing")
        };
        assert_eq!(entry::pfn(e), pfn, "stale device entry at {addr:#x}");
    }
}
