//! The candle engine — the reference every other engine is checked against. Runs on
//! CPU, on CUDA (`--features cuda`) and on the wasm CPU.
//!
//! Models are grouped by the weights they read: the base and every LoRA ARM trained on
//! it are rows of one batched `Llama`; an ARM with its own weights (a full checkpoint,
//! or a LoRA on another base) is a group of its own.

#[cfg(not(target_arch = "wasm32"))]
pub mod cuda_device;
pub mod decode_attention;
pub mod device_sample;
mod fused;
mod host_ops;
pub mod llama;
pub mod lowrank;
pub mod precision;
pub mod quant;
mod row_ops;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::engine::{
    check_feed, check_guidance, check_rewind, pick_on_host, Chosen, Engine, StepLogProbs,
    DEFAULT_CONTEXT,
};
use crate::error::Result;
use crate::guide::Sampler;
use crate::model::arm_plan::{group_arms, plan_arm, ArmPlan, Slot};
use crate::model::{BaseFacts, Checkpoint};
use device_sample::DeviceSampler;
use llama::Llama;
pub use precision::Precision;

pub struct CpuEngine {
    groups: Vec<Llama>,
    base: Slot,
    arms: Vec<Slot>,
    labels: Vec<String>,
    vocab: usize,
    facts: BaseFacts,
    device: Device,
    /// Picks guided tokens where the logits are, when set (by default off the CPU,
    /// where reading the rows costs nothing).
    device_pick: Option<DeviceSampler>,
}

impl CpuEngine {
    /// Loads the base at `base` and the ARMs at `arms` (GGUF files, HF dirs or LoRA
    /// adapter dirs). `context` caps the KV caches (default `DEFAULT_CONTEXT`).
    pub fn load(
        base: &Path,
        arms: &[PathBuf],
        context: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(base, arms, context, device, Precision::Auto)
    }

    /// `load` with the float type of dense weights and activations chosen by `precision`.
    pub fn load_with(
        base: &Path,
        arms: &[PathBuf],
        context: Option<usize>,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let base_ckpt = Checkpoint::open(base)?;
        let plans = arms
            .iter()
            .map(|p| plan_arm(p, base, device))
            .collect::<Result<Vec<_>>>()?;
        Self::from_parts_with(base_ckpt, plans, context, device, precision)
    }

    /// Builds the engine from opened checkpoints (the browser opens them from bytes).
    /// Each plan carries the name its errors use.
    pub fn from_parts(
        base: Checkpoint,
        plans: Vec<(PathBuf, ArmPlan)>,
        context: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_parts_with(base, plans, context, device, Precision::Auto)
    }

    /// `from_parts` with the precision chosen (the browser's GPU tests check the WebGPU
    /// engine against the f32 CPU engine, not the wasm build's default integer one).
    pub fn from_parts_with(
        base: Checkpoint,
        plans: Vec<(PathBuf, ArmPlan)>,
        context: Option<usize>,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let capacity = context.unwrap_or(DEFAULT_CONTEXT);
        let vocab = base.config.vocab_size;
        let facts = base.base_facts();
        let plan = group_arms(&base, &plans)?;
        let mut groups = Vec::with_capacity(1 + plan.own.len());
        groups.push(Llama::load_with(
            base.source.as_ref(),
            &base.config,
            &plan.base_rows,
            capacity,
            device,
            precision,
        )?);
        for (ckpt, adapter) in &plan.own {
            groups.push(Llama::load_with(
                ckpt.source.as_ref(),
                &ckpt.config,
                &[*adapter],
                capacity,
                device,
                precision,
            )?);
        }
        Ok(Self {
            groups,
            base: Slot { group: 0, row: 0 },
            arms: plan.arm_slots,
            labels: plan.labels,
            vocab,
            facts,
            device_pick: if device.is_cpu() {
                None
            } else {
                Some(DeviceSampler::new(vocab, device)?)
            },
            device: device.clone(),
        })
    }

    /// Whether `guided_step` picks on the device (reading back the choice only) or reads
    /// every row to the host; the CPU default is the host.
    pub fn set_device_pick(&mut self, on: bool) -> Result<()> {
        self.device_pick = if on {
            Some(DeviceSampler::new(self.vocab, &self.device)?)
        } else {
            None
        };
        Ok(())
    }

