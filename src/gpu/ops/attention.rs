//! One attention step: RoPE and the KV-cache write, then one query per (row, head) over
//! the cache, optionally with each head's part of the o projection's LoRA down half.

use crate::error::Result;
use crate::gpu::buffers::storage_zeros;
use crate::gpu::gpu_error;
use crate::gpu::uniforms::AttentionParams;

use super::{need, to_u32, Kernels, LoraDown, Op, WG};

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// HF checkpoints: (i, i + d/2).
    HalfSplit,
    /// GGUF / Meta checkpoints: (2i, 2i + 1).
    Interleaved,
}

/// The shape of one attention layer's single-query step.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Batch rows (base + ARMs), each with its own cache.
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions the cache holds.
    pub capacity: usize,
    /// How RoPE pairs the dimensions of a head.
    pub rope: RopeStyle,
    /// `Some(w)`: the query at `p` attends only to positions `p − w < t ≤ p`.
    pub window: Option<usize>,
    /// Consecutive positions from `pos[pos_index]` on (a prompt chunk; 1 for a decode
    /// step): the buffers hold one batch of `rows` per position, and the query at
    /// position `p` sees the cache up to `p`, the chunk's earlier positions included.
    pub positions: usize,
}

/// Buffers of one attention step.
pub struct AttentionBuffers<'a> {
    /// Each row's q `[heads, head_dim]`, k and v `[kv_heads, head_dim]` side by side, as
    /// the stacked q/k/v projection leaves them: `[positions · rows,
    /// (heads + 2·kv_heads)·head_dim]`.
    /// q is rotated in place; k is rotated on its way into the cache.
    pub qkv: &'a wgpu::Buffer,
    /// `[rows, kv_heads, capacity, head_dim]` each.
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
    /// `array<u32>`; the position is `pos[pos_index]`.
    pub pos: &'a wgpu::Buffer,
    /// RoPE's `[head_dim / 2]` frequencies.
    pub inv_freq: &'a wgpu::Buffer,
    /// `[positions · rows, heads, head_dim]`.
    pub out: &'a wgpu::Buffer,
    /// The o projection's LoRA down half, if ARM rows adapt o_proj: its `t` receives
    /// `[slots, heads, rank]`, each head's partial sum, for a matvec with `parts = heads`.
    pub o_lora: Option<LoraDown<'a>>,
}

impl Kernels {
    /// Rotates q and k by RoPE at `pos[pos_index]` and writes k/v there into the caches
    /// (one dispatch), then attends one query per (row, head) over positions `0..=pos`
    /// (the last `window` of them with a sliding window) and, with `o_lora`, computes each head's part of the o projection's down half.
    /// Owns a `[positions · rows, heads, capacity]` scratch buffer for the scores. The
    /// caller keeps `pos < capacity`; chunk positions at or past it are not stored.
    pub fn attention(
        &self,
        shape: AttentionShape,
        b: &AttentionBuffers<'_>,
        pos_index: usize,
    ) -> Result<Op> {
        let scores = storage_zeros(
            &self.ctx,
            "attention scores",
            shape.rows * shape.positions * shape.heads * shape.capacity,
        );
        self.attention_in(shape, b, pos_index, &scores)
    }

    /// [`Kernels::attention`] with the scores in `scores` (at least `[positions · rows,
    /// heads, capacity]`), which layers that run one after another can share.
    pub fn attention_in(
        &self,
        shape: AttentionShape,
        b: &AttentionBuffers<'_>,
        pos_index: usize,
        scores: &wgpu::Buffer,
    ) -> Result<Op> {
        let AttentionShape {
            rows,
            heads,
            kv_heads,
            head_dim,
            capacity,
            rope,
            window,
            positions,
        } = shape;
        let batch = rows;
        let rows = rows * positions;
        if kv_heads == 0
            || positions == 0
            || !heads.is_multiple_of(kv_heads)
            || capacity == 0
            || !head_dim.is_multiple_of(2)
            || window == Some(0)
        {
            return Err(gpu_error(format!("attention: bad shape {shape:?}")));
        }
        need(
            b.qkv,
            rows * (heads + 2 * kv_heads) * head_dim,
            "qkv",
            "attention",
        )?;
        need(b.out, rows * heads * head_dim, "out", "attention")?;
        let cache = batch * kv_heads * capacity * head_dim;
        need(b.k_cache, cache, "k_cache", "attention")?;
        need(b.v_cache, cache, "v_cache", "attention")?;
        need(b.pos, pos_index + 1, "pos", "attention")?;
        need(b.inv_freq, head_dim / 2, "inv_freq", "attention")?;
        let mut params = AttentionParams {
            rows: to_u32(rows, "rows")?,
            heads: to_u32(heads, "heads")?,
            kv_heads: to_u32(kv_heads, "kv_heads")?,
            head_dim: to_u32(head_dim, "head_dim")?,
            capacity: to_u32(capacity, "capacity")?,
            pos_index: to_u32(pos_index, "pos_index")?,
            scale: 1.0 / (head_dim as f32).sqrt(),
            // A window covering the whole cache changes nothing.
            window: to_u32(window.unwrap_or(0).min(capacity), "window")?,
            batch: to_u32(batch, "batch")?,
            ..Default::default()
        };
        if let Some(d) = &b.o_lora {
            if d.rank == 0
                || d.arms == 0
                || d.first + d.arms != batch
                || d.positions != positions
                || d.inp != heads * head_dim
            {
                return Err(gpu_error(format!(
                    "attention: o LoRA rows {}..{} of {batch}, rank {}, {} inputs for {heads} \
                     heads of {head_dim}",
                    d.first,
                    d.first + d.arms,
                    d.rank,
                    d.inp
                )));
            }
            need(d.a, d.arms * d.rank * d.inp, "lora a", "attention")?;
            need(d.t, d.slots() * heads * d.rank, "lora t", "attention")?;
            params.lora_first = to_u32(d.first, "lora first")?;
            params.lora_rank = to_u32(d.rank, "lora rank")?;
        }
        need(scores, rows * heads * capacity, "scores", "attention")?;
        let interleaved = rope == RopeStyle::Interleaved;
        let pairs = to_u32((heads + kv_heads) * rows * head_dim / 2, "rope pairs")?;
        let write = self.dispatch(
            self.pipeline::<AttentionParams>(
                "rope_kv_write",
                Self::defines(None, &format!("const INTERLEAVED: bool = {interleaved};\n")),
            ),
            &params,
            &[b.qkv, b.k_cache, b.v_cache, b.pos, b.inv_freq],
            pairs.div_ceil(WG),
        );
        let mut buffers = vec![b.qkv, b.k_cache, b.v_cache, b.pos, scores, b.out];
        let shader = match &b.o_lora {
            Some(d) => {
                buffers.extend([d.a, d.t]);
                "attention_lora"
            }
            None => "attention",
        };
        let attend = self.dispatch(
            self.pipeline::<AttentionParams>(shader, Self::defines(None, "")),
            &params,
            &buffers,
            params.rows * params.heads,
        );
        Ok(Op {
            label: "attention",
            dispatches: vec![write, attend],
        })
    }
}
