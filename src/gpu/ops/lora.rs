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
}
