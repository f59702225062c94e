//! `svmirror bench`: every available backend's figures, each with its baseline from the same
//! run, as one table, and as JSON and an SVG chart on request.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use svmirror::app::report::{Figure, ProgressFactory, fmt_ratio, table};
use svmirror::app::{self, AppConfig, AppError, AppKind, BackendKind};

use super::{Failure, progress::Bars, svg};

/// A backend that could not be measured, and why.
#[derive(Debug, Serialize)]
struct Skipped {
    backend: &'static str,
    reason: String,
}

/// Everything `svmirror bench` reports.
#[derive(Debug, Serialize)]
struct BenchReport {
    kernel: String,
    cpus: usize,
    quick: bool,
    seconds: f64,
    figures: Vec<Figure>,
    skipped: Vec<Skipped>,
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The app's throughput figures on `backend`: saxpy bytes/s and BFS edges/s against the CPU.
fn app_figures(
    backend: &dyn app::Backend,
    mm: &std::sync::Arc<svmirror::mm::ProcessMm>,
    quick: bool,
    bars: &dyn ProgressFactory,
) -> Result<Vec<Figure>, AppError> {
    let config = AppConfig {
        saxpy_bytes: if quick { 8 << 20 } else { 64 << 20 },
        nodes: if quick { 2000 } else { 16_384 },
        ..AppConfig::default()
    };
    config.validate()?;
    let report = app::run_apps(backend, mm, &[AppKind::Saxpy, AppKind::Bfs], &config, bars)?;
    report.result()?;
    let name = backend.kind().name();
    let mut figs = Vec::new();
    for a in &report.apps {
        let (Some(dev), Some(cpu), Some((_, unit))) = (a.device_rate(), a.cpu_rate(), a.rate)
        else {
            continue;
        };
        let what = match a.app {
            "saxpy" => format!(
                "saxpy through device kernels, {}",
                app::human_bytes(config.saxpy_bytes)
            ),
            "bfs" => format!("BFS pointer chasing, {} nodes", config.nodes),
            other => other.to_string(),
        };
        let fig = Figure::rate(name, &what, dev, unit, "the same on the CPU", cpu);
        // Issue 13's targets: the Vulkan device's BFS, the simulated IOMMU's BFS and saxpy.
        let target = match (name, a.app) {
            ("vulkan", "bfs") => Some(("≥ 0.2×", 0.2)),
            ("sim", "bfs") => Some(("≥ 0.1×", 0.1)),
            ("sim", "saxpy") => Some(("≥ 0.25×", 0.25)),
            _ => None,
        };
        figs.push(match target {
            Some((t, ratio)) => fig.with_target(t, dev >= ratio * cpu),
            None => fig,
        });
    }
    Ok(figs)
}

/// `svmirror bench`.
pub(crate) fn run(
    quick: bool,
    micro: bool,
    only: &[BackendKind],
    json: Option<&Option<PathBuf>>,
    svg_path: Option<&Path>,
    options: &app::BackendOptions,
    show_bars: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let json_stdout = matches!(json, Some(None));
    let bars = Bars::new(show_bars && !json_stdout);
    let mm = app::open_mm()?;
    let mut figures = Vec::new();
    let mut skipped = Vec::new();
    let kinds = if only.is_empty() {
        BackendKind::ALL.to_vec()
    } else {
        only.to_vec()
    };
    for kind in kinds {
        let backend = match app::open_backend_with(kind, &mm, options) {
            Ok(b) => b,
            Err(e) if e.is_bad_input() && only.is_empty() => {
                skipped.push(Skipped {
                    backend: kind.name(),
                    reason: e.to_string(),
                });
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !json_stdout {
            eprintln!(
                "svmirror bench: measuring the {kind} backend{} on {}",
                if quick { " (quick)" } else { "" },
                backend.device()
            );
        }
        figures.extend(backend.micro_benchmarks(quick)?);
        if !micro {
            figures.extend(app_figures(&*backend, &mm, quick, &bars)?);
        }
    }
    let report = BenchReport {
        kernel: kernel(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        quick,
        seconds: started.elapsed().as_secs_f64(),
        figures,
        skipped,
    };
    if let Some(path) = svg_path {
        std::fs::write(path, svg::chart(&report.figures))
            .map_err(|e| Failure::bad_input(format!("cannot write {}: {e}", path.display())))?;
    }
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
    match json {
        Some(None) => {
            println!("{text}");
            return Ok(());
        }
        Some(Some(path)) => std::fs::write(path, text + "\n")
            .map_err(|e| Failure::bad_input(format!("cannot write {}: {e}", path.display())))?,
        None => {}
    }
    print!("{}", render(&report));
    Ok(())
}

fn render(r: &BenchReport) -> String {
    let mut rows = vec![[
        "backend".to_string(),
        "figure".into(),
        "result".into(),
        "baseline".into(),
        "baseline result".into(),
        "ratio".into(),
        "target".into(),
    ]];
    for f in &r.figures {
        rows.push([
            f.backend.clone(),
            f.name.clone(),
            f.value_text(),
            f.baseline_name.clone(),
            f.baseline_text(),
            fmt_ratio(f.ratio),
            match (&f.target, f.met) {
                (Some(t), Some(true)) => format!("{t}: met"),
                (Some(t), _) => format!("{t}: not met"),
                _ => "-".into(),
            },
        ]);
    }
    let mut o = format!(
        "svmirror bench on Linux {}, {} CPUs{} ({:.1} s)\n\n",
        r.kernel,
        r.cpus,
        if r.quick {
            ", quick mode: indicative only"
        } else {
            ""
        },
        r.seconds
    );
    o.push_str(&table(&rows));
    o.push_str("ratio: above 1 the device is faster than its baseline (for latencies, baseline / result)\n");
    let details: Vec<_> = r
        .figures
        .iter()
        .filter_map(|f| Some((f, f.detail_text()?)))
        .collect();
    if !details.is_empty() {
        o.push_str("\nwhere the time goes (medians; the parts are means):\n");
        for (f, d) in details {
            o.push_str(&format!("  {} {}: {d}\n", f.backend, f.name));
        }
    }
    for s in &r.skipped {
        o.push_str(&format!("skipped {}: {}\n", s.backend, s.reason));
    }
    o
}
