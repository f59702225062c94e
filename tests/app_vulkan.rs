//! The example app on the Vulkan backend, run as a user runs it: `svmirror run --backend vulkan
//! --json` on lavapipe (or a GPU) with the Khronos validation layer on, every result checked
//! against the CPU, zero validation errors; and the one-line answer when the device asked for
//! is not there. Needs lavapipe (`mesa-vulkan-drivers`), the validation layer
//! (`vulkan-validationlayers`) and userfaultfd (root): without them the tests fail.

use std::process::{Command, Output};

use serde_json::Value;

fn svmirror(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_svmirror"));
    c.args(args)
        .env_remove("RUST_LOG")
        .env_remove("SVMIRROR_VK_DEVICE")
        .env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("the svmirror binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn u(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[test]
fn every_app_matches_the_cpu_on_vulkan_under_the_validation_layer() {
    let out = svmirror(
        &[
            "run",
            "--backend",
            "vulkan",
            "--size",
            "2M",
            "--nodes",
            "3000",
            "--rounds",
            "24",
            "--slots",
            "8",
            "--json",
        ],
        &[("SVMIRROR_VK_VALIDATION", "1")],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "svmirror run --backend vulkan failed (exit {:?}); it needs lavapipe (apt-get install \
         mesa-vulkan-drivers libvulkan1 vulkan-validationlayers) and userfaultfd (root)\n\
         stdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );
    assert!(
        !stderr.contains("validation layer reported"),
        "validation errors:\n{stderr}"
    );
    let r: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
    assert_eq!(r["backend"], "vulkan");
    let device = r["device"].as_str().expect("device string");
    assert!(
        device.contains("validation layer on"),
        "the backend must run with the validation layer: {device}"
    );
    assert_eq!(u(&r["mismatches"], "mismatches"), 0, "{stdout}");
    let apps = r["apps"].as_array().expect("apps");
    let names: Vec<&str> = apps.iter().filter_map(|a| a["app"].as_str()).collect();
    assert_eq!(names, ["bfs", "saxpy", "churn"]);
    for a in apps {
        let name = &a["app"];
        assert_eq!(u(&a["mismatches"], "mismatches"), 0, "{name}: {a}");
        assert!(a["first_mismatch"].is_null(), "{name}: {a}");
        assert!(u(&a["device"]["commands"], "commands") > 0, "{name}: {a}");
    }
    // Every node level, every saxpy element, every slot: the checks cover all the data.
    assert_eq!(u(&apps[0]["checks"], "bfs checks"), 3001);
    assert_eq!(u(&apps[1]["checks"], "saxpy checks"), (2 << 20) / 8);
    assert!(u(&apps[2]["checks"], "churn checks") >= 24 * 4 * 3);
    // The device faulted the apps' memory in itself, and the churn's read-only slots were
    // refused (a mapped slot left read-only by the CPU's last change happens in about one
    // round in six per slot: with 48 chances, all but certain).
    assert!(u(&r["counters"]["total_faults"], "faults") > 0, "{stdout}");
    let refused = apps[2]["extra"]
        .as_array()
        .expect("churn extra")
        .iter()
        .find(|e| e[0].as_str().is_some_and(|s| s.contains("refused")))
        .and_then(|e| e[1].as_str())
        .and_then(|s| s.parse::<u64>().ok())
        .expect("the churn reports refused stores");
    assert!(refused > 0, "no read-only slot was refused: {stdout}");
}

#[test]
fn a_missing_device_is_one_line_saying_what_to_do() {
    let out = svmirror(
        &["run", "--backend", "vulkan", "--size", "64K", "saxpy"],
        &[("SVMIRROR_VK_DEVICE", "no-such-vulkan-device")],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line:\n{stderr}");
    assert!(
        lines[0].contains("no usable Vulkan device")
            && lines[0].contains("unset SVMIRROR_VK_DEVICE"),
        "{stderr}"
    );
    // The message lists the devices found: lavapipe must be one of them.
    assert!(
        lines[0].contains("llvmpipe"),
        "lavapipe is not installed: {stderr}"
    );
}
