//! A pin that faults into the userfaultfd monitor must not hold anything the monitor's
//! invalidation needs (the lock order in `svmirror_core::context`).
//!
//! The scenario of the "exact under concurrency" issue, defect 3, against the real kernel: a page
//! migrated to a device is registered MISSING with the userfaultfd and absent from the CPU page
//! table. Pinning it makes the kernel's GUP fault, and the fault waits for the monitor. The monitor
//! brings the page back with a `Migrate` invalidation, and a backend's callback there releases a
//! pin of the same pool. Nothing has to be timed: the invalidation happens *because of* the pin's
//! fault, so it always runs while the pin is in GUP.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use svmirror_core::{
    Error, IntervalNotifierOps, InvalidateCtx, NotifierRange, Owner, PAGE_SIZE, Pass, UpdateLock,
    WouldBlock,
};
use svmirror_iommu::{Pin, PinPool, PinPoolConfig};
use svmirror_mm::testing::AnonMap;
use svmirror_mm::{
    DevicePages, ProcessMm, Protection, UffdAccess, VM_PIN_SETTLE, settled_vm_pinned_bytes,
    vm_pinned_bytes,
};

/// How long a pin may take before the test calls it a deadlock.
const WATCHDOG: Duration = Duration::from_secs(10);

/// `UFFDIO_ZEROPAGE`: `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;

/// The watchdog's way out of the deadlock: maps a zero page at `page` through the process's
/// userfaultfd (found in /proc/self/fd), which wakes the thread whose GUP waits there.
fn zero_page_through_the_userfaultfd(page: u64) -> std::io::Result<()> {
    #[repr(C)]
    struct ZeroPage {
        start: u64,
        len: u64,
        mode: u64,
        zeropage: i64,
    }
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let path = entry?.path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:[userfaultfd]" {
            continue;
        }
        let fd: i32 = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| std::io::Error::other("fd name"))?;
        let mut arg = ZeroPage {
            start: page,
            len: PAGE_SIZE,
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes the one struct we pass; it maps a zero page
        // at an address of ours that has no page (the one the stuck pin waits for).
        if unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE, &mut arg) } == 0 {
            return Ok(());
        }
    }
    Err(std::io::Error::other("no userfaultfd could serve the page"))
}

/// Device memory of the test: pages by the address they left from.
struct DeviceMemory {
    pages: Mutex<HashMap<u64, Vec<u8>>>,
}

impl DevicePages for DeviceMemory {
    fn owner(&self) -> Owner {
        Owner(0xd3)
    }

    fn copy_out(&self, addr: u64, src: *const u8) -> Result<(), Error> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        // SAFETY: `src` is readable for a page until we return (the trait's contract); `page`
        // is our own buffer of that size.
        unsafe { std::ptr::copy_nonoverlapping(src, page.as_mut_ptr(), page.len()) };
        self.pages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr, page);
        Ok(())
    }

    fn copy_back(&self, addr: u64, dst: *mut u8) -> Result<(), Error> {
        let page = self
            .pages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&addr)
            .expect("the page was copied out");
        // SAFETY: `dst` is writable for a page (the trait's contract) and is not `page`.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), dst, page.len()) };
        Ok(())
    }

    fn device_pfn(&self, addr: u64) -> u64 {
        addr >> 12
    }

    fn discard(&self, addr: u64) {
        self.pages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&addr);
    }
}

/// A backend whose invalidation releases a pin of the pool under its update lock, as the IOMMU
/// mirror does when a range it maps is invalidated.
struct ReleasesPin {
    state: UpdateLock<Option<Pin>>,
    entered: AtomicBool,
    released: AtomicBool,
}

impl IntervalNotifierOps for ReleasesPin {
    fn invalidate(&self, ctx: &InvalidateCtx<'_>, _nr: &NotifierRange) -> Result<Pass, WouldBlock> {
        let mut g = ctx.lock_update(&self.state)?;
        self.entered.store(true, Ordering::SeqCst);
        if let Some(pin) = g.take() {
            pin.release().expect("the pin is live");
        }
        self.released.store(true, Ordering::SeqCst);
        Ok(Pass::Done)
    }
}

