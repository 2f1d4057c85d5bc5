//! The WebGPU engine: base and ARMs on one device, one command encoder and one submit
//! per step, the GenARM pick made on the device.
//!
//! Models are grouped by weights as in the candle engine: the base and its LoRA ARMs
//! are rows of group 0; an ARM with weights of its own is a group of its own. All
//! groups read the token and position from one `cur` buffer. Group 0 writes its logits
//! straight into the shared `[rows, vocab]` logits buffer; other groups' rows are copied
//! in cut to the base's vocabulary, and every row is then normalised over the base's
//! tokens (GenARM's rule: an ARM's extra tokens take no probability). Only the chosen id
//! and its log-probs (a few words) come back per token.

use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::{
    check_feed, check_guidance, check_rewind, AsyncEngine, Chosen, Engine, StepLogProbs,
};
use crate::error::{Error, Result};
use crate::gpu::buffers::{storage_u32, storage_zeros};
use crate::gpu::model::GpuLlama;
use crate::gpu::ops::{Op, SampleBuffers, SampleSettings, SampleSettingsBuffers, MAX_MATVEC_ROWS};
use crate::gpu::{gpu_error, GpuContext, Kernels, MatVecKind};
use crate::guide::{log_softmax, Sampler, SamplingParams};
use crate::model::arm_plan::{group_arms, ArmPlan};
use crate::model::{BaseFacts, Checkpoint};

/// The id the sampler writes when no guided score is finite.
const NO_TOKEN: u32 = u32::MAX;

/// The most positions one prompt chunk holds (fewer when the base has ARM rows: a
/// chunk's rows are capped by [`MAX_MATVEC_ROWS`]). A prompt is fed in chunks of this
/// many positions, the last one padded; each chunk reads the weights once.
pub const PREFILL_POSITIONS: usize = 32;

/// How a feed splits into prompt chunks and single decode steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Positions per chunk.
    pub positions: usize,
    /// The fewest positions worth a padded last chunk; fewer go as decode steps.
    pub min_padded: usize,
}

impl ChunkPlan {
    /// For `kind`: a CPU adapter computes every row of a chunk, padding included, so a
    /// chunk costs about its rows' multiply-adds (on lavapipe 32 positions took about
    /// 17 decode steps) and a remainder under half a chunk is cheaper stepped; a GPU
    /// runs a chunk in about one step's chain of dispatches, so two positions already
    /// fill one.
    fn new(positions: usize, kind: MatVecKind) -> Self {
        let min_padded = match kind {
            MatVecKind::RowPerInvocation => positions.div_ceil(2),
            MatVecKind::RowPerWorkgroup => 2,
        };
        Self {
            positions,
            min_padded: min_padded.clamp(2, positions.max(2)),
        }
    }

    /// `(chunked, stepped)`: the first `chunked` tokens of a `len`-token feed go in
    /// chunks (the last one padded), the `stepped` after them one decode step each.
    pub fn split(&self, len: usize) -> (usize, usize) {
        let full = len / self.positions * self.positions;
        let rest = len - full;
        if rest >= self.min_padded {
            (len, 0)
        } else {
            (full, rest)
        }
    }
}

/// Compute dispatches of a prompt's forward passes and the pick after them, by length.
#[derive(Clone, Copy, Debug)]
pub struct PromptDispatches {
    /// One decode step, all groups (a one-token prompt is one).
    pub step: usize,
    /// How a prompt splits into chunks and steps.
    pub plan: ChunkPlan,
    /// One chunk's pass through the layers, all groups.
    pub per_chunk: usize,
    /// The last position's final norm and head, all groups.
    pub head: usize,
    /// The guided pick: logit statistics and the sample.
    pub pick: usize,
}

