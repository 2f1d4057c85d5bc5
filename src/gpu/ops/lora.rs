//! The LoRA deltas of a batch's ARM rows: the down half `t = A · x` as its own op (or
//! fused into the norm or attention that produces `x`), the up half `B · t` added by the
//! matvec that computes the projection.

use crate::error::Result;
use crate::gpu::gpu_error;
use crate::gpu::uniforms::LoraParams;

use super::{need, to_u32, Kernels, MatVecKind, Op, WG};

/// The down half of the LoRA deltas of batch rows `first..first + arms` for every
/// projection reading one input: each row's `[rank, inp]` A matrices stacked (zeros
/// where its adapter lacks one), so one dispatch serves q/k/v or gate/up alike.
pub struct LoraDown<'a> {
    /// `[arms, rank, inp]`.
    pub a: &'a wgpu::Buffer,
    /// `[slots, rank]`, the output: slot `s` is row `first + s` (see [`LoraDown::slots`]).
    pub t: &'a wgpu::Buffer,
    pub first: usize,
    pub arms: usize,
    /// Stacked rank: the sum of the projections' (padded) ranks.
    pub rank: usize,
    pub inp: usize,
    /// Positions of a prompt chunk: the batch (`first + arms` rows) repeats this many
    /// times in the input (1 for a decode step).
    pub positions: usize,
}

impl LoraDown<'_> {
    /// Rows of `t`: one per input row from `first` on, `arms` for one position. A base
    /// row's slot (row % batch < first) stays unused, so slots need no renumbering.
    pub fn slots(&self) -> usize {
        self.positions * (self.first + self.arms) - self.first
    }
}

/// The up half of one projection's LoRA deltas, added by the matvec that computes the
/// projection (see [`Kernels::matvec_lora`]).
pub struct LoraUp<'a> {
    /// `[batch - first, out, rank]`, already times each adapter's scale.
    pub b: &'a wgpu::Buffer,
    /// The down-projections: `[m - first, t_stride]`, this projection's at `t_offset`.
    pub t: &'a wgpu::Buffer,
    pub first: usize,
    /// Rows per position: the matvec's `m` rows are `m / batch` positions' batches.
    pub batch: usize,
    pub rank: usize,
    pub t_offset: usize,
    pub t_stride: usize,
    /// The down half as this many consecutive `rank`-wide partial sums, added up here
    /// (one per attention head for o_proj, see [`Kernels::attention`]; else 1).
    pub parts: usize,
}

impl Kernels {
    /// `t[s, :] = A_a · x[first + s, :]` for every adapted row (`a` its ARM); `x` is
    /// `[positions · (first + arms), inp]`.
    pub fn lora_down(&self, d: &LoraDown<'_>, x: &wgpu::Buffer) -> Result<Op> {
        if d.arms == 0 || d.rank == 0 || d.positions == 0 {
            return Err(gpu_error("lora_down: no ARM rows, no position or rank 0"));
        }
        need(d.a, d.arms * d.rank * d.inp, "a", "lora_down")?;
        need(d.t, d.slots() * d.rank, "t", "lora_down")?;
        need(x, (d.first + d.slots()) * d.inp, "x", "lora_down")?;
        let params = LoraParams {
            arms: to_u32(d.arms, "arms")?,
            rank: to_u32(d.rank, "rank")?,
            cols: to_u32(d.inp, "inp")?,
            first: to_u32(d.first, "first")?,
            slots: to_u32(d.slots(), "slots")?,
            ..Default::default()
        };
        let outputs = params.slots * params.rank;
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
}
