//! The coherence torture test: CPU threads change a 64 MiB region behind the device's back
//! while device threads read and write it through the simulated IOMMU, and every device access
//! is checked against what the CPU had mapped there at the time.
//!
//! # What runs
//!
//! - **The region** (`model`): 64 MiB at a fixed address, reserved once (PROT_NONE) and cut
//!   into slots of 2 MiB, 64 KiB and 4 KiB. Every page of a mapped slot starts with the slot's
//!   current *tag* (a unique value, eight times over); a slot whose pages were dropped reads as
//!   tag 0 (the zero page).
//! - **CPU threads** (`cpu`, 2 by default), seeded, each picking by weight: plain libc
//!   `munmap` (then leaving the hole or mapping it again), `mmap MAP_FIXED` over a slot,
//!   `mremap` moving a slot to a free one (`MREMAP_MAYMOVE | MREMAP_FIXED`), shrinking and
//!   growing it back in place, and moving it with `MREMAP_DONTUNMAP`; `madvise` DONTNEED and
//!   FREE; the same through the SVM API (`ProcessMm::munmap`, `madvise`, `mremap`), and
//!   `mprotect` read-only / read-write through it; and freeing and reallocating heap vectors.
//!   Each change writes a fresh tag into every page it (re)maps.
//! - **Device threads** (`device`, 2), each with its own `IommuMirror` in checking mode on the
//!   one `ProcessMm`: batches of 8-64 byte reads at page starts (half of them at slots changed a
//!   moment ago), write leases, and heap reads.
//!
//! # What is checked
//!
//! - **Every device read returns a tag that was live at that address during the access**: the
//!   global clock is read before and after each access, and the tag's live window in the
//!   slot's history must meet that interval (see `model` for the protocol that makes this
//!   exact). A tag that died before the access began is a *stale read*. A refusal (device
//!   fault) is always acceptable for a read: after a munmap it is the right answer.
//! - **Every device write after a change is seen by the CPU**: a device thread takes a slot's
//!   owner lock (a lease: no CPU change meanwhile), writes a marker, and reads it back with the
//!   CPU. A read-only or unmapped slot must refuse the write.
//! - **Heap reads**: a word of a heap vector that was not freed during the access is its tag.
//! - **At the end**: zero IOTLB violations; no IO page-table leaf left in the unmapped region;
//!   after one invalidation of everything, each mirror's mapped bytes equal its torn-down
//!   bytes and no pin is live; `VmPin` back where it started.
//! - **A watchdog** turns a hang into a failure that names every thread and the operation it
//!   was blocked in.
//!
//! The summary line (seed, operations, changes by kind, refusals by cause, failures) is always
//! printed; a failure message adds the first failures in full (address, tag read, the tag's
//! live windows, the access's window, the slot's history).
//!
//! # Running it
//!
//! `cargo test -p svmirror-iommu --test torture` runs the CI test: at least 100 000 device
//! operations. `cargo xtask soak --minutes N` runs the `soak` test (ignored otherwise) for N
//! minutes in release mode. Environment:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `SVMIRROR_TORTURE_SEED` | seed (decimal or 0x-hex) | a fixed one in CI, the time in a soak |
//! | `SVMIRROR_TORTURE_MIX` | a preset (`full`, `api`, `plain-munmap`, `mremap`, `madvise`, `heap`) or a comma list of operations (`munmap`, `mmap-fixed`, `mremap-move`, `mremap-grow`, `mremap-dontunmap`, `madv-dontneed`, `madv-free`, `api-munmap`, `api-madvise`, `api-mremap`, `api-mprotect`, `heap`) | `full` |
//! | `SVMIRROR_TORTURE_OPS` | device operations of the CI test | 100000 |
//! | `SVMIRROR_TORTURE_CPU_THREADS` | CPU threads | 2 |
//! | `SVMIRROR_TORTURE_OPS_PER_CHANGE` | device operations per CPU change (the CPU threads wait for the devices) | 8 in CI, 4 in a soak |
//! | `SVMIRROR_TORTURE_WATCHDOG_SECS` | stall that fails the run | 30 |
//! | `SVMIRROR_TORTURE_GDB` | on a stall, also print gdb backtraces (killed after 20 s: gdb cannot stop a thread waiting for the userfaultfd monitor) | off |
//! | `SVMIRROR_SOAK_SECS` | length of the soak | 60 |
//!
//! The `api` mix makes every change through the SVM API, which brackets it with an
//! invalidation: it must always pass, and is the check that the test's own bookkeeping is
//! exact. The plain libc operations are coherent as far as the userfaultfd monitor makes them
//! (README, "What svmirror sees"): the simulated IOMMU settles each access (a munmap or
//! mremap that returned is invalidated first), and a plain madvise's invalidation is held open
//! until its zap is seen (svmirror-mm `zap.rs`), so the default `full` mix must pass too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod cpu;
mod device;
mod engine;
mod model;

