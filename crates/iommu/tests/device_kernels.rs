//! Device kernels: Rust closures whose every load and store goes through the IOMMU, on ordinary
//! heap memory at its own virtual addresses. The tests compare the process-wide `VmPin`: they
//! run one at a time (`serial`).

mod common;

use common::{PAGE, mirror};
use svmirror_core::{Notifier, Range};
use svmirror_iommu::{Access, DeviceKernel, KernelError};
use svmirror_mm::{ProcessMm, Protection, VM_PIN_SETTLE, settled_vm_pinned_bytes, vm_pinned_bytes};
use svmirror_testsupport::serial;

/// A node of an ordinary heap linked list.
#[repr(C)]
struct Node {
    value: u64,
    next: *mut Node,
}

const VALUE_OFFSET: u64 = std::mem::offset_of!(Node, value) as u64;
const NEXT_OFFSET: u64 = std::mem::offset_of!(Node, next) as u64;

#[test]
fn pointer_chasing_kernel_sums_a_heap_linked_list() {
    let _serial = serial();
    let pinned = vm_pinned_bytes().unwrap();
    let notifier = Notifier::new();
    let m = mirror(&notifier);

    // Each node its own Box, allocated in an order that scatters them over the heap.
    let n = 1000u64;
    let mut head: *mut Node = std::ptr::null_mut();
    let mut cpu_sum = 0u64;
    let mut spacers = Vec::new();
    for i in 0..n {
        let value = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
        cpu_sum = cpu_sum.wrapping_add(value);
        head = Box::into_raw(Box::new(Node { value, next: head }));
        spacers.push(vec![0u8; (i as usize % 7) * 24 + 1]);
    }

    let run = DeviceKernel::new(&m)
        .run(|k| {
            let (mut sum, mut hops, mut at) = (0u64, 0u64, head as u64);
            while at != 0 {
                sum = sum.wrapping_add(k.load_u64(at + VALUE_OFFSET)?);
                at = k.load_u64(at + NEXT_OFFSET)?;
                hops += 1;
            }
            Ok((sum, hops))
        })
        .unwrap();
    assert_eq!(run.value, (cpu_sum, n));
    assert_eq!(run.stats.loads, 2 * n);
    assert_eq!(run.stats.stores, 0);
    assert!(run.stats.page_requests >= 1, "the heap was faulted in");
    println!(
        "pointer chasing: {} loads in {:?}: {:?} per load, {} page requests",
        run.stats.loads,
        run.stats.elapsed,
        run.stats.per_access(),
        run.stats.page_requests
    );
    assert_eq!(m.violations().1, 0);
    drop(m);

    while !head.is_null() {
        // SAFETY: every node came from `Box::into_raw` above and is freed once.
        let node = unsafe { Box::from_raw(head) };
        head = node.next;
    }
    drop(spacers);
    assert_eq!(
        settled_vm_pinned_bytes(pinned, VM_PIN_SETTLE).unwrap(),
        pinned
    );
}

#[test]
fn saxpy_kernel_updates_a_vec_the_cpu_then_checks() {
    let _serial = serial();
    let pinned = vm_pinned_bytes().unwrap();
    let notifier = Notifier::new();
    let m = mirror(&notifier);

    let n = 100_003usize;
    let a = 2.5f32;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.25).collect();
    let mut y: Vec<f32> = (0..n).map(|i| (i % 37) as f32 - 18.0).collect();
    let want: Vec<f32> = x.iter().zip(&y).map(|(&x, &y)| a * x + y).collect();
    let xp = x.as_ptr();
    let yp = y.as_mut_ptr();

    // Blocks of 4096 elements: two loads and one store per block.
    let block = 4096usize;
    let run = DeviceKernel::new(&m)
        .run(|k| {
            let mut i = 0;
            while i < n {
                let len = block.min(n - i);
                let off = (i * 4) as u64;
                let xs = k.load_f32s(xp as u64 + off, len)?;
                let mut ys = k.load_f32s(yp as u64 + off, len)?;
                for (y, x) in ys.iter_mut().zip(&xs) {
                    *y += a * x;
                }
                k.store_f32s(yp as u64 + off, &ys)?;
                i += len;
            }
            Ok(())
        })
        .unwrap();
    let blocks = n.div_ceil(block) as u64;
    assert_eq!(run.stats.loads, 2 * blocks);
    assert_eq!(run.stats.stores, blocks);
    assert_eq!(run.stats.bytes_stored, (n * 4) as u64);

    // A scalar tail through the typed accessors: y[0] = a * x[0] + y[0] once more.
    DeviceKernel::new(&m)
        .run(|k| {
            let x0 = k.load_f32(xp as u64)?;
            let y0 = k.load_f32(yp as u64)?;
            k.store_f32(yp as u64, a * x0 + y0)
        })
        .unwrap();

    for (i, &w) in want.iter().enumerate() {
        let w = if i == 0 { a * x[0] + w } else { w };
        // SAFETY: in bounds of `y`; read through the pointer the device wrote through.
        let got = unsafe { std::ptr::read_volatile(yp.wrapping_add(i)) };
        assert_eq!(got.to_bits(), w.to_bits(), "y[{i}]");
    }
    assert_eq!(m.violations().1, 0);
    drop(m);
    drop(y);
    assert_eq!(
        settled_vm_pinned_bytes(pinned, VM_PIN_SETTLE).unwrap(),
        pinned
    );
}

