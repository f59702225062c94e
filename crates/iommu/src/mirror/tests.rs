use std::sync::MutexGuard;
use std::time::Instant;

use svmirror_core::MirrorError;
use svmirror_core::{Error as CoreError, Notifier};

use super::*;
use crate::dma::{FaultMode, FaultReason, Injection};
use crate::page_table::{IOVA_END, LeafSize};
use crate::testing::{RaceAfterSnapshot, clear_through};
use svmirror_mm::testing::AnonMap;
use svmirror_mm::{ProcessPageSource, VM_PIN_SETTLE, settled_vm_pinned_bytes, vm_pinned_bytes};

const PAGE: u64 = PAGE_SIZE;

/// This process's page table, read raw (svmirror-mm's `ProcessPageSource`).
fn raw_source() -> ProcessPageSource {
    ProcessPageSource::new().expect("the process page source opens")
}

/// A mirror of `range` subscribed to `notifier`, which the test feeds by hand, reading this
/// process's page table raw.
///
/// # Safety
///
/// As for [`IommuMirror::new`].
unsafe fn raw_mirror(
    notifier: &Notifier,
    range: Range,
    config: MirrorConfig,
) -> Result<IommuMirror> {
    // SAFETY: this function's contract, passed on.
    unsafe { IommuMirror::with_page_source(notifier, range, config, Box::new(raw_source())) }
}

struct Rig {
    mirror: IommuMirror,
    notifier: Notifier,
    _serial: MutexGuard<'static, ()>,
}

/// A mirror over the whole user address space below 2^47.
fn rig_with(config: MirrorConfig) -> Rig {
    let serial = svmirror_testsupport::serial();
    let notifier = Notifier::new();
    let range = Range::new(PAGE, 1 << 47).unwrap();
    // SAFETY: tests touch device-written memory only through `AnonMap`'s raw pointers.
    let mirror = unsafe { raw_mirror(&notifier, range, config) }.unwrap();
    Rig {
        mirror,
        notifier,
        _serial: serial,
    }
}

fn rig() -> Rig {
    rig_with(MirrorConfig::checked())
}

impl Rig {
    fn run(&self, cmd: DmaCommand) -> Result<crate::dma::Completion> {
        self.mirror.submit(cmd)?.wait()
    }

    fn read(&self, src: u64, len: u64) -> Vec<u8> {
        self.run(DmaCommand::Read { src, len }).unwrap().data
    }

    fn invalidate(&self, start: u64, len: u64, event: Event) {
        let r = Range::with_len(start, len).unwrap();
        self.notifier
            .invalidate_range_start(NotifierRange::new(r, event))
            .unwrap()
            .end();
    }

    fn assert_no_violations(&self) {
        assert_eq!(self.mirror.violations().1, 0);
    }
}

/// A buffer of `len` bytes that starts a 2 MiB fault window, so that a count of page requests
/// on it does not depend on where the kernel put it: one placed across a window boundary takes
/// a request per window (`tests/prefetch.rs` does that on purpose).
fn placed(len: usize) -> AnonMap {
    AnonMap::aligned(len, 2 << 20).unwrap()
}

#[test]
fn device_read_faults_once_and_maps_at_the_process_address() {
    let r = rig();
    let b = placed(4 * PAGE as usize);
    b.fill_with(|i| (i % 253) as u8);
    let c = r
        .run(DmaCommand::Read {
            src: b.addr(),
            len: 4 * PAGE,
        })
        .unwrap();
    assert_eq!(c.data, b.to_vec());
    // One page request per mapping the buffer spans: one, unless something on the machine
    // (DAMON's madvise actions, say) split the buffer's VMA while the test ran.
    let vmas = vmas_overlapping(b.addr(), 4 * PAGE);
    assert_eq!(
        u64::from(c.page_requests),
        vmas,
        "page requests for {vmas} VMA(s)"
    );
    assert_eq!(r.mirror.stats().faults, vmas);
    assert_eq!(r.mirror.pins().live(), vmas);
    let t = r.mirror.mmu().translate(b.addr() + 3 * PAGE).unwrap();
    assert_eq!(t.perms, Perms::ReadWrite);
    r.assert_no_violations();
}

