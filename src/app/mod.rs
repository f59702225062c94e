//! The example SVM compute app: a device works on data structures the CPU built with ordinary
//! Rust allocations, by pointer, with no copies and no registration calls in the application
//! code, and every result is checked against a CPU reference.
//!
//! | app | what the device does | what it shows |
//! |---|---|---|
//! | [`bfs`] | breadth-first search over nodes whose adjacency lists are ordinary `Vec`s of node pointers | pointer chasing through the mirror |
//! | [`saxpy`] | `y = a·x + y` over two large `Vec<f32>` | streaming throughput |
//! | [`churn`] | sums slots and writes the sum back while another thread frees, reallocates, munmaps, madvises and mprotects the other slots | coherence: a stale translation shows as a mismatch |
//!
//! The apps run on a [`Backend`]: a device that mirrors this process's address space through
//! one [`ProcessMm`]. [`sim::SimBackend`] (the simulated IOMMU) implements it here; the Vulkan
//! and VFIO backends implement the same trait. [`open_backend`] picks one by [`BackendKind`]
//! and says, as an [`AppError::BackendUnavailable`], what a missing one needs.
//!
//! # What is the caller's job
//!
//! - **One [`ProcessMm`] per process**, shared by every backend and by the CPU side's churn:
//!   the SVM API calls that churn makes must reach the notifier the backend subscribed to.
//! - **Nothing else touches the apps' data** while they run: the device writes it behind Rust's
//!   back (the apps read it through raw pointers only).

pub mod bfs;
pub mod churn;
pub mod report;
pub mod saxpy;
pub mod sim;
pub mod vfio;
pub mod vulkan;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use svmirror_core::{CounterSnapshot, Mirror};
use svmirror_mm::ProcessMm;

pub use report::{AppOutcome, RunReport};

/// Why an app or a backend could not run. Every variant but [`Mismatch`](Self::Mismatch) and
/// [`Device`](Self::Device) is the user's input or the machine's setup: [`is_bad_input`]
/// says which.
///
/// [`is_bad_input`]: AppError::is_bad_input
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The backend cannot run on this machine or in this build.
    #[error("backend {backend} is not available: {missing}; {fix}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: BackendKind,
        /// What is missing.
        missing: String,
        /// How to get it.
        fix: String,
    },
    /// The data asked for does not fit in memory.
    #[error(
        "size {} does not fit in memory: the app needs about {} and {} is available; choose a smaller --size",
        human_bytes(*requested),
        human_bytes(*needed),
        human_bytes(*available)
    )]
    TooLarge {
        /// The `--size` asked for, in bytes.
        requested: u64,
        /// What the app would allocate for it.
        needed: u64,
        /// MemAvailable.
        available: u64,
    },
    /// A parameter is out of range.
    #[error("{what}")]
    BadParameter {
        /// What is wrong and what is allowed.
        what: String,
    },
    /// The device's result differs from the CPU reference.
    #[error("{app}: {count} mismatches against the CPU reference (first: {first})")]
    Mismatch {
        /// The app.
        app: &'static str,
        /// How many results differ.
        count: u64,
        /// The first one, described.
        first: String,
    },
    /// The device or the address space failed while an app ran.
    #[error("{app} on {backend}: {what}")]
    Device {
        /// The app.
        app: &'static str,
        /// The backend.
        backend: BackendKind,
        /// What failed.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl AppError {
    /// Whether the error is the user's input or the machine's setup (exit code 2), rather than
    /// a failure of svmirror (exit code 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            AppError::BackendUnavailable { .. }
                | AppError::TooLarge { .. }
                | AppError::BadParameter { .. }
        )
    }

    /// A [`Device`](Self::Device) error.
    pub fn device(
        app: &'static str,
        backend: BackendKind,
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> AppError {
        AppError::Device {
            app,
            backend,
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// The result of an app step.
pub type Result<T, E = AppError> = std::result::Result<T, E>;

/// The device backends the app knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The simulated IOMMU and its DMA device (runs everywhere: the default).
    Sim,
    /// A Vulkan device (Mesa lavapipe or a GPU) with VK_EXT_external_memory_host.
    Vulkan,
    /// A DMA-capable PCI device behind a real IOMMU, through VFIO.
    Vfio,
}

impl BackendKind {
    /// Every backend, in the order `svmirror bench` tries them.
    pub const ALL: [BackendKind; 3] = [BackendKind::Sim, BackendKind::Vulkan, BackendKind::Vfio];

    /// The name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Sim => "sim",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Vfio => "vfio",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The apps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// Every app below, one after the other.
    All,
    /// Breadth-first search over a pointer-linked graph.
    Bfs,
    /// `y = a·x + y` over two large vectors.
    Saxpy,
    /// Slot sums while the CPU changes the other slots' memory.
    Churn,
}

impl AppKind {
    /// The apps `self` stands for, in run order.
    pub fn expand(self) -> &'static [AppKind] {
        match self {
            AppKind::All => &[AppKind::Bfs, AppKind::Saxpy, AppKind::Churn],
            AppKind::Bfs => &[AppKind::Bfs],
            AppKind::Saxpy => &[AppKind::Saxpy],
            AppKind::Churn => &[AppKind::Churn],
        }
    }

    /// The name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            AppKind::All => "all",
            AppKind::Bfs => "bfs",
            AppKind::Saxpy => "saxpy",
            AppKind::Churn => "churn",
        }
    }
}

