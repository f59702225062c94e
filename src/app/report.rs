//! What the apps report: per-app outcomes, the mirror's counters, benchmark figures, and the
//! progress hook the command line draws bars with.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Serialize, Serializer};
use svmirror_core::counters::EVENT_NAMES;
use svmirror_core::{CounterSnapshot, FaultSize};
use svmirror_mm::MmStats;

use super::{AppConfig, AppError, Backend, DeviceWork, Result, human_bytes};

/// Serializes a duration as fractional seconds.
pub fn ser_duration<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A progress bar the apps advance.
pub trait Bar: Send + Sync {
    /// `done` of `total` units are done.
    fn set(&self, done: u64, total: u64);
    /// The step is over.
    fn finish(&self);
}

/// Makes progress bars (the command line's draws them with indicatif; [`NoProgress`] draws
/// nothing).
pub trait ProgressFactory {
    /// A bar for step `name`, counting `total` `unit`s.
    fn bar(&self, name: &str, total: u64, unit: &str) -> Box<dyn Bar>;
}

/// Progress that is not shown.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Bar for NoProgress {
    fn set(&self, _: u64, _: u64) {}
    fn finish(&self) {}
}

impl ProgressFactory for NoProgress {
    fn bar(&self, _: &str, _: u64, _: &str) -> Box<dyn Bar> {
        Box::new(NoProgress)
    }
}

/// Counts comparisons with the CPU reference and remembers the first mismatch.
#[derive(Debug, Default)]
pub struct Check {
    /// Results compared.
    pub count: u64,
    /// Results that differed.
    pub mismatches: u64,
    /// The first mismatch, described.
    pub first: Option<String>,
}

impl Check {
    /// Counts one comparison; `describe` is called only for the first mismatch.
    pub fn compare(&mut self, ok: bool, describe: impl FnOnce() -> String) {
        self.count += 1;
        if !ok {
            self.mismatches += 1;
            if self.first.is_none() {
                self.first = Some(describe());
            }
        }
    }

    /// `Ok` with no mismatch, else [`AppError::Mismatch`].
    pub fn into_result(self, app: &'static str) -> Result<()> {
        match self.first {
            None => Ok(()),
            Some(first) => Err(AppError::Mismatch {
                app,
                count: self.mismatches,
                first,
            }),
        }
    }
}

/// What one app did and how it compared with the CPU.
#[derive(Clone, Debug, Serialize)]
pub struct AppOutcome {
    /// The app.
    pub app: &'static str,
    /// Its data, in words.
    pub work: String,
    /// Results compared with the CPU reference.
    pub checks: u64,
    /// Results that differed (0, or the app failed).
    pub mismatches: u64,
    /// The first result that differed, described.
    pub first_mismatch: Option<String>,
    /// What the device did.
    pub device: DeviceWork,
    /// The same work on the CPU.
    #[serde(serialize_with = "ser_duration")]
    pub cpu_time: Duration,
    /// Units of work and their name, for a throughput (`units / elapsed`).
    #[serde(skip)]
    pub rate: Option<(f64, &'static str)>,
    /// Further lines for the report (`name`, `value`).
    pub extra: Vec<(String, String)>,
}

impl AppOutcome {
    /// Device throughput in `rate` units per second.
    pub fn device_rate(&self) -> Option<f64> {
        let (units, _) = self.rate?;
        let s = self.device.elapsed.as_secs_f64();
        (s > 0.0).then(|| units / s)
    }

