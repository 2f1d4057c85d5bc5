//! Attention for one new position per row, read straight from the KV cache: the decode
//! step's case.
//!
//! The general path (`llama::attention`) is candle ops — a batched matmul against the
//! transposed keys, a softmax, a matmul with the values — and for one query position
//! those are a few thousand multiply-adds each behind a general GEMM's packing and
//! dispatch: ~1.5 ms of a 1.1B model's ~30 ms token on two cores. Here each (row, query
//! head) is one task on candle's pool: it scores every cached key, takes the softmax and
//! sums the values, in f32 like the general path (with AVX-512, fused multiply-adds
//! over registers).

use std::ops::Range;

use super::host_ops::{dot, SharedOut};
use super::row_ops;

/// The sizes of one decode attention call.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions each cache row holds room for.
    pub capacity: usize,
    /// Positions to attend to (the cached ones and the new one, already written).
    pub len: usize,
}

impl Shape {
    /// Elements of the queries and of the output: `[rows, heads, head_dim]`.
    pub fn query_len(&self) -> usize {
        self.rows * self.heads * self.head_dim
    }

    /// Elements the caches must hold at least: `[rows, kv_heads, capacity, head_dim]`.
    pub fn cache_len(&self) -> usize {
        self.rows * self.kv_heads * self.capacity * self.head_dim
    }
}