#[test]
fn device_write_reaches_cpu_memory() {
    let r = rig();
    let b = AnonMap::new(2 * PAGE as usize).unwrap();
    r.run(DmaCommand::Fill {
        dst: b.addr() + 1,
        len: PAGE,
        value: 7,
    })
    .unwrap();
    let v = b.to_vec();
    assert_eq!(v[0], 0);
    assert!(v[1..=PAGE as usize].iter().all(|&x| x == 7));
}

#[test]
fn write_after_read_of_untouched_memory_upgrades_the_mapping() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    // Untouched: a read fault maps the zero page read-only.
    assert_eq!(r.read(b.addr(), 8), vec![0; 8]);
    assert_eq!(
        r.mirror.mmu().translate(b.addr()).unwrap().perms,
        Perms::Read
    );
    let c = r
        .run(DmaCommand::Fill {
            dst: b.addr(),
            len: 8,
            value: 3,
        })
        .unwrap();
    assert_eq!(c.page_requests, 1);
    assert_eq!(b.read(0, 8), vec![3; 8]);
    assert_eq!(r.mirror.pins().live(), 1, "the read-only pin was released");
    r.assert_no_violations();
}

#[test]
fn unmap_event_tears_down_and_frees_page_table_pages() {
    let r = rig();
    let b = AnonMap::new(8 * PAGE as usize).unwrap();
    b.fill(1);
    r.read(b.addr(), 8 * PAGE);
    r.invalidate(b.addr(), 8 * PAGE, Event::Unmap);
    assert!(r.mirror.mmu().translate(b.addr()).is_none());
    assert_eq!(r.mirror.pins().live(), 0);
    assert_eq!(
        r.mirror
            .mmu()
            .with(|s| s.page_table().stats().live_tables()),
        0
    );
    assert_eq!(r.mirror.mmu().with(|s| s.iotlb().len()), 0);
}

#[test]
fn clear_event_tears_down_but_keeps_page_table_pages() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    b.fill(1);
    r.read(b.addr(), PAGE);
    r.invalidate(b.addr(), PAGE, Event::Clear);
    assert!(r.mirror.mmu().translate(b.addr()).is_none());
    assert_eq!(r.mirror.pins().live(), 0);
    assert!(
        r.mirror
            .mmu()
            .with(|s| s.page_table().stats().live_tables())
            > 0
    );
    // The device refaults and goes on.
    assert_eq!(r.read(b.addr(), 4), vec![1; 4]);
}

#[test]
fn protection_event_downgrades_to_read_only_and_keeps_the_pin() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    b.fill(1);
    r.read(b.addr(), PAGE);
    r.invalidate(b.addr(), PAGE, Event::ProtectionVma);
    assert_eq!(
        r.mirror.mmu().translate(b.addr()).unwrap().perms,
        Perms::Read
    );
    assert_eq!(r.mirror.pins().live(), 1);
    assert_eq!(r.read(b.addr(), 4), vec![1; 4]);
    r.assert_no_violations();
}

#[test]
fn own_migration_and_soft_dirty_are_skipped() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    r.read(b.addr(), PAGE);
    let owner = r.mirror.owner();
    r.invalidate(b.addr(), PAGE, Event::Migrate { owner });
    r.invalidate(b.addr(), PAGE, Event::SoftDirty);
    assert!(r.mirror.mmu().translate(b.addr()).is_some());
    assert_eq!(r.mirror.stats().skipped, 2);
    r.invalidate(b.addr(), PAGE, Event::Migrate { owner: Owner(1) });
    assert!(r.mirror.mmu().translate(b.addr()).is_none());
}

