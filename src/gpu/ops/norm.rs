//! RMS norm, alone or with the LoRA down-projections of the rows it normalises.

use crate::error::Result;
use crate::gpu::gpu_error;
use crate::gpu::uniforms::{RmsNormLoraParams, RmsNormParams};

use super::{need, to_u32, Kernels, LoraDown, Op};

impl Kernels {
    /// `y = rms_norm(x) · weight` per row: `x`, `y` are `[rows, n]`, `weight` is `[n]`.
    pub fn rms_norm(
        &self,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<Op> {
        self.rms_norm_with(x, weight, y, rows, n, eps, None)
    }

    /// [`Kernels::rms_norm`] and, in the same dispatch, the LoRA down-projections of the
    /// normed rows (`down.t[a, :] = A_a · y[first + a, :]`), for the projections that
    /// read the norm's output.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_lora(
        &self,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rows: usize,
        n: usize,
        eps: f32,
        down: &LoraDown<'_>,
    ) -> Result<Op> {
        self.rms_norm_with(x, weight, y, rows, n, eps, Some(down))
    }

    #[allow(clippy::too_many_arguments)]
    fn rms_norm_with(
        &self,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rows: usize,
        n: usize,
        eps: f32,
        down: Option<&LoraDown<'_>>,
    ) -> Result<Op> {
        need(x, rows * n, "x", "rms_norm")?;
        need(weight, n, "weight", "rms_norm")?;
        need(y, rows * n, "y", "rms_norm")?;
        let (rows_u32, n_u32) = (to_u32(rows, "rows")?, to_u32(n, "n")?);
        let Some(down) = down else {
            let params = RmsNormParams {
                rows: rows_u32,
                n: n_u32,
                eps,
                _pad: 0,
            };
            let pipeline = self.pipeline::<RmsNormParams>("rms_norm", Self::defines(None, ""));
            let d = self.dispatch(pipeline, &params, &[x, weight, y], rows_u32);
            return Ok(Op {
                label: "rms_norm",
                dispatches: vec![d],
            });
        };
        let batch = down.first + down.arms;
        if down.arms == 0 || down.rank == 0 || down.positions * batch != rows || down.inp != n {
            return Err(gpu_error(format!(
                "rms_norm_lora: LoRA rows {}..{batch} of {} positions' batches, {rows} rows, \
                 rank {}, width {} (norm {n})",
                down.first, down.positions, down.rank, down.inp
            )));
        }
        need(down.a, down.arms * down.rank * n, "a", "rms_norm_lora")?;
        need(down.t, down.slots() * down.rank, "t", "rms_norm_lora")?;
        let params = RmsNormLoraParams {
            rows: rows_u32,
            n: n_u32,
            eps,
            first: to_u32(down.first, "first")?,
            arms: to_u32(down.arms, "arms")?,
            rank: to_u32(down.rank, "rank")?,
            batch: to_u32(batch, "batch")?,
            ..Default::default()
        };
        let pipeline = self.pipeline::<RmsNormLoraParams>("rms_norm_lora", Self::defines(None, ""));
        let d = self.dispatch(
            pipeline,
            &params,
            &[x, weight, y, down.a, down.t],
            params.rows + to_u32(down.slots() * down.rank, "LoRA outputs")?,
        );
        Ok(Op {
            label: "rms_norm_lora",
            dispatches: vec![d],
        })
    }
}