impl PromptDispatches {
    /// Dispatches from a `len`-token prompt to the first new token.
    pub fn for_len(&self, len: usize) -> usize {
        let (chunked, stepped) = self.plan.split(len);
        // A step runs the head itself; after chunks alone the last position needs one.
        let head = if stepped == 0 && chunked > 0 {
            self.head
        } else {
            0
        };
        chunked.div_ceil(self.plan.positions) * self.per_chunk
            + stepped * self.step
            + head
            + self.pick
    }
}

/// Which positions of a feed go through the head.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// None: a feed whose logits nobody reads.
    None,
    /// The last position's, for `step` and the guided pick.
    Last,
    /// Every position's, for `teacher_forced`.
    Every,
}

/// A step submitted before the host asked for it.
struct Speculative {
    /// The settings it ran with: it is used only if the next request has the same.
    settings: SampleSettings,
    /// The readback buffer it copies its choice to.
    slot: usize,
    submission: wgpu::SubmissionIndex,
}

pub struct GpuEngine {
    kernels: Kernels,
    groups: Vec<GpuLlama>,
    /// The first row of each group in `logits`.
    row_base: Vec<usize>,
    /// The logits row of the base and of each ARM.
    slots: Vec<usize>,
    labels: Vec<String>,
    vocab: usize,
    facts: BaseFacts,
    /// `[id, pos]` of the token being fed.
    cur: wgpu::Buffer,
    /// `[id, pos]` pairs of a feed: the last one is copied into `cur`.
    feed: wgpu::Buffer,
    /// A prompt chunk's first position and ids (`model::CHUNK_POS`, `model::CHUNK_IDS`),
    /// read by every group's chunk pass.
    chunk: wgpu::Buffer,
    /// The records of a feed's chunks, copied into `chunk` one by one.
    chunk_feed: wgpu::Buffer,
    /// How feeds split into prompt chunks and decode steps.
    chunk_plan: ChunkPlan,
    /// `[rows, vocab]`: group 0's logits rows, then the other groups' cut rows.
    logits: wgpu::Buffer,
    settings: SampleSettingsBuffers,
    chosen: wgpu::Buffer,
    /// Two readback buffers: one for the step being read, one for the step in flight.
    chosen_staging: [wgpu::Buffer; 2],
    /// Every model's logits rows, for `step` (built once, not per call).
    logits_staging: wgpu::Buffer,
    /// `cur` after a `feed`: the one word waited on instead of the logits.
    fed_staging: wgpu::Buffer,
    /// The position word of a speculative step, copied into `cur`.
    next_pos: wgpu::Buffer,
    speculative: Option<Speculative>,
    /// The id the last guided step returned (what a speculative step embeds).
    last_chosen: Option<u32>,
    /// Max and log-sum-exp of every row of `logits`, over the base vocabulary.
    stats: Op,
    sample: Op,
    capacity: usize,
    pos: usize,
}

