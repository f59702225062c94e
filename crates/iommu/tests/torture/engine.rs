//! The engine: sets up the region, the mirrors and the threads, runs until the stop condition,
//! tears everything down and checks what must be back where it started. [`run`] is what the CI
//! test and the soak both call.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use svmirror_core::{Event, NotifierRange, Range};
use svmirror_iommu::{IommuMirror, MirrorConfig};
use svmirror_mm::{ProcessMm, VM_PIN_SETTLE, settled_vm_pinned_bytes, vm_pinned_bytes};

use crate::model::{BASE, Map, REGION_LEN, Region, Tags, lock};
use svmirror_testsupport::Rng;

/// A CPU change operation (see the module documentation of `main.rs` for what each does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Munmap,
    MmapFixed,
    MremapMove,
    MremapGrow,
    MremapDontunmap,
    MadvDontneed,
    MadvFree,
    ApiMunmap,
    ApiMadvise,
    ApiMremap,
    ApiMprotect,
    Heap,
}

/// Every operation, its name and its weight in the full mix.
const OPS: [(Op, &str, u32); 12] = [
    (Op::Munmap, "munmap", 3),
    (Op::MmapFixed, "mmap-fixed", 2),
    (Op::MremapMove, "mremap-move", 2),
    (Op::MremapGrow, "mremap-grow", 2),
    (Op::MremapDontunmap, "mremap-dontunmap", 1),
    (Op::MadvDontneed, "madv-dontneed", 3),
    (Op::MadvFree, "madv-free", 2),
    (Op::ApiMunmap, "api-munmap", 2),
    (Op::ApiMadvise, "api-madvise", 2),
    (Op::ApiMremap, "api-mremap", 1),
    (Op::ApiMprotect, "api-mprotect", 3),
    (Op::Heap, "heap", 3),
];

/// Named mixes, for `SVMIRROR_TORTURE_MIX`.
pub const PRESETS: [(&str, &str); 6] = [
    ("full", "every operation, the default"),
    (
        "api",
        "api-munmap,api-madvise,api-mremap,api-mprotect: all bracketed, must pass",
    ),
    ("plain-munmap", "munmap,mmap-fixed"),
    ("mremap", "mremap-move,mremap-grow,mremap-dontunmap"),
    ("madvise", "madv-dontneed,madv-free"),
    ("heap", "heap"),
];

impl Op {
    pub fn name(self) -> &'static str {
        OPS.iter()
            .find(|o| o.0 == self)
            .expect("every op is listed")
            .1
    }

    fn index(self) -> usize {
        OPS.iter().position(|o| o.0 == self).expect("listed")
    }
}

/// The operations the CPU threads choose from, with weights. Mapping an unmapped slot again
/// (a refill, `mmap` into the hole) is part of every mix.
#[derive(Clone, Debug)]
pub struct Mix {
    pub name: String,
    ops: Vec<(Op, u32)>,
}

impl Mix {
    pub fn full() -> Self {
        Mix {
            name: "full".into(),
            ops: OPS.iter().map(|o| (o.0, o.2)).collect(),
        }
    }

    /// A preset name or a comma-separated list of operation names.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let list = match s {
            "full" => return Ok(Self::full()),
            "api" => "api-munmap,api-madvise,api-mremap,api-mprotect",
            "plain-munmap" => "munmap,mmap-fixed",
            "mremap" => "mremap-move,mremap-grow,mremap-dontunmap",
            "madvise" => "madv-dontneed,madv-free",
            other => other,
        };
        let mut ops = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let o = OPS.iter().find(|o| o.1 == name).ok_or_else(|| {
                let names: Vec<&str> = OPS.iter().map(|o| o.1).collect();
                let presets: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
                format!(
                    "unknown operation {name:?}: a preset ({}) or a list of {}",
                    presets.join(", "),
                    names.join(", ")
                )
            })?;
            ops.push((o.0, o.2));
        }
        if ops.is_empty() {
            return Err("empty operation mix".into());
        }
        Ok(Mix {
            name: s.into(),
            ops,
        })
    }

    pub fn has(&self, op: Op) -> bool {
        self.ops.iter().any(|o| o.0 == op)
    }

    pub fn pick(&self, rng: &mut Rng) -> Op {
        let total: u32 = self.ops.iter().map(|o| o.1).sum();
        let mut x = rng.below(total as usize) as u32;
        for &(op, w) in &self.ops {
            if x < w {
                return op;
            }
            x -= w;
        }
        unreachable!("the weights add up")
    }
}