/// Pinning a page that lives on a device (MISSING-registered, absent from the CPU page table)
/// while a backend's invalidation of it releases another pin of the same pool: the pin returns,
/// the page has its contents back, and `VmPin` returns exactly to where it started.
///
/// Failed on the old code: `PinPool::pin` held the pool mutex across `register_buffers_update`,
/// so the monitor, inside the bring-back invalidation, blocked in `PinPool::release` on that mutex
/// while the pin's GUP waited for the monitor; the watchdog fired with "the monitor is blocked
/// releasing a pin (PinPool::release) inside the bring-back invalidation". The stacks showed the
/// second lock too: the pinner in `io_uring_register` → `io_pin_pages` → `handle_userfault`,
/// holding the ring's `uring_lock`, and another thread in D state in `io_uring_del_tctx_node`
/// waiting for that `uring_lock`. So dropping only the Rust mutex would not do; pins are made
/// through a private ring (see `svmirror_iommu::pin`). Without the watchdog's rescue the test
/// binary hung at exit on that `uring_lock`.
#[test]
fn pin_faulting_into_the_monitor_does_not_block_an_invalidation_releasing_a_pin() {
    let pinned_before = vm_pinned_bytes().unwrap();
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    if mm.features().access == UffdAccess::UserModeOnly {
        eprintln!("skipped: a user-mode-only userfaultfd does not serve the kernel's GUP faults");
        return;
    }
    let pool = PinPool::new(PinPoolConfig::default()).unwrap();

    // The page to pin: written, then migrated to the device (MISSING-registered, zapped).
    let buf = mm
        .mmap_anonymous(PAGE_SIZE, Protection::READ_WRITE)
        .unwrap();
    let page = buf.start();
    // SAFETY: our own fresh mapping of a page, touched through a raw pointer only.
    unsafe { std::ptr::write_bytes(page as *mut u8, 0x5a, PAGE_SIZE as usize) };
    let device = Arc::new(DeviceMemory {
        pages: Mutex::new(HashMap::new()),
    });
    assert_eq!(mm.migrate_to_device(buf, device.clone()).unwrap(), 1);

    // A backend subscribed over the page, holding a pin of the same pool elsewhere.
    let other = AnonMap::new(PAGE_SIZE as usize).unwrap();
    other.fill(1);
    // SAFETY: test memory accessed only through raw pointers.
    let held = unsafe { pool.pin(other.addr(), PAGE_SIZE) }.unwrap();
    let backend = Arc::new(ReleasesPin {
        state: UpdateLock::new(Some(held)),
        entered: AtomicBool::new(false),
        released: AtomicBool::new(false),
    });
    let sub = mm.notifier().insert(buf, backend.clone()).unwrap();

    let (done, finished) = mpsc::channel();
    let pinner = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            // SAFETY: the page is test memory accessed only through raw pointers.
            let r = unsafe { pool.pin(page, PAGE_SIZE) };
            let _ = done.send(r);
        })
    };
    let pin = match finished.recv_timeout(WATCHDOG) {
        Ok(r) => r.expect("the migrated page pins"),
        Err(_) => {
            let blocked = if !backend.entered.load(Ordering::SeqCst) {
                "the monitor never reached the invalidation"
            } else if !backend.released.load(Ordering::SeqCst) {
                "the monitor is blocked releasing a pin (PinPool::release) inside the \
                 bring-back invalidation"
            } else {
                "the monitor finished the invalidation, yet the pin never returned"
            };
            // Break the deadlock so the suite goes on: serve the pin's fault ourselves.
            let served = zero_page_through_the_userfaultfd(page);
            let freed = finished.recv_timeout(WATCHDOG).is_ok();
            // The monitor's state is no longer what the test set up; tearing it down could hang.
            std::mem::forget((sub, mm, pool, other, device));
            eprintln!("watchdog: served the fault ({served:?}), pin then returned: {freed}");
            panic!(
                "deadlock: PinPool::pin of a MISSING-registered page has not returned after \
                 {WATCHDOG:?}; it waits in GUP for the userfaultfd monitor, and {blocked}"
            );
        }
    };
    pinner.join().unwrap();
    assert!(backend.released.load(Ordering::SeqCst));
    // SAFETY: the page is back in RAM (the pin faulted it back); read through a raw pointer.
    let first = unsafe { std::ptr::read_volatile(page as *const u8) };
    assert_eq!(first, 0x5a, "the page came back with its contents");
    assert_eq!(pool.stats().live, 1);
    pin.release().unwrap();
    sub.remove().unwrap();
    drop(pool);
    drop(other);
    assert_eq!(
        settled_vm_pinned_bytes(pinned_before, VM_PIN_SETTLE).unwrap(),
        pinned_before,
        "pins leaked"
    );
}