impl GpuEngine {
    /// Loads the base and ARMs from paths (as [`crate::cpu::CpuEngine::load`]) onto the
    /// default adapter.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(base: &std::path::Path, arms: &[PathBuf], context: Option<usize>) -> Result<Self> {
        use crate::model::arm_plan::plan_arm;
        use candle_core::Device;
        let ctx = Arc::new(GpuContext::new_blocking()?);
        let base_ckpt = Checkpoint::open(base)?;
        let plans = arms
            .iter()
            .map(|p| plan_arm(p, base, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        Self::new(ctx, base_ckpt, plans, context)
    }

    /// Builds the engine on `ctx` from opened checkpoints; `context` caps the KV caches
    /// (default [`crate::engine::DEFAULT_CONTEXT`]).
    pub fn new(
        ctx: Arc<GpuContext>,
        base: Checkpoint,
        plans: Vec<(PathBuf, ArmPlan)>,
        context: Option<usize>,
    ) -> Result<Self> {
        let capacity = context.unwrap_or(crate::engine::DEFAULT_CONTEXT);
        let vocab = base.config.vocab_size;
        let facts = base.base_facts();
        let kernels = Kernels::new(Arc::clone(&ctx));
        let cur = storage_u32(&ctx, "cur", &[0, 0]);

        let plan = group_arms(&base, &plans)?;
        let chunk_positions = PREFILL_POSITIONS.min(MAX_MATVEC_ROWS / plan.base_rows.len().max(1));
        let chunk = storage_zeros(&ctx, "chunk", 1 + chunk_positions);
        let chunk_plan = ChunkPlan::new(chunk_positions, kernels.matvec_kind());
        let rows_total = plan.base_rows.len() + plan.own.len();
        let logits = storage_zeros(&ctx, "logits", rows_total * vocab);
        let mut groups = vec![GpuLlama::load(
            &kernels,
            base.source.as_ref(),
            &base.config,
            &plan.base_rows,
            capacity,
            &cur,
            Some(logits.clone()),
            (&chunk, chunk_positions),
        )?];
        for (ckpt, adapter) in &plan.own {
            groups.push(GpuLlama::load(
                &kernels,
                ckpt.source.as_ref(),
                &ckpt.config,
                &[*adapter],
                capacity,
                &cur,
                None,
                (&chunk, chunk_positions),
            )?);
        }
        let mut row_base = Vec::with_capacity(groups.len());
        let mut next_row = 0;
        for g in &groups {
            row_base.push(next_row);
            next_row += g.rows();
        }
        let slots: Vec<usize> = std::iter::once(0)
            .chain(plan.arm_slots.iter().map(|s| row_base[s.group] + s.row))
            .collect();

        let models = slots.len();
        let stats = storage_zeros(&ctx, "logit stats", 2 * rows_total);
        let settings = SampleSettingsBuffers::new(&ctx, models - 1);
        let scores = storage_zeros(&ctx, "scores", vocab);
        let chosen = storage_zeros(&ctx, "chosen", 1 + models);
        let slots_buf = storage_u32(
            &ctx,
            "slots",
            &slots.iter().map(|&s| s as u32).collect::<Vec<_>>(),
        );
        let stats_op = kernels.logit_stats(&logits, rows_total, vocab, &stats, 0)?;
        let sample = kernels.guide_sample(
            &SampleBuffers {
                logits: &logits,
                stats: &stats,
                slots: &slots_buf,
                settings: &settings,
                scores: &scores,
                cur: &cur,
                chosen: &chosen,
            },
            models,
            vocab,
        )?;
        let capacity = groups.iter().map(GpuLlama::capacity).min().unwrap_or(1);
        let feed = storage_zeros(&ctx, "feed", 2 * capacity);
        let chunk_feed = storage_zeros(
            &ctx,
            "chunk feed",
            capacity.div_ceil(chunk_positions) * (1 + chunk_positions),
        );
        let chosen_staging =
            [0, 1].map(|_| readback_buffer(&ctx, "chosen readback", chosen.size()));
        let next_pos = storage_u32(&ctx, "next pos", &[0]);
        let logits_size = (logits_floats(&groups) * 4) as u64;
        let logits_staging = readback_buffer(&ctx, "logits readback", logits_size);
        let fed_staging = readback_buffer(&ctx, "fed readback", 8);
        ctx.check_lost().map_err(|e| {
            gpu_error(format!(
                "loading {} onto `{}`: {e}",
                base.path.display(),
                ctx.adapter_name()
            ))
        })?;
        Ok(Self {
            kernels,
            groups,
            row_base,
            slots,
            labels: plan.labels,
            vocab,
            facts,
            cur,
            feed,
            chunk,
            chunk_feed,
            chunk_plan,
            logits,
            settings,
            chosen,
            chosen_staging,
            logits_staging,
            fed_staging,
            next_pos,
            speculative: None,
            last_chosen: None,
            stats: stats_op,
            sample,
            capacity,
            pos: 0,
        })
    }

    fn ctx(&self) -> &GpuContext {
        self.kernels.context()
    }

    pub fn base_config(&self) -> &crate::model::config::LlamaConfig {
        self.groups[0].config()
    }

    /// Bytes of weights one token's forward pass reads, over all groups.
    pub fn weight_bytes_per_token(&self) -> u64 {
        self.groups.iter().map(GpuLlama::weight_bytes).sum()
    }

    /// Compute dispatches per generated token: every group's forward pass and the
    /// guided pick. On a GPU a small model's step is bound by these as much as by bytes.
    pub fn dispatches_per_token(&self) -> usize {
        let forward: usize = self.groups.iter().map(GpuLlama::dispatch_count).sum();
        forward + self.stats.dispatch_count() + self.sample.dispatch_count()
    }

    fn check_room(&self, tokens: &[u32]) -> Result<()> {
        check_feed(tokens, self.vocab, self.pos, self.capacity)
    }

    /// Encodes the forward passes of `tokens` from the current position, and the head of
    /// the `wanted` positions; after each position's head `after_token(encoder, i)` may
    /// copy its results out. A feed goes in prompt chunks as far as [`ChunkPlan::split`]
    /// says, the rest (a single token always) one decode step each.
    fn encode_feed(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        tokens: &[u32],
        wanted: Wanted,
        mut after_token: impl FnMut(&Self, &mut wgpu::CommandEncoder, usize),
    ) {
        let pairs: Vec<u32> = tokens
            .iter()
            .enumerate()
            .flat_map(|(i, &id)| [id, (self.pos + i) as u32])
            .collect();
        let queue = &self.ctx().queue;
        queue.write_buffer(&self.feed, 0, bytemuck::cast_slice(&pairs));
        // `cur` ends as a decode step leaves it: the last token and its position.
        let last = (8 * (tokens.len() - 1)) as u64;
        encoder.copy_buffer_to_buffer(&self.feed, last, &self.cur, 0, 8);
        let (chunked, stepped) = self.chunk_plan.split(tokens.len());
        let n = self.chunk_plan.positions;
        if chunked > 0 {
            let records = chunk_records(&tokens[..chunked], self.pos, n);
            queue.write_buffer(&self.chunk_feed, 0, bytemuck::cast_slice(&records));
        }
        let record_bytes = (4 * (1 + n)) as u64;
        for (c, chunk) in tokens[..chunked].chunks(n).enumerate() {
            let at = c as u64 * record_bytes;
            encoder.copy_buffer_to_buffer(&self.chunk_feed, at, &self.chunk, 0, record_bytes);
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for g in &self.groups {
                    g.encode_chunk(&mut pass);
                }
            }
            for j in 0..chunk.len() {
                let i = c * n + j;
                let head = match wanted {
                    Wanted::None => false,
                    Wanted::Last => i + 1 == tokens.len(),
                    Wanted::Every => true,
                };
                if !head {
                    continue;
                }
                for g in &self.groups {
                    g.copy_chunk_position(encoder, j);
                }
                {
                    let mut pass = encoder.begin_compute_pass(&Default::default());
                    for g in &self.groups {
                        g.encode_head(&mut pass);
                    }
                }
                after_token(self, encoder, i);
            }
        }
        // The rest one decode step each (its head included), from its pair in `feed`.
        for i in chunked..chunked + stepped {
            encoder.copy_buffer_to_buffer(&self.feed, (8 * i) as u64, &self.cur, 0, 8);
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for g in &self.groups {
                    g.encode(&mut pass);
                }
            }
            after_token(self, encoder, i);
        }
        self.pos += tokens.len();
    }

    /// What feeding a prompt and picking the token after it cost in compute dispatches.
    pub fn prompt_dispatches(&self) -> PromptDispatches {
        let sum = |f: fn(&GpuLlama) -> usize| -> usize { self.groups.iter().map(f).sum() };
        PromptDispatches {
            step: sum(GpuLlama::dispatch_count),
            plan: self.chunk_plan,
            per_chunk: sum(GpuLlama::chunk_dispatch_count),
            head: sum(GpuLlama::head_dispatch_count),
            pick: self.stats.dispatch_count() + self.sample.dispatch_count(),
        }
    }

    /// Positions per prompt chunk.
    pub fn chunk_positions(&self) -> usize {
        self.chunk_plan.positions
    }

    /// Copies every group's logits (full vocabularies) to `dst` at `offset` bytes.
    fn copy_all_logits(&self, encoder: &mut wgpu::CommandEncoder, dst: &wgpu::Buffer, offset: u64) {
        let mut at = offset;
        for g in &self.groups {
            let bytes = (g.rows() * g.config().vocab_size * 4) as u64;
            encoder.copy_buffer_to_buffer(g.logits(), 0, dst, at, bytes);
            at += bytes;
        }
    }

    /// Floats of one position's logits over all groups.
    fn logits_floats(&self) -> usize {
        logits_floats(&self.groups)
    }

    /// Log-probs per model (base, then ARMs) over the base vocabulary, from one
    /// position's host copy of every group's logits: an ARM's row is cut to the base's
    /// tokens before it is normalised.
    fn log_probs_of(&self, floats: &[f32]) -> Vec<Vec<f32>> {
        let mut rows = Vec::new();
        let mut at = 0;
        for g in &self.groups {
            let v = g.config().vocab_size;
            for _ in 0..g.rows() {
                rows.push(&floats[at..at + v]);
                at += v;
            }
        }
        self.slots
            .iter()
            .map(|&row| log_softmax(&rows[row][..self.vocab]))
            .collect()
    }

    /// What one pick is told: the sampling knobs with the draw `u`, and the ARM weights.
    fn settings(&self, alphas: &[f32], params: &SamplingParams, u: f64) -> SampleSettings {
        SampleSettings::new(params, u, self.vocab, alphas)
    }

    /// The uniform number the next pick uses, without counting it yet (a speculative
    /// step must not consume a draw it may never deliver).
    fn peek_uniform(sampler: &Sampler) -> f64 {
        if sampler.params().greedy {
            0.0
        } else {
            sampler.peek_uniform()
        }
    }

    /// The uniform number of the next pick, counted (greedy picks draw none).
    fn take_uniform(sampler: &mut Sampler) -> f64 {
        let u = Self::peek_uniform(sampler);
        if !sampler.params().greedy {
            sampler.next_uniform();
        }
        u
    }

    /// Encodes the pick after a forward pass: other groups' rows into the shared
    /// logits (cut to the base vocabulary), the normalisers of every row over it, the
    /// sample, and a copy of the choice to readback buffer `slot`.
    fn encode_pick(&self, encoder: &mut wgpu::CommandEncoder, slot: usize) {
        for (g, group) in self.groups.iter().enumerate().skip(1) {
            let v = group.config().vocab_size;
            for r in 0..group.rows() {
                encoder.copy_buffer_to_buffer(
                    group.logits(),
                    (r * v * 4) as u64,
                    &self.logits,
                    ((self.row_base[g] + r) * self.vocab * 4) as u64,
                    (self.vocab * 4) as u64,
                );
            }
        }
        self.stats.encode(encoder);
        self.sample.encode(encoder);
        let staging = &self.chosen_staging[slot];
        encoder.copy_buffer_to_buffer(&self.chosen, 0, staging, 0, self.chosen.size());
    }

    /// Submits the step after the one just submitted, before its choice is read: it
    /// embeds the id the device wrote to `cur` at the next position, so the device
    /// keeps working while the host reads, decodes and streams.
    fn launch_speculative(&mut self, alphas: &[f32], sampler: &Sampler, slot: usize) {
        if self.pos >= self.capacity {
            return;
        }
        let settings = self.settings(alphas, sampler.params(), Self::peek_uniform(sampler));
        let queue = &self.ctx().queue;
        self.settings.write(queue, &settings);
        queue.write_buffer(&self.next_pos, 0, bytemuck::bytes_of(&(self.pos as u32)));
        let mut encoder = self
            .ctx()
            .device
            .create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.next_pos, 0, &self.cur, 4, 4);
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for g in &self.groups {
                g.encode(&mut pass);
            }
        }
        self.encode_pick(&mut encoder, slot);
        let submission = self.ctx().queue.submit([encoder.finish()]);
        self.speculative = Some(Speculative {
            settings,
            slot,
            submission,
        });
    }

    /// [`Engine::guided_step`] without blocking: the browser must return to its event
    /// loop while the device works.
    ///
    /// Each call also submits the following step speculatively (the device already
    /// holds the id it picked), so reads lag the device by a step. The next call uses
    /// that step when it feeds exactly the id picked and the weights and sampling
    /// settings are unchanged; otherwise the position is simply computed again.
    pub async fn guided_step_async(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen> {
        self.ctx().check_lost()?;
        check_guidance(alphas, self.labels.len(), sampler.params())?;
        let spec = self.speculative.take();
        let continues = tokens.len() == 1 && self.last_chosen == Some(tokens[0]);
        let words = match spec {
            Some(spec)
                if continues
                    && spec.settings
                        == self.settings(alphas, sampler.params(), Self::peek_uniform(sampler)) =>
            {
                self.check_room(tokens)?;
                Self::take_uniform(sampler);
                self.pos += 1;
                self.launch_speculative(alphas, sampler, 1 - spec.slot);
                self.read_choice(spec.slot, spec.submission).await?
            }
            _ => {
                // Whatever was in flight wrote only past the position fed now.
                self.check_room(tokens)?;
                let u = Self::take_uniform(sampler);
                let settings = self.settings(alphas, sampler.params(), u);
                self.settings.write(&self.ctx().queue, &settings);
                let mut encoder = self
                    .ctx()
                    .device
                    .create_command_encoder(&Default::default());
                self.encode_feed(&mut encoder, tokens, Wanted::Last, |_, _, _| {});
                self.encode_pick(&mut encoder, 0);
                let submission = self.ctx().queue.submit([encoder.finish()]);
                self.launch_speculative(alphas, sampler, 1);
                self.read_choice(0, submission).await?
            }
        };
        let id = words[0];
        if id == NO_TOKEN || id as usize >= self.vocab {
            self.speculative = None;
            return Err(Error::Request(
                "the guided scores are not finite (NaN or infinite logits)".into(),
            ));
        }
        self.last_chosen = Some(id);
        let lp = |j: usize| f32::from_bits(words[1 + j]);
        Ok(Chosen {
            id,
            base_logprob: lp(0),
            arm_logprobs: (1..self.slots.len()).map(lp).collect(),
        })
    }

    /// The choice a submitted pick copied to readback buffer `slot`.
    async fn read_choice(
        &self,
        slot: usize,
        submission: wgpu::SubmissionIndex,
    ) -> Result<Vec<u32>> {
        let bytes = map_read(self.ctx(), &self.chosen_staging[slot], Some(submission)).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// [`Engine::step`] without blocking.
    pub async fn step_async(&mut self, tokens: &[u32]) -> Result<StepLogProbs> {
        self.submit_feed(tokens, Wanted::Last, |e, encoder| {
            e.copy_all_logits(encoder, &e.logits_staging, 0)
        })?;
        let host: Vec<f32> =
            bytemuck::pod_collect_to_vec(&map_read(self.ctx(), &self.logits_staging, None).await?);
        let mut models = self.log_probs_of(&host).into_iter();
        Ok(StepLogProbs {
            base: models.next().unwrap_or_default(),
            arms: models.collect(),
        })
    }

    /// [`Engine::feed`] without blocking: the tokens' forward passes, then a wait for
    /// them through the 8-byte `cur` word alone (no logits cross to the host).
    pub async fn feed_async(&mut self, tokens: &[u32]) -> Result<()> {
        let submission = self.submit_feed(tokens, Wanted::None, |e, encoder| {
            encoder.copy_buffer_to_buffer(&e.cur, 0, &e.fed_staging, 0, 8)
        })?;
        map_read(self.ctx(), &self.fed_staging, Some(submission)).await?;
        Ok(())
    }

    /// Submits the forward passes of `tokens` (dropping any speculative step) followed
    /// by `copy_out`, which records what the caller will read back.
    fn submit_feed(
        &mut self,
        tokens: &[u32],
        wanted: Wanted,
        copy_out: impl FnOnce(&Self, &mut wgpu::CommandEncoder),
    ) -> Result<wgpu::SubmissionIndex> {
        self.ctx().check_lost()?;
        self.speculative = None;
        self.last_chosen = None;
        self.check_room(tokens)?;
        let mut encoder = self
            .ctx()
            .device
            .create_command_encoder(&Default::default());
        self.encode_feed(&mut encoder, tokens, wanted, |_, _, _| {});
        copy_out(self, &mut encoder);
        Ok(self.ctx().queue.submit([encoder.finish()]))
    }

    /// [`Engine::teacher_forced`] without blocking.
    pub async fn teacher_forced_async(&mut self, tokens: &[u32]) -> Result<Vec<Vec<Vec<f32>>>> {
        check_feed(tokens, self.vocab, 0, self.capacity)?;
        self.reset();
        self.ctx().check_lost()?;
        self.check_room(tokens)?;
        let floats = self.logits_floats();
        let staging = readback_buffer(
            self.ctx(),
            "teacher-forced readback",
            (tokens.len() * floats * 4) as u64,
        );
        let mut encoder = self
            .ctx()
            .device
            .create_command_encoder(&Default::default());
        self.encode_feed(&mut encoder, tokens, Wanted::Every, |engine, enc, i| {
            engine.copy_all_logits(enc, &staging, (i * floats * 4) as u64)
        });
        self.ctx().queue.submit([encoder.finish()]);
        let host: Vec<f32> =
            bytemuck::pod_collect_to_vec(&map_read(self.ctx(), &staging, None).await?);
        self.reset();
        let mut out = vec![Vec::with_capacity(tokens.len()); self.slots.len()];
        for position in host.chunks_exact(floats) {
            for (model, lp) in self.log_probs_of(position).into_iter().enumerate() {
                out[model].push(lp);
            }
        }
        Ok(out)
    }
}

/// Floats in every model's logits rows, each over its own vocabulary.
fn logits_floats(groups: &[GpuLlama]) -> usize {
    groups
        .iter()
        .map(|g| g.rows() * g.config().vocab_size)
        .sum()
}

/// The chunk records of feeding `tokens` from position `pos`, `n` positions a chunk:
/// each the chunk's first position and its `n` ids, the last chunk padded with id 0
/// (its padding positions write cache entries past the feed, which attention never
/// reads before a later feed writes them again).
fn chunk_records(tokens: &[u32], pos: usize, n: usize) -> Vec<u32> {
    let mut records = Vec::with_capacity(tokens.len().div_ceil(n) * (1 + n));
    for (c, chunk) in tokens.chunks(n).enumerate() {
        records.push((pos + c * n) as u32);
        records.extend(chunk);
        records.resize(records.len() + n - chunk.len(), 0);
    }
    records
}

/// A buffer the host can map to read what a copy put there.
fn readback_buffer(ctx: &GpuContext, label: &str, size: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// Maps a readback buffer after the submitted work and copies it out. Natively this
/// waits on the device; in the browser the promise resolves when the GPU is done.
pub(crate) async fn map_read(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    submission: Option<wgpu::SubmissionIndex>,
) -> Result<Vec<u8>> {
    let slice = buffer.slice(..);
    let (tx, rx) = futures_channel::oneshot::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    // In the browser the promise resolves when the work is done; there is no polling.
    #[cfg(target_arch = "wasm32")]
    let _ = submission;
    #[cfg(not(target_arch = "wasm32"))]
    ctx.device
        .poll(wgpu::PollType::Wait {
            submission_index: submission,
            timeout: None,
        })
        .map_err(|e| gpu_error(format!("waiting for the device: {e}")))?;
    rx.await
        .map_err(|_| gpu_error("the readback was dropped (device lost?)"))?
        .map_err(|e| gpu_error(format!("mapping a readback buffer: {e}")))?;
    let data = slice
        .get_mapped_range()
        .map_err(|e| gpu_error(format!("mapped range: {e}")))?
        .to_vec();
    buffer.unmap();
    ctx.check_lost()?;
    Ok(data)
}

/// The synchronous [`Engine`] calls block natively; the browser must use the `_async`
/// methods.
#[cfg(not(target_arch = "wasm32"))]
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    pollster::block_on(f)
}

#[cfg(target_arch = "wasm32")]
fn block_on<T>(_: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    Err(gpu_error(
        "the WebGPU engine cannot block in the browser; use the async methods",
    ))
}

impl Engine for GpuEngine {
    fn backend(&self) -> String {
        format!("webgpu ({})", self.ctx().adapter_name())
    }

    fn facts(&self) -> &BaseFacts {
        &self.facts
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn arm_labels(&self) -> Vec<String> {
        self.labels.clone()
    }

    fn context_len(&self) -> usize {
        self.capacity
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn reset(&mut self) {
        // The caches keep stale entries past `pos`; attention never reads them.
        self.pos = 0;
        self.speculative = None;
        self.last_chosen = None;
    }

    fn rewind(&mut self, position: usize) -> Result<()> {
        check_rewind(position, self.pos)?;
        // A speculative step still in flight writes past `position`; the queue runs it
        // before anything fed from here, which overwrites it.
        self.pos = position;
        self.speculative = None;
        self.last_chosen = None;
        Ok(())
    }

    fn step(&mut self, tokens: &[u32]) -> Result<StepLogProbs> {
        block_on(self.step_async(tokens))
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        block_on(self.feed_async(tokens))
    }

    fn teacher_forced(&mut self, tokens: &[u32]) -> Result<Vec<Vec<Vec<f32>>>> {
        block_on(self.teacher_forced_async(tokens))
    }

    fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen> {
        block_on(self.guided_step_async(tokens, alphas, sampler))
    }
}

/// The decoding loop's seam without blocking: what the browser awaits.
impl AsyncEngine for GpuEngine {
    fn engine(&self) -> &dyn Engine {
        self
    }

    async fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        self.feed_async(tokens).await
    }

    async fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen> {
        self.guided_step_async(tokens, alphas, sampler).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeds_split_into_chunks_and_steps_by_adapter_kind() {
        let cpu = ChunkPlan::new(32, MatVecKind::RowPerInvocation);
        let gpu = ChunkPlan::new(32, MatVecKind::RowPerWorkgroup);
        assert_eq!(cpu.split(1), (0, 1));
        assert_eq!(gpu.split(1), (0, 1));
        assert_eq!(gpu.split(2), (2, 0));
        assert_eq!(cpu.split(15), (0, 15));
        assert_eq!(cpu.split(16), (16, 0));
        assert_eq!(cpu.split(100), (96, 4));
        assert_eq!(gpu.split(100), (100, 0));
        assert_eq!(gpu.split(97), (96, 1));
        // One-position chunks never pad: every feed is whole chunks.
        assert_eq!(
            ChunkPlan::new(1, MatVecKind::RowPerWorkgroup).split(5),
            (5, 0)
        );
    }

    #[test]
    fn prompt_dispatches_count_chunks_steps_and_one_head() {
        let d = PromptDispatches {
            step: 273,
            plan: ChunkPlan::new(32, MatVecKind::RowPerWorkgroup),
            per_chunk: 271,
            head: 2,
            pick: 2,
        };
        assert_eq!(d.for_len(1), 273 + 2);
        assert_eq!(d.for_len(100), 4 * 271 + 2 + 2);
        assert_eq!(d.for_len(97), 3 * 271 + 273 + 2);
    }
}