/// How big the apps' data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AppConfig {
    /// Bytes of the two saxpy vectors together.
    pub saxpy_bytes: u64,
    /// Nodes of the BFS graph.
    pub nodes: u64,
    /// Mean out-degree of a BFS node.
    pub degree: u64,
    /// Churn rounds.
    pub rounds: u64,
    /// Churn slots (half worked on by the device, half changed by the CPU, each round).
    pub slots: u64,
    /// Seed of every random choice (graph shape, churn operations).
    pub seed: u64,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            saxpy_bytes: 64 << 20,
            nodes: 16_384,
            degree: 8,
            rounds: 24,
            slots: 32,
            seed: 0x5eed_2026,
        }
    }
}

impl AppConfig {
    /// Checks the parameters and that the data fits in the memory available now.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(AppError::BadParameter { what });
        if self.saxpy_bytes < 4096 {
            return bad(format!(
                "--size {} is too small: at least 4K",
                human_bytes(self.saxpy_bytes)
            ));
        }
        if self.nodes == 0 || self.nodes > 1 << 24 {
            return bad(format!(
                "--nodes {} is out of range: 1 to 16777216",
                self.nodes
            ));
        }
        if self.degree == 0 || self.degree > 64 {
            return bad(format!("--degree {} is out of range: 1 to 64", self.degree));
        }
        if self.slots < 2 || self.slots > 4096 || self.slots % 2 != 0 {
            return bad(format!(
                "--slots {} is out of range: an even number from 2 to 4096",
                self.slots
            ));
        }
        if self.rounds == 0 || self.rounds > 100_000 {
            return bad(format!(
                "--rounds {} is out of range: 1 to 100000",
                self.rounds
            ));
        }
        let needed = self.memory_needed();
        let available = mem_available();
        if needed > available {
            return Err(AppError::TooLarge {
                requested: self.saxpy_bytes,
                needed,
                available,
            });
        }
        Ok(())
    }

    /// About how many bytes the apps allocate at most: the saxpy vectors, the reference copy
    /// of `y` (half of them again), and the graph.
    pub fn memory_needed(&self) -> u64 {
        let graph = self.nodes.saturating_mul(24 + 8 * self.degree + 64);
        self.saxpy_bytes
            .saturating_mul(3)
            .div_ceil(2)
            .saturating_add(graph)
            .saturating_add(churn::MAX_SLOT_BYTES.saturating_mul(self.slots))
    }
}

/// What one device run did: its wall time and the device commands or dispatches it issued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeviceWork {
    /// Wall time of the run.
    #[serde(serialize_with = "report::ser_duration")]
    pub elapsed: Duration,
    /// Device commands (loads, stores, dispatches) issued.
    pub commands: u64,
    /// Bytes the device read.
    pub bytes_read: u64,
    /// Bytes the device wrote.
    pub bytes_written: u64,
    /// Page requests (device faults) raised.
    pub page_requests: u64,
}

impl DeviceWork {
    /// Adds `other` to `self`.
    pub fn add(&mut self, other: &DeviceWork) {
        self.elapsed += other.elapsed;
        self.commands += other.commands;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.page_requests += other.page_requests;
    }
}

