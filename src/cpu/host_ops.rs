//! What the CPU ops that run on host slices share: their inputs as f32 slices, the output
//! pointer their parallel tasks write through, the dot product and `y += a·x`.

use candle_core::{CpuStorage, Layout};

/// The f32 elements of a contiguous CPU tensor (`storage` seen through `layout`); `op`
/// names the custom op in the error.
pub fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: the input must be f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&data[start..end])
}

/// `contiguous_f32` for a tensor an in-place op writes.
pub fn contiguous_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: the tensor written must be f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the tensor written must be contiguous");
    };
    Ok(&mut data[start..end])
}

/// An output slice that tasks on candle's pool write disjoint parts of.
pub struct SharedOut(*mut f32);

// SAFETY: tasks only write disjoint elements through it, and the `&mut [f32]` it was made
// from outlives the parallel loop (`new`'s contract).
unsafe impl Send for SharedOut {}
// SAFETY: as above; it is never read through.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Shares `out` with the tasks of one parallel loop that `out` outlives.
    pub fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// `index` is inside the output and no other task touches that element.
    pub unsafe fn write(&self, index: usize, value: f32) {
        *self.0.add(index) = value;
    }

    /// The `len` elements from `at`.
    ///
    /// # Safety
    /// The range is inside the output and no other task touches it while this lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// `a · b`: with AVX-512 in fused multiply-adds over 16 lanes, elsewhere in eight partial
/// sums so the compiler can vectorise without reassociating floats.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was detected; the lengths are equal.
        return unsafe { avx512::dot(a, b) };
    }
    // Whole chunks without index checks, so the lanes vectorise (simd128 in the browser).
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a8.remainder().iter().zip(b8.remainder());
    let mut acc = [0f32; 8];
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in tail {
        sum += x * y;
    }
    sum
}

/// `y += alpha · x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was detected; the lengths are equal.
        return unsafe { avx512::axpy(alpha, x, y) };
    }
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The mask of the first `n < 16` lanes.
    fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// # Safety
    /// The CPU has AVX-512 F; `a` and `b` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let (pa, pb, n) = (a.as_ptr(), b.as_ptr(), a.len());
        // Two chains: consecutive multiply-adds do not wait on each other.
        let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            even = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), even);
            odd = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                odd,
            );
            i += 32;
        }
        while i < n {
            let m = if n - i >= 16 {
                0xFFFF
            } else {
                tail_mask(n - i)
            };
            let x = _mm512_maskz_loadu_ps(m, pa.add(i));
            even = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, pb.add(i)), even);
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(even, odd))
    }

    /// # Safety
    /// The CPU has AVX-512 F; `x` and `y` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let (px, py, n) = (x.as_ptr(), y.as_mut_ptr(), x.len());
        let a = _mm512_set1_ps(alpha);
        let mut i = 0;
        while i < n {
            let m = if n - i >= 16 {
                0xFFFF
            } else {
                tail_mask(n - i)
            };
            let v = _mm512_fmadd_ps(
                a,
                _mm512_maskz_loadu_ps(m, px.add(i)),
                _mm512_maskz_loadu_ps(m, py.add(i)),
            );
            _mm512_mask_storeu_ps(py.add(i), m, v);
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_axpy_match_f64_at_every_length_to_70() {
        let mut rng = crate::test_rng::SplitMix64::new(9);
        for n in 0..70 {
            let (a, b) = (rng.signed_f32s(n), rng.signed_f32s(n));
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "dot, length {n}");
            let mut y = b.clone();
            axpy(0.75, &a, &mut y);
            for (k, (&got, (&x, &y0))) in y.iter().zip(a.iter().zip(&b)).enumerate() {
                let want = 0.75 * x as f64 + y0 as f64;
                assert!(
                    (got as f64 - want).abs() < 1e-6,
                    "axpy, length {n}, element {k}"
                );
            }
        }
    }
}