    pub fn base_config(&self) -> &crate::model::config::LlamaConfig {
        self.groups[0].config()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Feeds `tokens` to every group; each group's `[rows, vocab]` log-softmax over the
    /// base vocabulary, on the device: an ARM with a longer vocabulary has its logits
    /// cut before normalising (the official rule), so its log-probs are those of a
    /// model over the base's tokens.
    fn step_log_probs(&mut self, tokens: &[u32]) -> Result<Vec<Tensor>> {
        check_feed(tokens, self.vocab, self.position(), self.context_len())?;
        let vocab = self.vocab;
        self.groups
            .iter_mut()
            .map(|g| llama::log_softmax_over(&g.forward(tokens, false)?, vocab))
            .collect()
    }

    fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        std::iter::once(self.base).chain(self.arms.iter().copied())
    }

    /// Moves each model's result out of the per-group results (base first, then the
    /// ARMs). Each slot is a distinct (group, row), so nothing is copied.
    fn take_slots<T: Default>(&self, mut per_group: Vec<Vec<T>>) -> Vec<T> {
        self.slots()
            .map(|s| std::mem::take(&mut per_group[s.group][s.row]))
            .collect()
    }
}

impl Engine for CpuEngine {
    fn backend(&self) -> String {
        match &self.device {
            Device::Cpu => "cpu".into(),
            Device::Cuda(_) => "cuda".into(),
            Device::Metal(_) => "metal".into(),
        }
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
        self.groups.iter().map(Llama::capacity).min().unwrap_or(0)
    }

    fn position(&self) -> usize {
        self.groups[0].position()
    }

    fn reset(&mut self) {
        self.groups.iter_mut().for_each(Llama::reset);
    }

    fn rewind(&mut self, position: usize) -> Result<()> {
        check_rewind(position, self.position())?;
        self.groups.iter_mut().try_for_each(|g| g.rewind(position))
    }

    fn step(&mut self, tokens: &[u32]) -> Result<StepLogProbs> {
        let per_group = self.step_log_probs(tokens)?;
        let per_group = per_group
            .iter()
            .map(|lp| Ok(lp.to_vec2::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let mut rows = self.take_slots(per_group).into_iter();
        let base = rows.next().unwrap_or_default();
        Ok(StepLogProbs {
            base,
            arms: rows.collect(),
        })
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        check_feed(tokens, self.vocab, self.position(), self.context_len())?;
        self.groups.iter_mut().try_for_each(|g| g.feed(tokens))
    }

    fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen> {
        check_guidance(alphas, self.arms.len(), sampler.params())?;
        let per_group = self.step_log_probs(tokens)?;
        let rows = self
            .slots()
            .map(|s| Ok(per_group[s.group].get(s.row)?))
            .collect::<Result<Vec<_>>>()?;
        let picked = match &self.device_pick {
            Some(picker) => picker.pick(&rows, alphas, sampler.params(), sampler.peek_uniform())?,
            None => None,
        };
        if let Some(chosen) = picked {
            if !sampler.params().greedy {
                sampler.next_uniform();
            }
            return Ok(chosen);
        }
        // The host pick: on the CPU, or when a top-p prefix may pass the device's
        // candidate set.
        let mut host = rows.iter().map(|r| Ok(r.to_vec1::<f32>()?));
        let lp = StepLogProbs {
            base: host.next().unwrap_or_else(|| Ok(Vec::new()))?,
            arms: host.collect::<Result<_>>()?,
        };
        pick_on_host(&lp, alphas, sampler)
    }

    fn teacher_forced(&mut self, tokens: &[u32]) -> Result<Vec<Vec<Vec<f32>>>> {
        check_feed(tokens, self.vocab, 0, self.context_len())?;
        self.reset();
        let vocab = self.vocab;
        let per_group = self
            .groups
            .iter_mut()
            .map(|g| {
                let logits = g.forward(tokens, true)?;
                Ok(llama::log_softmax_over(&logits, vocab)?.to_vec3::<f32>()?)
            })
            .collect::<Result<Vec<_>>>()?;
        self.reset();
        Ok(self.take_slots(per_group))
    }
}
