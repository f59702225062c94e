//! `cargo xtask`: svmirror's CI and maintenance tasks.
//!
//! - `cargo xtask ci`: everything CI checks, in order: formatting, clippy with `-D warnings`, the
//!   whole test suite, the bounded loom models, and that the benchmarks build. Ends with one
//!   summary line. Installs the Debian packages the suites need when it can (root with apt-get);
//!   otherwise stops with the exact command to run.
//! - `cargo xtask loom`: the loom models of the seq protocol, bounded by `LOOM_MAX_PREEMPTIONS`
//!   (default 3).
//! - `cargo xtask bench [FILTER]`: runs the criterion benchmarks and prints a table of results.
//! - `cargo xtask vfio-vm`: boots a QEMU guest with an emulated IOMMU and QEMU's edu device and
//!   runs the VFIO tests inside it ([`vfio_vm`]).
//! - `cargo xtask shaders [--check]`: regenerates the committed SPIR-V from `shaders/`, or checks
//!   that it matches its source and passes `spirv-val` ([`vulkan`]).
//! - `cargo xtask device-test`: on a GPU host, the Vulkan suite and benchmarks on the real GPU
//!   ([`vulkan`]).
//! - `cargo xtask soak --minutes N [--mix MIX] [--seed SEED]`: the coherence torture test
//!   (`crates/iommu/tests/torture`) for N minutes in release mode, with a fresh seed unless one
//!   is given; the CI runs the same test for 100 000 device operations.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

mod vfio_vm;
mod vulkan;

/// A Debian package a suite needs: its name and a shell test that succeeds when it is installed
/// (`command -v prog`, `test -e /path`).
pub(crate) type DebianPackage = (&'static str, &'static str);

/// Every Debian package the test suites need.
fn debian_packages() -> Vec<DebianPackage> {
    let mut v = Vec::new();
    v.extend_from_slice(vulkan::DEBIAN_PACKAGES);
    v.extend_from_slice(vfio_vm::DEBIAN_PACKAGES);
    v
}