#[test]
fn invalidation_waits_for_device_access_in_flight() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    r.read(b.addr(), PAGE);
    let f = r
        .mirror
        .submit(DmaCommand::Inject(Injection::StallDuringAccess {
            iova: b.addr(),
            duration: Duration::from_millis(300),
        }))
        .unwrap();
    let page = Range::with_len(b.addr(), PAGE).unwrap();
    while !r.mirror.mmu().with(|s| s.busy(page)) {
        std::thread::yield_now();
    }
    let started = Instant::now();
    r.invalidate(b.addr(), PAGE, Event::Unmap);
    assert!(!r.mirror.mmu().with(|s| s.busy(page)));
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "invalidation did not wait"
    );
    f.wait().unwrap();
    assert_eq!(r.mirror.pins().live(), 0);
}

#[test]
fn non_blocking_invalidation_is_refused_while_access_is_in_flight() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    r.read(b.addr(), PAGE);
    let f = r
        .mirror
        .submit(DmaCommand::Inject(Injection::StallDuringAccess {
            iova: b.addr(),
            duration: Duration::from_millis(500),
        }))
        .unwrap();
    let page = Range::with_len(b.addr(), PAGE).unwrap();
    while !r.mirror.mmu().with(|s| s.busy(page)) {
        std::thread::yield_now();
    }
    let nr = NotifierRange::new(page, Event::Unmap).non_blocking();
    let err = r.notifier.invalidate_range_start(nr).err().unwrap();
    assert!(matches!(err, CoreError::WouldBlock { .. }), "{err}");
    f.wait().unwrap();
    assert!(
        r.mirror.mmu().translate(b.addr()).is_some(),
        "refused means untouched"
    );
}

#[test]
fn non_blocking_invalidation_defers_pin_release_to_next_fault() {
    let r = rig();
    let (a, b) = (
        AnonMap::new(PAGE as usize).unwrap(),
        AnonMap::new(PAGE as usize).unwrap(),
    );
    r.read(a.addr(), PAGE);
    let nr = NotifierRange::new(Range::with_len(a.addr(), PAGE).unwrap(), Event::Unmap);
    r.notifier
        .invalidate_range_start(nr.non_blocking())
        .unwrap()
        .end();
    assert!(r.mirror.mmu().translate(a.addr()).is_none());
    assert_eq!(r.mirror.pins().live(), 1, "release deferred");
    r.read(b.addr(), PAGE);
    assert_eq!(
        r.mirror.pins().live(),
        1,
        "deferred pin released, new one taken"
    );
}

#[test]
fn write_to_read_only_memory_fails_with_eperm_cause() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    b.protect(libc::PROT_READ).unwrap();
    let err = r
        .run(DmaCommand::Fill {
            dst: b.addr(),
            len: 1,
            value: 1,
        })
        .unwrap_err();
    let IommuError::DeviceFault {
        source: Some(cause),
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert!(
        matches!(
            **cause,
            IommuError::Mirror(MirrorError::Core {
                source: CoreError::WriteToReadOnly { .. },
                ..
            })
        ),
        "{cause}"
    );
    assert_eq!(r.mirror.pins().live(), 0);
}

#[test]
fn read_of_read_only_memory_is_a_typed_limitation() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    b.protect(libc::PROT_READ).unwrap();
    let err = r
        .run(DmaCommand::Read {
            src: b.addr(),
            len: 1,
        })
        .unwrap_err();
    let cause = std::error::Error::source(&err).unwrap();
    assert!(cause.to_string().contains("read-only memory"), "{cause}");
}

#[test]
fn access_to_a_hole_fails_with_efault_cause() {
    let r = rig();
    // Below vm.mmap_min_addr: never mapped, whatever other tests map meanwhile.
    assert_efault(r.run(DmaCommand::Read {
        src: 0x2000,
        len: 1,
    }));
}

#[test]
fn access_to_prot_none_fails_with_efault_cause() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    b.protect(libc::PROT_NONE).unwrap();
    assert_efault(r.run(DmaCommand::Read {
        src: b.addr(),
        len: 1,
    }));
    assert_eq!(r.mirror.pins().live(), 0);
}

