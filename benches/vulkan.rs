//! svmirror-vulkan: a compute shader over the process's memory by CPU pointer (SVM), against the
//! explicit staging-copy version of the same kernel, in the same run.
//!
//! `cargo bench --bench vulkan` (on lavapipe here; `cargo xtask device-test` on a GPU host).
//! The device is the one [`Gpu::new`] picks (a discrete GPU first; `SVMIRROR_VK_DEVICE`
//! overrides) and is printed first.
//!
//! - `vulkan_stream/*`: `y = a * x + y` over two `Vec<f32>` of 1 Mi elements (4 MiB each).
//!   - `svm_faulting`: every iteration starts with nothing mapped (`evict_all`, untimed): the
//!     first pass faults, the host imports and maps the chunks, the faulted items replay.
//!   - `svm_prefetched`: the same, with an explicit `prefetch` of both arrays (timed) first.
//!   - `svm_mapped`: the arrays stay mapped from earlier iterations: the kernel alone, with a
//!     page-table lookup per access.
//!   - `staging_copy`: upload both arrays to device-local memory through a staging buffer, run
//!     the kernel without translation, download `y`.
//! - `vulkan_chase/*`: 1024 linked-list walks of 64 steps over 64 Ki 16-byte nodes in a `Vec`
//!   linked by real pointers, with the same four variants; the staging copy rewrites every
//!   `next` pointer to a device address (the work SVM saves).
//! - `cuda_stream/*` (only where the NVIDIA driver is present; skipped with a message
//!   elsewhere): the same saxpy over CUDA managed memory (`cuMemAllocManaged`, what
//!   `cudaMallocManaged` calls), with the CPU writing `y` before each launch so the pages start
//!   on the host (`managed_host_resident`), and the host-to-device copy of the 8 MiB the kernel
//!   reads, from pinned memory (`htod_copy_8m`): the physical limit for host-resident data.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use svmirror::core::Range;
use svmirror::mm::ProcessMm;
use svmirror_vulkan::cuda::CudaBaseline;
use svmirror_vulkan::{
    ChaseNode, Dispatch, Gpu, GpuConfig, Kernel, MirrorConfig, StagedChase, StagedStream,
    VulkanMirror,
};

const N: usize = 1 << 20;
const NODES: usize = 1 << 16;
const LISTS: usize = 1024;
const STEPS: u64 = 64;

fn setup() -> VulkanMirror {
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let gpu = Arc::new(Gpu::new(&GpuConfig::default()).expect("a usable Vulkan device"));
    let i = gpu.info();
    eprintln!(
        "vulkan bench device: {} ({}), driver {} {}, Vulkan {}",
        i.name, i.kind, i.driver, i.driver_info, i.api_version
    );
    let range = Range::new(1 << 16, 1 << 47).expect("the user address space");
    VulkanMirror::new(gpu, mm, range, MirrorConfig::default()).expect("a mirror")
}

/// Times `iters` runs of `run`, each after `before` (untimed).
fn timed(iters: u64, mut before: impl FnMut(), mut run: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        before();
        let t = Instant::now();
        run();
        total += t.elapsed();
    }
    total
}

fn stream(c: &mut Criterion, m: &VulkanMirror) {
    let x: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let mut y = vec![1.0f32; N];
    let (xp, yp) = (x.as_ptr() as u64, y.as_mut_ptr() as u64);
    let d = Dispatch::new(
        Kernel::Stream,
        N as u32,
        &[xp, yp, u64::from(0.5f32.to_bits())],
    )
    .expect("a dispatch");
    let run = || {
        // SAFETY: `x` and `y` hold N floats and no reference to them is used while a dispatch
        // runs.
        let stats = unsafe { m.dispatch(&d) };
        black_box(stats.expect("dispatch"));
    };
    let mut g = c.benchmark_group("vulkan_stream");
    g.throughput(Throughput::Bytes((N * 4 * 3) as u64));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("svm_faulting", |b| {
        b.iter_custom(|iters| timed(iters, || m.evict_all(), run))
    });
    g.bench_function("svm_prefetched", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || m.evict_all(),
                || {
                    m.prefetch(xp, (N * 4) as u64, false).expect("prefetch");
                    m.prefetch(yp, (N * 4) as u64, true).expect("prefetch");
                    run();
                },
            )
        })
    });
    g.bench_function("svm_mapped", |b| b.iter(run));
    let staged = StagedStream::new(m.gpu(), N as u32).expect("staging buffers");
    let mut y2 = vec![1.0f32; N];
    g.bench_function("staging_copy", |b| {
        b.iter(|| staged.run(m, &x, &mut y2, 0.5).expect("staged run"))
    });
    g.finish();
    black_box(&mut y);
}