/// `out[r, h] = softmax(q[r, h] · K[r, g]ᵀ / √d) · V[r, g]` over positions `0..len`, where
/// query head `h` reads KV head `g = h / (heads / kv_heads)` (grouped-query attention).
/// `k` and `v` are caches laid out `[rows ≥ shape.rows, kv_heads, capacity, head_dim]`.
pub fn decode_attention(q: &[f32], k: &[f32], v: &[f32], shape: Shape, out: &mut [f32]) {
    let Shape {
        rows,
        heads,
        kv_heads,
        head_dim,
        capacity,
        len,
    } = shape;
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads) && len <= capacity);
    assert!(q.len() == shape.query_len() && out.len() == shape.query_len());
    assert!(k.len() >= shape.cache_len() && v.len() >= shape.cache_len());
    let n_rep = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let out_ptr = SharedOut::new(out);
    // One task per (row, query head): a demo model's three KV heads would split 2:1
    // over two threads.
    let task = |row_heads: Range<usize>| {
        let mut scores = vec![0f32; len];
        for row_head in row_heads {
            let (r, h) = (row_head / heads, row_head % heads);
            let cache = (r * kv_heads + h / n_rep) * capacity * head_dim;
            let at = row_head * head_dim;
            let query = &q[at..at + head_dim];
            // SAFETY: each (row, head) output slice belongs to one task, and `out`
            // outlives the parallel loop.
            let out = unsafe { out_ptr.slice(at, head_dim) };
            attend_head(
                query,
                &k[cache..cache + len * head_dim],
                &v[cache..cache + len * head_dim],
                scale,
                &mut scores,
                out,
            );
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(rows * heads, task);
}

/// One head: `out = softmax(scale · keys · query) · values`, with `keys` and `values`
/// `[scores.len(), head_dim]` and `scores` as scratch.
fn attend_head(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let head_dim = query.len();
    assert!(out.len() == head_dim && keys.len() == scores.len() * head_dim);
    assert_eq!(values.len(), keys.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was detected; the sizes were checked above.
        match head_dim {
            64 => {
                return unsafe { avx512::attend_head::<4>(query, keys, values, scale, scores, out) }
            }
            128 => {
                return unsafe { avx512::attend_head::<8>(query, keys, values, scale, scores, out) }
            }
            _ => {}
        }
    }
    for (s, key) in scores.iter_mut().zip(keys.chunks_exact(head_dim)) {
        *s = dot(query, key) * scale;
    }
    let total = exp_shifted_in_place(scores);
    out.fill(0.0);
    for (&p, value) in scores.iter().zip(values.chunks_exact(head_dim)) {
        for (o, &x) in out.iter_mut().zip(value) {
            *o += p * x;
        }
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `s ← exp(s − max s)` in place (`row_ops::exp`, no libm call); returns the sum (the
/// softmax's denominator).
fn exp_shifted_in_place(s: &mut [f32]) -> f32 {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, row_ops::larger);
    let mut total = 0.0;
    for x in s.iter_mut() {
        *x = row_ops::exp(*x - max);
        total += *x;
    }
    total
}

/// `attend_head` with the query, each key and the output in registers: one fused
/// multiply-add per 16 elements instead of the portable path's separate products and
/// sums over memory.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `attend_head` for `head_dim = 16·C`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `query` and `out` hold `16·C` floats, `keys` and `values`
    /// `scores.len()` rows of them.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend_head<const C: usize>(
        query: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let head_dim = 16 * C;
        let q: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(query.as_ptr().add(16 * c)));
        for (t, s) in scores.iter_mut().enumerate() {
            let key = keys.as_ptr().add(t * head_dim);
            let mut acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(key));
            for (c, q) in q.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(*q, _mm512_loadu_ps(key.add(16 * c)), acc);
            }
            *s = _mm512_reduce_add_ps(acc) * scale;
        }
        let total = super::exp_shifted_in_place(scores);
        let mut acc = [_mm512_setzero_ps(); C];
        for (t, &p) in scores.iter().enumerate() {
            let value = values.as_ptr().add(t * head_dim);
            let p = _mm512_set1_ps(p);
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(p, _mm512_loadu_ps(value.add(16 * c)), *acc);
            }
        }
        let inv = _mm512_set1_ps(1.0 / total);
        for (c, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), _mm512_mul_ps(*acc, inv));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same attention in f64, written out directly.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: Shape) -> Vec<f64> {
        let n_rep = s.heads / s.kv_heads;
        let mut out = vec![0f64; s.query_len()];
        for r in 0..s.rows {
            for h in 0..s.heads {
                let g = h / n_rep;
                let qv = &q[(r * s.heads + h) * s.head_dim..][..s.head_dim];
                let base = (r * s.kv_heads + g) * s.capacity * s.head_dim;
                let scores: Vec<f64> = (0..s.len)
                    .map(|t| {
                        let key = &k[base + t * s.head_dim..][..s.head_dim];
                        let d: f64 = qv.iter().zip(key).map(|(&a, &b)| a as f64 * b as f64).sum();
                        d / (s.head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for (t, p) in e.iter().enumerate() {
                    let value = &v[base + t * s.head_dim..][..s.head_dim];
                    for (d, &x) in value.iter().enumerate() {
                        out[(r * s.heads + h) * s.head_dim + d] += p / total * x as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_an_f64_reference_for_grouped_heads_and_partial_caches() {
        let mut rng = crate::test_rng::SplitMix64::new(5);
        for (rows, heads, kv_heads, head_dim, capacity, len) in [
            (1, 4, 4, 8, 4, 1),
            (2, 8, 2, 64, 40, 33),
            (3, 6, 3, 12, 9, 9),
            (2, 4, 1, 128, 7, 5),
        ] {
            let shape = Shape {
                rows,
                heads,
                kv_heads,
                head_dim,
                capacity,
                len,
            };
            let q = rng.signed_f32s(shape.query_len());
            // Cache rows beyond `rows` and positions beyond `len` must not be read: make
            // them huge so reading them would show.
            let mut k = rng.signed_f32s(shape.cache_len() + head_dim * capacity);
            let mut v = rng.signed_f32s(k.len());
            for (i, (kk, vv)) in k.iter_mut().zip(&mut v).enumerate() {
                let pos = (i / head_dim) % capacity;
                if pos >= len || i >= shape.cache_len() {
                    (*kk, *vv) = (1e30, 1e30);
                }
            }
            let mut out = vec![f32::NAN; shape.query_len()];
            decode_attention(&q, &k, &v, shape, &mut out);
            for (i, (&got, want)) in out.iter().zip(reference(&q, &k, &v, shape)).enumerate() {
                assert!(
                    (got as f64 - want).abs() < 1e-5,
                    "{shape:?} element {i}: {got} vs {want}"
                );
            }
        }
    }
}
