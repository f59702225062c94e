use std::sync::MutexGuard;

use svmirror_core::PAGE_SIZE;

use super::*;
use crate::mmu::MmuConfig;
use crate::page_table::{IOVA_END, Perms};
use crate::pin::{Pin, PinPoolConfig};
use svmirror_mm::testing::AnonMap;

/// A DMA engine over a fresh IOMMU, with buffers pinned and mapped at their own addresses.
struct Rig {
    mmu: Arc<Mmu>,
    pool: Arc<PinPool>,
    dma: DmaEngine,
    pins: Vec<Pin>,
    _serial: MutexGuard<'static, ()>,
}

fn rig(config: DmaConfig) -> Rig {
    let serial = svmirror_testsupport::serial();
    let mmu = Arc::new(Mmu::new(MmuConfig {
        iotlb_entries: 16,
        checking: true,
    }));
    let pool = PinPool::new(PinPoolConfig::default()).unwrap();
    let dma = DmaEngine::new(mmu.clone(), pool.clone(), config).unwrap();
    Rig {
        mmu,
        pool,
        dma,
        pins: Vec::new(),
        _serial: serial,
    }
}

impl Rig {
    /// Pins `buf` and maps it at its own address with `perms`.
    fn map(&mut self, buf: &AnonMap, perms: Perms) {
        // SAFETY: test buffers are accessed only through raw pointers.
        let pin = unsafe { self.pool.pin(buf.addr(), buf.len() as u64) }.unwrap();
        let t = pin.target_of(buf.addr()).unwrap();
        self.mmu.with(|s| {
            s.page_table_mut()
                .map(buf.addr(), buf.len() as u64, t, perms)
                .unwrap()
        });
        self.pins.push(pin);
    }

    fn run(&self, cmd: DmaCommand) -> Result<Completion> {
        self.dma.submit(cmd)?.wait()
    }

    fn violations(&self) -> u64 {
        self.mmu.with(|s| s.iotlb().stats().violations)
    }
}

fn buf(pages: u64) -> AnonMap {
    AnonMap::new((pages * PAGE_SIZE) as usize).unwrap()
}

#[test]
fn copy_moves_bytes_between_mapped_buffers() {
    let mut r = rig(DmaConfig::default());
    let (a, b) = (buf(4), buf(4));
    a.fill_with(|i| (i * 7) as u8);
    r.map(&a, Perms::Read);
    r.map(&b, Perms::ReadWrite);
    let c = r
        .run(DmaCommand::Copy {
            src: a.addr() + 100,
            dst: b.addr() + 5,
            len: 3 * PAGE_SIZE,
        })
        .unwrap();
    assert_eq!(c.page_requests, 0);
    let got = b.read(5, (3 * PAGE_SIZE) as usize);
    assert_eq!(got, a.read(100, (3 * PAGE_SIZE) as usize));
    assert_eq!(b.read(0, 5), vec![0; 5]);
    assert_eq!(r.violations(), 0);
}

#[test]
fn fill_sets_every_byte() {
    let mut r = rig(DmaConfig::default());
    let b = buf(20);
    r.map(&b, Perms::ReadWrite);
    let len = 20 * PAGE_SIZE - 3;
    r.run(DmaCommand::Fill {
        dst: b.addr() + 1,
        len,
        value: 0x5a,
    })
    .unwrap();
    let v = b.to_vec();
    assert_eq!(v[0], 0);
    assert!(v[1..=len as usize].iter().all(|&x| x == 0x5a));
}

#[test]
fn read_and_write_commands_round_trip_through_device_memory() {
    let mut r = rig(DmaConfig::default());
    let b = buf(2);
    r.map(&b, Perms::ReadWrite);
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    r.run(DmaCommand::Write {
        dst: b.addr() + 1000,
        data: data.clone(),
    })
    .unwrap();
    assert_eq!(b.read(1000, 5000), data);
    let c = r
        .run(DmaCommand::Read {
            src: b.addr() + 1000,
            len: 5000,
        })
        .unwrap();
    assert_eq!(c.data, data);
}

#[test]
fn atomic_add_returns_old_value_and_adds() {
    let mut r = rig(DmaConfig::default());
    let b = buf(1);
    b.write(8, &41u64.to_ne_bytes());
    r.map(&b, Perms::ReadWrite);
    let c = r
        .run(DmaCommand::AtomicAdd {
            addr: b.addr() + 8,
            value: 1,
        })
        .unwrap();
    assert_eq!(c.old_value, Some(41));
    assert_eq!(b.read(8, 8), 42u64.to_ne_bytes());
}

