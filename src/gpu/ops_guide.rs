//! Ops for the ARM rows and the guided pick: the LoRA delta of a batch's ARM rows, the
//! per-row log-softmax normalisers, and the GenARM sample written back on the device.

use crate::error::Result;
use crate::gpu::gpu_error;
use crate::gpu::ops::{need, to_u32, Kernels, Op, WG};
use crate::gpu::uniforms::{LogitStatsParams, LoraParams, SampleParams};

/// The stacked low-rank factors of batch rows `first..first + arms` at one projection,
/// each row with its own adapter (zeros where a row has none at this projection).
pub struct LoraStack<'a> {
    /// `[arms, rank, inp]`.
    pub a: &'a wgpu::Buffer,
    /// `[arms, out, rank]`, already times each adapter's scale.
    pub b: &'a wgpu::Buffer,
    /// `[arms, rank]` scratch.
    pub t: &'a wgpu::Buffer,
    pub first: usize,
    pub arms: usize,
    pub rank: usize,
    pub inp: usize,
    pub out: usize,
}

/// Buffers of the guided pick.
pub struct SampleBuffers<'a> {
    /// `[rows, vocab]`: every model's logits rows, cut to the base vocabulary.
    pub logits: &'a wgpu::Buffer,
    /// `[rows, 2]` (max, log-sum-exp) from [`Kernels::logit_stats`].
    pub stats: &'a wgpu::Buffer,
    /// `[models]`: the logits row of the base and of each ARM.
    pub slots: &'a wgpu::Buffer,
    /// `[5 + arms]` f32: 1/T, top-p, u, top-k (0: off), greedy, α_1..α_n.
    pub knobs: &'a wgpu::Buffer,
    /// `[vocab]` scratch.
    pub scores: &'a wgpu::Buffer,
    /// `[2]` u32: the token the next step embeds is written to index 0.
    pub cur: &'a wgpu::Buffer,
    /// `[1 + models]` u32: the id and its log-prob (f32 bits) under each model.
    pub chosen: &'a wgpu::Buffer,
}

/// The knobs buffer's fixed fields; the ARM weights follow.
pub const KNOB_FIELDS: usize = 5;

impl Kernels {
    /// `y[first + a, :] += B_a · (A_a · x[first + a, :])` for every adapted row; `x` is
    /// `[first + arms, inp]`, `y` is `[first + arms, out]` (or longer).
    pub fn lora(&self, s: &LoraStack<'_>, x: &wgpu::Buffer, y: &wgpu::Buffer) -> Result<Op> {
        if s.arms == 0 || s.rank == 0 {
            return Err(gpu_error("lora: no ARM rows or rank 0"));
        }
        need(s.a, s.arms * s.rank * s.inp, "a", "lora")?;
        need(s.b, s.arms * s.out * s.rank, "b", "lora")?;
        need(s.t, s.arms * s.rank, "t", "lora")?;
        need(x, (s.first + s.arms) * s.inp, "x", "lora")?;
        need(y, (s.first + s.arms) * s.out, "y", "lora")?;
        let down_params = LoraParams {
            arms: to_u32(s.arms, "arms")?,
            rank: to_u32(s.rank, "rank")?,
            cols: to_u32(s.inp, "inp")?,
            first: to_u32(s.first, "first")?,
        };
        let up_params = LoraParams {
            cols: to_u32(s.out, "out")?,
            ..down_params
        };
        let down = self.dispatch(
            self.pipeline::<LoraParams>("lora_down", Self::defines(None, "")),
            &down_params,
            &[s.a, x, s.t],
            down_params.arms * down_params.rank,
        );
        let up = self.dispatch(
            self.pipeline::<LoraParams>("lora_up", Self::defines(None, "")),
            &up_params,
            &[s.b, s.t, y],
            (up_params.arms * up_params.cols).div_ceil(WG),
        );
        Ok(Op {
            label: "lora",
            dispatches: vec![down, up],
        })
    }

    /// Max and log-sum-exp of each of `rows` rows of `logits` (`[rows, vocab]`), into
    /// `stats[row_base + r]`.
    pub fn logit_stats(
        &self,
        logits: &wgpu::Buffer,
        rows: usize,
        vocab: usize,
        stats: &wgpu::Buffer,
        row_base: usize,
    ) -> Result<Op> {
        need(logits, rows * vocab, "logits", "logit_stats")?;
        need(stats, 2 * (row_base + rows), "stats", "logit_stats")?;
        let params = LogitStatsParams {
            rows: to_u32(rows, "rows")?,
            vocab: to_u32(vocab, "vocab")?,
            row_base: to_u32(row_base, "row_base")?,
            _pad: 0,
        };
        let d = self.dispatch(
            self.pipeline::<LogitStatsParams>("logit_stats", Self::defines(None, "")),
            &params,
            &[logits, stats],
            params.rows,
        );
        Ok(Op {
            label: "logit_stats",
            dispatches: vec![d],
        })
    }

    /// The GenARM pick over `models` rows (base + ARMs) of the base `vocab` (see
    /// `shaders/guide_sample.wgsl`).
    pub fn guide_sample(&self, b: &SampleBuffers<'_>, models: usize, vocab: usize) -> Result<Op> {
        if models == 0 {
            return Err(gpu_error("guide_sample: no models"));
        }
        need(b.slots, models, "slots", "guide_sample")?;
        need(b.knobs, KNOB_FIELDS + models - 1, "knobs", "guide_sample")?;
        need(b.scores, vocab, "scores", "guide_sample")?;
        need(b.cur, 1, "cur", "guide_sample")?;
        need(b.chosen, 1 + models, "chosen", "guide_sample")?;
        need(b.logits, vocab, "logits", "guide_sample")?;
        let params = SampleParams {
            models: to_u32(models, "models")?,
            vocab: to_u32(vocab, "vocab")?,
            ..Default::default()
        };
        let d = self.dispatch(
            self.pipeline::<SampleParams>("guide_sample", Self::defines(None, "")),
            &params,
            &[
                b.logits, b.stats, b.slots, b.knobs, b.scores, b.cur, b.chosen,
            ],
            1,
        );
        Ok(Op {
            label: "guide_sample",
            dispatches: vec![d],
        })
    }
}