/// Commands started and not yet finished keep their order on the device: a load started after
/// a store to the same bytes sees the store, before either is waited for; a load started
/// while another is in flight gets its own bytes; and a start that faults reports the fault at
/// its `finish`, naming the address, with the earlier commands done.
#[test]
fn started_commands_run_in_order_and_fail_at_their_finish() {
    let _serial = serial();
    let pinned = vm_pinned_bytes().unwrap();
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    let mut a: Vec<u8> = (0..3 * PAGE as usize).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = vec![9; PAGE as usize];
    let (pa, pb) = (a.as_mut_ptr() as u64, b.as_ptr() as u64);
    let run = DeviceKernel::new(&m)
        .run(|k| {
            let store = k.start_store(pa + 100, vec![0xab; 5000])?;
            let over = k.start_load(pa + 98, 8)?;
            let other = k.start_load(pb, PAGE)?;
            let whole = k.start_load(pa, 3 * PAGE)?;
            assert!(k.finish(store)?.is_empty());
            Ok((k.finish(over)?, k.finish(other)?, k.finish(whole)?))
        })
        .unwrap();
    let (over, other, whole) = run.value;
    assert_eq!(over, [98, 99, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab]);
    assert_eq!(other, b);
    assert_eq!(&whole[100..5100], &[0xab; 5000][..]);
    assert_eq!(whole[5100], (5100 % 251) as u8);
    assert_eq!(
        (run.stats.loads, run.stats.stores, run.stats.bytes_stored),
        (3, 1, 5000)
    );
    // The CPU sees the store.
    assert_eq!(a[100..5100], [0xab; 5000]);

    // Unmapped: the start is accepted, the finish reports the fault.
    let hole = {
        let v = vec![0u8; 4 * PAGE as usize];
        let at = (v.as_ptr() as u64).next_multiple_of(PAGE) + PAGE;
        // SAFETY: a page inside `v`'s allocation, unmapped; `v` is forgotten below so that
        // nothing frees or touches it again.
        let rc = unsafe { libc::munmap(at as *mut libc::c_void, PAGE as usize) };
        assert_eq!(rc, 0);
        std::mem::forget(v);
        at
    };
    let err = DeviceKernel::new(&m)
        .run(|k| {
            let good = k.start_load(pb, 8)?;
            let bad = k.start_load(hole + 8, 8)?;
            assert_eq!(k.finish(good)?, vec![9; 8]);
            k.finish(bad)
        })
        .unwrap_err();
    assert!(
        matches!(err, KernelError::Fault { addr, access: Access::Read, .. } if addr == hole + 8),
        "{err:?}"
    );
    drop(m);
    drop(a);
    assert_eq!(
        settled_vm_pinned_bytes(pinned, VM_PIN_SETTLE).unwrap(),
        pinned
    );
}