#[test]
fn malformed_commands_are_refused_at_submit() {
    let r = rig(DmaConfig::default());
    for cmd in [
        DmaCommand::AtomicAdd { addr: 4, value: 1 },
        DmaCommand::Copy {
            src: 0,
            dst: 0,
            len: 0,
        },
        DmaCommand::Fill {
            dst: u64::MAX,
            len: 2,
            value: 0,
        },
        DmaCommand::Read {
            src: 0,
            len: 2 << 30,
        },
    ] {
        let err = r.dma.submit(cmd).unwrap_err();
        assert!(matches!(err, IommuError::InvalidCommand { .. }), "{err}");
    }
}

#[test]
fn unrecoverable_fault_aborts_command_and_logs_record() {
    let r = rig(DmaConfig {
        fault_mode: FaultMode::Unrecoverable,
        ..DmaConfig::default()
    });
    let b = buf(1);
    let err = r
        .run(DmaCommand::Read {
            src: b.addr(),
            len: 8,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            IommuError::DeviceFault {
                reason: FaultReason::NotMapped,
                access: Access::Read,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        r.dma.faults(),
        vec![FaultRecord {
            iova: b.addr(),
            access: Access::Read,
            reason: FaultReason::NotMapped,
            resolved: false,
        }]
    );
}

#[test]
fn write_through_read_only_mapping_faults() {
    let mut r = rig(DmaConfig::default());
    let b = buf(1);
    r.map(&b, Perms::Read);
    let err = r
        .run(DmaCommand::Fill {
            dst: b.addr(),
            len: 1,
            value: 1,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            IommuError::DeviceFault {
                reason: FaultReason::ReadOnly,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(b.read(0, 1), [0]);
}

#[test]
fn address_beyond_iova_space_faults_without_page_request() {
    let r = rig(DmaConfig::default());
    let err = r
        .run(DmaCommand::Read {
            src: IOVA_END,
            len: 8,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            IommuError::DeviceFault {
                reason: FaultReason::OutsideIovaSpace,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(r.dma.stats().page_requests, 0);
}

/// Maps the buffer it holds when asked.
struct MapOnRequest {
    mmu: Arc<Mmu>,
    pin: Pin,
    perms: Perms,
    fail: bool,
}

impl PageRequestHandler for MapOnRequest {
    /// Settling may wait for an invalidation, which waits for the device's accesses in flight:
    /// the device settles only with none in flight, and panics its thread here otherwise.
    fn settle(&self, _iova: u64, _len: u64) -> Result<u64> {
        let everything = Range::new(0, IOVA_END).unwrap();
        assert!(
            !self.mmu.with(|s| s.busy(everything)),
            "settled with an access in flight"
        );
        Ok(0)
    }

    fn page_request(&self, req: &PageRequest) -> Result<()> {
        if self.fail {
            return Err(IommuError::StalePin { pin: self.pin.id() });
        }
        assert!(self.pin.target_of(req.iova).is_some());
        // The device raises a page request only with no access in flight (module
        // documentation, "Faults"): a gather that raised one mid-batch would deadlock an
        // invalidation waiting for its accesses, and panics the device thread here.
        let everything = Range::new(0, IOVA_END).unwrap();
        assert!(
            !self.mmu.with(|s| s.busy(everything)),
            "a page request was raised with an access in flight"
        );
        let t = self.pin.target_of(self.pin.addr()).unwrap();
        self.mmu.with(|s| {
            s.page_table_mut()
                .map(self.pin.addr(), self.pin.len(), t, self.perms)
        })
    }
}

#[test]
fn page_request_is_resolved_and_access_retried() {
    let r = rig(DmaConfig::default());
    let b = buf(2);
    b.fill(9);
    // SAFETY: test buffer accessed only through raw pointers.
    let pin = unsafe { r.pool.pin(b.addr(), b.len() as u64) }.unwrap();
    r.dma.set_page_request_handler(Arc::new(MapOnRequest {
        mmu: r.mmu.clone(),
        pin,
        perms: Perms::Read,
        fail: false,
    }));
    let c = r
        .run(DmaCommand::Read {
            src: b.addr() + 10,
            len: 2 * PAGE_SIZE - 10,
        })
        .unwrap();
    assert_eq!(c.page_requests, 1);
    assert!(c.data.iter().all(|&x| x == 9));
    assert!(r.dma.faults()[0].resolved);
}

#[test]
fn unresolvable_page_request_aborts_with_driver_error_as_source() {
    let r = rig(DmaConfig::default());
    let b = buf(1);
    // SAFETY: test buffer accessed only through raw pointers.
    let pin = unsafe { r.pool.pin(b.addr(), b.len() as u64) }.unwrap();
    r.dma.set_page_request_handler(Arc::new(MapOnRequest {
        mmu: r.mmu.clone(),
        pin,
        perms: Perms::Read,
        fail: true,
    }));
    let err = r
        .run(DmaCommand::Read {
            src: b.addr(),
            len: 1,
        })
        .unwrap_err();
    let source = std::error::Error::source(&err).expect("driver error as source");
    assert!(source.to_string().contains("not registered"), "{source}");
}

#[test]
fn dead_device_fails_pending_fences_and_refuses_submissions() {
    let r = rig(DmaConfig::default());
    let stall = r
        .dma
        .submit(DmaCommand::Inject(Injection::Stall(Duration::from_millis(
            20,
        ))))
        .unwrap();
    let crash = r.dma.submit(DmaCommand::Inject(Injection::Panic)).unwrap();
    let queued = r
        .dma
        .submit(DmaCommand::Inject(Injection::Stall(Duration::ZERO)))
        .unwrap();
    stall.wait().unwrap();
    assert!(matches!(crash.wait(), Err(IommuError::DeviceDied)));
    assert!(matches!(queued.wait(), Err(IommuError::DeviceDied)));
    let err = r
        .dma
        .submit(DmaCommand::Inject(Injection::Stall(Duration::ZERO)))
        .unwrap_err();
    assert!(matches!(err, IommuError::DeviceDied), "{err}");
    assert!(r.dma.handle().has_failed());
}

#[test]
fn hung_device_is_declared_by_the_watchdog_and_fails_closed() {
    let r = rig(DmaConfig {
        watchdog: Duration::from_millis(50),
        ..DmaConfig::default()
    });
    let f = r
        .dma
        .submit(DmaCommand::Inject(Injection::Stall(Duration::from_secs(2))))
        .unwrap();
    let err = f.wait().unwrap_err();
    assert!(matches!(err, IommuError::DeviceHung { .. }), "{err}");
    let err = r
        .dma
        .submit(DmaCommand::Inject(Injection::Stall(Duration::ZERO)))
        .unwrap_err();
    assert!(matches!(err, IommuError::DeviceHung { .. }), "{err}");
}

#[test]
fn wait_idle_range_waits_for_access_in_flight() {
    let mut r = rig(DmaConfig::default());
    let b = buf(2);
    r.map(&b, Perms::Read);
    let f = r
        .dma
        .submit(DmaCommand::Inject(Injection::StallDuringAccess {
            iova: b.addr(),
            duration: Duration::from_millis(500),
        }))
        .unwrap();
    let page = Range::with_len(b.addr(), PAGE_SIZE).unwrap();
    let other = Range::with_len(b.addr() + PAGE_SIZE, PAGE_SIZE).unwrap();
    let started = Instant::now();
    while !r.mmu.with(|s| s.busy(page)) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "access never started"
        );
        std::thread::yield_now();
    }
    r.dma.wait_idle_range(other).unwrap();
    assert!(
        r.mmu.with(|s| s.busy(page)),
        "an unrelated range waited for the access"
    );
    r.dma.wait_idle_range(page).unwrap();
    assert!(!r.mmu.with(|s| s.busy(page)));
    f.wait().unwrap();
}

#[test]
fn access_hung_in_flight_makes_wait_idle_range_report_the_hang() {
    let mut r = rig(DmaConfig {
        watchdog: Duration::from_millis(50),
        ..DmaConfig::default()
    });
    let b = buf(1);
    r.map(&b, Perms::Read);
    let _f = r
        .dma
        .submit(DmaCommand::Inject(Injection::StallDuringAccess {
            iova: b.addr(),
            duration: Duration::from_secs(1),
        }))
        .unwrap();
    let page = Range::with_len(b.addr(), PAGE_SIZE).unwrap();
    while !r.mmu.with(|s| s.busy(page)) {
        std::thread::yield_now();
    }
    let err = r.dma.wait_idle_range(page).unwrap_err();
    assert!(matches!(err, IommuError::DeviceHung { .. }), "{err}");
    // Let the stalled thread finish before its pins go away with the rig.
    assert!(
        r.mmu
            .wait_drained(page, Instant::now() + Duration::from_secs(5))
    );
}

#[test]
fn shutdown_refuses_new_commands() {
    let mut r = rig(DmaConfig::default());
    r.dma.shutdown();
    let err = r
        .dma
        .submit(DmaCommand::Inject(Injection::Stall(Duration::ZERO)))
        .unwrap_err();
    assert!(matches!(err, IommuError::EngineStopped), "{err}");
    r.dma.shutdown();
}

#[test]
fn wait_idle_returns_after_queue_drains() {
    let r = rig(DmaConfig::default());
    for _ in 0..3 {
        let _ = r
            .dma
            .submit(DmaCommand::Inject(Injection::Stall(Duration::from_millis(
                5,
            ))))
            .unwrap();
    }
    r.dma.wait_idle().unwrap();
    assert_eq!(r.dma.stats().completed, 3);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "the page level must not sleep")]
fn fence_wait_at_page_level_panics_naming_the_rule() {
    let r = rig(DmaConfig::default());
    let f = r
        .dma
        .submit(DmaCommand::Inject(Injection::Stall(Duration::ZERO)))
        .unwrap();
    let _atomic = svmirror_core::AtomicSection::enter();
    let _ = f.wait();
}

/// A waiter runs its own command only when it is next and the device idle: then no hand-off
/// to the device thread and back (`DmaStats::run_by_waiter`). A command queued behind another
/// is never run out of order: its waiter sleeps, and the device thread runs it after the one
/// before. The idle case is made deterministic by parking the device thread first: with no
/// spin it parks on `changed` when it finds the device taken, and the test frees the device
/// without waking it. (Seen failing with `run_if_next` taken out of `Fence::wait`: the device
/// thread ran the write once the test woke it, and `run_by_waiter` stayed 0.)
#[test]
fn the_waiter_runs_its_command_when_the_device_is_idle_and_never_out_of_order() {
    let mut r = rig(DmaConfig {
        spin: Duration::ZERO,
        ..DmaConfig::default()
    });
    let b = buf(1);
    r.map(&b, Perms::ReadWrite);
    let sh = r.dma.handle.shared.clone();
    // The device taken by someone else: the device thread cannot pop what comes next.
    relock(&sh.state).current = Some(FenceSlot::new());
    let f = r
        .dma
        .submit(DmaCommand::Write {
            dst: b.addr(),
            data: vec![7],
        })
        .unwrap();
    // Let the device thread find the device taken and park.
    std::thread::sleep(Duration::from_millis(50));
    relock(&sh.state).current = None;
    // Without the fast path nothing would wake the parked device thread: wake it after a
    // while, so the old code fails the assert below instead of hanging.
    let waker = {
        let sh = sh.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            sh.changed.notify_all();
        })
    };
    f.wait().unwrap();
    waker.join().unwrap();
    assert_eq!(b.read(0, 1), vec![7]);
    assert_eq!(
        r.dma.stats().run_by_waiter,
        1,
        "the idle device's waiter ran it"
    );

    // Busy: a stall runs on the device thread, two writes queue behind it; waiting for the
    // second first must not run it before the first.
    let stall = r
        .dma
        .submit(DmaCommand::Inject(Injection::Stall(Duration::from_millis(
            30,
        ))))
        .unwrap();
    let first = r
        .dma
        .submit(DmaCommand::Write {
            dst: b.addr(),
            data: vec![1],
        })
        .unwrap();
    let second = r
        .dma
        .submit(DmaCommand::Write {
            dst: b.addr(),
            data: vec![2],
        })
        .unwrap();
    second.wait().unwrap();
    assert!(
        first.is_done(),
        "the second write completed before the first"
    );
    first.wait().unwrap();
    stall.wait().unwrap();
    assert_eq!(b.read(0, 1), vec![2], "the writes ran in submission order");
    assert_eq!(r.dma.stats().run_by_waiter, 1, "nothing ran out of turn");
}

/// `n` parts over `bufs`: sizes from 1 byte to a few pages (some crossing pages, some
/// overlapping others), then one larger than a quarter of the pipe, so one part is cut into
/// pieces; in an order that alternates between the buffers.
fn parts_over(bufs: &[&AnonMap], n: usize, seed: u64) -> Vec<(u64, u64)> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut parts = Vec::new();
    for i in 0..n {
        let b = bufs[i % bufs.len()];
        let len = 1 + next() % if i % 50 == 0 { 3 * PAGE_SIZE } else { 64 };
        let off = next() % (b.len() as u64 - len);
        parts.push((b.addr() + off, len));
    }
    let big = bufs[0];
    parts.push((big.addr() + 3, big.len() as u64 - 3));
    parts
}

/// What a gather of `parts` must return, read by the CPU.
fn expected(parts: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(a, len) in parts {
        // SAFETY: every part lies in a live test buffer that nothing writes meanwhile.
        v.extend_from_slice(unsafe { std::slice::from_raw_parts(a as *const u8, len as usize) });
    }
    v
}

#[test]
fn gather_returns_every_part_in_order_across_batches_and_pins() {
    let mut r = rig(DmaConfig::default());
    // 80 pages: larger than a quarter of the 1 MiB pipe, so the last part is cut in pieces.
    let (a, b) = (buf(80), buf(3));
    a.fill_with(|i| (i * 7 + 1) as u8);
    b.fill_with(|i| (i * 13 + 5) as u8);
    r.map(&a, Perms::Read);
    r.map(&b, Perms::Read);
    // More parts than one batch claims and than the ring holds.
    let parts = parts_over(&[&a, &b], 1000, 0x5eed);
    let c = r
        .run(DmaCommand::Gather {
            parts: parts.clone(),
        })
        .unwrap();
    assert_eq!(c.page_requests, 0);
    assert_eq!(c.data, expected(&parts));
    assert_eq!(r.violations(), 0);
}

#[test]
fn scatter_writes_every_part_in_order_and_nothing_else() {
    let mut r = rig(DmaConfig::default());
    let (a, b) = (buf(80), buf(3));
    r.map(&a, Perms::ReadWrite);
    r.map(&b, Perms::ReadWrite);
    let parts = parts_over(&[&a, &b], 700, 0xface);
    let total: u64 = parts.iter().map(|p| p.1).sum();
    let data: Vec<u8> = (0..total).map(|i| (i % 253) as u8 + 1).collect();
    // What the buffers must hold: the parts written in order over zeroes.
    let (mut wa, mut wb) = (vec![0u8; a.len()], vec![0u8; b.len()]);
    let mut at = 0usize;
    for &(p, len) in &parts {
        let (w, base) = if p >= a.addr() && p < a.addr() + a.len() as u64 {
            (&mut wa, a.addr())
        } else {
            (&mut wb, b.addr())
        };
        let o = (p - base) as usize;
        w[o..o + len as usize].copy_from_slice(&data[at..at + len as usize]);
        at += len as usize;
    }
    r.run(DmaCommand::Scatter { parts, data }).unwrap();
    assert_eq!(a.to_vec(), wa);
    assert_eq!(b.to_vec(), wb);
    assert_eq!(r.violations(), 0);
}

/// A gather over one mapped buffer and one the driver maps on request, parts alternating:
/// the batch that reaches the first unmapped part ends there, is moved and ends its
/// accesses, and the next batch raises the page request with nothing in flight (the
/// handler panics the device otherwise), and settles every part with nothing in flight
/// (settling may wait for an invalidation that waits for those accesses). Seen failing (the
/// device died) with `claim_batch` raising page requests for every piece, and again with it
/// settling each piece after the ones before it were claimed.
#[test]
fn gather_raises_page_requests_only_with_no_access_in_flight() {
    let mut r = rig(DmaConfig::default());
    let (a, b) = (buf(4), buf(4));
    a.fill(3);
    b.fill(4);
    r.map(&a, Perms::Read);
    // SAFETY: test buffer accessed only through raw pointers.
    let pin = unsafe { r.pool.pin(b.addr(), b.len() as u64) }.unwrap();
    r.dma.set_page_request_handler(Arc::new(MapOnRequest {
        mmu: r.mmu.clone(),
        pin,
        perms: Perms::Read,
        fail: false,
    }));
    let parts: Vec<(u64, u64)> = (0..40)
        .map(|i| {
            let b = if i % 2 == 0 { &a } else { &b };
            (b.addr() + i * 100, 50)
        })
        .collect();
    let c = r
        .run(DmaCommand::Gather {
            parts: parts.clone(),
        })
        .unwrap();
    assert_eq!(c.page_requests, 1);
    assert_eq!(c.data, expected(&parts));
}

#[test]
fn malformed_gathers_and_scatters_are_refused_at_submit() {
    let r = rig(DmaConfig::default());
    for cmd in [
        DmaCommand::Gather { parts: vec![] },
        DmaCommand::Gather {
            parts: vec![(4096, 8), (8192, 0)],
        },
        DmaCommand::Gather {
            parts: vec![(u64::MAX, 2)],
        },
        DmaCommand::Gather {
            parts: vec![(0, 1 << 30), (0, 1)],
        },
        DmaCommand::Scatter {
            parts: vec![(4096, 8)],
            data: vec![0; 7],
        },
    ] {
        let err = r.dma.submit(cmd).unwrap_err();
        assert!(matches!(err, IommuError::InvalidCommand { .. }), "{err}");
    }
}
