//! `cargo xtask shaders` and `cargo xtask device-test`: the Vulkan backend's maintenance tasks.
//!
//! The SPIR-V in `shaders/spv/` is committed, so a fresh machine builds svmirror-vulkan with no
//! shader compiler. `cargo xtask shaders` regenerates it with glslangValidator; `--check` (a CI
//! step) compiles into a temporary directory, requires every committed file to be byte-identical
//! to a fresh compile of its source, and runs `spirv-val` on it.

use std::path::Path;
use std::process::Command;

use crate::DebianPackage;

/// Debian packages the Vulkan suite and the shader check need.
pub(crate) const DEBIAN_PACKAGES: &[DebianPackage] = &[
    // Vulkan loader, loaded at run time by ash.
    (
        "libvulkan1",
        "test -e /usr/lib/x86_64-linux-gnu/libvulkan.so.1",
    ),
    // lavapipe, the CPU Vulkan device the suite runs on.
    (
        "mesa-vulkan-drivers",
        "test -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json",
    ),
    // The Khronos validation layer every test enables.
    (
        "vulkan-validationlayers",
        "test -e /usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json",
    ),
    // glslangValidator, for the SPIR-V check.
    ("glslang-tools", "command -v glslangValidator"),
    // spirv-val, for the SPIR-V check.
    ("spirv-tools", "command -v spirv-val"),
];

/// One SPIR-V module: its source, the macros it is compiled with, and its committed file.
struct Shader {
    source: &'static str,
    defines: &'static [&'static str],
    output: &'static str,
}

/// Every committed module. Keep in step with `crates/vulkan/src/kernels.rs`.
const SHADERS: &[Shader] = &[
    Shader {
        source: "stream.comp",
        defines: &[],
        output: "stream.spv",
    },
    Shader {
        source: "stream.comp",
        defines: &["SVM_DIRECT"],
        output: "stream_direct.spv",
    },
    Shader {
        source: "chase.comp",
        defines: &[],
        output: "chase.spv",
    },
    Shader {
        source: "chase.comp",
        defines: &["SVM_DIRECT"],
        output: "chase_direct.spv",
    },
    Shader {
        source: "bfs.comp",
        defines: &[],
        output: "bfs.spv",
    },
    Shader {
        source: "bfs_frontier.comp",
        defines: &[],
        output: "bfs_frontier.spv",
    },
    Shader {
        source: "slots.comp",
        defines: &[],
        output: "slots.spv",
    },
];

/// The Vulkan version the modules target (buffer device addresses are core in 1.2).
const TARGET_ENV: &str = "vulkan1.2";

fn compile(shaders_dir: &Path, s: &Shader, out: &Path) -> Result<(), String> {
    let mut c = Command::new("glslangValidator");
    c.current_dir(shaders_dir)
        // No debug information: the output depends on the source alone.
        .args(["-g0", "--target-env", TARGET_ENV]);
    for d in s.defines {
        c.arg(format!("-D{d}"));
    }
    c.arg("-o").arg(out).arg(s.source);
    let output = c.output().map_err(|e| {
        format!("glslangValidator: could not start ({e}); install Debian package glslang-tools")
    })?;
    if !output.status.success() {
        return Err(format!(
            "glslangValidator {} failed:\n{}{}",
            s.source,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

fn validate(path: &Path) -> Result<(), String> {
    let output = Command::new("spirv-val")
        .args(["--target-env", TARGET_ENV])
        .arg(path)
        .output()
        .map_err(|e| format!("spirv-val: could not start ({e}); install spirv-tools"))?;
    if !output.status.success() {
        return Err(format!(
            "spirv-val {} failed:\n{}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// Recompiles the shaders (or, with `check`, verifies the committed SPIR-V).
pub(crate) fn shaders(check: bool) -> Result<(), String> {
    let dir = crate::root().join("shaders");
    let spv = dir.join("spv");
    let tmp = std::env::temp_dir().join(format!("svmirror-shaders-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = (|| {
        let mut stale = Vec::new();
        for s in SHADERS {
            let fresh = tmp.join(s.output);
            compile(&dir, s, &fresh)?;
            validate(&fresh)?;
            let committed = spv.join(s.output);
            if check {
                let a = std::fs::read(&fresh).map_err(|e| format!("{}: {e}", fresh.display()))?;
                match std::fs::read(&committed) {
                    Ok(b) if a == b => validate(&committed)?,
                    Ok(_) => stale.push(format!("{} differs from {}", s.output, s.source)),
                    Err(e) => stale.push(format!("{}: {e}", committed.display())),
                }
            } else {
                std::fs::create_dir_all(&spv).map_err(|e| format!("{}: {e}", spv.display()))?;
                std::fs::copy(&fresh, &committed)
                    .map_err(|e| format!("{}: {e}", committed.display()))?;
                eprintln!("xtask: wrote shaders/spv/{}", s.output);
            }
        }
        if stale.is_empty() {
            if check {
                eprintln!(
                    "xtask: {} SPIR-V modules match their sources and pass spirv-val",
                    SHADERS.len()
                );
            }
            Ok(())
        } else {
            Err(format!(
                "committed SPIR-V is stale (run `cargo xtask shaders`): {}",
                stale.join("; ")
            ))
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Runs the Vulkan suite and benchmarks on a real GPU.
///
/// Extra arguments go to the benchmark binary (a criterion filter, say). The suite runs with
/// `SVMIRROR_VK_DEVICE` unset, so the discrete GPU is picked; the tests print the device and
/// driver they run on, and the benchmark prints its results table.
pub(crate) fn device_test(args: &[String]) -> Result<(), String> {
    let mut info = crate::cargo();
    info.args([
        "test",
        "--release",
        "-p",
        "svmirror-vulkan",
        "--test",
        "device_info",
        "--",
        "--nocapture",
    ]);
    run_vk("device info", info)?;
    let mut suite = crate::cargo();
    suite.args(["test", "--release", "-p", "svmirror-vulkan"]);
    run_vk("Vulkan suite", suite)?;
    let mut bench = crate::cargo();
    bench.args(["bench", "--bench", "vulkan", "--"]).args(args);
    run_vk("Vulkan benchmarks", bench)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"));
    let dir = target.join("criterion");
    let mut rows = Vec::new();
    crate::collect_estimates(&dir, &dir, &mut rows);
    rows.retain(|(name, _)| name.starts_with("vulkan_"));
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    println!("{:<40} {:>14}", "benchmark (device above)", "mean");
    for (name, ns) in rows {
        println!("{name:<40} {:>14}", crate::human_time(ns));
    }
    Ok(())
}

fn run_vk(what: &str, mut c: Command) -> Result<(), String> {
    c.env_remove("SVMIRROR_VK_DEVICE");
    crate::run(what, c)
}
