//! The candle engine — the reference every other engine is checked against. Runs on
//! CPU, on CUDA (`--features cuda`) and on the wasm CPU.
//!
//! Models are grouped by the weights they read: the base and every LoRA ARM trained on
//! it are rows of one batched `Llama`; an ARM with its own weights (a full checkpoint,
//! or a LoRA on another base) is a group of its own.

pub mod llama;
pub mod lowrank;
pub mod quant;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::engine::{check_feed, Engine, StepLogProbs, DEFAULT_CONTEXT};
use crate::error::Result;
use crate::model::arm_plan::{group_arms, plan_arm, ArmPlan, Slot};
use crate::model::{BaseFacts, Checkpoint};
use llama::Llama;

pub struct CpuEngine {
    groups: Vec<Llama>,
    base: Slot,
    arms: Vec<Slot>,
    labels: Vec<String>,
    vocab: usize,
    facts: BaseFacts,
    device: Device,
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
        let base_ckpt = Checkpoint::open(base)?;
        let plans = arms
            .iter()
            .map(|p| plan_arm(p, base, device))
            .collect::<Result<Vec<_>>>()?;
        Self::from_parts(base_ckpt, plans, context, device)
    }

    /// Builds the engine from opened checkpoints (the browser opens them from bytes).
    /// Each plan carries the name its errors use.
    pub fn from_parts(
        base: Checkpoint,
        plans: Vec<(PathBuf, ArmPlan)>,
        context: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let capacity = context.unwrap_or(DEFAULT_CONTEXT);
        let vocab = base.config.vocab_size;
        let facts = base.base_facts();
        let plan = group_arms(&base, &plans)?;
        let mut groups = Vec::with_capacity(1 + plan.own.len());
        groups.push(Llama::load(
            base.source.as_ref(),
            &base.config,
            &plan.base_rows,
            capacity,
            device,
        )?);
        for (ckpt, adapter) in &plan.own {
            groups.push(Llama::load(
                ckpt.source.as_ref(),
                &ckpt.config,
                &[*adapter],
                capacity,
                device,
            )?);
        }
        Ok(Self {
            groups,
            base: Slot { group: 0, row: 0 },
            arms: plan.arm_slots,
            labels: plan.labels,
            vocab,
            facts,
            device: device.clone(),
        })
    }

    pub fn base_config(&self) -> &crate::model::config::LlamaConfig {
        self.groups[0].config()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Log-softmax of each group's logits over the base vocabulary, as host rows: an
    /// ARM with a longer vocabulary has its logits cut before normalising (the
    /// official rule), so its log-probs are those of a model over the base's tokens.
    fn log_probs(logits: &Tensor, vocab: usize) -> Result<Vec<Vec<f32>>> {
        Ok(llama::log_softmax_over(logits, vocab)?.to_vec2::<f32>()?)
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

    fn step(&mut self, tokens: &[u32]) -> Result<StepLogProbs> {
        check_feed(tokens, self.vocab, self.position(), self.context_len())?;
        let vocab = self.vocab;
        let per_group = self
            .groups
            .iter_mut()
            .map(|g| {
                g.forward(tokens, false)
                    .and_then(|l| Self::log_probs(&l, vocab))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut rows = self.take_slots(per_group).into_iter();
        let base = rows.next().unwrap_or_default();
        Ok(StepLogProbs {
            base,
            arms: rows.collect(),
        })
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