/// When a run stops.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// Once the device threads have done this many operations; a failure if `limit` passes
    /// first.
    Ops { ops: u64, limit: Duration },
    /// After this long.
    Time(Duration),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub stop: Stop,
    pub cpu_threads: usize,
    pub device_threads: usize,
    pub mix: Mix,
    /// No progress by one thread for this long fails the run, naming what it was doing.
    pub watchdog: Duration,
    /// Device operations per CPU change: the CPU threads wait for the devices to keep this
    /// ratio.
    pub ops_per_change: u64,
}

/// A heap vector the device reads through its pointer.
#[derive(Default)]
pub struct HeapRec {
    pub vec: Vec<u64>,
    pub tag: u64,
    /// Bumped at every free/reallocation.
    pub gen_: u64,
}

/// Slots changed a moment ago: where device threads look for stale translations.
pub struct Hot {
    ring: [AtomicUsize; 16],
    next: AtomicUsize,
}

impl Hot {
    fn new() -> Self {
        Hot {
            ring: std::array::from_fn(|_| AtomicUsize::new(usize::MAX)),
            next: AtomicUsize::new(0),
        }
    }

    pub fn push(&self, slot: usize) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.ring.len();
        self.ring[i].store(slot, Ordering::Relaxed);
    }

    pub fn pick(&self, rng: &mut Rng) -> Option<usize> {
        let v = self.ring[rng.below(self.ring.len())].load(Ordering::Relaxed);
        (v != usize::MAX).then_some(v)
    }
}

/// A thread's heartbeat and what it is doing, for the watchdog.
pub struct Progress {
    pub name: String,
    op: Mutex<String>,
    beat: AtomicU64,
    epoch: Instant,
}

impl Progress {
    fn new(name: String, epoch: Instant) -> Self {
        Progress {
            name,
            op: Mutex::new("starting".into()),
            beat: AtomicU64::new(0),
            epoch,
        }
    }

    /// Records progress and what the thread does next.
    pub fn set(&self, what: std::fmt::Arguments<'_>) {
        let mut op = lock(&self.op);
        op.clear();
        let _ = op.write_fmt(what);
        drop(op);
        self.touch();
    }

    pub fn beat(&self, what: &str) {
        let mut op = lock(&self.op);
        op.clear();
        op.push_str(what);
        drop(op);
        self.touch();
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.beat.store(ms, Ordering::Relaxed);
    }

    fn stalled(&self) -> Duration {
        let ms = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(ms.saturating_sub(self.beat.load(Ordering::Relaxed)))
    }

    fn line(&self) -> String {
        format!(
            "{} (no progress for {:.1?}): {}",
            self.name,
            self.stalled(),
            lock(&self.op)
        )
    }
}

#[derive(Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub heap_reads: AtomicU64,
    pub heap_raced: AtomicU64,
    /// CPU operations started (changes, and picks of a busy slot).
    pub attempts: AtomicU64,
    pub stale: AtomicU64,
    /// Stale reads by the operation that ended the tag read.
    pub stale_by: Mutex<BTreeMap<&'static str, u64>>,
    pub lost: AtomicU64,
    changes: [AtomicU64; OPS.len()],
    refills: AtomicU64,
    /// (what, root cause) → count.
    refusals: Mutex<BTreeMap<(String, String), u64>>,
}

impl Stats {
    pub fn ops(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
            + self.writes.load(Ordering::Relaxed)
            + self.heap_reads.load(Ordering::Relaxed)
    }

