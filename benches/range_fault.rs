//! range_fault over the scripted page source: pages per second.
//!
//! `cargo bench --bench range_fault`. The scripted source is an in-memory table, so this measures
//! the walk and the request/flag logic, not the kernel's page-table walk (svmirror-mm's benches
//! measure that on the real process).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use svmirror::core::testing::{ScriptedPageSource, TestMirror};
use svmirror::core::{AreaKind, FaultRequest, Notifier, Owner, PAGE_SIZE, Range, range_fault};

fn walk(c: &mut Criterion) {
    let mut g = c.benchmark_group("range_fault_present");
    for &pages in &[1u64, 64, 512, 4096] {
        let src = ScriptedPageSource::new();
        let range = Range::with_len(0x4000_0000, pages * PAGE_SIZE).unwrap();
        src.map_area(
            range,
            AreaKind::Mapped {
                read: true,
                write: true,
            },
        );
        src.populate(range, true);
        let n = Notifier::new();
        let sub = n
            .insert(range, Arc::new(TestMirror::new(Owner(1))))
            .unwrap();
        let mut entries = vec![0u64; pages as usize];
        g.throughput(Throughput::Elements(pages));
        g.bench_function(BenchmarkId::from_parameter(pages), |b| {
            b.iter(|| {
                let seq = sub.read_begin().unwrap();
                let mut req = FaultRequest::fault_all(range, &mut entries, true);
                black_box(range_fault(&sub, seq, &src, &mut req).unwrap())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("range_fault_fault_in");
    let pages = 512u64;
    g.throughput(Throughput::Elements(pages));
    g.bench_function(BenchmarkId::from_parameter(pages), |b| {
        let range = Range::with_len(0x4000_0000, pages * PAGE_SIZE).unwrap();
        let n = Notifier::new();
        let m = Arc::new(TestMirror::new(Owner(1)));
        let sub = n.insert(range, m.clone()).unwrap();
        b.iter_batched(
            || {
                let src = ScriptedPageSource::new();
                src.map_area(
                    range,
                    AreaKind::Mapped {
                        read: true,
                        write: true,
                    },
                );
                src
            },
            |src| black_box(m.fault(&sub, &src, range, true).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, walk);
criterion_main!(benches);