    /// CPU throughput in `rate` units per second.
    pub fn cpu_rate(&self) -> Option<f64> {
        let (units, _) = self.rate?;
        let s = self.cpu_time.as_secs_f64();
        (s > 0.0).then(|| units / s)
    }
}

/// The mirror's counters, as reported.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CountersReport {
    /// Faults by size class label.
    pub faults: Vec<(String, u64)>,
    /// All faults.
    pub total_faults: u64,
    /// Bytes mapped by faults.
    pub fault_bytes: u64,
    /// Fault loops started over.
    pub retries: u64,
    /// Invalidations acted on, by reason.
    pub invalidations: Vec<(String, u64)>,
    /// Invalidations skipped, by reason.
    pub skipped: Vec<(String, u64)>,
    /// Bytes mapped for the device.
    pub bytes_mapped: u64,
    /// Bytes of device mappings torn down.
    pub bytes_unmapped: u64,
    /// Median fault latency (request to mapped), seconds.
    pub fault_latency_median: Option<f64>,
    /// 99th-percentile fault latency, seconds.
    pub fault_latency_p99: Option<f64>,
}

impl From<&CounterSnapshot> for CountersReport {
    fn from(c: &CounterSnapshot) -> Self {
        let named = |v: &[u64]| {
            v.iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (EVENT_NAMES[i].to_string(), *n))
                .collect()
        };
        CountersReport {
            faults: FaultSize::ALL
                .iter()
                .map(|s| (s.label().to_string(), c.faults[*s as usize]))
                .filter(|(_, n)| *n > 0)
                .collect(),
            total_faults: c.total_faults(),
            fault_bytes: c.fault_bytes,
            retries: c.retries,
            invalidations: named(&c.invalidations),
            skipped: named(&c.skipped),
            bytes_mapped: c.bytes_mapped,
            bytes_unmapped: c.bytes_unmapped,
            fault_latency_median: c.fault_latency.median().map(|d| d.as_secs_f64()),
            fault_latency_p99: c.fault_latency.p99().map(|d| d.as_secs_f64()),
        }
    }
}

/// The userfaultfd events the address-space monitor read during the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EventsReport {
    /// munmap events.
    pub unmap: u64,
    /// madvise (DONTNEED, FREE, REMOVE) events.
    pub remove: u64,
    /// mremap events.
    pub remap: u64,
    /// Events an SVM API call had already invalidated for.
    pub covered_by_api: u64,
    /// Mappings registered for events.
    pub registrations: u64,
    /// Pages brought back from device memory: for a CPU touch, for another device's fault,
    /// and on request (migrate to RAM, prepare for fork).
    pub migrated_back: [u64; 3],
    /// Plain madvise invalidations held until their zap was seen.
    pub zap_waits: u64,
    /// Of those, how many the time limit ended.
    pub zap_timeouts: u64,
    /// Device accesses settled against the monitor, and of those how many waited for a
    /// munmap, madvise or mremap that had returned but was not yet handled.
    pub settles: u64,
    /// See `settles`.
    pub settle_waits: u64,
    /// CPU huge pages svmirror split ([`MmStats::huge_splits`]).
    pub huge_splits: u64,
}

/// Everything one `svmirror run` did.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The backend.
    pub backend: &'static str,
    /// Its device.
    pub device: String,
    /// The sizes.
    pub config: AppConfig,
    /// Each app's outcome.
    pub apps: Vec<AppOutcome>,
    /// The mirror's counters over the run.
    pub counters: CountersReport,
    /// The monitor's events over the run.
    pub events: EventsReport,
    /// Total mismatches (0: every result matched the CPU reference).
    pub mismatches: u64,
}