fn chase(c: &mut Criterion, m: &VulkanMirror) {
    let mut nodes = vec![ChaseNode::default(); NODES];
    let base = nodes.as_ptr() as u64;
    let mut s = 0x9e37_79b9_u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for (i, n) in nodes.iter_mut().enumerate() {
        n.next = base + 16 * (rnd() % NODES as u64);
        n.value = i as u32;
    }
    let heads: Vec<u64> = (0..LISTS)
        .map(|_| base + 16 * (rnd() % NODES as u64))
        .collect();
    let mut out = vec![0u32; LISTS];
    let d = Dispatch::new(
        Kernel::Chase,
        LISTS as u32,
        &[heads.as_ptr() as u64, out.as_mut_ptr() as u64, STEPS],
    )
    .expect("a dispatch");
    let run = || {
        // SAFETY: the pointers lead into `nodes`; `out` holds LISTS u32s and is not referenced
        // while a dispatch runs.
        let stats = unsafe { m.dispatch(&d) };
        black_box(stats.expect("dispatch"));
    };
    let mut g = c.benchmark_group("vulkan_chase");
    g.throughput(Throughput::Elements(LISTS as u64 * STEPS));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("svm_faulting", |b| {
        b.iter_custom(|iters| timed(iters, || m.evict_all(), run))
    });
    g.bench_function("svm_prefetched", |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || m.evict_all(),
                || {
                    m.prefetch(base, (NODES * 16) as u64, false)
                        .expect("prefetch");
                    m.prefetch(heads.as_ptr() as u64, (LISTS * 8) as u64, false)
                        .expect("prefetch");
                    m.prefetch(out.as_ptr() as u64, (LISTS * 4) as u64, true)
                        .expect("prefetch");
                    run();
                },
            )
        })
    });
    g.bench_function("svm_mapped", |b| b.iter(run));
    let staged = StagedChase::new(m.gpu(), NODES as u32, LISTS as u32).expect("staging buffers");
    let mut out2 = vec![0u32; LISTS];
    g.bench_function("staging_copy", |b| {
        b.iter(|| {
            staged
                .run(m, &nodes, &heads, STEPS, &mut out2)
                .expect("staged run")
        })
    });
    g.finish();
    assert_eq!(out, out2, "SVM and staging copy agree");
}

fn cuda(c: &mut Criterion) {
    let cuda = match CudaBaseline::open() {
        Ok(cuda) => cuda,
        Err(e) => {
            eprintln!("cuda_stream skipped: {e}");
            return;
        }
    };
    eprintln!("cuda bench device: {}", cuda.device_name());
    let mut g = c.benchmark_group("cuda_stream");
    g.throughput(Throughput::Bytes((N * 4 * 3) as u64));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("managed_host_resident", |b| {
        b.iter_custom(|iters| {
            let (times, right) = cuda
                .managed_stream(N as u32, iters as u32)
                .expect("managed saxpy");
            assert!(right, "CUDA saxpy result");
            times.iter().sum()
        })
    });
    g.throughput(Throughput::Bytes((N * 4 * 2) as u64));
    g.bench_function("htod_copy_8m", |b| {
        b.iter_custom(|iters| {
            cuda.htod_copy(N * 4 * 2, iters as u32)
                .expect("host-to-device copy")
                .iter()
                .sum()
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let m = setup();
    stream(c, &m);
    chase(c, &m);
    cuda(c);
    let counters = m.counters();
    eprintln!(
        "vulkan bench counters: {} faults ({} bytes), {} retries",
        counters.total_faults(),
        counters.fault_bytes,
        counters.retries
    );
}

criterion_group!(vulkan, benches);
criterion_main!(vulkan);