#[test]
fn kernel_touching_an_unmapped_address_aborts_naming_it() {
    let _serial = serial();
    let pinned = vm_pinned_bytes().unwrap();
    let notifier = Notifier::new();
    let m = mirror(&notifier);

    // Three pages, the middle one unmapped: a hole nothing else is mapped into.
    let len = 3 * PAGE as usize;
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let base = p as u64;
    let hole = base + PAGE;
    // SAFETY: the middle page of the mapping above; nothing refers into it.
    let rc = unsafe { libc::munmap(hole as *mut libc::c_void, PAGE as usize) };
    assert_eq!(rc, 0);

    let bad = hole + 0x128;
    let mut reached = false;
    let err = DeviceKernel::new(&m)
        .run(|k| {
            k.store_u64(base, 7)?;
            assert_eq!(k.load_u64(base)?, 7);
            reached = true;
            k.load_u64(bad)
        })
        .unwrap_err();
    assert!(reached, "the accesses before the bad one ran");
    match err {
        KernelError::Fault {
            addr,
            len,
            access,
            iova,
            ..
        } => {
            assert_eq!((addr, len, access, iova), (bad, 8, Access::Read, bad));
        }
        e => panic!("expected a fault, got {e:?}"),
    }
    let rec = m.dma().faults();
    assert!(
        rec.iter().any(|r| r.iova == bad && !r.resolved),
        "unresolved fault recorded: {rec:?}"
    );

    // A store there aborts the same way.
    let err = DeviceKernel::new(&m)
        .run(|k| k.store_u32(hole, 1))
        .unwrap_err();
    assert!(
        matches!(err, KernelError::Fault { addr, access: Access::Write, .. } if addr == hole),
        "{err:?}"
    );
    assert_eq!(err.addr(), hole);

    drop(m);
    for page in [base, base + 2 * PAGE] {
        // SAFETY: the outer pages of the mapping above; the mirror is gone.
        let rc = unsafe { libc::munmap(page as *mut libc::c_void, PAGE as usize) };
        assert_eq!(rc, 0);
    }
    assert_eq!(
        settled_vm_pinned_bytes(pinned, VM_PIN_SETTLE).unwrap(),
        pinned
    );
}

#[test]
fn after_munmap_a_second_kernel_faults_again_and_sees_the_new_page() {
    let _serial = serial();
    let pinned = vm_pinned_bytes().unwrap();
    let mm = ProcessMm::new().expect("userfaultfd available (run as root)");
    let m = mirror(mm.notifier());

    let range = mm.mmap_anonymous(PAGE, Protection::READ_WRITE).unwrap();
    let addr = range.start();
    let p = addr as *mut u64;
    // SAFETY: in the fresh mapping; no reference is made.
    unsafe { std::ptr::write_volatile(p.wrapping_add(3), 0xaaaa) };

    let sum = |k: &mut svmirror_iommu::KernelCtx<'_>| -> svmirror_iommu::KernelResult<u64> {
        let v = k.load_u64(addr + 3 * 8)?;
        k.store_u64(addr + 4 * 8, v + 1)?;
        Ok(v)
    };
    let first = DeviceKernel::new(&m).run(sum).unwrap();
    assert_eq!(first.value, 0xaaaa);
    assert_eq!(first.stats.page_requests, 1);
    // SAFETY: in the mapping, which is still there.
    let got = unsafe { std::ptr::read_volatile(p.wrapping_add(4)) };
    assert_eq!(got, 0xaaab);
    let faults = m.stats().faults;
    assert!(m.mmu().translate(addr).is_some());

    // SAFETY: nothing in Rust refers into the page.
    unsafe { mm.munmap(range) }.unwrap();
    assert!(
        m.mmu().translate(addr).is_none(),
        "the device lost the page"
    );
    assert_eq!(m.pins().live(), 0);

    // New memory at the same address.
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let q = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(q as u64, addr, "remapped at the same address");
    // SAFETY: in the new mapping; no reference is made.
    unsafe { std::ptr::write_volatile(p.wrapping_add(3), 0x5555) };

    let second = DeviceKernel::new(&m).run(sum).unwrap();
    assert_eq!(second.value, 0x5555, "the kernel sees the new page");
    assert_eq!(second.stats.page_requests, 1, "it faulted again");
    assert_eq!(m.stats().faults, faults + 1);
    // SAFETY: in the new mapping.
    let got = unsafe { std::ptr::read_volatile(p.wrapping_add(4)) };
    assert_eq!(got, 0x5556);
    assert_eq!(m.violations().1, 0);

    drop(m);
    let range = Range::with_len(addr, PAGE).unwrap();
    // SAFETY: nothing refers into the page; the mirror is gone.
    unsafe { mm.munmap(range) }.unwrap();
    drop(mm);
    assert_eq!(
        settled_vm_pinned_bytes(pinned, VM_PIN_SETTLE).unwrap(),
        pinned
    );
}
