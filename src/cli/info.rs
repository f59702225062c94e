//! `svmirror info`: what this machine offers svmirror, found by asking the kernel (not by
//! reading version numbers), and for each missing piece what to do about it.

use std::ffi::CStr;
use std::path::Path;

use serde::Serialize;
use svmirror::app::{self, BackendKind, human_bytes};
use svmirror::mm::{ProcessMm, ProcessPageSource, UffdAccess};
use svmirror::mm::{memlock_limit, vm_pinned_bytes};

use super::Failure;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    /// Everything svmirror uses is there.
    Ok,
    /// It works, with less (a fallback, a limit).
    Limited,
    /// It is not there.
    Missing,
}

/// One finding.
#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
    /// What to do about it, when it is not `Ok`.
    fix: Option<String>,
}

/// Whether a backend can run here.
#[derive(Debug, Serialize)]
struct BackendInfo {
    name: &'static str,
    available: bool,
    detail: String,
}

/// Everything `svmirror info` reports.
#[derive(Debug, Serialize)]
struct Info {
    kernel: String,
    machine: String,
    cpus: usize,
    memory_total: u64,
    memory_available: u64,
    root: bool,
    checks: Vec<Check>,
    backends: Vec<BackendInfo>,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn meminfo(field: &str) -> u64 {
    read("/proc/meminfo")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn uname() -> (String, String) {
    // SAFETY: `utsname` is plain old data; all zeroes is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct we own.
    if unsafe { libc::uname(&mut u) } != 0 {
        return ("unknown".into(), "unknown".into());
    }
    let field = |f: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates every field within its array.
        unsafe { CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (
        format!("{} {}", field(&u.sysname), field(&u.release)),
        field(&u.machine),
    )
}

fn check(name: &'static str, status: Status, detail: String, fix: Option<&str>) -> Check {
    Check {
        name,
        status,
        detail,
        fix: if status == Status::Ok {
            None
        } else {
            fix.map(str::to_string)
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn userfaultfd(root: bool, checks: &mut Vec<Check>) -> bool {
    let unpriv = read("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_else(|| "?".into());
    let dev = Path::new("/dev/userfaultfd").exists();
    match ProcessMm::new() {
        Ok(mm) => {
            let f = mm.features();
            let (status, mode) = match f.access {
                UffdAccess::DevUserfaultfd => (Status::Ok, "full, through /dev/userfaultfd"),
                UffdAccess::Syscall => (Status::Ok, "full, through the syscall"),
                UffdAccess::UserModeOnly => (
                    Status::Limited,
                    "user-mode only: a kernel access to a page migrated to a device fails with EFAULT",
                ),
            };
            checks.push(check(
                "userfaultfd",
                status,
                format!(
                    "{mode}; features {}; vm.unprivileged_userfaultfd = {unpriv}; running as {}",
                    f.uffd_feature_names.join(" "),
                    if root { "root" } else { "a user" }
                ),
                Some("for full access run as root, or give access to /dev/userfaultfd (chmod or a udev rule), or sysctl vm.unprivileged_userfaultfd=1"),
            ));
            let ps = f.page_source;
            checks.push(check(
                "PROCMAP_QUERY",
                if ps.procmap_query {
                    Status::Ok
                } else {
                    Status::Limited
                },
                if ps.procmap_query {
                    "VMAs looked up with the ioctl".into()
                } else {
                    "missing: /proc/self/maps is parsed instead (slower faults)".into()
                },
                Some("needs Linux 6.11 or later"),
            ));
            checks.push(check(
                "PAGEMAP_SCAN",
                if ps.pagemap_scan {
                    Status::Ok
                } else {
                    Status::Limited
                },
                if ps.pagemap_scan {
                    "zero and huge pages recognised in snapshots".into()
                } else {
                    "missing: huge pages are mirrored as 4 KiB pages".into()
                },
                Some("needs Linux 6.7 or later"),
            ));
            checks.push(check(
                "pagemap frame numbers",
                if ps.pfn_visible {
                    Status::Ok
                } else {
                    Status::Limited
                },
                if ps.pfn_visible {
                    "visible (CAP_SYS_ADMIN)".into()
                } else {
                    "hidden: snapshots report frame 0 (nothing svmirror needs)".into()
                },
                Some("run as root to see frame numbers in dmirror snapshots"),
            ));
            true
        }
        Err(e) => {
            checks.push(check(
                "userfaultfd",
                Status::Missing,
                format!(
                    "cannot open one: {}; /dev/userfaultfd {}; vm.unprivileged_userfaultfd = {unpriv}",
                    error_chain(&e),
                    if dev { "exists" } else { "missing" }
                ),
                Some("run as root, or sysctl vm.unprivileged_userfaultfd=1, or give access to /dev/userfaultfd; the kernel needs CONFIG_USERFAULTFD"),
            ));
            if let Ok(ps) = ProcessPageSource::new() {
                let f = ps.features();
                checks.push(check(
                    "PROCMAP_QUERY",
                    if f.procmap_query {
                        Status::Ok
                    } else {
                        Status::Limited
                    },
                    if f.procmap_query {
                        "available"
                    } else {
                        "missing"
                    }
                    .into(),
                    Some("needs Linux 6.11 or later"),
                ));
                checks.push(check(
                    "PAGEMAP_SCAN",
                    if f.pagemap_scan {
                        Status::Ok
                    } else {
                        Status::Limited
                    },
                    if f.pagemap_scan {
                        "available"
                    } else {
                        "missing"
                    }
                    .into(),
                    Some("needs Linux 6.7 or later"),
                ));
            }
            false
        }
    }
}

fn thp(checks: &mut Vec<Check>) {
    let mode = |p: &str| {
        read(p).and_then(|s| {
            s.split_whitespace()
                .find(|w| w.starts_with('['))
                .map(|w| w.trim_matches(['[', ']']).to_string())
        })
    };
    let enabled = mode("/sys/kernel/mm/transparent_hugepage/enabled");
    let defrag = mode("/sys/kernel/mm/transparent_hugepage/defrag");
    let (status, detail) = match enabled.as_deref() {
        Some("never") => (
            Status::Limited,
            "never: every fault maps 4 KiB pages".to_string(),
        ),
        Some(m) => (
            Status::Ok,
            format!(
                "{m} (defrag {}): 2 MiB device leaves where the CPU has huge pages",
                defrag.as_deref().unwrap_or("?")
            ),
        ),
        None => (
            Status::Missing,
            "no /sys/kernel/mm/transparent_hugepage".into(),
        ),
    };
    checks.push(check(
        "transparent huge pages",
        status,
        detail,
        Some("echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (the kernel needs CONFIG_TRANSPARENT_HUGEPAGE)"),
    ));
}

fn io_uring(root: bool, checks: &mut Vec<Check>) -> bool {
    let disabled = read("/proc/sys/kernel/io_uring_disabled").unwrap_or_else(|| "0".into());
    let ok = match io_uring::IoUring::new(2) {
        Ok(_) => {
            checks.push(check(
                "io_uring",
                Status::Ok,
                format!("io_uring_setup works (kernel.io_uring_disabled = {disabled}); the simulated IOMMU pins memory with registered buffers"),
                None,
            ));
            true
        }
        Err(e) => {
            checks.push(check(
                "io_uring",
                Status::Missing,
                format!("io_uring_setup fails: {e} (kernel.io_uring_disabled = {disabled})"),
                Some("sysctl kernel.io_uring_disabled=0 (1 allows only the io_uring_group); the simulated IOMMU cannot pin memory without it"),
            ));
            false
        }
    };
    match memlock_limit() {
        Ok(l) => {
            let pinned = vm_pinned_bytes().unwrap_or(0);
            let enough = root || l.soft >= 256 << 20;
            let lim = |v: u64| {
                if v == u64::MAX {
                    "unlimited".to_string()
                } else {
                    human_bytes(v)
                }
            };
            checks.push(check(
                "locked memory",
                if enough { Status::Ok } else { Status::Limited },
                format!(
                    "RLIMIT_MEMLOCK soft {} hard {}{}; VmPin {}",
                    lim(l.soft),
                    lim(l.hard),
                    if root { " (root: not enforced on pins)" } else { "" },
                    human_bytes(pinned)
                ),
                Some("pins count against RLIMIT_MEMLOCK for users: ulimit -l unlimited, or a memlock line in /etc/security/limits.conf; the default app pins about 100 MiB"),
            ));
        }
        Err(e) => checks.push(check(
            "locked memory",
            Status::Missing,
            format!("cannot read RLIMIT_MEMLOCK: {e}"),
            None,
        )),
    }
    ok
}

fn vulkan(checks: &mut Vec<Check>) {
    let loader = ["libvulkan.so.1", "libvulkan.so"].iter().any(|name| {
        let c = std::ffi::CString::new(*name).expect("no NUL");
        // SAFETY: loading the Vulkan loader runs its initialisers, which are safe to run; the
        // handle is closed right away.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if h.is_null() {
            false
        } else {
            // SAFETY: `h` is a handle dlopen returned and is closed once.
            unsafe { libc::dlclose(h) };
            true
        }
    });
    let mut icds = Vec::new();
    for dir in [
        "/usr/share/vulkan/icd.d",
        "/etc/vulkan/icd.d",
        "/usr/local/share/vulkan/icd.d",
    ] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".json") {
                    icds.push(n);
                }
            }
        }
    }
    icds.sort();
    let lavapipe = icds.iter().any(|n| n.starts_with("lvp_icd"));
    checks.push(check(
        "Vulkan loader",
        if loader { Status::Ok } else { Status::Missing },
        if loader {
            "libvulkan.so.1 loads".into()
        } else {
            "libvulkan.so.1 not found".into()
        },
        Some("apt install libvulkan1"),
    ));
    checks.push(check(
        "Vulkan drivers",
        if icds.is_empty() {
            Status::Missing
        } else if lavapipe {
            Status::Ok
        } else {
            Status::Limited
        },
        if icds.is_empty() {
            "no ICD files in /usr/share/vulkan/icd.d or /etc/vulkan/icd.d".into()
        } else {
            format!(
                "{} (lavapipe {}); the devices and their VK_EXT_external_memory_host are under backends below",
                icds.join(", "),
                if lavapipe { "present" } else { "missing" }
            )
        },
        Some("apt install mesa-vulkan-drivers (lavapipe, the CPU driver CI uses), or your GPU vendor's driver"),
    ));
}

fn vfio(checks: &mut Vec<Check>) {
    let container = Path::new("/dev/vfio/vfio").exists();
    let mut groups: Vec<String> = std::fs::read_dir("/dev/vfio")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "vfio")
                .collect()
        })
        .unwrap_or_default();
    groups.sort();
    let mut bound: Vec<String> = std::fs::read_dir("/sys/bus/pci/drivers/vfio-pci")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(':') && n.contains('.'))
                .collect()
        })
        .unwrap_or_default();
    bound.sort();
    let iommu_groups = std::fs::read_dir("/sys/kernel/iommu_groups")
        .map(|rd| rd.count())
        .unwrap_or(0);
    checks.push(check(
        "IOMMU",
        if iommu_groups > 0 { Status::Ok } else { Status::Missing },
        format!("{iommu_groups} IOMMU groups"),
        Some("enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line, VT-d/AMD-Vi in firmware); cargo xtask vfio-vm runs a QEMU guest with an emulated one"),
    ));
    checks.push(check(
        "VFIO",
        if container && !bound.is_empty() {
            Status::Ok
        } else {
            Status::Missing
        },
        format!(
            "/dev/vfio/vfio {}; groups [{}]; devices bound to vfio-pci [{}]",
            if container { "present" } else { "missing" },
            groups.join(", "),
            bound.join(", ")
        ),
        Some("modprobe vfio-pci, then bind a DMA-capable device: echo <vendor> <device> > /sys/bus/pci/drivers/vfio-pci/new_id; or run in the QEMU guest of cargo xtask vfio-vm"),
    ));
}