/// A node of the BFS graph, as the CPU built it and the device reads it.
///
/// Each node is its own heap allocation; `edges` points at the data of an ordinary
/// `Vec<*const Node>` holding `degree` node pointers. The device writes `level`.
#[repr(C)]
#[derive(Debug)]
pub struct Node {
    /// BFS level from the root, [`bfs::UNVISITED`] until the device reaches the node.
    pub level: u64,
    /// Number of out-edges.
    pub degree: u64,
    /// The adjacency list: `degree` pointers to nodes.
    pub edges: *const *const Node,
}

/// A churn slot as the device sees it in the slot table: where the slot's words are and how
/// many there are. The device sums words `0..words - 1` and stores the sum in the last one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRef {
    /// Address of the first word (0: the slot is empty this round).
    pub addr: u64,
    /// Number of u64 words, the last one being the result.
    pub words: u64,
}

/// What the device did with one churn slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotResult {
    /// It summed the slot and stored the sum (which it returns).
    Stored(u64),
    /// An access was refused (the address is read-only or not mapped for the device).
    Refused {
        /// The address the device could not access.
        addr: u64,
    },
}

/// A progress callback: `(done, total)` in the app's own unit.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// A device that mirrors this process's address space and runs the apps' kernels on CPU
/// pointers. Object safe: the app holds a `Box<dyn Backend>`.
///
/// Every method works on memory the CPU allocated, at the CPU's addresses: the backend faults
/// what it touches into its own page table through the core, and keeps it coherent through the
/// [`ProcessMm`]'s notifier.
pub trait Backend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The device, in words (for the report).
    fn device(&self) -> String;

    /// Breadth-first search from `root`: writes every reachable node's level from the root
    /// into its `level` field (which must be [`bfs::UNVISITED`] on entry for every node) and
    /// returns the number of nodes reached.
    ///
    /// # Safety
    ///
    /// `root` and every node reachable from it are valid [`Node`]s whose `edges` point at
    /// `degree` valid node pointers, and nothing accesses them during the call.
    unsafe fn bfs(&self, root: *const Node, progress: Progress<'_>) -> Result<(u64, DeviceWork)>;

    /// `y[i] = a * x[i] + y[i]` for `i < n`.
    ///
    /// # Safety
    ///
    /// `x` and `y` point at `n` valid f32s each, not overlapping, and nothing accesses `y`
    /// during the call.
    unsafe fn saxpy(
        &self,
        a: f32,
        x: *const f32,
        y: *mut f32,
        n: usize,
        progress: Progress<'_>,
    ) -> Result<DeviceWork>;

    /// For each of the `n` entries of the slot table at `table`: loads the entry, sums the
    /// slot's words but the last (wrapping), and stores the sum in the last word. A slot whose
    /// access the device is refused (read-only memory, nothing mapped) is reported as
    /// [`SlotResult::Refused`] and the next slot is worked on.
    ///
    /// # Safety
    ///
    /// `table` points at `n` [`SlotRef`]s, and nothing writes them or the slots they point at
    /// during the call (other memory may change).
    unsafe fn sum_slots(
        &self,
        table: *const SlotRef,
        n: usize,
    ) -> Result<(Vec<SlotResult>, DeviceWork)>;

    /// The backend's mirrors of this address space, as the core's one contract: every
    /// backend's counters, translations and faults are read through these. Most backends have
    /// one; VFIO has one per IOVA window.
    fn mirrors(&self) -> Vec<&dyn Mirror>;

    /// The mirrors' counters together (faults by size, retries, invalidations by reason,
    /// bytes mapped, fault latency).
    fn counters(&self) -> CounterSnapshot {
        let mut c = CounterSnapshot::default();
        for m in self.mirrors() {
            c.add(&m.counters());
        }
        c
    }

    /// The backend's own micro-benchmarks, each against its baseline (fault → replay latency,
    /// DMA copy rate): see `svmirror bench`.
    fn micro_benchmarks(&self, quick: bool) -> Result<Vec<report::Figure>>;
}

/// Opens backend `kind` on `mm`'s address space with the default [`BackendOptions`], or says
/// what it needs.
pub fn open_backend(kind: BackendKind, mm: &Arc<ProcessMm>) -> Result<Box<dyn Backend>> {
    open_backend_with(kind, mm, &BackendOptions::default())
}