const USAGE: &str =
    "usage: cargo xtask <ci|loom|bench [FILTER]|vfio-vm|shaders [--check]|device-test|
                    soak --minutes N [--mix MIX] [--seed SEED]>

  ci           fmt check, clippy -D warnings, all tests, SPIR-V check, VFIO guest, loom models,
               benches build
  loom         bounded loom models of the seq protocol (LOOM_MAX_PREEMPTIONS, default 3)
  bench        criterion benchmarks, then a table of the results
  vfio-vm      boot a QEMU guest (emulated Intel IOMMU + edu device) and run the VFIO tests in it
  shaders      recompile shaders/*.comp to the committed SPIR-V (--check: verify, change nothing)
  device-test  on a GPU host: the Vulkan suite and benchmarks on the real GPU, with a table
  soak         the coherence torture test for N minutes (release); --mix: a preset (full,
               the default; api, plain-munmap, mremap, madvise, heap) or a comma list of
               operations";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("loom") => loom().map_err(|e| vec![e]),
        Some("bench") => bench(args.get(1).map(String::as_str)).map_err(|e| vec![e]),
        Some("vfio-vm") => vfio_vm::run(&args[1..]).map_err(|e| vec![e]),
        Some("shaders") => {
            vulkan::shaders(args.get(1).is_some_and(|a| a == "--check")).map_err(|e| vec![e])
        }
        Some("device-test") => vulkan::device_test(&args[1..]).map_err(|e| vec![e]),
        Some("soak") => soak(&args[1..]).map_err(|e| vec![e]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(errors) => {
            for e in errors {
                eprintln!("xtask: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub(crate) fn run(what: &str, mut cmd: Command) -> Result<(), String> {
    eprintln!("xtask: running {what}");
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: could not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// One CI step: a name and what it runs.
type Step = Box<dyn Fn() -> Result<(), String>>;

fn ci() -> Result<(), Vec<String>> {
    let started = Instant::now();
    ensure_debian_packages().map_err(|e| vec![e])?;
    let mut steps: Vec<(&str, Step)> = Vec::new();
    steps.push((
        "fmt",
        Box::new(|| {
            let mut c = cargo();
            c.args(["fmt", "--all", "--", "--check"]);
            run("cargo fmt --check", c)
        }),
    ));
    steps.push((
        "clippy",
        Box::new(|| {
            let mut c = cargo();
            c.args([
                "clippy",
                "--workspace",
                "--all-targets",
                // The VFIO guest test binary needs it (it runs the backend scenario suite).
                "--features",
                "svmirror-edu/guest-tests",
                "--",
                "-D",
                "warnings",
            ]);
            run("cargo clippy -D warnings", c)
        }),
    ));
    steps.push((
        "doc",
        Box::new(|| {
            let mut c = cargo();
            // Broken intra-doc links and bad doc markup fail the build, as clippy's warnings do.
            c.env("RUSTDOCFLAGS", "-D warnings");
            c.args(["doc", "--workspace", "--no-deps"]);
            run("cargo doc -D warnings", c)
        }),
    ));
    steps.push((
        "tests",
        Box::new(|| {
            let mut c = cargo();
            c.args(["test", "--workspace"]);
            run("cargo test --workspace", c)
        }),
    ));
    steps.push(("shaders", Box::new(|| vulkan::shaders(true))));
    steps.push(("vfio-vm", Box::new(|| vfio_vm::run(&[]))));
    steps.push(("loom", Box::new(loom)));
    steps.push((
        "bench-build",
        Box::new(|| {
            let mut c = cargo();
            c.args(["bench", "--workspace", "--no-run"]);
            run("cargo bench --no-run", c)
        }),
    ));
    let mut failed = Vec::new();
    let mut passed = Vec::new();
    for (name, step) in &steps {
        let t = Instant::now();
        match step() {
            Ok(()) => passed.push(format!("{name} {:.0}s", t.elapsed().as_secs_f64())),
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if failed.is_empty() {
        println!(
            "xtask ci: PASS, {} steps in {secs:.0}s ({})",
            passed.len(),
            passed.join(", ")
        );
        Ok(())
    } else {
        println!(
            "xtask ci: FAIL, {} of {} steps failed in {secs:.0}s",
            failed.len(),
            steps.len()
        );
        Err(failed)
    }
}

/// `cargo xtask soak --minutes N [--mix MIX] [--seed SEED]`: the torture test's `soak` entry
/// point (ignored in normal runs) for N minutes, in release mode.
fn soak(args: &[String]) -> Result<(), String> {
    let mut minutes: Option<u64> = None;
    let mut mix = None;
    let mut seed = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("soak: {name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--minutes" => {
                let v = value("--minutes")?;
                minutes = Some(v.parse().map_err(|e| format!("soak: --minutes {v}: {e}"))?);
            }
            "--mix" => mix = Some(value("--mix")?),
            "--seed" => seed = Some(value("--seed")?),
            other => return Err(format!("soak: unknown argument {other:?}\n{USAGE}")),
        }
    }
    let minutes = minutes.ok_or_else(|| format!("soak: --minutes N is required\n{USAGE}"))?;
    let mut c = cargo();
    c.env("SVMIRROR_SOAK_SECS", (minutes * 60).to_string())
        .args([
            "test",
            "--release",
            "-p",
            "svmirror-iommu",
            "--test",
            "torture",
            "--",
            "--ignored",
            "--exact",
            "soak",
            "--nocapture",
        ]);
    if let Some(m) = mix {
        c.env("SVMIRROR_TORTURE_MIX", m);
    }
    if let Some(s) = seed {
        c.env("SVMIRROR_TORTURE_SEED", s);
    }
    run(&format!("coherence soak, {minutes} min"), c)
}

fn loom() -> Result<(), String> {
    let mut c = cargo();
    let flags = env::var("RUSTFLAGS").unwrap_or_default();
    c.env("RUSTFLAGS", format!("{flags} --cfg loom").trim())
        .env(
            "LOOM_MAX_PREEMPTIONS",
            env::var("LOOM_MAX_PREEMPTIONS").unwrap_or_else(|_| "3".into()),
        )
        .args([
            "test",
            "--release",
            "-p",
            "svmirror-core",
            "--test",
            "loom",
            "--target-dir",
            "target/loom",
        ]);
    run("loom models", c)
}

/// Checks that every package the suites need is installed; installs the missing ones with
/// apt-get when running as root, else fails with the command to run.
fn ensure_debian_packages() -> Result<(), String> {
    let missing: Vec<&str> = debian_packages()
        .into_iter()
        .filter(|(_, check)| {
            !Command::new("sh")
                .args(["-c", check])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(pkg, _)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root {
        return Err(format!(
            "missing Debian packages; install them with: sudo apt-get install -y {list}"
        ));
    }
    let mut update = Command::new("apt-get");
    update.arg("update");
    run("apt-get update", update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&format!("apt-get install {list}"), install)
}

fn bench(filter: Option<&str>) -> Result<(), String> {
    let mut c = cargo();
    c.args(["bench", "--workspace"]);
    if let Some(f) = filter {
        c.args(["--", f]);
    }
    run("cargo bench", c)?;
    print_bench_table(&root().join("target/criterion"))
}

/// Prints `group/function/parameter  mean` for every criterion result under `dir`.
fn print_bench_table(dir: &Path) -> Result<(), String> {
    let mut rows = Vec::new();
    collect_estimates(dir, dir, &mut rows);
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    println!("{:<60} {:>14}", "benchmark", "mean");
    for (name, ns) in rows {
        println!("{name:<60} {:>14}", human_time(ns));
    }
    Ok(())
}

fn collect_estimates(base: &Path, dir: &Path, rows: &mut Vec<(String, f64)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "new") {
                if let Some(mean) = fs::read_to_string(p.join("estimates.json"))
                    .ok()
                    .and_then(|s| mean_point_estimate(&s))
                {
                    let name = p
                        .parent()
                        .and_then(|q| q.strip_prefix(base).ok())
                        .map(|q| q.display().to_string())
                        .unwrap_or_default();
                    rows.push((name, mean));
                }
            } else if p.file_name().is_some_and(|n| n != "report" && n != "base") {
                collect_estimates(base, &p, rows);
            }
        }
    }
}

/// The mean's point estimate (ns) from criterion's `estimates.json`, without a JSON dependency.
fn mean_point_estimate(json: &str) -> Option<f64> {
    let mean = &json[json.find("\"mean\"")?..];
    let pe = &mean[mean.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = pe.find([',', '}'])?;
    pe[..end].trim().parse().ok()
}

fn human_time(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.1} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}
