//! `cargo xtask vfio-vm`: the VFIO tests, run for real inside a QEMU guest.
//!
//! This machine has no VFIO, but QEMU under software emulation (TCG) has one: a q35 guest with
//! an emulated Intel IOMMU and QEMU's `edu` PCI device (a small DMA engine) runs a stock Debian
//! kernel's vfio-pci in a few seconds. The task:
//!
//! 1. fetches what it needs from Debian: QEMU (`qemu-system-x86`, installed with apt-get when
//!    missing and running as root; `cargo xtask ci` installs it with the other suites'
//!    packages), and with `apt-get download` the kernel package that `linux-image-amd64` points
//!    to and `busybox-static`, once, into `target/vfio-vm/`;
//! 2. extracts the kernel as an uncompressed `vmlinux` (qboot boots it through its PVH entry,
//!    about twice as fast as SeaBIOS with a bzImage) and the vfio modules with everything they
//!    depend on (read from each module's `depends=`);
//! 3. builds `svmirror-edu`'s `vfio-guest-tests` and the `svmirror` command statically
//!    (`+crt-static`, one cargo run) and packs them, busybox, the modules and an `/init` script
//!    into an initramfs;
//! 4. boots `-machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on
//!    -device edu` (with `aw-bits=48` so the IOMMU takes the process's virtual addresses as
//!    IOVAs, and edu's `dma_mask` opened to 64 bits); `/init` loads the modules, binds edu
//!    (1234:11e8) to vfio-pci, runs the tests, then the example app on the VFIO backend
//!    (`svmirror run --backend vfio` with sizes made for edu's 100 ms per DMA: [`APP_ARGS`]; a
//!    mismatch against the CPU reference exits 1 and fails the run), and reports through
//!    `isa-debug-exit`: QEMU exits with 1 when everything passed, 3 when something failed;
//!    anything else (a kernel panic, a crash) is a failed run, and a hang is killed after the
//!    timeout (`VFIO_VM_TIMEOUT`, seconds, default 180).
//!
//! `cargo xtask vfio-vm --also BINARY [ARGS...]` also runs another statically linked program in
//! the guest after the tests (the example app on the VFIO backend, say): it finds edu bound to
//! vfio-pci and the modules loaded, runs as root, and its failure fails the run.
//!
//! The serial log goes to `target/vfio-vm/serial.log`; a failed run's is kept as
//! `serial-failed.log`. The guest's DMAR fault lines (the IOMMU blocking DMA to unmapped
//! chunks) are printed on success too. A missing QEMU or a failed download fails the task.

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::DebianPackage;

/// Debian packages the guest run needs installed on the host (the guest's kernel and busybox
/// are downloaded, not installed).
pub(crate) const DEBIAN_PACKAGES: &[DebianPackage] = &[
    ("qemu-system-x86", "command -v qemu-system-x86_64"),
    ("xz-utils", "command -v xz"),
];

