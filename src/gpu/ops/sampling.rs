//! The guided pick: per-row log-softmax normalisers, then the GenARM sample written back
//! on the device where the next step's embedding reads it.

use crate::error::Result;
use crate::gpu::buffers::storage_zeros;
use crate::gpu::uniforms::{LogitStatsParams, SampleKnobs, SampleParams, Uniform};
use crate::gpu::{gpu_error, GpuContext};
use crate::guide::SamplingParams;

use super::{need, to_u32, Kernels, Op};

/// Buffers of the guided pick.
pub struct SampleBuffers<'a> {
    /// `[rows, vocab]`: every model's logits rows, cut to the base vocabulary.
    pub logits: &'a wgpu::Buffer,
    /// `[rows, 2]` (max, log-sum-exp) from [`Kernels::logit_stats`].
    pub stats: &'a wgpu::Buffer,
    /// `[models]`: the logits row of the base and of each ARM.
    pub slots: &'a wgpu::Buffer,
    /// What the host sets before each pick.
    pub settings: &'a SampleSettingsBuffers,
    /// `[vocab]` scratch.
    pub scores: &'a wgpu::Buffer,
    /// `[2]` u32: the token the next step embeds is written to index 0.
    pub cur: &'a wgpu::Buffer,
    /// `[1 + models]` u32: the id and its log-prob (f32 bits) under each model.
    pub chosen: &'a wgpu::Buffer,
}

/// What the host tells one guided pick: the sampling knobs and each ARM's weight.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleSettings {
    knobs: SampleKnobs,
    /// α per ARM, in slot order.
    alphas: Vec<f32>,
}

impl SampleSettings {
    /// The settings for `params`, the draw's uniform number `u` and the ARM weights, over
    /// a `vocab`-token vocabulary (top-k beyond it keeps everything).
    pub fn new(params: &SamplingParams, u: f64, vocab: usize, alphas: &[f32]) -> Self {
        let top_k = params.top_k.map_or(0, |k| k.min(vocab));
        Self {
            knobs: SampleKnobs {
                inv_temperature: 1.0 / params.temperature,
                top_p: params.top_p,
                u: u as f32,
                // The vocabulary fits in u32 (the op's `vocab` does), so top-k does too.
                top_k: u32::try_from(top_k).unwrap_or(u32::MAX),
                greedy: u32::from(params.greedy),
                ..Default::default()
            },
            alphas: alphas.to_vec(),
        }
    }
}

/// The device side of [`SampleSettings`]: the knobs as a uniform, the α (as many as the
/// engine's ARMs) in a storage buffer.
pub struct SampleSettingsBuffers {
    knobs: wgpu::Buffer,
    alphas: wgpu::Buffer,
}

impl SampleSettingsBuffers {
    /// Buffers for picks guided by `arms` ARMs.
    pub fn new(ctx: &GpuContext, arms: usize) -> Self {
        let knobs = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("sample knobs"),
            size: std::mem::size_of::<SampleKnobs>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Self {
            knobs,
            alphas: storage_zeros(ctx, "sample alphas", arms),
        }
    }

    /// Queues `settings` for the next pick.
    pub fn write(&self, queue: &wgpu::Queue, settings: &SampleSettings) {
        queue.write_buffer(&self.knobs, 0, bytemuck::bytes_of(&settings.knobs));
        if !settings.alphas.is_empty() {
            queue.write_buffer(&self.alphas, 0, bytemuck::cast_slice(&settings.alphas));
        }
    }
}

impl Kernels {
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
        need(&b.settings.alphas, models - 1, "alphas", "guide_sample")?;
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
            self.pipeline::<SampleParams>("guide_sample", Self::defines(None, SampleKnobs::WGSL)),
            &params,
            &[
                b.logits,
                b.stats,
                b.slots,
                &b.settings.knobs,
                &b.settings.alphas,
                b.scores,
                b.cur,
                b.chosen,
            ],
            1,
        );
        Ok(Op {
            label: "guide_sample",
            dispatches: vec![d],
        })
    }
}
