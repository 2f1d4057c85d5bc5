//! The decode step's glue between the matmuls as a few host ops: rotary embedding, the
//! KV-cache writes and attention straight from the fused q/k/v output, and SwiGLU
//! straight from the fused gate/up output.
//!
//! As candle ops the same step is ~15 small tensors per layer (narrows, transposes,
//! copies, two rope ops, two cache writes, the attention's own buffers, silu, a product),
//! each allocated and dispatched on the calling thread while the pool's other threads
//! wait: on the 135M demo model a quarter of a token's time. Here each op reads the
//! matmul's output where it lies and computes exactly what those ops computed (the same
//! float expressions in the same order), so the results are the same bit for bit.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, InplaceOp2, Layout, Shape};

use super::decode_attention::{self, Shape as AttentionShape};
use super::host_ops::{contiguous_f32, contiguous_f32_mut};
use super::row_ops::silu_times;
use crate::model::config::RopeLayout;

/// The rotary embedding's tables at one position: `head_dim / 2` cosines and sines.
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub layout: RopeLayout,
}

impl Rope {
    /// Rotates one head (`2 · cos.len()` values) in place, as candle's `rope`/`rope_i`.
    fn apply(&self, x: &mut [f32]) {
        let half = self.cos.len();
        assert_eq!(x.len(), 2 * half);
        match self.layout {
            RopeLayout::HalfSplit => {
                let (a, b) = x.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * self.cos[i] - x2 * self.sin[i];
                    b[i] = x1 * self.sin[i] + x2 * self.cos[i];
                }
            }
            RopeLayout::Interleaved => {
                for (i, pair) in x.chunks_exact_mut(2).enumerate() {
                    let (x1, x2) = (pair[0], pair[1]);
                    pair[0] = x1 * self.cos[i] - x2 * self.sin[i];
                    pair[1] = x1 * self.sin[i] + x2 * self.cos[i];
                }
            }
        }
    }
}

/// Where q, k and v sit in a row of the fused q/k/v projection's output.
#[derive(Clone, Copy, Debug)]
pub struct Qkv {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Qkv {
    fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    fn k_offset(&self) -> usize {
        self.heads * self.head_dim
    }

    fn v_offset(&self) -> usize {
        (self.heads + self.kv_heads) * self.head_dim
    }
}

/// Writes one position's keys (rotated) or values from the q/k/v output `[rows, 1,
/// width]` into a cache `[cache_rows, kv_heads, capacity, head_dim]`, in place. One
/// output row (a layer the rows share) goes to every cache row.
pub struct WriteCache<'a> {
    pub qkv: Qkv,
    pub position: usize,
    /// `Some` for keys (rotated on the way), `None` for values.
    pub rope: Option<&'a Rope>,
}

impl InplaceOp2 for WriteCache<'_> {
    fn name(&self) -> &'static str {
        "write-kv-cache"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let Qkv {
            kv_heads, head_dim, ..
        } = self.qkv;
        let src = contiguous_f32(src, src_l, self.name())?;
        let (cache_rows, heads, capacity, hd) = dst_l.shape().dims4()?;
        let rows = src_l.dims()[0];
        let width = self.qkv.width();
        if heads != kv_heads || hd != head_dim || self.position >= capacity {
            candle_core::bail!(
                "write-kv-cache: cache {:?} for {:?}",
                dst_l.dims(),
                self.qkv
            );
        }
        if src.len() != rows * width || !(rows == cache_rows || rows == 1) {
            candle_core::bail!(
                "write-kv-cache: q/k/v {:?} for {cache_rows} rows",
                src_l.dims()
            );
        }
        let cache = contiguous_f32_mut(dst, dst_l, self.name())?;
        let offset = match self.rope {
            Some(_) => self.qkv.k_offset(),
            None => self.qkv.v_offset(),
        };
        for cache_row in 0..cache_rows {
            let row = if rows == 1 { 0 } else { cache_row };
            for g in 0..kv_heads {
                let from = row * width + offset + g * head_dim;
                let to = ((cache_row * kv_heads + g) * capacity + self.position) * head_dim;
                let slot = &mut cache[to..to + head_dim];
                slot.copy_from_slice(&src[from..from + head_dim]);
                if let Some(rope) = self.rope {
                    rope.apply(slot);
                }
            }
        }
        Ok(())
    }
}

/// Attention of one new position per row, its queries rotated from the q/k/v output
/// `[rows, 1, width]`, over the caches' first `len` positions (the new one written):
/// `[rows, 1, heads · head_dim]`.
pub struct Attend<'a> {
    pub qkv: Qkv,
    pub len: usize,
    pub rope: &'a Rope,
}

impl CustomOp3 for Attend<'_> {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Qkv {
            heads,
            kv_heads,
            head_dim,
        } = self.qkv;
        let qkv = contiguous_f32(s1, l1, self.name())?;
        let rows = l1.dims()[0];
        let width = self.qkv.width();
        if qkv.len() != rows * width || l2.dims() != l3.dims() {
            candle_core::bail!(
                "decode-attention: q/k/v {:?}, cache {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let (cache_rows, _, capacity, _) = l2.shape().dims4()?;
        if rows > cache_rows || self.len > capacity {
            candle_core::bail!("decode-attention: {rows} rows, {} positions", self.len);
        }
        let mut queries = Vec::with_capacity(rows * heads * head_dim);
        for row in qkv.chunks_exact(width) {
            queries.extend_from_slice(&row[..heads * head_dim]);
        }
        for head in queries.chunks_exact_mut(head_dim) {
            self.rope.apply(head);
        }
        let shape = AttentionShape {
            rows,
            heads,
            kv_heads,
            head_dim,
            capacity,
            len: self.len,
        };
        let (k, v) = (
            contiguous_f32(s2, l2, self.name())?,
            contiguous_f32(s3, l3, self.name())?,
        );
        let mut out = vec![0f32; shape.query_len()];
        decode_attention::decode_attention(&queries, k, v, shape, &mut out);
        Ok((
            CpuStorage::F32(out),
            Shape::from((rows, 1, heads * head_dim)),
        ))
    }
}