/// The firmware: qboot, shipped with QEMU (qemu-system-data).
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
/// Modules to load, with their dependencies resolved from the kernel package.
const ROOT_MODULES: &[&str] = &["vfio_iommu_type1", "vfio_pci"];
/// The test binary's package and name.
const TEST_PACKAGE: &str = "svmirror-edu";
const TEST_BIN: &str = "vfio-guest-tests";
/// The example app's package and binary, run on the VFIO backend after the tests.
const APP_PACKAGE: &str = "svmirror";
const APP_BIN: &str = "svmirror";
/// `svmirror run --backend vfio` sized for edu: each of its DMA transfers takes 100 ms of
/// virtual time and moves at most 4095 bytes: about 300 transfers in all, some 30 s in the guest.
const APP_ARGS: &[&str] = &[
    "run",
    "--backend",
    "vfio",
    "--quiet",
    "--nodes",
    "200",
    "--degree",
    "4",
    "--size",
    "4K",
    "--rounds",
    "4",
    "--slots",
    "2",
];
/// Then the VFIO backend's own micro-benchmarks through `svmirror bench` (fault to mapped for a
/// chunk, DMA copy against memcpy), so they run for real on every `cargo xtask vfio-vm`.
const BENCH_ARGS: &[&str] = &[
    "bench",
    "--backend",
    "vfio",
    "--micro",
    "--quick",
    "--quiet",
];
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds and boots the guest and runs the VFIO tests inside it.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let also = match args {
        [] => None,
        [flag, bin, rest @ ..] if flag == "--also" => {
            let bin = PathBuf::from(bin);
            check_static(&bin)?;
            Some((bin, rest.to_vec()))
        }
        _ => {
            return Err(format!(
                "usage: cargo xtask vfio-vm [--also STATIC-BINARY [ARGS...]] (got `{}`)",
                args.join(" ")
            ));
        }
    };
    let started = Instant::now();
    let cache = crate::root().join("target/vfio-vm");
    fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let qemu = check_qemu()?;
    let kernel = fetch_kernel(&cache)?;
    let busybox = fetch_busybox(&cache)?;
    let (test_bin, app_bin) = build_guest_binaries()?;
    let initrd = cache.join("initrd.cpio");
    let bins = GuestBinaries {
        tests: &test_bin,
        app: &app_bin,
        also: also.as_ref(),
    };
    write_initramfs(&initrd, &busybox, &bins, &kernel.modules)?;
    eprintln!(
        "xtask: vfio-vm: guest ready in {:.1}s (kernel {}), booting",
        started.elapsed().as_secs_f64(),
        kernel.version
    );
    boot(&qemu, &cache, &kernel.vmlinux, &initrd)?;
    eprintln!(
        "xtask: vfio-vm: PASS in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn is_root() -> bool {
    output("id -u", Command::new("id").arg("-u"))
        .is_ok_and(|o| String::from_utf8_lossy(&o).trim() == "0")
}