/// The options of backends that have some.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// VFIO: the PCI device to drive (an address such as `0000:00:04.0`, or its sysfs
    /// path): an NVMe controller or QEMU's edu device. Default: the first NVMe controller
    /// bound to vfio-pci, else the first edu device.
    pub vfio_device: Option<String>,
    /// VFIO on NVMe: let the apps overwrite the first blocks of the namespace of a controller
    /// that is not QEMU's emulated one (they are refused with a typed error otherwise).
    pub nvme_allow_write: bool,
}

/// Opens backend `kind` on `mm`'s address space with `options`, or says what it needs.
pub fn open_backend_with(
    kind: BackendKind,
    mm: &Arc<ProcessMm>,
    options: &BackendOptions,
) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Sim => Ok(Box::new(sim::SimBackend::open(mm.clone())?)),
        BackendKind::Vulkan => Ok(Box::new(vulkan::VulkanBackend::open(mm.clone())?)),
        BackendKind::Vfio => vfio::open(
            mm.clone(),
            options.vfio_device.as_deref(),
            options.nvme_allow_write,
        ),
    }
}

/// Opens the process's address space monitor, or says what it needs.
pub fn open_mm() -> Result<Arc<ProcessMm>> {
    ProcessMm::new().map(Arc::new).map_err(|e| {
        AppError::BackendUnavailable {
            backend: BackendKind::Sim,
            missing: format!("userfaultfd is not usable ({})", error_chain(&e)),
            fix: "run as root, or allow it: sysctl vm.unprivileged_userfaultfd=1 (or access to /dev/userfaultfd); see svmirror info".into(),
        }
    })
}

/// Runs `apps` on `backend` and checks every result.
pub fn run_apps(
    backend: &dyn Backend,
    mm: &Arc<ProcessMm>,
    apps: &[AppKind],
    config: &AppConfig,
    progress: &dyn report::ProgressFactory,
) -> Result<RunReport> {
    let before = backend.counters();
    let mm_before = mm.stats();
    let mut outcomes = Vec::new();
    for app in apps {
        let outcome = match app {
            AppKind::Bfs => bfs::run(backend, config, progress)?,
            AppKind::Saxpy => saxpy::run(backend, config, progress)?,
            AppKind::Churn => churn::run(backend, mm, config, progress)?,
            AppKind::All => continue,
        };
        outcomes.push(outcome);
    }
    Ok(RunReport::new(
        backend,
        config,
        outcomes,
        backend.counters().since(&before),
        &mm_before,
        &mm.stats(),
    ))
}

/// `e` with its chain of causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The median of `v`, in seconds (0 for none): what the backends' micro-benchmarks report.
pub(crate) fn median(v: Vec<Duration>) -> f64 {
    percentile(v, 50)
}

/// The `p`th percentile of `v` (nearest rank), in seconds (0 for none).
pub(crate) fn percentile(mut v: Vec<Duration>, p: usize) -> f64 {
    v.sort();
    let i = (v.len() * p.min(100) / 100).min(v.len().saturating_sub(1));
    v.get(i).map_or(0.0, Duration::as_secs_f64)
}

/// MemAvailable from /proc/meminfo, in bytes (`u64::MAX` when it cannot be read).
pub fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb.saturating_mul(1024))
}

/// `bytes` with a binary unit: `512 B`, `4.0 KiB`, `64.0 MiB`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Parses a size: a number with an optional binary suffix (`K`, `M`, `G`, `T`, optionally
/// followed by `iB` or `B`): `4096`, `64M`, `1.5G`, `512KiB`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: use a number with an optional K, M, G or T suffix, e.g. 64M"
            ));
        }
    };
    let v: f64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: use a number with an optional K, M, G or T suffix, e.g. 64M")
    })?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("invalid size {s:?}: must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// splitmix64: small, deterministic, good enough for graph shapes and churn choices.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("2 K"), Ok(2048));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("-5M").is_err());
    }

    #[test]
    fn a_size_past_memory_is_too_large_and_bad_input() {
        let c = AppConfig {
            saxpy_bytes: 1 << 60,
            ..AppConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(matches!(e, AppError::TooLarge { .. }), "{e}");
        assert!(e.is_bad_input());
        assert!(e.to_string().contains("choose a smaller --size"), "{e}");
    }

    #[test]
    fn odd_slot_counts_are_refused() {
        let c = AppConfig {
            slots: 3,
            ..AppConfig::default()
        };
        assert!(matches!(c.validate(), Err(AppError::BadParameter { .. })));
    }

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
