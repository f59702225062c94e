//! Booting the guest of `cargo xtask vfio-vm`: QEMU (installed from Debian when missing), the
//! machine with its emulated IOMMU, edu device and NVMe controller, the serial log streamed and kept, and the
//! verdict read from QEMU's exit code (`isa-debug-exit`).

use std::collections::BTreeSet;
use std::env;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::image::NVME_SERIAL;
use super::{is_root, output};

/// The firmware: qboot, shipped with QEMU (qemu-system-data).
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// Finds QEMU, installing Debian's `qemu-system-x86` first when it is missing and we are root.
pub(super) fn check_qemu() -> Result<PathBuf, String> {
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

/// Boots the guest, streams the test output, and turns QEMU's exit code into the result.
pub(super) fn boot(
    qemu: &Path,
    cache: &Path,
    vmlinux: &Path,
    initrd: &Path,
    nvme_image: &Path,
) -> Result<(), String> {
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
            &format!("nvme,serial={NVME_SERIAL},drive=nvm0"),
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
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=nvm0,format=raw",
            nvme_image.display()
        ))
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