/// Finds QEMU, installing Debian's `qemu-system-x86` first when it is missing and we are root.
fn check_qemu() -> Result<PathBuf, String> {
    let qemu = PathBuf::from("qemu-system-x86_64");
    let present = || {
        Command::new(&qemu)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !present() && is_root() {
        eprintln!("xtask: vfio-vm: installing qemu-system-x86 from Debian");
        let install = || {
            output(
                "apt-get install qemu-system-x86",
                Command::new("apt-get")
                    .args([
                        "install",
                        "-y",
                        "--no-install-recommends",
                        "qemu-system-x86",
                    ])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        };
        if install().is_err() {
            output("apt-get update", Command::new("apt-get").arg("update"))?;
            install()?;
        }
    }
    if !present() {
        return Err(
            "vfio-vm: qemu-system-x86_64 not found: install Debian's qemu-system-x86 \
             (`sudo apt-get install qemu-system-x86`; `cargo xtask ci` does it as root)"
                .into(),
        );
    }
    if !Path::new(QBOOT).exists() {
        return Err(format!(
            "vfio-vm: {QBOOT} not found (Debian's qemu-system-data ships it)"
        ));
    }
    Ok(qemu)
}

/// Runs `cmd`, returning its stdout, or an error naming `what` with its stderr.
fn output(what: &str, cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("vfio-vm: {what}: could not start: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vfio-vm: {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// Downloads `package`'s .deb into `dir` with apt-get (running `apt-get update` once first
/// when the package lists do not know it and we are root); returns its path.
fn apt_download(dir: &Path, package: &str) -> Result<PathBuf, String> {
    let find = || {
        fs::read_dir(dir).ok().and_then(|rd| {
            rd.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
        })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("xtask: vfio-vm: downloading {package} from Debian");
    let download = || {
        output(
            &format!("apt-get download {package}"),
            Command::new("apt-get")
                .args(["download", package])
                .current_dir(dir),
        )
    };
    if let Err(first) = download() {
        if !is_root() {
            return Err(format!("{first} (try `sudo apt-get update`)"));
        }
        output("apt-get update", Command::new("apt-get").arg("update"))?;
        download()?;
    }
    find().ok_or_else(|| format!("vfio-vm: apt-get download {package} left no .deb"))
}

/// The guest kernel, extracted.
struct Kernel {
    version: String,
    vmlinux: PathBuf,
    /// Module files in load order (dependencies first).
    modules: Vec<PathBuf>,
}

fn fetch_kernel(cache: &Path) -> Result<Kernel, String> {
    let dir = cache.join("kernel");
    let ready = dir.join("ready");
    if let Ok(text) = fs::read_to_string(&ready) {
        let mut lines = text.lines();
        let version = lines.next().unwrap_or_default().to_owned();
        let modules: Vec<PathBuf> = lines.map(|m| dir.join(m)).collect();
        if dir.join("vmlinux").exists() && modules.iter().all(|m| m.exists()) {
            return Ok(Kernel {
                version,
                vmlinux: dir.join("vmlinux"),
                modules,
            });
        }
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(|e| format!("creating {}: {e}", debs.display()))?;
    // The metapackage names the current kernel package in its Depends.
    let meta = apt_download(&debs, "linux-image-amd64")?;
    let depends = output(
        "dpkg-deb -f Depends",
        Command::new("dpkg-deb").arg("-f").arg(&meta).arg("Depends"),
    )?;
    let depends = String::from_utf8_lossy(&depends);
    let package = depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .find(|d| d.starts_with("linux-image-") && d != &"linux-image-amd64")
        .ok_or_else(|| format!("vfio-vm: no kernel package in `{}`", depends.trim()))?
        .to_owned();
    let deb = apt_download(&debs, &package)?;
    let tree = cache.join("kernel-tree");
    let _ = fs::remove_dir_all(&tree);
    output(
        "dpkg-deb -x (kernel)",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
    )?;
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let vmlinuz = fs::read_dir(tree.join("boot"))
        .map_err(|e| format!("vfio-vm: kernel package has no /boot: {e}"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or("vfio-vm: no vmlinuz in the kernel package")?;
    let version = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    extract_vmlinux(&vmlinuz, &dir.join("vmlinux"))?;
    let modules_root = tree.join("lib/modules").join(&version);
    let order = resolve_modules(&modules_root)?;
    let mut names = Vec::new();
    for (name, src) in &order {
        let file = format!("{name}.ko");
        copy_module(src, &dir.join(&file))?;
        names.push(file);
    }
    let _ = fs::remove_dir_all(&tree);
    fs::write(&ready, format!("{version}\n{}\n", names.join("\n")))
        .map_err(|e| format!("writing {}: {e}", ready.display()))?;
    Ok(Kernel {
        version,
        vmlinux: dir.join("vmlinux"),
        modules: names.iter().map(|n| dir.join(n)).collect(),
    })
}

/// Extracts the uncompressed kernel from a bzImage: the payload is the first stream in a
/// compression format the kernel supports (Debian's is xz), decompressed up to its end.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), String> {
    let data = fs::read(bzimage).map_err(|e| format!("reading {}: {e}", bzimage.display()))?;
    const XZ: &[u8] = b"\xfd7zXZ\x00";
    const ZSTD: &[u8] = b"\x28\xb5\x2f\xfd";
    let (at, tool): (usize, &[&str]) = if let Some(i) = find(&data, XZ) {
        (i, &["xz", "-dc", "--single-stream"])
    } else if let Some(i) = find(&data, ZSTD) {
        (i, &["zstd", "-dc"])
    } else {
        return Err("vfio-vm: kernel image is neither xz nor zstd compressed".into());
    };
    let file = fs::File::create(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("vfio-vm: {} (decompressing the kernel): {e}", tool[0]))?;
    // Trailing bytes after the stream make the tool complain; the stream itself is complete.
    let _ = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&data[at..]);
    let _ = child.wait();
    let head = fs::read(out).map_err(|e| format!("reading {}: {e}", out.display()))?;
    if head.len() < 1 << 20 || !head.starts_with(b"\x7fELF") {
        return Err("vfio-vm: the kernel did not decompress to an ELF vmlinux".into());
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A module's name as the kernel knows it: the file name without `.ko[.xz|.zst]`, with `-`
/// read as `_`.
fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))?;
    Some(stem.replace('-', "_"))
}

/// The `depends=` list from a module's `.modinfo`.
fn module_depends(data: &[u8]) -> Vec<String> {
    let Some(at) = find(data, b"\0depends=") else {
        return Vec::new();
    };
    let rest = &data[at + b"\0depends=".len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// Every module under `root` by name.
fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            index_modules(&p, index);
        } else if let Some(n) = p.file_name().and_then(|n| n.to_str()).and_then(module_name) {
            index.insert(n, p);
        }
    }
}

/// [`ROOT_MODULES`] and their dependencies, dependencies first.
fn resolve_modules(root: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let mut index = BTreeMap::new();
    index_modules(root, &mut index);
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), String> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let path = index
            .get(name)
            .ok_or_else(|| format!("vfio-vm: module {name} not in the kernel package"))?;
        let data = read_module(path)?;
        for dep in module_depends(&data) {
            visit(&dep, index, seen, order)?;
        }
        order.push((name.to_owned(), path.clone()));
        Ok(())
    }
    for m in ROOT_MODULES {
        visit(m, &index, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    if name.ends_with(".ko.xz") || name.ends_with(".ko.zst") {
        let tool = if name.ends_with(".xz") { "xz" } else { "zstd" };
        output(
            &format!("{tool} -dc {name}"),
            Command::new(tool).arg("-dc").arg(path),
        )
    } else {
        fs::read(path).map_err(|e| format!("reading {name}: {e}"))
    }
}

fn copy_module(src: &Path, dst: &Path) -> Result<(), String> {
    let data = read_module(src)?;
    fs::write(dst, data).map_err(|e| format!("writing {}: {e}", dst.display()))
}

fn fetch_busybox(cache: &Path) -> Result<PathBuf, String> {
    let out = cache.join("busybox");
    if out.exists() {
        return Ok(out);
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(|e| format!("creating {}: {e}", debs.display()))?;
    let deb = apt_download(&debs, "busybox-static")?;
    let tree = cache.join("busybox-tree");
    let _ = fs::remove_dir_all(&tree);
    output(
        "dpkg-deb -x (busybox)",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
    )?;
    fs::copy(tree.join("bin/busybox"), &out)
        .map_err(|e| format!("vfio-vm: busybox-static has no bin/busybox: {e}"))?;
    let _ = fs::remove_dir_all(&tree);
    Ok(out)
}

/// Checks that `bin` is an x86-64 ELF executable with no program interpreter (statically
/// linked), as the guest has no shared libraries.
fn check_static(bin: &Path) -> Result<(), String> {
    let data = fs::read(bin).map_err(|e| format!("vfio-vm: reading {}: {e}", bin.display()))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let elf64 = data.starts_with(b"\x7fELF\x02\x01") && u16_at(0x12) == Some(0x3e);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err(format!(
            "vfio-vm: {} is not an ELF executable",
            bin.display()
        ));
    };
    if !elf64 {
        return Err(format!(
            "vfio-vm: {} is not an x86-64 ELF executable",
            bin.display()
        ));
    }
    let interp = (0..phnum as usize).any(|i| {
        let at = phoff as usize + i * phentsize as usize;
        data.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) == 3)
    });
    if interp {
        return Err(format!(
            "vfio-vm: {} is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static' \
             and --target {TARGET}",
            bin.display()
        ));
    }
    Ok(())
}

/// Builds the guest test binary and the example app, statically linked (one cargo run), and
/// returns their paths.
fn build_guest_binaries() -> Result<(PathBuf, PathBuf), String> {
    let mut c = crate::cargo();
    let flags = env::var("RUSTFLAGS").unwrap_or_default();
    // Debug assertions on: the guest tests then run the lock-order checks (`might_fault`
    // panics if a VFIO map runs under a lock an invalidation takes).
    c.env(
        "RUSTFLAGS",
        format!("{flags} -C target-feature=+crt-static -C debug-assertions").trim(),
    )
    .args([
        "build",
        "--release",
        "--target",
        TARGET,
        "-p",
        TEST_PACKAGE,
        "--bin",
        TEST_BIN,
        "--features",
        "svmirror-edu/guest-tests",
        "-p",
        APP_PACKAGE,
        "--bin",
        APP_BIN,
    ]);
    crate::run("cargo build (static vfio-guest-tests and svmirror)", c)?;
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                crate::root().join(p)
            }
        })
        .unwrap_or_else(|| crate::root().join("target"));
    let built = |name: &str| {
        let bin = target_dir.join(TARGET).join("release").join(name);
        if bin.exists() {
            Ok(bin)
        } else {
            Err(format!("vfio-vm: {} was not built", bin.display()))
        }
    };
    let tests = built(TEST_BIN)?;
    let app = built(APP_BIN)?;
    check_static(&app)?;
    Ok((tests, app))
}

