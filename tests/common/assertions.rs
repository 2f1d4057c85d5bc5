//! Assertions with failure messages that say where and by how much.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::{stderr, stdout};

/// Panics unless |got - want| <= atol + rtol * |want| everywhere (NaN fails),
/// listing the first 5 mismatches and the max abs diff.
pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length mismatch (got {}, want {})",
        got.len(),
        want.len()
    );
    let mut max_diff = 0.0f64;
    let mut bad = Vec::new();
    let mut n_bad = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g as f64 - w).abs();
        // NaN counts as a mismatch.
        if diff.is_nan() || diff > atol + rtol * w.abs() {
            n_bad += 1;
            if bad.len() < 5 {
                bad.push(format!("  [{i}] got {g} want {w} |diff| {diff:e}"));
            }
        }
        if diff.is_nan() || diff > max_diff {
            max_diff = if diff.is_nan() { f64::NAN } else { diff };
        }
    }
    if n_bad > 0 {
        panic!(
            "{what}: {n_bad} of {} values not close (atol {atol:e}, rtol {rtol:e}), max abs diff {max_diff:e}\n{}",
            got.len(),
            bad.join("\n")
        );
    }
}

/// Two safetensors files hold the same tensors to 1e-6.
pub fn assert_same_safetensors(a: &Path, b: &Path) {
    let a_map = candle_core::safetensors::load(a, &Device::Cpu).expect("first file loads");
    let b_map = candle_core::safetensors::load(b, &Device::Cpu).expect("second file loads");
    assert_eq!(
        a_map.len(),
        b_map.len(),
        "{} vs {}",
        a.display(),
        b.display()
    );
    for (name, ta) in &a_map {
        let diff = (ta - &b_map[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{}: {name} differs by {diff}", a.display());
    }
}

/// A failing run must say why (containing `needle`) and must not have panicked.
pub fn assert_clean_error(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

/// Checks autograd's gradients of an f64 loss against central finite differences at
/// the first, middle and last entry of each named variable (`loss` recomputes the loss
/// from the variables' current values); returns how many entries were checked.
pub fn assert_gradients_match_finite_differences(
    vars: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
    loss: &mut dyn FnMut() -> f64,
) -> usize {
    let eps = 1e-5;
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut checked = 0;
    for (name, var) in vars {
        let g = flat(
            grads
                .get(var.as_tensor())
                .expect("the variable has a gradient"),
        );
        let values = flat(var.as_tensor());
        let set = |v: Vec<f64>| {
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap()
        };
        for idx in [0, values.len() / 2, values.len() - 1] {
            let mut nudged = |delta: f64| {
                let mut v = values.clone();
                v[idx] += delta;
                set(v);
                loss()
            };
            let fd = (nudged(eps) - nudged(-eps)) / (2.0 * eps);
            set(values.clone());
            let tol = 1e-6 + 1e-4 * fd.abs().max(g[idx].abs());
            assert!(
                (fd - g[idx]).abs() < tol,
                "{name}[{idx}]: autograd {} vs finite difference {fd}",
                g[idx]
            );
            checked += 1;
        }
    }
    checked
}
