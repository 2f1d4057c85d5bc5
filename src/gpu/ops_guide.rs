//! Ops for the ARM rows and the guided pick: the LoRA down-projections of a batch's ARM
//! rows (matvec adds the up half), the per-row log-softmax normalisers, and the GenARM
//! sample written back on the device.

use crate::error::Result;
use crate::gpu::gpu_error;
use crate::gpu::ops::{need, to_u32, Kernels, MatVecKind, Op, WG};
use crate::gpu::uniforms::{LogitStatsParams, LoraParams, SampleParams};

/// The down half of the LoRA deltas of batch rows `first..first + arms` for every
/// projection reading one input: each row's `[rank, inp]` A matrices stacked (zeros
/// where its adapter lacks one), so one dispatch serves q/k/v or gate/up alike.
pub struct LoraDown<'a> {
    /// `[arms, rank, inp]`.
    pub a: &'a wgpu::Buffer,
    /// `[arms, rank]`, the output.
    pub t: &'a wgpu::Buffer,
    pub first: usize,
    pub arms: usize,
    /// Stacked rank: the sum of the projections' (padded) ranks.
    pub rank: usize,
    pub inp: usize,
}

/// The up half of one projection's LoRA deltas, added by the matvec that computes the
/// projection (see [`Kernels::matvec_lora`]).
pub struct LoraUp<'a> {
    /// `[m - first, out, rank]`, already times each adapter's scale.
    pub b: &'a wgpu::Buffer,
    /// The down-projections: `[m - first, t_stride]`, this projection's at `t_offset`.
    pub t: &'a wgpu::Buffer,
    pub first: usize,
    pub rank: usize,
    pub t_offset: usize,
    pub t_stride: usize,
    /// The down half as this many consecutive `rank`-wide partial sums, added up here
    /// (one per attention head for o_proj, see [`Kernels::attention`]; else 1).
    pub parts: usize,
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
    /// `t[a, :] = A_a · x[first + a, :]` for every adapted row; `x` is
    /// `[first + arms, inp]`.
    pub fn lora_down(&self, d: &LoraDown<'_>, x: &wgpu::Buffer) -> Result<Op> {
        if d.arms == 0 || d.rank == 0 {
            return Err(gpu_error("lora_down: no ARM rows or rank 0"));
        }
        need(d.a, d.arms * d.rank * d.inp, "a", "lora_down")?;
        need(d.t, d.arms * d.rank, "t", "lora_down")?;
        need(x, (d.first + d.arms) * d.inp, "x", "lora_down")?;
        let params = LoraParams {
            arms: to_u32(d.arms, "arms")?,
            rank: to_u32(d.rank, "rank")?,
            cols: to_u32(d.inp, "inp")?,
            first: to_u32(d.first, "first")?,
        };
        let outputs = params.arms * params.rank;
        let (shader, workgroups) = match self.matvec_kind() {
            MatVecKind::RowPerWorkgroup => ("lora_down", outputs),
            MatVecKind::RowPerInvocation => ("lora_down_rows", outputs.div_ceil(WG)),
        };
        let dispatch = self.dispatch(
            self.pipeline::<LoraParams>(shader, Self::defines(None, "")),
            &params,
            &[d.a, x, d.t],
            workgroups,
        );
        Ok(Op {
            label: "lora_down",
            dispatches: vec![dispatch],
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