impl RunReport {
    /// Collects a report.
    pub fn new(
        backend: &dyn Backend,
        config: &AppConfig,
        apps: Vec<AppOutcome>,
        counters: CounterSnapshot,
        mm_before: &MmStats,
        mm_after: &MmStats,
    ) -> RunReport {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        RunReport {
            backend: backend.kind().name(),
            device: backend.device(),
            config: *config,
            mismatches: apps.iter().map(|a| a.mismatches).sum(),
            apps,
            counters: CountersReport::from(&counters),
            events: EventsReport {
                unmap: d(mm_after.unmap_events, mm_before.unmap_events),
                remove: d(mm_after.remove_events, mm_before.remove_events),
                remap: d(mm_after.remap_events, mm_before.remap_events),
                covered_by_api: d(
                    mm_after.events_covered_by_api,
                    mm_before.events_covered_by_api,
                ),
                registrations: d(mm_after.registrations, mm_before.registrations),
                migrated_back: [
                    d(mm_after.migrated_back_cpu, mm_before.migrated_back_cpu),
                    d(
                        mm_after.migrated_back_device,
                        mm_before.migrated_back_device,
                    ),
                    d(
                        mm_after.migrated_back_requested,
                        mm_before.migrated_back_requested,
                    ),
                ],
                zap_waits: d(mm_after.zap_waits, mm_before.zap_waits),
                zap_timeouts: d(mm_after.zap_timeouts, mm_before.zap_timeouts),
                settles: d(mm_after.settles, mm_before.settles),
                settle_waits: d(mm_after.settle_waits, mm_before.settle_waits),
                huge_splits: d(mm_after.huge_splits, mm_before.huge_splits),
            },
        }
    }

    /// `Ok` when every result matched, else [`AppError::Mismatch`] for the first app with a
    /// mismatch.
    pub fn result(&self) -> Result<()> {
        match self.apps.iter().find(|a| a.mismatches > 0) {
            None => Ok(()),
            Some(a) => Err(AppError::Mismatch {
                app: a.app,
                count: a.mismatches,
                first: a.first_mismatch.clone().unwrap_or_default(),
            }),
        }
    }

    /// The report as text for people.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "backend  {} ({})", self.backend, self.device);
        let _ = writeln!(o);
        let mut rows = vec![[
            "app".to_string(),
            "result".into(),
            "work".into(),
            "device".into(),
            "device rate".into(),
            "CPU".into(),
            "CPU rate".into(),
        ]];
        for a in &self.apps {
            let unit = a.rate.map_or("", |r| r.1);
            rows.push([
                a.app.to_string(),
                if a.mismatches == 0 {
                    format!("ok ({} checks)", a.checks)
                } else {
                    format!("{} MISMATCHES", a.mismatches)
                },
                a.work.clone(),
                fmt_duration(a.device.elapsed),
                a.device_rate().map_or("-".into(), |r| fmt_rate(r, unit)),
                fmt_duration(a.cpu_time),
                a.cpu_rate().map_or("-".into(), |r| fmt_rate(r, unit)),
            ]);
        }
        o.push_str(&table(&rows));
        for a in &self.apps {
            for (k, v) in &a.extra {
                let _ = writeln!(o, "  {}: {k}: {v}", a.app);
            }
        }
        let c = &self.counters;
        let _ = writeln!(o);
        let _ = writeln!(o, "mirror counters");
        let list = |v: &[(String, u64)]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let _ = writeln!(
            o,
            "  faults          {} ({}), {} mapped by faults",
            c.total_faults,
            list(&c.faults),
            human_bytes(c.fault_bytes)
        );
        let _ = writeln!(
            o,
            "  fault latency   median {}, p99 {} (device request to mapped)",
            c.fault_latency_median
                .map_or("-".into(), |s| fmt_duration(Duration::from_secs_f64(s))),
            c.fault_latency_p99
                .map_or("-".into(), |s| fmt_duration(Duration::from_secs_f64(s)))
        );
        let _ = writeln!(o, "  retries         {}", c.retries);
        let _ = writeln!(o, "  invalidations   {}", list(&c.invalidations));
        let _ = writeln!(o, "  skipped         {}", list(&c.skipped));
        let _ = writeln!(
            o,
            "  page table      {} mapped, {} torn down",
            human_bytes(c.bytes_mapped),
            human_bytes(c.bytes_unmapped)
        );
        let e = &self.events;
        let _ = writeln!(
            o,
            "  uffd events     unmap {}, remove {}, remap {} ({} already handled by the SVM API); {} mappings registered",
            e.unmap, e.remove, e.remap, e.covered_by_api, e.registrations
        );
        let _ = writeln!(
            o,
            "  madvise holds   {} until the zap was seen ({} ended by the time limit)",
            e.zap_waits, e.zap_timeouts
        );
        let _ = writeln!(
            o,
            "  settled         {} device accesses, {} waited for a returned munmap/madvise/mremap",
            e.settles, e.settle_waits
        );
        let [cpu, device, requested] = e.migrated_back;
        let _ = writeln!(
            o,
            "  migrated back   {cpu} for the CPU, {device} for another device's fault, {requested} on request"
        );
        let _ = writeln!(
            o,
            "  huge pages      {} split by svmirror (write tracking over part of one, or a pin of one shared with a forked child)",
            e.huge_splits
        );
        let _ = writeln!(o);
        if self.mismatches == 0 {
            let checks: u64 = self.apps.iter().map(|a| a.checks).sum();
            let _ = writeln!(
                o,
                "every device result matched the CPU reference ({checks} checks)"
            );
        } else {
            let _ = writeln!(
                o,
                "FAILED: {} device results differ from the CPU reference",
                self.mismatches
            );
        }
        o
    }
}

