//! `cargo xtask vfio-vm`: the VFIO tests, run for real inside a QEMU guest.

use crate::DebianPackage;

/// Debian packages the guest run needs.
pub(crate) const DEBIAN_PACKAGES: &[DebianPackage] = &[];

/// Builds and boots the guest and runs the VFIO tests inside it.
pub(crate) fn run(_args: &[String]) -> Result<(), String> {
    Err("vfio-vm: not built yet".into())
}