/// The programs the guest runs.
struct GuestBinaries<'a> {
    tests: &'a Path,
    app: &'a Path,
    also: Option<&'a (PathBuf, Vec<String>)>,
}

/// Single-quotes `args` for the guest's shell.
fn shell_quote<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.as_ref().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The guest's /init: load the modules, bind edu to vfio-pci, run the tests, then the example
/// app on the VFIO backend, then the `--also` binary, print the DMAR fault lines, and report
/// through isa-debug-exit.
fn init_script(modules: &[String], also: Option<&[String]>) -> String {
    let app: String = [APP_ARGS, BENCH_ARGS]
        .iter()
        .map(|args| {
            format!(
                "echo \"vfio-vm: running /bin/{APP_BIN} {}\"\n\
                 t0=$(cut -d' ' -f1 /proc/uptime)\n\
                 /bin/{APP_BIN} {}\n\
                 src=$?\n\
                 echo \"vfio-vm: {APP_BIN} exited with $src (started at ${{t0}}s of uptime, ended at $(cut -d' ' -f1 /proc/uptime)s)\"\n\
                 [ $src = 0 ] || rc=1\n",
                args.join(" "),
                shell_quote(args)
            )
        })
        .collect();
    let also = match also {
        None => String::new(),
        Some(args) => format!(
            "echo \"vfio-vm: running --also binary\"\n\
             /bin/also {}\n\
             arc=$?\n\
             echo \"vfio-vm: --also binary exited with $arc\"\n\
             [ $arc = 0 ] || rc=1\n",
            shell_quote(args)
        ),
    };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() {{ echo "vfio-vm: guest setup failed: $*"; /bin/{TEST_BIN} --qemu-exit 2; poweroff -f; }}
for m in {modules}; do insmod /lib/modules/$m.ko || fail "insmod $m"; done
edu=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x1234 ] && [ "$(cat $d/device)" = 0x11e8 ]; then edu=$d; fi
done
[ -n "$edu" ] || fail "no edu device (1234:11e8)"
echo vfio-pci > $edu/driver_override || fail "driver_override"
echo ${{edu##*/}} > /sys/bus/pci/drivers_probe
group=$(basename $(readlink $edu/iommu_group))
[ -c /dev/vfio/$group ] || fail "edu is not bound to vfio-pci (no /dev/vfio/$group)"
echo "vfio-vm: edu ${{edu##*/}} bound to vfio-pci, IOMMU group $group"
/bin/{TEST_BIN}
rc=$?
{app}{also}echo "vfio-vm: DMAR fault lines in the guest log:"
dmesg | grep 'DMAR.*fault addr'
echo "vfio-vm: tests exited with $rc"
if [ $rc = 0 ]; then /bin/{TEST_BIN} --qemu-exit 0; else /bin/{TEST_BIN} --qemu-exit 1; fi
poweroff -f
"#,
        modules = modules.join(" ")
    )
}

