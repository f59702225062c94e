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
//!    -device edu -device nvme` (with `aw-bits=48` so the IOMMU takes the process's virtual
//!    addresses as IOVAs, and edu's `dma_mask` opened to 64 bits; the NVMe controller's
//!    namespace is a scratch image written anew each run, 8 MiB of 512-byte sectors each
//!    holding its own number, see [`image::write_nvme_image`]); `/init` loads the modules,
//!    binds edu (1234:11e8) and the NVMe controller (class 010802) to vfio-pci, runs the
//!    tests (the edu scenarios, then svmirror-nvme's), then the example app on the VFIO backend
//!    (`svmirror run --backend vfio` with sizes made for edu's 100 ms per DMA: `APP_ARGS` in
//!    [`image`]; a mismatch against the CPU reference exits 1 and fails the run), and reports
//!    through `isa-debug-exit`: QEMU exits with 1 when everything passed, 3 when something
//!    failed; anything else (a kernel panic, a crash) is a failed run, and a hang is killed
//!    after the timeout (`VFIO_VM_TIMEOUT`, seconds, default 180).
//!
//! `cargo xtask vfio-vm --also BINARY [ARGS...]` also runs another statically linked program in
//! the guest after the tests (the example app on the VFIO backend, say): it finds edu bound to
//! vfio-pci and the modules loaded, runs as root, and its failure fails the run.
//!
//! The serial log goes to `target/vfio-vm/serial.log`; a failed run's is kept as
//! `serial-failed.log`. The guest's DMAR fault lines (the IOMMU blocking DMA to unmapped
//! chunks) are printed on success too. A missing QEMU or a failed download fails the task.
//!
//! [`image`] builds the guest (steps 1 to 3: the kernel, the modules, the binaries, the
//! initramfs); [`boot`](mod@boot) runs it (step 4: QEMU, the serial log, the verdict).

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use crate::DebianPackage;

mod boot;
mod image;

use boot::{boot, check_qemu};
use image::{
    GuestBinaries, build_guest_binaries, check_static, fetch_busybox, fetch_kernel,
    write_initramfs, write_nvme_image,
};

/// Debian packages the guest run needs installed on the host (the guest's kernel and busybox
/// are downloaded, not installed).
pub(crate) const DEBIAN_PACKAGES: &[DebianPackage] = &[
    ("qemu-system-x86", "command -v qemu-system-x86_64"),
    ("xz-utils", "command -v xz"),
];

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
    let nvme_image = cache.join("nvme.img");
    write_nvme_image(&nvme_image)?;
    boot(&qemu, &cache, &kernel.vmlinux, &initrd, &nvme_image)?;
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
