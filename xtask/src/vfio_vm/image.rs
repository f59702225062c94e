//! The guest image of `cargo xtask vfio-vm`: the Debian kernel and busybox (downloaded once
//! into the cache), the vfio modules with their dependencies, the statically linked test
//! binary and `svmirror`, the `/init` script, and the initramfs that holds them.

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{is_root, output};

/// Modules to load, with their dependencies resolved from the kernel package.
const ROOT_MODULES: &[&str] = &["vfio_iommu_type1", "vfio_pci"];
/// The test binary's package and name.
const TEST_PACKAGE: &str = "svmirror-edu";
const TEST_BIN: &str = "vfio-guest-tests";
/// The example app's package and binary, run on the VFIO backend after the tests.
const APP_PACKAGE: &str = "svmirror";
const APP_BIN: &str = "svmirror";
/// `svmirror run --backend vfio` on edu (`--vfio-device` the edu device), sized for it: each
/// of its DMA transfers takes 100 ms of virtual time and moves at most 4095 bytes: about 300
/// transfers in all, some 30 s in the guest.
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
/// Then `svmirror run --backend vfio` on the NVMe controller (`--vfio-device` it): the BFS,
/// saxpy and churn, one run each (sized for NVMe, not edu): every input (the graph's nodes and
/// adjacency lists, the vectors, the slots) makes a round trip through the namespace's first
/// blocks into fresh `Vec`s. The churn runs 32 rounds: before the mapper waited for commands in
/// flight on a whole mapping (not only on the invalidated range), a CPU change next to a slot
/// cut the device's read of it off in about one run of 8 rounds in 6.
const NVME_BFS_ARGS: &[&str] = &[
    "run",
    "bfs",
    "--backend",
    "vfio",
    "--quiet",
    "--nodes",
    "1000",
    "--degree",
    "4",
];
const NVME_CHURN_ARGS: &[&str] = &[
    "run",
    "churn",
    "--backend",
    "vfio",
    "--quiet",
    "--rounds",
    "32",
    "--slots",
    "8",
];
const NVME_SAXPY_ARGS: &[&str] = &[
    "run",
    "saxpy",
    "--backend",
    "vfio",
    "--quiet",
    "--size",
    "1M",
];
/// Then the VFIO backend's own micro-benchmarks on edu, then on NVMe (reads into ordinary
/// memory against a DMA pool mapped once plus memcpy), through `svmirror bench` (fault to mapped for a
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
/// The NVMe controller's serial number (the guest tests check it).
pub(super) const NVME_SERIAL: &str = "svmirror-nvme0";
/// The NVMe namespace's image: its size, and the sector of its pattern.
const NVME_IMAGE_BYTES: usize = 8 << 20;
const NVME_SECTOR: usize = 512;

/// The NVMe namespace's contents: sector `n` holds `n` (u64, little endian) 64 times, so a
/// guest read can be checked against its offset alone. The guest tests (svmirror-edu's
/// `vfio_guest_tests/nvme.rs`) expect this size and pattern.
fn nvme_image() -> Vec<u8> {
    let mut out = vec![0u8; NVME_IMAGE_BYTES];
    for (n, sector) in out.chunks_exact_mut(NVME_SECTOR).enumerate() {
        for c in sector.chunks_exact_mut(8) {
            c.copy_from_slice(&(n as u64).to_le_bytes());
        }
    }
    out
}

/// Writes the NVMe image anew (the guest's write scenarios change it).
pub(super) fn write_nvme_image(path: &Path) -> Result<(), String> {
    fs::write(path, nvme_image()).map_err(|e| format!("writing {}: {e}", path.display()))
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
pub(super) struct Kernel {
    pub(super) version: String,
    pub(super) vmlinux: PathBuf,
    /// Module files in load order (dependencies first).
    pub(super) modules: Vec<PathBuf>,
}

pub(super) fn fetch_kernel(cache: &Path) -> Result<Kernel, String> {
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

pub(super) fn fetch_busybox(cache: &Path) -> Result<PathBuf, String> {
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
pub(super) fn check_static(bin: &Path) -> Result<(), String> {
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
pub(super) fn build_guest_binaries() -> Result<(PathBuf, PathBuf), String> {
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
pub(super) struct GuestBinaries<'a> {
    pub(super) tests: &'a Path,
    pub(super) app: &'a Path,
    pub(super) also: Option<&'a (PathBuf, Vec<String>)>,
}

/// Single-quotes `args` for the guest's shell.
fn shell_quote<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.as_ref().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The guest's /init: load the modules, bind edu and the NVMe controller to vfio-pci, run the tests, then the example
/// app on the VFIO backend, then the `--also` binary, print the DMAR fault lines, and report
/// through isa-debug-exit.
fn init_script(modules: &[String], also: Option<&[String]>) -> String {
    // Each run names its device: `$edu` and `$nvme` are the sysfs paths the script found.
    let app: String = [
        (APP_ARGS, "edu"),
        (NVME_BFS_ARGS, "nvme"),
        (NVME_SAXPY_ARGS, "nvme"),
        (NVME_CHURN_ARGS, "nvme"),
        (BENCH_ARGS, "edu"),
        (BENCH_ARGS, "nvme"),
    ]
    .iter()
    .map(|(args, dev)| {
            format!(
                "echo \"vfio-vm: running /bin/{APP_BIN} {} --vfio-device ${{{dev}##*/}}\"\n\
                 t0=$(cut -d' ' -f1 /proc/uptime)\n\
                 /bin/{APP_BIN} {} --vfio-device \"${{{dev}##*/}}\"\n\
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
nvme=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x1234 ] && [ "$(cat $d/device)" = 0x11e8 ]; then edu=$d; fi
  if [ "$(cat $d/class)" = 0x010802 ]; then nvme=$d; fi
done
[ -n "$edu" ] || fail "no edu device (1234:11e8)"
[ -n "$nvme" ] || fail "no NVMe controller (class 010802)"
for d in $edu $nvme; do
  echo vfio-pci > $d/driver_override || fail "driver_override"
  echo ${{d##*/}} > /sys/bus/pci/drivers_probe
  group=$(basename $(readlink $d/iommu_group))
  [ -c /dev/vfio/$group ] || fail "${{d##*/}} is not bound to vfio-pci (no /dev/vfio/$group)"
  echo "vfio-vm: $(cat $d/vendor):$(cat $d/device) at ${{d##*/}} bound to vfio-pci, IOMMU group $group"
done
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

pub(super) fn write_initramfs(
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
    fn nvme_sectors_hold_their_own_number() {
        let img = nvme_image();
        assert_eq!(img.len(), NVME_IMAGE_BYTES);
        assert!(img[..NVME_SECTOR].iter().all(|&b| b == 0));
        let s = 4095 * NVME_SECTOR;
        assert_eq!(&img[s..s + 8], &4095u64.to_le_bytes());
        assert_eq!(&img[s + 504..s + 512], &4095u64.to_le_bytes());
    }

    #[test]
    fn both_devices_are_bound_to_vfio_pci() {
        let init = init_script(&[], None);
        assert!(init.contains("= 0x010802 ]; then nvme=$d"), "{init}");
        assert!(init.contains("for d in $edu $nvme; do"), "{init}");
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
