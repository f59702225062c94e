//! `cargo xtask shaders` and `cargo xtask device-test`: the Vulkan backend's maintenance tasks.

use crate::DebianPackage;

/// Debian packages the Vulkan suite and the shader check need.
pub(crate) const DEBIAN_PACKAGES: &[DebianPackage] = &[];

/// Recompiles the shaders (or, with `check`, verifies the committed SPIR-V).
pub(crate) fn shaders(_check: bool) -> Result<(), String> {
    Err("shaders: not built yet".into())
}

/// Runs the Vulkan suite and benchmarks on a real GPU.
pub(crate) fn device_test(_args: &[String]) -> Result<(), String> {
    Err("device-test: not built yet".into())
}