use engine::{Config, Mix, Stop};
use svmirror_testsupport::serial;

const DEFAULT_SEED: u64 = 0x7047_7572_e000_2026;
/// Device operations a CI run must reach.
const CI_OPS: u64 = 100_000;
/// Device operations per CPU change in the CI run: fewer changes than the soak's 4, so that a
/// debug build reaches `CI_OPS` in about a minute on 2 cores (device faults dominate the cost).
const CI_OPS_PER_CHANGE: u64 = 8;

fn env_u64(name: &str) -> Option<u64> {
    let s = std::env::var(name).ok()?;
    let s = s.trim();
    let v = s
        .strip_prefix("0x")
        .map_or_else(|| s.parse(), |h| u64::from_str_radix(h, 16));
    Some(v.unwrap_or_else(|e| panic!("{name}={s}: not a decimal or 0x-hex u64: {e}")))
}

fn config(stop: Stop, default_seed: u64, ops_per_change: u64) -> Config {
    let mix = std::env::var("SVMIRROR_TORTURE_MIX")
        .map(|m| Mix::parse(&m).unwrap_or_else(|e| panic!("SVMIRROR_TORTURE_MIX: {e}")))
        .unwrap_or_else(|_| Mix::full());
    Config {
        seed: env_u64("SVMIRROR_TORTURE_SEED").unwrap_or(default_seed),
        stop,
        cpu_threads: env_u64("SVMIRROR_TORTURE_CPU_THREADS").unwrap_or(2) as usize,
        device_threads: 2,
        mix,
        watchdog: Duration::from_secs(env_u64("SVMIRROR_TORTURE_WATCHDOG_SECS").unwrap_or(30)),
        ops_per_change: env_u64("SVMIRROR_TORTURE_OPS_PER_CHANGE").unwrap_or(ops_per_change),
    }
}

fn check(cfg: &Config, report: &engine::Report) {
    println!("{}", report.summary);
    if report.failed() {
        panic!(
            "coherence torture failed: {:?}\nreplay: SVMIRROR_TORTURE_SEED={:#x} \
             SVMIRROR_TORTURE_MIX={} (thread interleaving is not replayed)\nfirst failures:\n  \
             {}\n{}",
            report.failure_counts,
            cfg.seed,
            cfg.mix.name,
            report.failures.join("\n  "),
            report.summary
        );
    }
}

#[test]
fn torture_coherence() {
    // One run at a time (the soak may run beside it): `VmPin` is per process.
    let _s = serial();
    let ops = env_u64("SVMIRROR_TORTURE_OPS").unwrap_or(CI_OPS);
    let cfg = config(
        Stop::Ops {
            ops,
            limit: Duration::from_secs(300),
        },
        DEFAULT_SEED,
        CI_OPS_PER_CHANGE,
    );
    println!(
        "torture_coherence: seed {:#x}, mix {} (SVMIRROR_TORTURE_SEED / _MIX to change)",
        cfg.seed, cfg.mix.name
    );
    let report = engine::run(cfg.clone());
    check(&cfg, &report);
    assert!(
        report.ops >= ops,
        "{} device operations, at least {ops} wanted",
        report.ops
    );
}

/// The long run behind `cargo xtask soak --minutes N`.
#[test]
#[ignore = "long: run by `cargo xtask soak`"]
fn soak() {
    let _s = serial();
    let secs = env_u64("SVMIRROR_SOAK_SECS").unwrap_or(60);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(DEFAULT_SEED, |d| d.as_nanos() as u64);
    let cfg = config(Stop::Time(Duration::from_secs(secs)), now, 4);
    println!(
        "soak: {secs}s, seed {:#x}, mix {} (SVMIRROR_TORTURE_SEED to replay)",
        cfg.seed, cfg.mix.name
    );
    let report = engine::run(cfg.clone());
    check(&cfg, &report);
}