/// One entry of a newc cpio archive.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let name_len = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name_len as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn write_initramfs(
    path: &Path,
    busybox: &Path,
    bins: &GuestBinaries<'_>,
    modules: &[PathBuf],
) -> Result<(), String> {
    let also = bins.also;
    let read = |p: &Path| fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let names: Vec<String> = modules
        .iter()
        .filter_map(|m| m.file_stem()?.to_str().map(str::to_owned))
        .collect();
    let mut out = Vec::new();
    let mut ino = 1;
    let mut add = |out: &mut Vec<u8>, name: &str, mode: u32, rdev, data: &[u8]| {
        cpio_entry(out, ino, name, mode, rdev, data);
        ino += 1;
    };
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        add(&mut out, d, 0o040755, (0, 0), &[]);
    }
    add(&mut out, "dev/console", 0o020600, (5, 1), &[]);
    let also_args = also.map(|(_, a)| a.as_slice());
    let init = init_script(&names, also_args);
    add(&mut out, "init", 0o100755, (0, 0), init.as_bytes());
    if let Some((bin, _)) = also {
        add(&mut out, "bin/also", 0o100755, (0, 0), &read(bin)?);
    }
    add(&mut out, "bin/busybox", 0o100755, (0, 0), &read(busybox)?);
    add(
        &mut out,
        &format!("bin/{TEST_BIN}"),
        0o100755,
        (0, 0),
        &read(bins.tests)?,
    );
    add(
        &mut out,
        &format!("bin/{APP_BIN}"),
        0o100755,
        (0, 0),
        &read(bins.app)?,
    );
    for (m, n) in modules.iter().zip(&names) {
        add(
            &mut out,
            &format!("lib/modules/{n}.ko"),
            0o100644,
            (0, 0),
            &read(m)?,
        );
    }
    add(&mut out, "TRAILER!!!", 0, (0, 0), &[]);
    fs::write(path, out).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Boots the guest, streams the test output, and turns QEMU's exit code into the result.