/// One benchmark figure and its baseline from the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// The backend measured.
    pub backend: String,
    /// What was measured.
    pub name: String,
    /// The result.
    pub value: f64,
    /// Its unit (`s` for latencies, `B/s`, `edges/s`).
    pub unit: String,
    /// What it is compared with.
    pub baseline_name: String,
    /// The baseline's result, same unit.
    pub baseline: f64,
    /// value / baseline for rates, baseline / value for latencies: above 1 the device is
    /// faster.
    pub ratio: f64,
    /// The target, in words (`≤ 10 µs`, `≥ 0.5× memcpy`), if there is one.
    pub target: Option<String>,
    /// Whether the target is met, if there is one.
    pub met: Option<bool>,
    /// For a latency, the 99th percentile of the samples its median was taken from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    /// Where the time goes: named parts, in the figure's unit (means over the samples).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breakdown: Vec<Part>,
    /// Counters that explain the figure (faults per batch, faults per run): plain numbers,
    /// means over the samples.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub counts: Vec<Part>,
}

/// One part of a [`Figure`]'s breakdown.
#[derive(Clone, Debug, Serialize)]
pub struct Part {
    /// The step.
    pub name: String,
    /// Its share, in the figure's unit.
    pub value: f64,
}

impl Figure {
    /// A rate (higher is better) against its baseline rate.
    pub fn rate(
        backend: &str,
        name: &str,
        value: f64,
        unit: &str,
        baseline_name: &str,
        baseline: f64,
    ) -> Figure {
        Figure {
            backend: backend.into(),
            name: name.into(),
            value,
            unit: unit.into(),
            baseline_name: baseline_name.into(),
            baseline,
            ratio: if baseline > 0.0 {
                value / baseline
            } else {
                0.0
            },
            target: None,
            met: None,
            p99: None,
            breakdown: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// A latency in seconds (lower is better) against its baseline latency.
    pub fn latency(
        backend: &str,
        name: &str,
        value: f64,
        baseline_name: &str,
        baseline: f64,
    ) -> Figure {
        Figure {
            backend: backend.into(),
            name: name.into(),
            value,
            unit: "s".into(),
            baseline_name: baseline_name.into(),
            baseline,
            ratio: if value > 0.0 { baseline / value } else { 0.0 },
            target: None,
            met: None,
            p99: None,
            breakdown: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Sets the target and whether it is met.
    pub fn with_target(mut self, target: &str, met: bool) -> Figure {
        self.target = Some(target.into());
        self.met = Some(met);
        self
    }

    /// Sets the 99th percentile of the samples.
    pub fn with_p99(mut self, p99: f64) -> Figure {
        self.p99 = Some(p99);
        self
    }

    /// Adds one part of the breakdown, in the figure's unit.
    pub fn with_part(mut self, name: &str, value: f64) -> Figure {
        self.breakdown.push(Part {
            name: name.into(),
            value,
        });
        self
    }

    /// Adds a counter that explains the figure (a plain number, not in the figure's unit).
    pub fn with_count(mut self, name: &str, value: f64) -> Figure {
        self.counts.push(Part {
            name: name.into(),
            value,
        });
        self
    }

    /// The p99, the breakdown and the counters as one line (`None` when the figure has none).
    pub fn detail_text(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(p) = self.p99 {
            parts.push(format!("p99 {}", fmt_value(p, &self.unit)));
        }
        for b in &self.breakdown {
            parts.push(format!("{} {}", b.name, fmt_value(b.value, &self.unit)));
        }
        for c in &self.counts {
            parts.push(format!("{} {:.1}", c.name, c.value));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// The value formatted in its unit.
    pub fn value_text(&self) -> String {
        fmt_value(self.value, &self.unit)
    }

    /// The baseline formatted in its unit.
    pub fn baseline_text(&self) -> String {
        fmt_value(self.baseline, &self.unit)
    }
}

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "s" => fmt_duration(Duration::from_secs_f64(v.max(0.0))),
        "B/s" => format!("{:.2} GB/s", v / 1e9),
        u => fmt_rate(v, u.trim_start_matches('/')),
    }
}

/// A ratio with enough digits to tell small ones apart: `1.25×`, `0.0123×`, `4.5e-4×`.
pub fn fmt_ratio(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.3}×")
    } else if r >= 0.001 {
        format!("{r:.4}×")
    } else {
        format!("{r:.1e}×")
    }
}

/// A duration with a readable unit: `812 ns`, `45.3 µs`, `12.4 ms`, `1.32 s`.
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// A rate with an SI prefix: `161 k edges/s`, `1.02 GB/s`.
pub fn fmt_rate(v: f64, unit: &str) -> String {
    if unit == "B/s" {
        return format!("{:.2} GB/s", v / 1e9);
    }
    let (d, p) = if v >= 1e9 {
        (1e9, "G")
    } else if v >= 1e6 {
        (1e6, "M")
    } else if v >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    format!("{:.1} {p}{unit}", v / d)
}

/// Lays `rows` out as a plain-text table, the first row being the header.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut width = [0usize; N];
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut o = String::new();
    for (i, r) in rows.iter().enumerate() {
        let mut line = String::new();
        for (k, (c, w)) in r.iter().zip(width).enumerate() {
            line.push_str(c);
            if k + 1 < N {
                line.extend(std::iter::repeat_n(' ', w - c.chars().count() + 2));
            }
        }
        o.push_str(line.trim_end());
        o.push('\n');
        if i == 0 {
            let total: usize = width.iter().sum::<usize>() + 2 * (N - 1);
            o.push_str(&"-".repeat(total));
            o.push('\n');
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_remembers_the_first_mismatch_only() {
        let mut c = Check::default();
        c.compare(true, || unreachable!());
        c.compare(false, || "a".into());
        c.compare(false, || "b".into());
        assert_eq!((c.count, c.mismatches), (3, 2));
        let e = c.into_result("x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x: 2 mismatches against the CPU reference (first: a)"
        );
        assert!(!e.is_bad_input());
    }

    #[test]
    fn ratios_favour_the_device_above_one() {
        let r = Figure::rate("sim", "copy", 2e9, "B/s", "memcpy", 4e9);
        assert!((r.ratio - 0.5).abs() < 1e-9);
        let l = Figure::latency("sim", "fault", 20e-6, "warm", 10e-6);
        assert!((l.ratio - 0.5).abs() < 1e-9);
        assert_eq!(l.value_text(), "20.0 µs");
        assert_eq!(r.value_text(), "2.00 GB/s");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&[
            ["a".to_string(), "bb".into()],
            ["ccc".to_string(), "d".into()],
        ]);
        assert_eq!(t, "a    bb\n-------\nccc  d\n");
    }
}