/// `silu(gate) · up` from the fused gate/up output `[…, 2·ffn]`: `[…, ffn]`.
pub struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let mut dims = l.dims().to_vec();
        let last = dims.last_mut().expect("a tensor with dimensions");
        let ffn = *last / 2;
        *last = ffn;
        let mut out = Vec::with_capacity(x.len() / 2);
        for row in x.chunks_exact(2 * ffn) {
            let (gate, up) = row.split_at(ffn);
            // The unfused path's expression (`row_ops::SiluTimes`).
            out.extend(gate.iter().zip(up).map(|(&g, &u)| silu_times(g, u)));
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, D};

    use super::*;
    use crate::test_rng::SplitMix64;

    fn tensor(rng: &mut SplitMix64, dims: &[usize]) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(rng.signed_f32s(n), dims, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn swiglu_is_the_unfused_silu_times_up_bit_for_bit() {
        let mut rng = SplitMix64::new(3);
        let x = tensor(&mut rng, &[2, 3, 2 * 40]);
        let (gate, up) = (
            x.narrow(D::Minus1, 0, 40).unwrap().contiguous().unwrap(),
            x.narrow(D::Minus1, 40, 40).unwrap().contiguous().unwrap(),
        );
        let want = gate
            .apply_op2_no_bwd(&up, &super::super::row_ops::SiluTimes)
            .unwrap();
        let got = x.apply_op1_no_bwd(&SwiGlu).unwrap();
        assert_eq!(got.dims(), &[2, 3, 40]);
        assert_eq!(bits(&got), bits(&want));
    }

    /// The cache writes and attention against candle's rope, `slice_set` and the
    /// general attention's inputs, for both rope layouts, shared and per-row outputs.
    #[test]
    fn cache_writes_and_attention_match_the_candle_ops() {
        let mut rng = SplitMix64::new(4);
        let qkv = Qkv {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let (capacity, position) = (6, 3);
        for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
            for (rows, cache_rows) in [(2, 2), (1, 3)] {
                let cos: Vec<f32> = rng.signed_f32s(4);
                let sin: Vec<f32> = rng.signed_f32s(4);
                let rope = Rope {
                    cos: cos.clone(),
                    sin: sin.clone(),
                    layout,
                };
                let (cos_t, sin_t) = (
                    Tensor::from_vec(cos, (1, 4), &Device::Cpu).unwrap(),
                    Tensor::from_vec(sin, (1, 4), &Device::Cpu).unwrap(),
                );
                let candle_rope = |t: &Tensor| match layout {
                    RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(t, &cos_t, &sin_t),
                    RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(t, &cos_t, &sin_t),
                };
                let out = tensor(&mut rng, &[rows, 1, qkv.width()]);
                let heads = |at: usize, n: usize| {
                    out.narrow(D::Minus1, at, n * 8)
                        .unwrap()
                        .reshape((rows, 1, n, 8))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                };
                let k_want = candle_rope(&heads(32, 2)).unwrap();
                let v_want = heads(48, 2);
                let k = tensor(&mut rng, &[cache_rows, 2, capacity, 8]);
                let v = tensor(&mut rng, &[cache_rows, 2, capacity, 8]);
                let (k_ref, v_ref) = (k.copy().unwrap(), v.copy().unwrap());
                let every = |t: Tensor| {
                    t.broadcast_as((cache_rows, 2, 1, 8))
                        .unwrap()
                        .contiguous()
                        .unwrap()
                };
                k_ref.slice_set(&every(k_want), 2, position).unwrap();
                v_ref.slice_set(&every(v_want), 2, position).unwrap();
                let write = |cache: &Tensor, rope| {
                    let op = WriteCache {
                        qkv,
                        position,
                        rope,
                    };
                    cache.inplace_op2(&out, &op).unwrap();
                };
                write(&k, Some(&rope));
                write(&v, None);
                assert_eq!(bits(&k), bits(&k_ref), "{layout:?} keys");
                assert_eq!(bits(&v), bits(&v_ref), "{layout:?} values");

                let q = candle_rope(&heads(0, 4)).unwrap();
                let queries: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
                let shape = AttentionShape {
                    rows,
                    heads: 4,
                    kv_heads: 2,
                    head_dim: 8,
                    capacity,
                    len: position + 1,
                };
                let (kv, vv): (Vec<f32>, Vec<f32>) = (
                    k.flatten_all().unwrap().to_vec1().unwrap(),
                    v.flatten_all().unwrap().to_vec1().unwrap(),
                );
                let mut want = vec![0f32; shape.query_len()];
                decode_attention::decode_attention(&queries, &kv, &vv, shape, &mut want);
                let attend = Attend {
                    qkv,
                    len: position + 1,
                    rope: &rope,
                };
                let got = out.apply_op3_no_bwd(&k, &v, &attend).unwrap();
                assert_eq!(got.dims(), &[rows, 1, 32]);
                let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                assert_eq!(bits(&got), want, "{layout:?} attention");
            }
        }
    }
}
