//! The command line: argument parsing (clap), tracing, progress bars, and turning every error
//! into one line and an exit code.

mod bench;
mod info;
mod progress;
mod svg;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand};
use svmirror::app::{self, AppConfig, AppError, AppKind, BackendKind};

const ABOUT: &str = "Userspace shared virtual memory: a device works on this process's ordinary memory, by pointer, while svmirror keeps the device's page table an exact mirror of the CPU's.";

const LONG_ABOUT: &str = "\
Userspace shared virtual memory: a device works on this process's ordinary memory, by pointer, \
while svmirror keeps the device's page table an exact mirror of the CPU's.

With no command, svmirror runs the example SVM compute app on the simulated IOMMU (the same as \
`svmirror run`): a breadth-first search chasing pointers through Vecs the CPU built, a saxpy \
streaming over two large vectors, and a churn test in which a CPU thread frees, reallocates, \
unmaps and protects memory while the device works. Every device result is checked against a \
CPU reference, and the mirror's counters are printed: faults by size, retries, invalidations by \
reason, pages mapped, fault latency.";

const AFTER_HELP: &str = "\
Examples:
  svmirror                         run every app on the simulated IOMMU
  svmirror run bfs --nodes 100000  one app, a bigger graph
  svmirror run --json              the report as JSON
  svmirror info                    what this machine offers, and what to do about what is missing
  svmirror bench --svg ratios.svg  the benchmark table, and a chart of the ratios

Exit status: 0 all results matched; 1 a result differed or a device failed; 2 bad input \
(unknown app or backend, a backend this machine lacks, a size that does not fit).
Logging: -v (debug), -vv (trace), or RUST_LOG=svmirror_iommu=trace and the like.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "svmirror",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    subcommand_negates_reqs = true,
    override_usage = "svmirror [OPTIONS] [APP]\n       svmirror <COMMAND> [OPTIONS]"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Options of `svmirror run`, for when no command is given.
    #[command(flatten)]
    run: RunArgs,
    /// Print tracing output on stderr: -v for debug, -vv for trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Draw no progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the example SVM compute app and check every result against the CPU (the default).
    #[command(long_about = "\
Run the example SVM compute app and check every result against the CPU (the default).

The device works on memory the CPU allocated with ordinary Rust allocations, at the CPU's own \
addresses: no copies, no registration calls. Apps:
  bfs    breadth-first search over nodes whose adjacency lists are Vecs of node pointers
  saxpy  y = a*x + y over two large Vec<f32> (--size bytes together)
  churn  the device sums slots while a CPU thread frees, reallocates, munmaps, madvises and
         mprotects the other slots, through the SVM API and through plain libc calls that
         userfaultfd reports; a stale translation would show as a mismatch
  all    every app above (the default)

Exit status 1 if any result differs from the CPU reference.")]
    Run(RunArgs),
    /// Say what this machine offers svmirror, and what to do about what is missing.
    #[command(long_about = "\
Say what this machine offers svmirror: the kernel, userfaultfd (features and privilege mode), \
PAGEMAP_SCAN and PROCMAP_QUERY, transparent huge pages, io_uring and locked-memory limits (the \
simulated IOMMU's pins), Vulkan drivers, and VFIO groups and devices. Each missing piece comes \
with what to do about it.")]
    Info(InfoArgs),
    /// Run the benchmarks of every available backend and print one table with baselines.
    #[command(long_about = "\
Run the benchmarks of every available backend and print one table: each figure next to its \
baseline measured in the same run (an access that is already mapped, memcpy, the same work on \
the CPU), the ratio (above 1: the device is faster), and the target where there is one.

  fault → replay   a device read that misses: page request, fault in, map, replay
  DMA copy         a device copy between pre-faulted buffers, against memcpy
  saxpy            the app's streaming kernel, against the CPU loop
  bfs              the app's pointer-chasing search, in edges per second, against the CPU")]
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// The app to run.
    #[arg(value_enum, default_value_t = AppKind::All)]
    app: AppKind,
    /// The device backend.
    #[arg(short, long, value_enum, default_value_t = BackendKind::Sim)]
    backend: BackendKind,
    /// Bytes of the saxpy vectors together (K, M, G suffixes).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    size: u64,
    /// Nodes of the BFS graph.
    #[arg(long, default_value_t = AppConfig::default().nodes)]
    nodes: u64,
    /// Mean out-degree of a BFS node.
    #[arg(long, default_value_t = AppConfig::default().degree)]
    degree: u64,
    /// Churn rounds (the halves swap every round).
    #[arg(long, default_value_t = AppConfig::default().rounds)]
    rounds: u64,
    /// Churn slots (an even number).
    #[arg(long, default_value_t = AppConfig::default().slots)]
    slots: u64,
    /// Seed of the graph's shape and the churn's choices.
    #[arg(long, default_value_t = AppConfig::default().seed)]
    seed: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vfio: VfioArgs,
}

