//! The device copies between ordinary buffers at their own virtual addresses.

mod common;

use common::{PAGE, RustBuf, mirror, pattern};
use svmirror_core::Notifier;
use svmirror_iommu::{DmaCommand, LeafSize};
use svmirror_mm::testing::AnonMap;

#[test]
fn copy_between_rust_allocated_buffers_gives_the_right_bytes() {
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    let len = 64 * 1024 + 123;
    let src = RustBuf::new(64 * 1024 + PAGE as usize);
    let dst = RustBuf::new(64 * 1024 + PAGE as usize);
    let data = pattern(src.len(), 7);
    src.write(&data);
    let done = m
        .submit(DmaCommand::Copy {
            src: src.addr() + 1,
            dst: dst.addr() + 2,
            len: len as u64,
        })
        .unwrap()
        .wait()
        .unwrap();
    assert!(done.page_requests >= 1, "the buffers were faulted in");
    let got = dst.to_vec();
    assert_eq!(&got[2..2 + len], &data[1..1 + len]);
    assert_eq!(&got[..2], &[0, 0]);
    assert!(got[2 + len..].iter().all(|&b| b == 0));
    assert_eq!(m.violations().1, 0);
    drop(m);
}

#[test]
fn copy_between_2m_aligned_buffers_uses_2m_leaves() {
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    let len = 4 << 20;
    let src = AnonMap::aligned(len, 2 << 20).unwrap();
    let dst = AnonMap::aligned(len, 2 << 20).unwrap();
    let data = pattern(len, 3);
    src.write(0, &data);
    m.submit(DmaCommand::Copy {
        src: src.addr(),
        dst: dst.addr(),
        len: len as u64,
    })
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(dst.to_vec(), data);
    for addr in [src.addr(), dst.addr() + (2 << 20)] {
        assert_eq!(m.mmu().translate(addr).unwrap().size, LeafSize::Size2M);
    }
    assert_eq!(m.stats().faults, 4, "one page request per 2 MiB window");
    assert_eq!(m.violations().1, 0);
}

#[test]
fn device_atomics_accumulate_in_cpu_memory() {
    let notifier = Notifier::new();
    let m = mirror(&notifier);
    let counter = AnonMap::new(PAGE as usize).unwrap();
    let fences: Vec<_> = (0..10)
        .map(|_| {
            m.submit(DmaCommand::AtomicAdd {
                addr: counter.addr() + 64,
                value: 3,
            })
            .unwrap()
        })
        .collect();
    let olds: Vec<u64> = fences
        .into_iter()
        .map(|f| f.wait().unwrap().old_value.unwrap())
        .collect();
    assert_eq!(olds, (0..10).map(|i| i * 3).collect::<Vec<_>>());
    assert_eq!(counter.read(64, 8), 30u64.to_ne_bytes());
}