    pub fn refusal(&self, what: &str, kind: String) {
        *lock(&self.refusals)
            .entry((what.to_string(), kind))
            .or_default() += 1;
    }
}

/// Everything the threads share.
pub struct Shared {
    pub cfg: Config,
    pub region: Region,
    pub mm: Arc<ProcessMm>,
    pub heap: Vec<Mutex<HeapRec>>,
    pub hot: Hot,
    pub stop: AtomicBool,
    pub stats: Stats,
    pub progress: Vec<Progress>,
    /// (kind, message) of the first failures, and the count of each kind.
    failures: Mutex<(Vec<String>, BTreeMap<&'static str, u64>)>,
}

/// Failure messages kept for the report, of each kind.
const KEPT_FAILURES: u64 = 4;

impl Shared {
    /// Records a failure. A device failure (not a refusal: the engine died or hung, a transfer
    /// failed) ends the run: the device refuses everything after it.
    pub fn fail(&self, kind: &'static str, msg: String) {
        if kind == "device" {
            self.stop.store(true, Ordering::Relaxed);
        }
        let mut f = lock(&self.failures);
        let n = f.1.entry(kind).or_default();
        *n += 1;
        if *n <= KEPT_FAILURES {
            f.0.push(format!("[{kind}] {msg}"));
        }
    }