fn assert_efault(r: Result<crate::dma::Completion>) {
    let err = r.unwrap_err();
    let IommuError::DeviceFault {
        source: Some(cause),
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert!(
        matches!(
            **cause,
            IommuError::Mirror(MirrorError::Core {
                source: CoreError::BadAddress { .. },
                ..
            })
        ),
        "{cause}"
    );
}

#[test]
fn access_outside_the_mirror_fails() {
    let serial = svmirror_testsupport::serial();
    let notifier = Notifier::new();
    let b = AnonMap::new(2 * PAGE as usize).unwrap();
    let range = Range::with_len(b.addr(), PAGE).unwrap();
    // SAFETY: test memory is touched only through raw pointers.
    let m = unsafe { raw_mirror(&notifier, range, MirrorConfig::checked()) }.unwrap();
    let err = m
        .submit(DmaCommand::Read {
            src: b.addr() + PAGE,
            len: 1,
        })
        .unwrap()
        .wait()
        .unwrap_err();
    let cause = std::error::Error::source(&err).unwrap();
    assert!(
        cause.to_string().contains("outside the mirrored range"),
        "{cause}"
    );
    drop(m);
    drop(serial);
}

#[test]
fn unrecoverable_mode_aborts_without_mapping() {
    let mut config = MirrorConfig::checked();
    config.dma.fault_mode = FaultMode::Unrecoverable;
    let r = rig_with(config);
    let b = AnonMap::new(PAGE as usize).unwrap();
    let err = r
        .run(DmaCommand::Read {
            src: b.addr(),
            len: 1,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            IommuError::DeviceFault {
                reason: FaultReason::NotMapped,
                source: None,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(r.mirror.pins().live(), 0);
    // The driver can still map it itself; then the access works.
    r.mirror.fault(b.addr(), PAGE, true).unwrap();
    r.run(DmaCommand::Read {
        src: b.addr(),
        len: 1,
    })
    .unwrap();
}

fn window_rig() -> Rig {
    rig_with(MirrorConfig {
        prefetch: Prefetch::Window,
        ..MirrorConfig::checked()
    })
}

#[test]
fn window_prefetch_maps_the_window_clamped_to_the_mapping() {
    let r = window_rig();
    let b = AnonMap::aligned(4 << 20, 2 << 20).unwrap();
    let inner = Range::with_len(b.addr() + (2 << 20) + PAGE, 3 * PAGE).unwrap();
    // Shrink the VMA around the fault: [inner] gets its own protection, so its own VMA.
    // SAFETY: mprotect of part of our own mapping.
    let rc = unsafe {
        libc::mprotect(
            inner.start() as *mut libc::c_void,
            inner.len() as usize,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        )
    };
    assert_eq!(rc, 0);
    r.read(inner.start() + PAGE, 1);
    let pins = r.mirror.pins().stats();
    assert_eq!(
        pins.bytes,
        3 * PAGE,
        "pinned exactly the VMA part of the window"
    );
    assert!(r.mirror.mmu().translate(inner.start() - PAGE).is_none());
    assert!(r.mirror.mmu().translate(inner.end()).is_none());
}

#[test]
fn window_prefetch_of_an_aligned_2m_window_maps_one_2m_leaf() {
    let r = window_rig();
    let b = AnonMap::aligned(2 << 20, 2 << 20).unwrap();
    r.read(b.addr() + 12345, 1);
    let t = r.mirror.mmu().translate(b.addr()).unwrap();
    assert_eq!(t.size, LeafSize::Size2M);
}

#[test]
fn demand_fault_maps_the_pages_asked_for_and_no_neighbour() {
    let r = rig();
    let b = AnonMap::aligned(2 << 20, 2 << 20).unwrap();
    // SAFETY: advice on our own mapping: 4 KiB pages, so no huge-page extension.
    unsafe {
        libc::madvise(
            b.addr() as *mut libc::c_void,
            b.len(),
            libc::MADV_NOHUGEPAGE,
        )
    };
    r.read(b.addr() + 12345, 2 * PAGE);
    assert_eq!(r.mirror.pins().stats().bytes, 3 * PAGE);
    assert!(r.mirror.mmu().translate(b.addr() + 2 * PAGE).is_none());
    assert!(r.mirror.mmu().translate(b.addr() + 6 * PAGE).is_none());
    let t = r.mirror.mmu().translate(b.addr() + 3 * PAGE).unwrap();
    assert_eq!(t.size, LeafSize::Size4K);
}

#[test]
fn drop_releases_every_pin() {
    let _serial = svmirror_testsupport::serial();
    let before = vm_pinned_bytes().unwrap();
    let notifier = Notifier::new();
    let b = AnonMap::new(8 * PAGE as usize).unwrap();
    // SAFETY: test memory is touched only through raw pointers.
    let m = unsafe {
        raw_mirror(
            &notifier,
            Range::new(PAGE, 1 << 47).unwrap(),
            MirrorConfig::checked(),
        )
    }
    .unwrap();
    m.fault(b.addr(), 8 * PAGE, true).unwrap();
    assert!(vm_pinned_bytes().unwrap() >= before + 8 * PAGE);
    drop(m);
    assert_eq!(
        settled_vm_pinned_bytes(before, VM_PIN_SETTLE).unwrap(),
        before
    );
    assert_eq!(notifier.stats().subscriptions, 0);
}

#[test]
fn notifier_release_tears_everything_down() {
    let r = rig();
    let b = AnonMap::new(PAGE as usize).unwrap();
    r.read(b.addr(), PAGE);
    r.notifier.release().unwrap();
    assert_eq!(r.mirror.pins().live(), 0);
    assert_eq!(
        r.mirror
            .mmu()
            .with(|s| s.page_table().stats().live_tables()),
        0
    );
}

#[test]
fn invalidation_racing_a_page_request_makes_it_retry() {
    let _serial = svmirror_testsupport::serial();
    let notifier = Notifier::new();
    let b = placed(2 * PAGE as usize);
    b.fill(4);
    let range = Range::with_len(b.addr(), b.len() as u64).unwrap();
    let source = RaceAfterSnapshot::new(raw_source(), clear_through(&notifier, range));
    // SAFETY: test memory is touched only through raw pointers.
    let m = unsafe {
        IommuMirror::with_page_source(&notifier, range, MirrorConfig::checked(), Box::new(source))
    }
    .unwrap();
    let c = m
        .submit(DmaCommand::Read {
            src: b.addr(),
            len: 2 * PAGE,
        })
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(c.data, vec![4; 2 * PAGE as usize]);
    assert_eq!(c.page_requests, 1);
    let s = m.stats();
    assert_eq!((s.faults, s.fault_retries, s.invalidations), (1, 1, 1));
    assert_eq!(
        m.pins().live(),
        1,
        "the pin of the stale snapshot was dropped"
    );
    assert_eq!(m.pins().stats().taken, 2);
}

#[test]
fn bad_fault_window_is_refused() {
    let notifier = Notifier::new();
    let mut config = MirrorConfig::checked();
    config.fault_window = 3 * PAGE;
    // SAFETY: refused before anything is mapped.
    let err =
        unsafe { raw_mirror(&notifier, Range::new(PAGE, 2 * PAGE).unwrap(), config) }.unwrap_err();
    assert!(
        matches!(err, IommuError::Mirror(MirrorError::InvalidConfig { .. })),
        "{err}"
    );
}

#[test]
fn range_beyond_iova_space_is_refused() {
    let notifier = Notifier::new();
    let range = Range::new(PAGE, IOVA_END + PAGE).unwrap();
    // SAFETY: refused before anything is mapped.
    let err = unsafe { raw_mirror(&notifier, range, MirrorConfig::checked()) }.unwrap_err();
    assert!(matches!(err, IommuError::OutsideIovaSpace { .. }), "{err}");
}

/// How many lines of /proc/self/maps overlap `[addr, addr + len)`.
fn vmas_overlapping(addr: u64, len: u64) -> u64 {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        })
        .filter(|&(lo, hi)| lo < addr + len && addr < hi)
        .count() as u64
}