fn boot(qemu: &Path, cache: &Path, vmlinux: &Path, initrd: &Path) -> Result<(), String> {
    let timeout = env::var("VFIO_VM_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(180), Duration::from_secs);
    let mut child = Command::new(qemu)
        .args([
            "-machine",
            "q35,kernel-irqchip=split",
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-smp",
            "1",
            "-bios",
            QBOOT,
            "-device",
            "intel-iommu,intremap=on,caching-mode=on,aw-bits=48",
            "-device",
            "edu,dma_mask=0xffffffffffffffff",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=4",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("vfio-vm: starting QEMU: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim_end_matches('\r').to_owned();
            // Test output live; the kernel's own lines go to the log only.
            if !line.starts_with('[') && !line.starts_with('<') {
                println!("guest: {line}");
            }
            log.push(line);
        }
        log
    });
    let err_reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("vfio-vm: waiting for QEMU: {e}")),
        }
    };
    let log = reader.join().unwrap_or_default();
    let qemu_err = err_reader.join().unwrap_or_default();
    let mut text = log.join("\n");
    if !qemu_err.is_empty() {
        text.push_str("\n--- QEMU stderr ---\n");
        text.push_str(&qemu_err.join("\n"));
    }
    let serial = cache.join("serial.log");
    fs::write(&serial, &text).map_err(|e| format!("writing {}: {e}", serial.display()))?;
    let verdict = match status.and_then(|s| s.code()) {
        Some(1) => Ok(()),
        Some(3) => Err("the VFIO tests (or the --also binary) failed in the guest".to_owned()),
        Some(5) => Err("guest setup failed".to_owned()),
        Some(c) => Err(format!(
            "the guest ended without reporting a result (QEMU exit code {c}: kernel panic or crash?)"
        )),
        None if status.is_some() => Err("QEMU was killed by a signal".to_owned()),
        None => Err(format!(
            "the guest hung: killed after {}s (VFIO_VM_TIMEOUT)",
            timeout.as_secs()
        )),
    };
    match verdict {
        Ok(()) => {
            println!("xtask: vfio-vm: the guest's DMAR fault lines (DMA blocked by the IOMMU):");
            let mut seen = BTreeSet::new();
            for l in log
                .iter()
                .filter(|l| l.starts_with('[') && l.contains("DMAR") && l.contains("fault addr"))
            {
                if seen.insert(l.as_str()) {
                    println!("  {l}");
                }
            }
            Ok(())
        }
        Err(e) => {
            let kept = cache.join("serial-failed.log");
            let _ = fs::copy(&serial, &kept);
            eprintln!("xtask: vfio-vm: last lines of the serial log:");
            for l in log
                .iter()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("  {l}");
            }
            Err(format!(
                "vfio-vm: {e}; serial log kept in {}",
                kept.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_read_dashes_as_underscores() {
        assert_eq!(
            module_name("vfio-pci-core.ko").as_deref(),
            Some("vfio_pci_core")
        );
        assert_eq!(module_name("irqbypass.ko.xz").as_deref(), Some("irqbypass"));
        assert_eq!(module_name("README"), None);
    }

    #[test]
    fn depends_come_from_modinfo() {
        let data = b"\x7fELF....\0license=GPL\0depends=vfio-pci-core,vfio\0vermagic=6.1";
        assert_eq!(module_depends(data), vec!["vfio_pci_core", "vfio"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
    }

    #[test]
    fn dynamic_executables_are_refused_and_static_ones_pass() {
        // This test binary itself is dynamically linked unless built with +crt-static.
        let me = env::current_exe().unwrap();
        let data = fs::read(&me).unwrap();
        let has_interp = find(&data, b"ld-linux-x86-64.so").is_some();
        assert_eq!(check_static(&me).is_err(), has_interp);
        assert!(check_static(Path::new("/nonexistent")).is_err());
        let not_elf = env::temp_dir().join("xtask-vfio-not-elf");
        fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        assert!(check_static(&not_elf).is_err());
        let _ = fs::remove_file(&not_elf);
    }

    #[test]
    fn also_arguments_are_shell_quoted() {
        let init = init_script(&["vfio".into()], Some(&["--size".into(), "it's".into()]));
        assert!(init.contains(r"/bin/also '--size' 'it'\''s'"), "{init}");
        assert!(!init_script(&[], None).contains("/bin/also"));
    }

    #[test]
    fn the_app_runs_on_the_vfio_backend_after_the_tests_and_fails_the_run() {
        let init = init_script(&[], None);
        let tests = init.find(&format!("/bin/{TEST_BIN}\n")).unwrap();
        let app = init.find("/bin/svmirror 'run' '--backend' 'vfio'").unwrap();
        assert!(tests < app, "{init}");
        assert!(init.contains("[ $src = 0 ] || rc=1"), "{init}");
    }

    #[test]
    fn cpio_entries_are_padded_to_four_bytes() {
        let mut out = Vec::new();
        cpio_entry(&mut out, 1, "init", 0o100755, (0, 0), b"abc");
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // Header 110 bytes + "init\0" = 115, padded to 116; data 3, padded to 4.
        assert_eq!(out.len(), 120);
    }
}
