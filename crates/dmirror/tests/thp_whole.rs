//! A device's reads and writes leave the CPU's transparent huge pages whole (issue 16, point
//! 3), against the real kernel, through the dmirror device; the splits that cannot be helped
//! are counted in `MmStats::huge_splits`.
//!
//! Each test maps its 4 MiB buffer at a fixed far address (MAP_FIXED_NOREPLACE), 2 MiB
//! aligned and advised MADV_HUGEPAGE, so no other thread's mapping lands next to it and merges
//! into its VMA. The CPU writes it, and the test checks that both 2 MiB windows are mapped at
//! order 9 before going on: without THP (`/sys/kernel/mm/transparent_hugepage/enabled` set to
//! `never`, or no huge page to be had) the test fails and says so, it does not skip.

mod hmm_common;

use hmm_common::*;
use svmirror_core::{CpuPte, PageSource, Range};
use svmirror_mm::{Advice, ProcessPageSource};
use svmirror_testsupport::serial;

/// The buffer: two PMD-sized windows.
const LEN: u64 = 2 * TWO_MEG;

/// A private anonymous read-write `LEN` mapping at `hint`, advised MADV_HUGEPAGE and written
/// by the CPU (int `i` holds `i`).
fn thp_buffer_at(env: &Env, hint: u64) -> Range {
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped.
    let p = unsafe {
        libc::mmap(
            hint as *mut libc::c_void,
            LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(
        p as u64,
        hint,
        "address {hint:#x} is free in a test process: {}",
        std::io::Error::last_os_error()
    );
    let buf = Range::with_len(hint, LEN).unwrap();
    // SAFETY: advice only; no contents change.
    unsafe { env.mm.madvise(buf, Advice::HugePage) }.unwrap();
    fill_ints(buf);
    buf
}

/// For each 2 MiB window of `buf`, the orders its pages are mapped at (255: not present), as
/// the page source reports them (PAGEMAP_SCAN's PAGE_IS_HUGE).
fn window_orders(buf: Range) -> Vec<Vec<u8>> {
    let source = ProcessPageSource::new().unwrap();
    (0..buf.len() / TWO_MEG)
        .map(|w| {
            let mut ptes = vec![CpuPte::None; (TWO_MEG / PAGE) as usize];
            source
                .snapshot(buf.start() + w * TWO_MEG, &mut ptes)
                .unwrap();
            let mut orders: Vec<u8> = ptes
                .iter()
                .map(|p| match p {
                    CpuPte::Present { order, .. } => *order,
                    _ => 255,
                })
                .collect();
            orders.sort_unstable();
            orders.dedup();
            orders
        })
        .collect()
}

/// Checks that the CPU maps both windows of `buf` with one 2 MiB page each.
fn assert_huge(buf: Range, when: &str) {
    let orders = window_orders(buf);
    assert!(
        orders.iter().all(|o| o == &[9]),
        "{when}: the CPU should map both 2 MiB windows at order 9, it maps them at orders {orders:?}"
    );
}

/// Checks, before the device touches `buf`, that the CPU got its huge pages at all.
fn assert_thp_available(buf: Range) {
    let orders = window_orders(buf);
    let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap_or_else(|e| format!("unreadable: {e}"));
    assert!(
        orders.iter().all(|o| o == &[9]),
        "no transparent huge pages to test with: a MADV_HUGEPAGE buffer written by the CPU is \
         mapped at orders {orders:?}, not 9 (transparent_hugepage/enabled: {})",
        enabled.trim()
    );
}

/// The reproduction: a dmirror READ of a THP-backed buffer the CPU wrote leaves both
/// of its huge pages mapped at order 9, and reads the right data.
///
/// Seen on Linux 6.18 at the commit this test came with: it passes before the fix as well.
/// The split the issue reports does not reproduce on this kernel with this scenario: the
/// fault path already registers the whole VMA and maps the CPU's huge page whole. The split
/// a read does cause is on a write-tracked buffer: see
/// [`read_of_a_write_tracked_thp_keeps_it_whole`].
#[test]
fn read_keeps_thp_whole() {
    let _s = serial();
    let env = Env::new();
    let buf = thp_buffer_at(&env, 0x3100_0000_0000);
    assert_thp_available(buf);
    let dev = env.open();
    assert_huge(buf, "after Dmirror::open");

    let mut m = mirror_buf(buf.pages());
    let cmd = dev.read(buf.start(), buf.pages(), &mut m).unwrap();
    assert_eq!(cmd.cpages, buf.pages());
    assert_huge(buf, "after the device read the buffer");
    check_mirror(&m, ints(buf), "device read", |i| i as u32);
    assert_eq!(env.mm.stats().huge_splits, 0);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// A device read of a buffer whose CPU writes are tracked (`ProcessMm::track_writes`: the
/// huge pages write-protected whole, in userfaultfd's asynchronous mode) leaves both huge
/// pages whole; the pages read as written at the next collection (the device pinned them for
/// writing), and collecting over whole huge pages splits nothing either.
///
/// Failed before the fix (the device's pin, taken for writing, write-faulted the protected
/// PMDs and the kernel split them in `wp_huge_pmd`):
/// `after the device read the buffer: the CPU should map both 2 MiB windows at order 9, it
/// maps them at orders [[0], [0]]`.
#[test]
fn read_of_a_write_tracked_thp_keeps_it_whole() {
    let _s = serial();
    let env = Env::new();
    assert!(
        env.mm.features().write_tracking(),
        "this kernel has no userfaultfd WP_ASYNC"
    );
    let buf = thp_buffer_at(&env, 0x3110_0000_0000);
    assert_thp_available(buf);
    let dev = env.open();
    env.mm.track_writes(buf).unwrap();
    assert_huge(buf, "after write tracking started");

    let mut m = mirror_buf(buf.pages());
    let cmd = dev.read(buf.start(), buf.pages(), &mut m).unwrap();
    assert_eq!(cmd.cpages, buf.pages());
    assert_huge(buf, "after the device read the buffer");
    check_mirror(&m, ints(buf), "device read", |i| i as u32);

    let written = env.mm.collect_writes(buf).unwrap();
    assert_eq!(
        written,
        vec![buf],
        "pages pinned for writing read as written"
    );
    assert_huge(buf, "after the writes were collected");
    assert_eq!(env.mm.stats().huge_splits, 0);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// The same for a device write of a tracked buffer: the huge pages stay whole and hold what
/// the device wrote.
///
/// Failed before the fix, for the same reason: `after the device wrote the buffer: the CPU
/// should map both 2 MiB windows at order 9, it maps them at orders [[0], [0]]`.
#[test]
fn write_of_a_write_tracked_thp_keeps_it_whole() {
    let _s = serial();
    let env = Env::new();
    assert!(
        env.mm.features().write_tracking(),
        "this kernel has no userfaultfd WP_ASYNC"
    );
    let buf = thp_buffer_at(&env, 0x3120_0000_0000);
    assert_thp_available(buf);
    let dev = env.open();
    env.mm.track_writes(buf).unwrap();

    let mut m = mirror_buf(buf.pages());
    for i in 0..ints(buf) {
        set_mirror_int(&mut m, i, !(i as u32));
    }
    let cmd = dev.write(buf.start(), buf.pages(), &m).unwrap();
    assert_eq!(cmd.cpages, buf.pages());
    assert_huge(buf, "after the device wrote the buffer");
    check_ints(buf, "device wrote", |i| !(i as u32));
    assert_eq!(env.mm.stats().huge_splits, 0);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}

/// Write tracking over part of a huge page splits it (userfaultfd protects 4 KiB pages): the
/// one split svmirror cannot avoid there is counted, and the huge page the range covers whole
/// stays whole.
#[test]
fn partial_write_tracking_split_is_counted() {
    let _s = serial();
    let env = Env::new();
    assert!(
        env.mm.features().write_tracking(),
        "this kernel has no userfaultfd WP_ASYNC"
    );
    let buf = thp_buffer_at(&env, 0x3130_0000_0000);
    assert_thp_available(buf);
    let before = env.mm.stats().huge_splits;

    // All of the first window and half of the second.
    let part = Range::with_len(buf.start(), TWO_MEG + TWO_MEG / 2).unwrap();
    env.mm.track_writes(part).unwrap();
    let orders = window_orders(buf);
    assert_eq!(orders[0], [9], "the window tracked whole stays huge");
    assert_eq!(orders[1], [0], "the window tracked in part is split");
    assert_eq!(env.mm.stats().huge_splits - before, 1);

    env.unmap(buf);
}

/// A device read of a huge page shared copy-on-write with a forked child splits it: the pin
/// must unshare the page, and the kernel does that to a PMD-mapped THP by splitting it.
/// Unavoidable while devices work through pins; counted, one per huge page.
#[test]
fn read_of_a_cow_shared_thp_split_is_counted() {
    let _s = serial();
    let env = Env::new();
    let buf = thp_buffer_at(&env, 0x3140_0000_0000);
    assert_thp_available(buf);
    let dev = env.open();
    let before = env.mm.stats().huge_splits;
    // The child keeps the pages shared while the parent's device reads them.
    let child = fork(|| std::thread::sleep(std::time::Duration::from_secs(1)));

    let mut m = mirror_buf(buf.pages());
    let cmd = dev.read(buf.start(), buf.pages(), &mut m).unwrap();
    assert_eq!(cmd.cpages, buf.pages());
    check_mirror(&m, ints(buf), "device read", |i| i as u32);
    let split = window_orders(buf).iter().filter(|o| *o == &[0]).count() as u64;
    assert_eq!(split, 2, "both huge pages were unshared by splitting");
    assert_eq!(env.mm.stats().huge_splits - before, split);
    wait_ok(child);

    drop(dev);
    env.unmap(buf);
    env.check_unpinned();
}