fn gather() -> Info {
    let (kernel, machine) = uname();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut checks = Vec::new();
    let uffd = userfaultfd(root, &mut checks);
    thp(&mut checks);
    let uring = io_uring(root, &mut checks);
    vulkan(&mut checks);
    vfio(&mut checks);
    let sim_ok = uffd && uring;
    let mut backends = vec![BackendInfo {
        name: BackendKind::Sim.name(),
        available: sim_ok,
        detail: if sim_ok {
            "simulated IOMMU: userfaultfd and io_uring work".into()
        } else {
            "needs userfaultfd and io_uring (see above)".into()
        },
    }];
    if let Some(mm) = sim_ok.then(app::open_mm).and_then(Result::ok) {
        for kind in [BackendKind::Vulkan, BackendKind::Vfio] {
            let (available, detail) = match app::open_backend(kind, &mm) {
                Ok(b) => (true, b.device()),
                Err(e) => (false, e.to_string()),
            };
            backends.push(BackendInfo {
                name: kind.name(),
                available,
                detail,
            });
        }
    }
    Info {
        kernel,
        machine,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_total: meminfo("MemTotal:"),
        memory_available: meminfo("MemAvailable:"),
        root,
        checks,
        backends,
    }
}

/// `svmirror info`.
pub(crate) fn run(json: bool) -> Result<(), Failure> {
    let info = gather();
    if json {
        let s = serde_json::to_string_pretty(&info)
            .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
        println!("{s}");
        return Ok(());
    }
    println!(
        "{} on {}, {} CPUs, {} memory ({} available), running as {}",
        info.kernel,
        info.machine,
        info.cpus,
        human_bytes(info.memory_total),
        human_bytes(info.memory_available),
        if info.root { "root" } else { "a user" }
    );
    println!();
    for c in &info.checks {
        let mark = match c.status {
            Status::Ok => "ok     ",
            Status::Limited => "limited",
            Status::Missing => "MISSING",
        };
        println!("{mark}  {:<22} {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            println!("         {:<22} fix: {fix}", "");
        }
    }
    println!();
    println!("backends");
    for b in &info.backends {
        println!(
            "  {:<7} {}  {}",
            b.name,
            if b.available {
                "available  "
            } else {
                "unavailable"
            },
            b.detail
        );
    }
    Ok(())
}
