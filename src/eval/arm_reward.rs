//! The ARMs' own trajectory reward, for ranking whole responses (best-of-N by ARM):
//! `R(x, y) = Σ_i α_i · Σ_t log π_arm_i(y_t | x, y_<t)` — the paper's
//! `β_r · Σ_t log π_arm` with the ARM weights of `--arm PATH:ALPHA` in place of β_r
//! (one ARM: a positive constant, which does not change the ranking). No base term is
//! subtracted. Each ARM runs alone (one row, no base row), and the prompt is computed
//! once for all the responses to it.

use std::path::Path;

use candle_core::Device;

use crate::cpu::llama::{log_softmax_over, Llama};
use crate::engine::ArmSpec;
use crate::error::{Error, Result};
use crate::model::arm_plan::{check_compatible, plan_arm, ArmPlan};
use crate::model::Checkpoint;

struct WeightedArm {
    model: Llama,
    alpha: f32,
    /// Next-token log-probs after the prompt last given to `prefill`.
    after_prompt: Vec<f32>,
}

pub struct ArmRewardModel {
    arms: Vec<WeightedArm>,
    prompt_len: usize,
    /// The base vocabulary: ARM logits are cut to it before normalising.
    vocab: usize,
}

impl ArmRewardModel {
    pub fn load(base: &Path, specs: &[ArmSpec], context: usize, device: &Device) -> Result<Self> {
        if specs.is_empty() {
            return Err(Error::Request(
                "ranking by ARM reward needs an --arm".into(),
            ));
        }
        let base_ckpt = Checkpoint::open(base)?;
        let mut arms = Vec::with_capacity(specs.len());
        for spec in specs {
            let (path, plan) = plan_arm(&spec.path, base, device)?;
            let name = path.display().to_string();
            let model = match &plan {
                // `plan_arm` never yields a policy; as a reward it would be a shared LoRA.
                ArmPlan::SharedLora(a) | ArmPlan::Policy(a) => Llama::load(
                    base_ckpt.source.as_ref(),
                    &base_ckpt.config,
                    &[Some(a)],
                    context,
                    device,
                )?,
                ArmPlan::LoraOn(a, ckpt) => {
                    check_compatible(&base_ckpt, ckpt, &name)?;
                    Llama::load(
                        ckpt.source.as_ref(),
                        &ckpt.config,
                        &[Some(a)],
                        context,
                        device,
                    )?
                }
                ArmPlan::Full(ckpt) => {
                    check_compatible(&base_ckpt, ckpt, &name)?;
                    Llama::load(ckpt.source.as_ref(), &ckpt.config, &[None], context, device)?
                }
            };
            arms.push(WeightedArm {
                model,
                alpha: spec.alpha,
                after_prompt: Vec::new(),
            });
        }
        Ok(Self {
            arms,
            prompt_len: 0,
            vocab: base_ckpt.config.vocab_size,
        })
    }

    pub fn n_arms(&self) -> usize {
        self.arms.len()
    }

    /// Runs every ARM over the prompt the next responses continue.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<()> {
        for arm in &mut self.arms {
            arm.model.reset();
            let logits = arm.model.forward(prompt, false)?;
            arm.after_prompt = log_softmax_over(&logits, self.vocab)?
                .flatten_all()?
                .to_vec1::<f32>()?;
        }
        self.prompt_len = prompt.len();
        Ok(())
    }

    /// `R(prompt, response)` for the prompt given to `prefill`: each ARM computes the
    /// response's positions but the last (whose prediction is not needed).
    pub fn reward(&mut self, response: &[u32]) -> Result<f64> {
        let Some((&first, _)) = response.split_first() else {
            return Ok(0.0);
        };
        let mut total = 0.0;
        for arm in &mut self.arms {
            let mut sum = *arm.after_prompt.get(first as usize).ok_or_else(|| {
                Error::Request(format!("token id {first} is outside the ARM's vocabulary"))
            })? as f64;
            if response.len() > 1 {
                arm.model.rewind(self.prompt_len)?;
                let fed = &response[..response.len() - 1];
                let rows = log_softmax_over(&arm.model.forward(fed, true)?, self.vocab)?
                    .squeeze(0)?
                    .to_vec2::<f32>()?;
                sum += rows
                    .iter()
                    .zip(&response[1..])
                    .map(|(row, &next)| row[next as usize] as f64)
                    .sum::<f64>();
            }
            total += arm.alpha as f64 * sum;
        }
        Ok(total)
    }
}
