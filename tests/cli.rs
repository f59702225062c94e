//! The `svmirror` command, run as a user runs it: the app on the simulated IOMMU, `info` and
//! `bench --json` parsed, and every bad-input case (one line on stderr, exit code 2).

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn svmirror(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svmirror"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the svmirror binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The run's report says every app ran and matched, and the counters moved as they must.
fn check_run_report(v: &Value) {
    assert_eq!(v["backend"], "sim");
    assert_eq!(v["mismatches"], 0, "{v:#}");
    let apps: Vec<&str> = v["apps"]
        .as_array()
        .expect("apps")
        .iter()
        .map(|a| a["app"].as_str().unwrap())
        .collect();
    assert_eq!(apps, ["bfs", "saxpy", "churn"]);
    for a in v["apps"].as_array().unwrap() {
        assert_eq!(a["mismatches"], 0, "{a:#}");
        assert!(a["checks"].as_u64().unwrap() > 0, "{a:#}");
        assert!(a["device"]["commands"].as_u64().unwrap() > 0, "{a:#}");
    }
    let c = &v["counters"];
    assert!(c["total_faults"].as_u64().unwrap() > 0, "{c:#}");
    assert!(c["bytes_mapped"].as_u64().unwrap() > 0, "{c:#}");
    assert!(c["fault_latency_median"].as_f64().unwrap() > 0.0, "{c:#}");
    assert!(
        c["fault_latency_p99"].as_f64().unwrap() >= c["fault_latency_median"].as_f64().unwrap()
    );
    let reasons: Vec<&str> = c["invalidations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    for r in ["unmap", "clear", "protection-vma"] {
        assert!(reasons.contains(&r), "churn invalidates for {r}: {c:#}");
    }
    let e = &v["events"];
    assert!(
        e["unmap"].as_u64().unwrap() > 0,
        "plain munmaps were seen: {e:#}"
    );
    assert!(
        e["remove"].as_u64().unwrap() > 0,
        "plain madvises were seen: {e:#}"
    );
}

#[test]
fn run_json_completes_every_app_with_zero_mismatches() {
    let out = svmirror(&[
        "run", "all", "--size", "2M", "--nodes", "800", "--rounds", "8", "--json",
    ]);
    assert_ok(&out);
    check_run_report(&json(&out));
}

#[test]
fn no_command_runs_the_app_and_prints_the_results() {
    let out = svmirror(&[
        "--size", "1M", "--nodes", "300", "--rounds", "4", "--seed", "7",
    ]);
    assert_ok(&out);
    let s = text(&out.stdout);
    for want in [
        "sim backend",
        "bfs",
        "saxpy",
        "churn",
        "fault latency",
        "invalidations",
        "every device result matched the CPU reference",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }
}

#[test]
fn info_json_reports_every_piece_and_a_fix_for_each_missing_one() {
    let out = svmirror(&["info", "--json"]);
    assert_ok(&out);
    let v = json(&out);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        v["kernel"].as_str().unwrap().contains(release.trim()),
        "{}",
        v["kernel"]
    );
    assert!(v["cpus"].as_u64().unwrap() >= 1);
    assert!(v["memory_total"].as_u64().unwrap() > 0);
    let checks = v["checks"].as_array().unwrap();
    for name in [
        "userfaultfd",
        "PROCMAP_QUERY",
        "PAGEMAP_SCAN",
        "transparent huge pages",
        "io_uring",
        "locked memory",
        "Vulkan loader",
        "Vulkan drivers",
        "IOMMU",
        "VFIO",
    ] {
        assert!(
            checks.iter().any(|c| c["name"] == name),
            "no {name} check in {checks:#?}"
        );
    }
    for c in checks {
        let status = c["status"].as_str().unwrap();
        assert!(["ok", "limited", "missing"].contains(&status), "{c}");
        if status != "ok" {
            assert!(
                c["fix"].as_str().is_some_and(|f| !f.is_empty()),
                "no fix: {c}"
            );
        }
    }
    let uffd = checks.iter().find(|c| c["name"] == "userfaultfd").unwrap();
    assert_ne!(
        uffd["status"], "missing",
        "this machine runs svmirror: {uffd}"
    );
    let backends = v["backends"].as_array().unwrap();
    let sim = backends.iter().find(|b| b["name"] == "sim").unwrap();
    assert_eq!(
        sim["available"], true,
        "the simulated IOMMU runs here: {sim}"
    );
    for name in ["vulkan", "vfio"] {
        let b = backends.iter().find(|b| b["name"] == name);
        assert!(b.is_some(), "{name} missing from {backends:#?}");
    }
}

#[test]
fn info_prints_a_line_per_check() {
    let out = svmirror(&["info"]);
    assert_ok(&out);
    let s = text(&out.stdout);
    assert!(s.contains("userfaultfd") && s.contains("backends"), "{s}");
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("svmirror-cli-{}-{name}", std::process::id()))
}