/// The VFIO backend's device choice.
#[derive(Debug, Clone, Default, Args)]
struct VfioArgs {
    /// VFIO: the PCI device to drive, by address (0000:00:04.0, see lspci -D) or sysfs path:
    /// an NVMe controller or QEMU's edu device bound to vfio-pci. Default: the first NVMe
    /// controller bound to vfio-pci, else the first edu device.
    #[arg(long, value_name = "BDF")]
    vfio_device: Option<String>,
    /// VFIO on NVMe: let the app overwrite the first blocks of a real drive's namespace (its
    /// inputs make a round trip through them). Without it, writes to any controller but
    /// QEMU's emulated one are refused.
    #[arg(long)]
    nvme_allow_write: bool,
}

impl VfioArgs {
    fn options(&self) -> app::BackendOptions {
        app::BackendOptions {
            vfio_device: self.vfio_device.clone(),
            nvme_allow_write: self.nvme_allow_write,
        }
    }
}

impl RunArgs {
    fn config(&self) -> AppConfig {
        AppConfig {
            saxpy_bytes: self.size,
            nodes: self.nodes,
            degree: self.degree,
            rounds: self.rounds,
            slots: self.slots,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// Print the findings as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// A short run (seconds, smaller sizes and fewer iterations): for smoke tests, not figures.
    #[arg(long)]
    quick: bool,
    /// Measure only this backend (repeat for more); one that is not available here is an
    /// error. Default: every backend available here, the others listed as skipped.
    #[arg(short, long, value_enum)]
    backend: Vec<BackendKind>,
    /// Only the backends' own micro-benchmarks (fault latency, copy rate), not the apps.
    #[arg(long)]
    micro: bool,
    /// Write the figures as JSON to FILE, or to stdout with no FILE.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    json: Option<Option<PathBuf>>,
    /// Write a bar chart of the ratios as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    #[command(flatten)]
    vfio: VfioArgs,
}

fn parse_size(s: &str) -> Result<u64, String> {
    app::parse_size(s)
}

/// A failure of a command, with its exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// Bad input or a missing piece of the machine: exit code 2.
    pub(crate) fn bad_input(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 2,
        }
    }

    /// Something that ran failed: exit code 1.
    pub(crate) fn failed(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<AppError> for Failure {
    fn from(e: AppError) -> Failure {
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        Failure {
            message,
            code: if e.is_bad_input() { 2 } else { 1 },
        }
    }
}

/// One line for a command-line parse error: what was wrong and what is allowed.
fn parse_error_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_string();
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let mut line = match (e.kind(), e.get(ContextKind::InvalidValue)) {
        (ErrorKind::InvalidValue, Some(ContextValue::String(v))) if arg.contains("BACKEND") => {
            format!("unknown backend '{v}'")
        }
        (ErrorKind::InvalidValue, Some(ContextValue::String(v))) if arg.contains("APP") => {
            format!("unknown app '{v}'")
        }
        _ => first,
    };
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        line.push_str(&format!(" (choose one of: {})", valid.join(", ")));
    }
    line.push_str("; see svmirror --help");
    line
}

/// Parses the command line, runs the command, and maps every outcome to an exit code.
pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    eprintln!("svmirror: {}", parse_error_line(&e));
                    ExitCode::from(2)
                }
            };
        }
    };
    init_tracing(cli.verbose);
    let show_bars = !cli.quiet && cli.verbose == 0 && std::io::stderr().is_terminal();
    let result = match &cli.command {
        None => run(&cli.run, show_bars),
        Some(Command::Run(args)) => run(args, show_bars),
        Some(Command::Info(args)) => info::run(args.json),
        Some(Command::Bench(args)) => bench::run(
            args.quick,
            args.micro,
            &args.backend,
            args.json.as_ref(),
            args.svg.as_deref(),
            &args.vfio.options(),
            show_bars,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("svmirror: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "warn,svmirror=debug,svmirror_core=debug,svmirror_mm=debug,svmirror_iommu=debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
}

/// `svmirror run`.
fn run(args: &RunArgs, show_bars: bool) -> Result<(), Failure> {
    let config = args.config();
    config.validate()?;
    let mm = app::open_mm()?;
    let backend = app::open_backend_with(args.backend, &mm, &args.vfio.options())?;
    let _span = tracing::info_span!("svmirror.run", backend = %args.backend, app = args.app.name())
        .entered();
    if !args.json {
        println!(
            "svmirror: the example SVM compute app on the {} backend",
            args.backend
        );
        println!(
            "  the device works on ordinary Rust allocations by pointer: no copies, no registration calls"
        );
        println!();
    }
    let bars = progress::Bars::new(show_bars && !args.json);
    let report = app::run_apps(&*backend, &mm, args.app.expand(), &config, &bars)?;
    if args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Failure::failed(format!("cannot write the report as JSON: {e}")))?;
        println!("{json}");
    } else {
        print!("{}", report.render());
    }
    report.result()?;
    Ok(())
}
