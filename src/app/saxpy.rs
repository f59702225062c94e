//! Streaming: `y = a·x + y` over two large `Vec<f32>` the CPU allocated and filled. The device
//! reads and writes them at their own addresses; the CPU computes the same on a copy of `y` and
//! compares every element bit for bit.

use std::time::Instant;

use super::report::{AppOutcome, Check, ProgressFactory};
use super::{AppConfig, Backend, Result, human_bytes};

/// The scalar `a`.
pub const A: f32 = 2.5;

/// The vectors' contents: small integers and quarters, so that `a·x + y` is exact in f32 and
/// the device's result must equal the CPU's bit for bit.
pub fn inputs(n: usize) -> (Vec<f32>, Vec<f32>) {
    let x = (0..n).map(|i| (i % 1000) as f32 * 0.25).collect();
    let y = (0..n).map(|i| (i % 37) as f32 - 18.0).collect();
    (x, y)
}

/// `y = a·x + y` over native-endian f32s held as bytes (what a device backend loaded): `ys` is
/// updated in place, as many elements as both hold.
pub(crate) fn saxpy_bytes(a: f32, ys: &mut [u8], xs: &[u8]) {
    for (yb, xb) in ys.chunks_exact_mut(4).zip(xs.chunks_exact(4)) {
        let xv = f32::from_ne_bytes([xb[0], xb[1], xb[2], xb[3]]);
        let yv = f32::from_ne_bytes([yb[0], yb[1], yb[2], yb[3]]);
        yb.copy_from_slice(&(yv + a * xv).to_ne_bytes());
    }
}

/// Allocates the vectors, runs the device's saxpy, and checks every element.
pub fn run(
    backend: &dyn Backend,
    config: &AppConfig,
    progress: &dyn ProgressFactory,
) -> Result<AppOutcome> {
    let n = (config.saxpy_bytes / 8).max(1) as usize;
    let (x, mut y) = inputs(n);

    let cpu_started = Instant::now();
    let mut want = y.clone();
    for (w, &xi) in want.iter_mut().zip(&x) {
        *w += A * xi;
    }
    let cpu_time = cpu_started.elapsed();
    std::hint::black_box(&want);

    // The device writes `y` behind Rust's back: from here on it is touched through this raw
    // pointer only, until it is dropped.
    let yp = y.as_mut_ptr();
    let bar = progress.bar("saxpy", n as u64, "elements");
    // SAFETY: `x` and `y` hold `n` f32s each, are distinct allocations, and nothing touches
    // them until the call returns.
    let work = unsafe { backend.saxpy(A, x.as_ptr(), yp, n, &|d, t| bar.set(d, t)) }?;
    bar.finish();

    let mut check = Check::default();
    for (i, w) in want.iter().enumerate() {
        // SAFETY: `i < n`, in `y`, read through the pointer the device wrote through.
        let got = unsafe { yp.wrapping_add(i).read_volatile() };
        check.compare(got.to_bits() == w.to_bits(), || {
            format!("y[{i}]: device {got}, CPU {w}")
        });
    }
    drop(y);
    let bytes = 3 * 4 * n as u64;
    let outcome = AppOutcome {
        app: "saxpy",
        work: format!("2 x {} f32 ({})", n, human_bytes(8 * n as u64)),
        checks: check.count,
        mismatches: check.mismatches,
        first_mismatch: check.first,
        device: work,
        cpu_time,
        rate: Some((bytes as f64, "B/s")),
        extra: vec![],
    };
    Ok(outcome)
}