#[test]
fn bench_quick_json_has_figures_with_baselines_and_writes_files() {
    let (json_path, svg_path) = (tmp("bench.json"), tmp("bench.svg"));
    let out = svmirror(&[
        "bench",
        "--quick",
        "--json",
        json_path.to_str().unwrap(),
        "--svg",
        svg_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let table = text(&out.stdout);
    assert!(
        table.contains("fault → replay") && table.contains("ratio"),
        "{table}"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let _ = std::fs::remove_file(&json_path);
    let _ = std::fs::remove_file(&svg_path);
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    assert_eq!(v["quick"], true);
    let figs = v["figures"].as_array().unwrap();
    for want in [
        "fault → replay, 4 KiB",
        "fault → replay, 2 MiB",
        "DMA copy",
        "saxpy",
        "BFS",
    ] {
        let f = figs
            .iter()
            .find(|f| f["backend"] == "sim" && f["name"].as_str().unwrap().contains(want))
            .unwrap_or_else(|| panic!("no sim figure {want:?} in {figs:#?}"));
        for k in ["value", "baseline", "ratio"] {
            assert!(f[k].as_f64().unwrap() > 0.0, "{k} of {f}");
        }
        assert!(f["baseline_name"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(svg.contains(&f["name"].as_str().unwrap().replace('&', "&amp;")));
    }
    // Every backend is measured or says why not.
    let skipped = v["skipped"].as_array().unwrap();
    for b in ["sim", "vulkan", "vfio"] {
        let measured = figs.iter().any(|f| f["backend"] == b);
        let why = skipped
            .iter()
            .find(|s| s["backend"] == b)
            .map(|s| s["reason"].as_str().unwrap().to_string());
        assert!(
            measured || why.is_some(),
            "{b} neither measured nor skipped"
        );
    }
}

#[test]
fn bench_json_on_stdout_is_json_only() {
    let out = svmirror(&["bench", "--quick", "--json"]);
    assert_ok(&out);
    let v = json(&out);
    assert!(!v["figures"].as_array().unwrap().is_empty());
}

/// A bad-input case: exit code 2, one line on stderr naming the problem, no panic.
fn bad_input(args: &[&str], wants: &[&str]) {
    let out = svmirror(args);
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: stdout:\n{}\nstderr:\n{err}",
        text(&out.stdout)
    );
    assert_eq!(err.lines().count(), 1, "{args:?}: one line, got:\n{err}");
    assert!(err.starts_with("svmirror: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    for w in wants {
        assert!(err.contains(w), "{args:?}: {w:?} missing from {err}");
    }
}

#[test]
fn unknown_app_is_bad_input() {
    bad_input(&["run", "mandelbrot"], &["unknown app 'mandelbrot'", "bfs"]);
}

#[test]
fn unknown_backend_is_bad_input() {
    bad_input(
        &["run", "--backend", "cuda"],
        &["unknown backend 'cuda'", "sim", "vulkan", "vfio"],
    );
}

#[test]
fn unavailable_backend_says_what_it_needs() {
    // No VFIO device is bound on a development machine or in CI (only in the QEMU guest).
    bad_input(
        &["run", "--backend", "vfio", "--size", "1M"],
        &["vfio", "not available", "vfio-pci"],
    );
}

#[test]
fn bench_of_an_unavailable_backend_named_explicitly_is_bad_input_not_a_skip() {
    bad_input(
        &["bench", "--backend", "vfio", "--micro", "--quick"],
        &["vfio", "not available"],
    );
}

#[test]
fn size_past_memory_is_bad_input() {
    bad_input(
        &["run", "--size", "64T"],
        &["does not fit in memory", "--size"],
    );
}

#[test]
fn malformed_size_is_bad_input() {
    bad_input(&["run", "--size", "lots"], &["invalid size", "64M"]);
}

#[test]
fn out_of_range_parameters_are_bad_input() {
    bad_input(&["run", "churn", "--slots", "3"], &["--slots", "even"]);
    bad_input(&["run", "bfs", "--nodes", "0"], &["--nodes"]);
}

#[test]
fn unknown_option_is_bad_input() {
    bad_input(&["--frobnicate"], &["--frobnicate"]);
}

#[test]
fn help_teaches_the_commands() {
    let out = svmirror(&["--help"]);
    assert_ok(&out);
    let s = text(&out.stdout);
    for want in [
        "run",
        "info",
        "bench",
        "Examples",
        "Exit status",
        "RUST_LOG",
    ] {
        assert!(s.contains(want), "{want:?} missing from --help:\n{s}");
    }
    let out = svmirror(&["run", "--help"]);
    assert_ok(&out);
    let s = text(&out.stdout);
    for want in ["bfs", "saxpy", "churn", "sim", "vulkan", "vfio", "--size"] {
        assert!(s.contains(want), "{want:?} missing from run --help:\n{s}");
    }
}

#[test]
fn verbose_flag_prints_tracing_on_stderr_before_or_after_the_command() {
    for args in [
        &["-v", "run", "saxpy", "--size", "1M"][..],
        &["run", "-v", "saxpy", "--size", "1M"][..],
    ] {
        let out = svmirror(args);
        assert_ok(&out);
        let err = text(&out.stderr);
        assert!(
            err.contains("DEBUG"),
            "{args:?}: no tracing on stderr:\n{err}"
        );
    }
}