    pub fn count(&self, op: Op) {
        self.stats.changes[op.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_refill(&self) {
        self.stats.refills.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a run did and found.
pub struct Report {
    pub summary: String,
    pub ops: u64,
    /// Failure counts by kind, and the first messages.
    pub failure_counts: BTreeMap<&'static str, u64>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn failed(&self) -> bool {
        !self.failure_counts.is_empty()
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// The watchdog: a thread of its own, so that it also catches a hang of the main thread in
/// setup or teardown. On a stall it writes the report straight to stderr (past the test
/// harness's capture), sets `tripped` for the main thread to fail the test with, and if the
/// main thread does not end the process within a few seconds (it is the one hung), exits.
struct Watchdog {
    tripped: Arc<Mutex<Option<String>>>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(sh: Arc<Shared>, main: Arc<Progress>, limit: Duration) -> Self {
        let tripped = Arc::new(Mutex::new(None));
        let done = Arc::new(AtomicBool::new(false));
        let (t2, d2) = (tripped.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("torture-watchdog".into())
            .spawn(move || {
                while !d2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let all = std::iter::once(&*main).chain(sh.progress.iter());
                    let stuck: Vec<&Progress> = all
                        .filter(|p| !p.name.is_empty() && p.stalled() > limit)
                        .filter(|p| !lock(&p.op).starts_with("finished"))
                        .collect();
                    if stuck.is_empty() {
                        continue;
                    }
                    let mut msg = format!(
                        "torture watchdog: no progress for {limit:?} (seed {:#x}, mix {}); \
                         blocked: {}\nevery thread:\n",
                        sh.cfg.seed,
                        sh.cfg.mix.name,
                        stuck
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    for p in std::iter::once(&*main).chain(sh.progress.iter()) {
                        let _ = writeln!(msg, "  {}", p.line());
                    }
                    let _ = writeln!(msg, "mm: {:?}", sh.mm.stats());
                    let (kinds, first) = {
                        let f = lock(&sh.failures);
                        (f.1.clone(), f.0.clone())
                    };
                    let _ = writeln!(msg, "failures so far: {kinds:?}");
                    for f in first {
                        let _ = writeln!(msg, "  {f}");
                    }
                    msg.push_str(&kernel_stacks());
                    let _ = std::io::stderr().write_all(msg.as_bytes());
                    if std::env::var_os("SVMIRROR_TORTURE_GDB").is_some() {
                        let _ = std::io::stderr().write_all(gdb_backtraces().as_bytes());
                    }
                    *lock(&t2) = Some(msg);
                    sh.stop.store(true, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_secs(5));
                    if !d2.load(Ordering::Relaxed) {
                        let _ = std::io::stderr()
                            .write_all(b"torture watchdog: the main thread is stuck too: exit\n");
                        std::process::exit(101);
                    }
                    return;
                }
            })
            .expect("spawn the watchdog");
        Watchdog {
            tripped,
            done,
            thread: Some(thread),
        }
    }

    fn tripped(&self) -> Option<String> {
        lock(&self.tripped).clone()
    }

    fn finish(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every thread of this process with its kernel wait channel and, where readable (root), its
/// kernel stack: where a hang is stuck in a system call (a munmap waiting for the userfaultfd
/// monitor, a fault waiting on a page).
fn kernel_stacks() -> String {
    let mut out = String::from("threads (name, kernel wait channel, kernel stack):\n");
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in dir.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} {}: {}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim()
        );
        // The system call and its arguments: for a futex wait, the lock's address and the
        // mapping it lies in (a glibc arena, the heap, libc's data for main_arena).
        let sc = read("syscall");
        let f: Vec<&str> = sc.split_whitespace().collect();
        if f.first() == Some(&"202") {
            let addr = f
                .get(1)
                .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0);
            let _ = writeln!(out, "      futex {addr:#x} in {}", mapping_of(addr));
        } else if !sc.trim().is_empty() {
            let _ = writeln!(out, "      syscall {}", sc.trim());
        }
        for line in read("stack").lines().take(12) {
            let _ = writeln!(out, "      {line}");
        }
    }
    out
}

/// The /proc/self/maps line of the mapping holding `addr`.
fn mapping_of(addr: u64) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for line in maps.lines() {
        let Some((range, _)) = line.split_once(' ') else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if (a..b).contains(&addr) {
            return line.to_string();
        }
    }
    "no mapping".into()
}

/// User-space backtraces of every thread, from gdb (`SVMIRROR_TORTURE_GDB=1`), killed after
/// 20 s: gdb stops every thread, the userfaultfd monitor included, and cannot stop a thread
/// that waits in munmap or madvise for that monitor, so it may never finish by itself.
fn gdb_backtraces() -> String {
    // SAFETY: PR_SET_PTRACER with an integer argument only changes who may attach to us.
    unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
    let pid = std::process::id().to_string();
    match std::process::Command::new("timeout")
        .args(["-s", "KILL", "20", "gdb", "-p", &pid, "-batch", "-nx"])
        .args(["-ex", "thread apply all bt 30"])
        .output()
    {
        Ok(o) => format!("gdb:\n{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => format!("gdb: {e}\n"),
    }
}

/// Runs the torture test with `cfg` and returns what it found. Panics on a hang (watchdog) and
/// on setup failures.
pub fn run(cfg: Config) -> Report {
    let started = Instant::now();
    let pinned = vm_pinned_bytes().expect("VmPin readable");
    let mm = Arc::new(ProcessMm::new().expect("userfaultfd available (run as root)"));
    let region = Region::new(cfg.device_threads);

    // Reserve the region, then map every slot into it.
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the address is the
    // test's own, far from where the kernel places mappings.
    let p = unsafe {
        libc::mmap(
            BASE as *mut libc::c_void,
            REGION_LEN as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, BASE, "{}", os_err("reserving the region"));

    let epoch = Instant::now();
    let mut progress = Vec::new();
    for t in 0..cfg.cpu_threads {
        progress.push(Progress::new(format!("cpu thread {t}"), epoch));
    }
    for t in 0..cfg.device_threads {
        progress.push(Progress::new(format!("device thread {t}"), epoch));
    }
    let heap = (0..8).map(|_| Mutex::new(HeapRec::default())).collect();
    let sh = Arc::new(Shared {
        cfg: cfg.clone(),
        region,
        mm: mm.clone(),
        heap,
        hot: Hot::new(),
        stop: AtomicBool::new(false),
        stats: Stats::default(),
        progress,
        failures: Mutex::new((Vec::new(), BTreeMap::new())),
    });
    let main = Arc::new(Progress::new("main thread".into(), epoch));
    let watchdog = Watchdog::start(sh.clone(), main.clone(), cfg.watchdog);

    main.beat("setup: mapping the slots");
    for slot in &sh.region.slots {
        let mut st = lock(&slot.owner);
        let tag = sh.region.tags.next(Tags::SLOT);
        let plan = [crate::model::Plan::new(slot, &[], &[tag])];
        let b = sh.region.begin("setup", &plan);
        // SAFETY: maps over the test's own reservation; nothing refers into it.
        let q = unsafe {
            libc::mmap(
                slot.start as *mut libc::c_void,
                slot.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        assert_eq!(q as u64, slot.start, "{}", os_err("mapping a slot"));
        crate::cpu::write_tag(slot.start, slot.len, tag);
        st.map = Map::ReadWrite;
        sh.region.end("setup", &plan, b, &mut [&mut st]);
    }
    for rec in &sh.heap {
        let mut r = lock(rec);
        r.tag = sh.region.tags.next(Tags::HEAP);
        r.vec = vec![r.tag; 1024];
    }

    main.beat("setup: opening the mirrors");
    let mirrors: Vec<Arc<IommuMirror>> = (0..cfg.device_threads)
        .map(|_| {
            let range = Range::new(4096, 1 << 47).expect("user space");
            // SAFETY: device writes land only in the region's slots (write leases), which the
            // CPU touches through raw pointers only.
            let m = unsafe { IommuMirror::new(mm.clone(), range, MirrorConfig::checked()) };
            Arc::new(m.expect("mirror"))
        })
        .collect();

    main.beat("running");
    let run_start = Instant::now();
    let mut timed_out = false;
    let mut threads = Vec::new();
    for t in 0..cfg.cpu_threads {
        let sh = sh.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("torture-cpu{t}"))
                .spawn(move || crate::cpu::cpu_thread(&sh, t))
                .expect("spawn"),
        );
    }
    for (t, m) in mirrors.iter().enumerate() {
        let (sh, m) = (sh.clone(), m.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("torture-dev{t}"))
                .spawn(move || crate::device::device_thread(&sh, t, &m))
                .expect("spawn"),
        );
    }
    loop {
        std::thread::sleep(Duration::from_millis(50));
        main.beat("running: waiting for the stop condition");
        if let Some(msg) = watchdog.tripped() {
            // The blocked threads will not join: leave them (and the process) as they are.
            std::mem::forget(threads);
            panic!("{msg}");
        }
        let done = match cfg.stop {
            Stop::Ops { ops, limit } => {
                timed_out = run_start.elapsed() > limit;
                sh.stats.ops() >= ops || timed_out
            }
            Stop::Time(d) => run_start.elapsed() >= d,
        };
        if done || threads.iter().any(|t| t.is_finished()) {
            break;
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    main.beat("running: joining the threads");
    for t in threads {
        if t.join().is_err() {
            sh.fail(
                "panic",
                "a worker thread panicked (see its message above)".into(),
            );
        }
    }
    let ran = run_start.elapsed();
    if let Some(msg) = watchdog.tripped() {
        panic!("{msg}");
    }
    if let (Stop::Ops { ops, limit }, true) = (cfg.stop, timed_out) {
        sh.fail(
            "too-slow",
            format!(
                "only {} device operations in {limit:?}, {ops} wanted",
                sh.stats.ops()
            ),
        );
    }

    main.beat("teardown: IOTLB violations");
    for (i, m) in mirrors.iter().enumerate() {
        let (v, total) = m.violations();
        if total > 0 {
            sh.fail(
                "iotlb-violation",
                format!("mirror {i}: {total} IOTLB violations: {v:?}"),
            );
        }
    }
    let mm_stats = mm.stats();
    let mirror_stats: Vec<String> = mirrors.iter().map(|m| format!("{:?}", m.stats())).collect();

    main.beat("teardown: freeing the heap vectors");
    for rec in &sh.heap {
        lock(rec).vec = Vec::new();
    }
    main.beat("teardown: unmapping the slots through the SVM API");
    for slot in &sh.region.slots {
        if lock(&slot.owner).mapped() {
            let r = Range::with_len(slot.start, slot.len).expect("slot");
            // SAFETY: nothing refers into the region; every thread that touched it has ended.
            if let Err(e) = unsafe { mm.munmap(r) } {
                sh.fail(
                    "teardown",
                    format!("api munmap of slot {}: {e}", slot.index),
                );
            }
        }
    }
    // SAFETY: unmaps what is left of the test's own region (holes).
    let rc = unsafe { libc::munmap(BASE as *mut libc::c_void, REGION_LEN as usize) };
    assert_eq!(rc, 0, "{}", os_err("munmap of the region"));
    let region = Range::with_len(BASE, REGION_LEN).expect("region");
    for (i, m) in mirrors.iter().enumerate() {
        let left = m.mmu().with(|s| s.page_table().leaves(region));
        if !left.is_empty() {
            sh.fail(
                "leak",
                format!(
                    "mirror {i}: {} IO page-table leaves left in the unmapped region, first {:?}",
                    left.len(),
                    left[0]
                ),
            );
        }
    }
    main.beat("teardown: invalidating everything");
    let all = Range::new(4096, 1 << 47).expect("user space");
    mm.notifier()
        .invalidate_range_start(NotifierRange::new(all, Event::Clear))
        .expect("invalidate everything")
        .end();
    for (i, m) in mirrors.iter().enumerate() {
        let c = m.counters();
        let live = m.pins().live();
        if c.bytes_mapped != c.bytes_unmapped || live != 0 {
            sh.fail(
                "leak",
                format!(
                    "mirror {i}: after invalidating everything, {} bytes mapped, {} torn down, \
                     {live} pins live",
                    c.bytes_mapped, c.bytes_unmapped
                ),
            );
        }
    }
    main.beat("teardown: dropping the mirrors and the mm");
    drop(mirrors);
    drop(mm);
    main.beat("teardown: waiting for VmPin to settle");
    let now = settled_vm_pinned_bytes(pinned, VM_PIN_SETTLE).expect("VmPin readable");
    if now != pinned {
        sh.fail(
            "leak",
            format!("VmPin is {now} bytes after teardown, {pinned} before"),
        );
    }
    main.beat("finished");
    watchdog.finish();

    let st = &sh.stats;
    let mut changes = String::new();
    for (op, name, _) in OPS {
        let n = st.changes[op.index()].load(Ordering::Relaxed);
        if n > 0 {
            let _ = write!(changes, "{name} {n}, ");
        }
    }
    let _ = write!(changes, "refill {}", st.refills.load(Ordering::Relaxed));
    let refusals: Vec<String> = lock(&st.refusals)
        .iter()
        .map(|((what, why), n)| format!("{what}: {why}: {n}"))
        .collect();
    let (failures, counts) = std::mem::take(&mut *lock(&sh.failures));
    let ops = st.ops();
    let summary = format!(
        "torture: seed {:#x}, mix {}, {} cpu + {} device threads: {ops} device ops in {:.1}s \
         ({} reads, {} write leases, {} heap reads, {} of them raced a free); changes: \
         {changes}; refusals: [{}]; stale reads {} (by the operation that ended the tag: {:?}), lost writes {}; failures {:?}; total \
         {:.1}s; mm {mm_stats:?}; mirrors {}",
        cfg.seed,
        cfg.mix.name,
        cfg.cpu_threads,
        cfg.device_threads,
        ran.as_secs_f64(),
        st.reads.load(Ordering::Relaxed),
        st.writes.load(Ordering::Relaxed),
        st.heap_reads.load(Ordering::Relaxed),
        st.heap_raced.load(Ordering::Relaxed),
        refusals.join("; "),
        st.stale.load(Ordering::Relaxed),
        lock(&st.stale_by),
        st.lost.load(Ordering::Relaxed),
        counts,
        started.elapsed().as_secs_f64(),
        mirror_stats.join(", ")
    );
    Report {
        summary,
        ops,
        failure_counts: counts,
        failures,
    }
}
