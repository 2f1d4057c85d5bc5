//! The engine's element-wise exponentials as host ops: the attention softmax over a
//! prompt, the log-softmax over the vocabulary and SwiGLU's `silu(gate)·up`, each with
//! `exp` below instead of the C library's.
//!
//! WebAssembly has no exp instruction: libm's `expf` there is a call per element, 5% of
//! the playground's time to read a prompt (SiLU alone is 1,536 per token per layer per
//! model). This `exp` is plain arithmetic that vectorises, on every target the same
//! operations, so the browser and the native engine keep agreeing bit for bit.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::host_ops::contiguous_f32;

/// `e^x` within 2 ulp over f32's range (Cephes' `expf` polynomial on `x − n·ln 2`,
/// scaled by `2^n` through the exponent bits). NaN stays NaN; below `e^−87.33` (the
/// smallest normal) it is 0 — so a masked score of −∞ weighs exactly nothing — and
/// above `e^88.37` infinity. No branch, so a loop over it vectorises.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LOW: f32 = -87.33;
    // Past 127.5/log2(e), n = 128 and the scale's exponent bits are infinity's.
    const HIGH: f32 = 88.75;
    const LN2_HIGH: f32 = 0.693_359_4; // 355/512: n·LN2_HIGH is exact for |n| ≤ 128
    const LN2_LOW: f32 = -2.121_944_4e-4;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let c = x.clamp(LOW, HIGH); // two comparisons; NaN passes through
    let shifted = c * std::f32::consts::LOG2_E + SHIFTER;
    let n = (shifted.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let nf = shifted - SHIFTER;
    let r = (c - nf * LN2_HIGH) - nf * LN2_LOW;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = (p * (r * r) + r) + 1.0;
    let scale = f32::from_bits((n.wrapping_add(127) as u32) << 23);
    let below = if x < LOW { 0 } else { u32::MAX };
    f32::from_bits((e * scale).to_bits() & below)
}

/// Whether the host ops here take `t`: f32 on the CPU (elsewhere candle's ops run).
pub(super) fn on_host_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The larger of two, NaN skipped (as `f32::max`, without its libm call on WebAssembly).
#[inline]
pub(super) fn larger(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// `Σ f(v)` in eight lanes (a fixed order the compiler can vectorise).
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for chunk in &mut chunks {
        for k in 0..8 {
            lanes[k] += f(chunk[k]);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
        + tail
}

/// `max(v)` in eight lanes (NaN skipped).
fn lane_max(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for chunk in &mut chunks {
        for k in 0..8 {
            lanes[k] = larger(lanes[k], chunk[k]);
        }
    }
    let tail = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, larger)
}

/// `softmax(row)` in place: `e^(x − max) / Σ`.
pub fn softmax(row: &mut [f32]) {
    let max = lane_max(row);
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let sum = lane_sum(row, |e| e);
    row.iter_mut().for_each(|x| *x /= sum);
}

/// `log_softmax(row)` in place: `(x − max) − ln Σ e^(x − max)`.
pub fn log_softmax(row: &mut [f32]) {
    let max = lane_max(row);
    row.iter_mut().for_each(|x| *x -= max);
    let log_sum = lane_sum(row, exp).ln();
    row.iter_mut().for_each(|x| *x -= log_sum);
}

/// `silu(g)·u = g / (1 + e^−g) · u`, candle's SiLU expression.
#[inline]
pub fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + exp(-g)) * u
}

/// A row function (`softmax`, `log_softmax`) as a candle op over the last dimension of a
/// contiguous f32 tensor.
pub struct RowOp {
    name: &'static str,
    f: fn(&mut [f32]),
}

/// [`softmax`] over the last dimension.
pub const SOFTMAX: RowOp = RowOp {
    name: "softmax-rows",
    f: softmax,
};

/// [`log_softmax`] over the last dimension.
pub const LOG_SOFTMAX: RowOp = RowOp {
    name: "log-softmax-rows",
    f: log_softmax,
};

impl CustomOp1 for RowOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = contiguous_f32(s, l, self.name)?.to_vec();
        let last = l.dims().last().copied().unwrap_or(1).max(1);
        out.chunks_exact_mut(last).for_each(self.f);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `silu(gate)·up` of two tensors of one shape.
pub struct SiluTimes;

impl CustomOp2 for SiluTimes {
    fn name(&self) -> &'static str {
        "silu-times"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "{}: gate {:?} and up {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let (gate, up) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
        );
        let out = gate
            .iter()
            .zip(up)
            .map(|(&g, &u)| silu_times(g, u))
            .collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::test_rng::SplitMix64;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.3 {
            for x in [x, -x.abs() * 0.37, x * 1e-3] {
                let want = f64::from(x).exp();
                let ulp = f64::from(f32::EPSILON) * want;
                worst = worst.max((f64::from(exp(x)) - want).abs() / ulp);
            }
            x += 0.0123;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    fn f64_softmax(row: &[f32]) -> Vec<f64> {
        let max = row
            .iter()
            .map(|&x| f64::from(x))
            .fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = row.iter().map(|&x| (f64::from(x) - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    #[test]
    fn softmax_and_log_softmax_match_f64() {
        let mut rng = SplitMix64::new(11);
        for len in [2, 7, 8, 33, 1000] {
            let mut row: Vec<f32> = rng.signed_f32s(len).iter().map(|x| 16.0 * x).collect();
            // A masked position weighs nothing.
            row[0] = f32::NEG_INFINITY;
            let want = f64_softmax(&row);
            let mut probs = row.clone();
            softmax(&mut probs);
            let mut logs = row.clone();
            log_softmax(&mut logs);
            assert_eq!(probs[0], 0.0);
            assert_eq!(logs[0], f32::NEG_INFINITY);
            for i in 1..len {
                assert!((f64::from(probs[i]) - want[i]).abs() <= 1e-6 * want[i].max(1e-3));
                assert!(
                    (f64::from(logs[i]) - want[i].ln()).abs() <= 2e-5 * want[i].ln().abs().max(1.0)
                );
            }
        }
    }

    #[test]
    fn ops_match_candles_within_rounding() {
        let mut rng = SplitMix64::new(12);
        let data: Vec<f32> = rng.signed_f32s(300).iter().map(|x| 12.0 * x).collect();
        let x = Tensor::from_vec(data, (2, 3, 50), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(rng.signed_f32s(300), (2, 3, 50), &Device::Cpu).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        let ours = x.apply_op1_no_bwd(&SOFTMAX).unwrap();
        let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert!(close(&ours, &theirs) < 1e-6);
        let ours = x.apply_op1_no_bwd(&LOG_SOFTMAX).unwrap();
        let theirs = candle_nn::ops::log_softmax(&x, candle_core::D::Minus1).unwrap();
        assert!(close(&ours, &theirs) < 1e-5);
        let ours = x.apply_op2_no_bwd(&y, &SiluTimes).unwrap();
        let theirs = (candle_nn::ops::silu(&x).unwrap() * &y).unwrap();
        assert!(close(&ours, &theirs) < 1e-5);
    }
}
