//! The ARM training loop: shuffled mini-batches of preference pairs, gradient
//! accumulation over micro-batches, clipping, AdamW with warmup and decay, a JSONL log,
//! held-out pairwise accuracy each epoch, and atomic checkpoints that a killed run
//! resumes from with the same result as an uninterrupted one. With `scalar_head` the same
//! loop trains a conventional scalar reward model (Bradley–Terry loss) instead of an ARM.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use web_time::Instant;

use super::arm::{DropoutKey, LoraSpec, TrainableArm, Tuning};
use super::data::TokenizedPair;
use super::dpo::{pair_sequences, ReferenceLogprobs};
use super::loss::{
    bradley_terry_loss, bradley_terry_loss_f64, genarm_loss, genarm_loss_f64, sft_term,
    sft_term_f64, Objective,
};
use super::optim::{accumulate, clip_grad_norm, collect_grads, learning_rate, AdamW, Schedule};
use super::score_head::ScoreHead;
use crate::error::{Error, Result};
use crate::guide::uniform;
use crate::model::lora::{
    write_atomic, AdapterKind, ArmInfo, ADAPTER_CONFIG, ADAPTER_WEIGHTS, ARM_INFO,
    SCORE_HEAD_TENSOR, SCORE_HEAD_WEIGHTS,
};
use crate::model::Checkpoint;
use crate::outdir::{first_difference, save_safetensors, FileFingerprint};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub beta_r: f64,
    pub gamma: f64,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_targets: Vec<String>,
    /// Top layers with LoRA; the ones below stay frozen and run without autograd.
    pub lora_layers: usize,
    pub lr: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub micro_batch: usize,
    pub warmup: usize,
    pub schedule: String,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub eval_frac: f64,
    pub seed: u64,
    /// Optimizer steps between checkpoints.
    pub checkpoint_every: usize,
    /// Train a scalar reward model (LoRA + a linear head on the last token's final
    /// hidden state, Bradley–Terry loss) instead of an ARM; β_r and γ are then unused.
    #[serde(default)]
    pub scalar_head: bool,
    /// Full fine-tuning: every weight of the top `lora_layers` blocks and the final norm
    /// trains (the `lora_*` settings are unused) and the output is a standalone HF model
    /// directory rather than a LoRA adapter.
    #[serde(default)]
    pub full: bool,
    /// With `full`, the LM head trains too (a tied base's head becomes an untied copy).
    #[serde(default)]
    pub train_head: bool,
    /// With `full`, the model is the base's bottom K layers (embedding, layers 0..K,
    /// final norm, head) rather than all of them: a smaller ARM for the same base.
    /// `lora_layers` then counts the trained layers from the top of those K.
    #[serde(default)]
    pub keep_layers: Option<usize>,
    /// λ of the anchor term `λ·(−Σ log π(y_w) / |y_w|)` added to the GenARM loss (0: off).
    #[serde(default)]
    pub sft_weight: f64,
    /// An ARM (GenARM loss) or, with [`Objective::Dpo`], a DPO policy: `beta_r` is then
    /// DPO's β and `gamma` a margin inside the sigmoid, as for an ARM.
    #[serde(default)]
    pub objective: Objective,
}

impl TrainConfig {
    /// Refuses values that would train nothing or write NaN weights, naming the flag and
    /// its range.
    pub fn check_ranges(&self) -> Result<()> {
        let finite_positive = |v: f64| v.is_finite() && v > 0.0;
        let finite_non_negative = |v: f64| v.is_finite() && v >= 0.0;
        let checks = [
            (
                "--beta-r",
                finite_positive(self.beta_r),
                "a finite number > 0",
                self.beta_r,
            ),
            (
                "--gamma",
                self.gamma.is_finite(),
                "a finite number",
                self.gamma,
            ),
            (
                "--lr",
                finite_positive(self.lr),
                "a finite number > 0",
                self.lr,
            ),
            (
                "--weight-decay",
                finite_non_negative(self.weight_decay),
                "a finite number ≥ 0",
                self.weight_decay,
            ),
            (
                "--lora-alpha",
                finite_positive(self.lora_alpha),
                "a finite number > 0",
                self.lora_alpha,
            ),
            (
                "--lora-dropout",
                (0.0..1.0).contains(&self.lora_dropout),
                "in [0, 1)",
                self.lora_dropout,
            ),
            (
                "--eval-frac",
                (0.0..1.0).contains(&self.eval_frac),
                "in [0, 1)",
                self.eval_frac,
            ),
            (
                "--lora-rank",
                self.lora_rank >= 1,
                "≥ 1",
                self.lora_rank as f64,
            ),
            (
                "--layers",
                self.lora_layers >= 1,
                "≥ 1",
                self.lora_layers as f64,
            ),
        ];
        for (flag, ok, range, value) in checks {
            if !ok {
                return Err(Error::Request(format!(
                    "{flag} must be {range}, got {value}"
                )));
            }
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            beta_r: 0.05,
            gamma: 0.0,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            lora_targets: crate::model::lora::TARGETS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            lora_layers: usize::MAX,
            lr: 5e-4,
            epochs: 1,
            batch_size: 32,
            micro_batch: 4,
            warmup: 100,
            schedule: "cosine".into(),
            weight_decay: 0.05,
            max_grad_norm: 1.0,
            eval_frac: 0.05,
            seed: 0,
            checkpoint_every: 10,
            scalar_head: false,
            full: false,
            train_head: false,
            keep_layers: None,
            sft_weight: 0.0,
            objective: Objective::Genarm,
        }
    }
}

/// What the ARM is for, written to `genarm.json`.
#[derive(Clone, Debug, Default)]
pub struct ArmLabel {
    pub name: Option<String>,
    pub objective: Option<String>,
    /// Written as `base_model_name_or_path` (default: the base checkpoint's path). A name
    /// that is not a local path makes loaders use the base they are given.
    pub base_name: Option<String>,
}

/// One optimizer step, as logged.
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    /// Fraction of the batch's pairs where the chosen response scored higher.
    pub accuracy: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub pairs_per_second: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalLog {
    pub step: usize,
    pub epoch: usize,
    pub eval_pairs: usize,
    pub eval_accuracy: f64,
    pub eval_loss: f64,
}

pub enum Event<'a> {
    Step(&'a StepLog),
    Eval(&'a EvalLog),
    Checkpoint(usize),
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub final_eval: Option<f64>,
    pub resumed_from: Option<usize>,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct CheckpointMeta {
    step: usize,
    adam_t: usize,
    config: TrainConfig,
    train_pairs: usize,
    /// The model and data the run trains on (absent in checkpoints of older versions).
    #[serde(default)]
    inputs: Option<RunInputs>,
}

/// What a resumed run must continue with besides its settings: the base model (path and
/// size) and the preference data (path, size and hash).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunInputs {
    pub model: FileFingerprint,
    pub data: FileFingerprint,
}

impl RunInputs {
    pub fn new(model: &Path, data: &Path) -> Result<Self> {
        Ok(Self {
            model: FileFingerprint::stat(model)?,
            data: FileFingerprint::of(data)?,
        })
    }
}

const CHECKPOINT: &str = "checkpoint";
const LOG: &str = "train_log.jsonl";

/// Splits pairs into (train, eval) by a seeded shuffle; eval takes `eval_frac` of them.
pub fn split_pairs(
    pairs: Vec<TokenizedPair>,
    eval_frac: f64,
    seed: u64,
) -> (Vec<TokenizedPair>, Vec<TokenizedPair>) {
    let order = shuffled(pairs.len(), seed ^ 0x5EED_E7A1);
    let n_eval = ((pairs.len() as f64) * eval_frac).round() as usize;
    let n_eval = n_eval.min(pairs.len().saturating_sub(1));
    let mut slots: Vec<Option<TokenizedPair>> = pairs.into_iter().map(Some).collect();
    let mut eval = Vec::with_capacity(n_eval);
    let mut train = Vec::with_capacity(slots.len() - n_eval);
    for (k, &i) in order.iter().enumerate() {
        let pair = slots[i].take().expect("each index once");
        if k < n_eval {
            eval.push(pair);
        } else {
            train.push(pair);
        }
    }
    (train, eval)
}

/// A seeded Fisher–Yates permutation of `0..n`.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (uniform(seed, i as u64) * (i + 1) as f64) as usize;
        idx.swap(i, j.min(i));
    }
    idx
}

pub struct Trainer {
    pub config: TrainConfig,
    pub out: PathBuf,
    arm: TrainableArm,
    /// The scalar head when training a reward model rather than an ARM.
    head: Option<ScoreHead>,
    base_path: PathBuf,
    /// The dtype of a fully tuned model's saved weights (F32 or BF16); LoRA adapters
    /// are always saved in F32.
    pub save_dtype: DType,
    /// The model and data, recorded in checkpoints and checked on resume when set.
    pub inputs: Option<RunInputs>,
    /// DPO's reference log-probs of the pairs seen (empty for an ARM).
    reference: ReferenceLogprobs,
}

impl Trainer {
    pub fn new(
        base: &Checkpoint,
        config: TrainConfig,
        out: &Path,
        max_len: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::with_dtype(base, config, out, max_len, DType::F32, device)
    }

    pub fn with_dtype(
        base: &Checkpoint,
        config: TrainConfig,
        out: &Path,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if config.batch_size == 0 || config.micro_batch == 0 || config.epochs == 0 {
            return Err(Error::Request(
                "batch size, micro batch and epochs must be ≥ 1".into(),
            ));
        }
        config.check_ranges()?;
        config
            .schedule
            .parse::<Schedule>()
            .map_err(Error::Request)?;
        if config.full && config.scalar_head {
            return Err(Error::Request(
                "full fine-tuning of a scalar reward model is not supported; train it as a \
                 LoRA (drop --full)"
                    .into(),
            ));
        }
        if !(config.sft_weight >= 0.0 && config.sft_weight.is_finite()) {
            return Err(Error::Request(format!(
                "--sft-weight must be ≥ 0, got {}",
                config.sft_weight
            )));
        }
        if config.sft_weight > 0.0 && config.scalar_head {
            return Err(Error::Request(
                "--sft-weight anchors an ARM's log-probs; a scalar reward model has none".into(),
            ));
        }
        if config.objective == Objective::Dpo
            && (config.full || config.scalar_head || config.sft_weight > 0.0)
        {
            return Err(Error::Request(
                "--loss dpo trains a LoRA policy: not with --full, --scalar-head or \
                 --sft-weight"
                    .into(),
            ));
        }
        if config.train_head && !config.full {
            return Err(Error::Request(
                "training the LM head needs full fine-tuning (--full)".into(),
            ));
        }
        if let Some(k) = config.keep_layers {
            if !config.full {
                return Err(Error::Request(
                    "--keep-layers cuts the base into a smaller model of its own: it needs \
                     full fine-tuning (--full)"
                        .into(),
                ));
            }
            super::full::keep_bottom_layers(&base.config, k)?;
            if config.lora_layers != usize::MAX && config.lora_layers > k {
                return Err(Error::Request(format!(
                    "--layers {} trains more layers than --keep-layers {k} keeps",
                    config.lora_layers
                )));
            }
        }
        let tuning = if config.full {
            Tuning::Full {
                layers: config.lora_layers,
                train_head: config.train_head,
                keep_layers: config.keep_layers,
            }
        } else {
            Tuning::Lora(LoraSpec {
                rank: config.lora_rank,
                alpha: config.lora_alpha,
                dropout: config.lora_dropout,
                targets: config.lora_targets.clone(),
                layers: config.lora_layers,
            })
        };
        let arm = TrainableArm::new(base, &tuning, max_len, config.seed, dtype, device)?;
        let head = config
            .scalar_head
            .then(|| ScoreHead::new(arm.config().hidden_size, config.seed, dtype, device))
            .transpose()?;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        Ok(Self {
            config,
            out: out.into(),
            arm,
            head,
            base_path: base.path.clone(),
            save_dtype: DType::F32,
            inputs: None,
            reference: ReferenceLogprobs::default(),
        })
    }

    pub fn arm(&mut self) -> &mut TrainableArm {
        &mut self.arm
    }

    /// The scalar head, when training a reward model.
    pub fn score_head(&self) -> Option<&ScoreHead> {
        self.head.as_ref()
    }

    /// Everything the optimizer updates: the LoRA pairs (or fully tuned weights), then
    /// the head if any.
    fn trainable_vars(&self) -> Vec<candle_core::Var> {
        let mut vars = self.arm.vars();
        vars.extend(self.head.as_ref().map(|h| h.weight.clone()));
        vars
    }

    /// DPO's reference log-probs, computed so far.
    pub fn reference(&self) -> &ReferenceLogprobs {
        &self.reference
    }

    /// What the loss compares for a slice of pairs, (chosen, rejected): summed response
    /// log-probs for an ARM, their log-ratios to the frozen base for a DPO policy (the
    /// reference computed on first sight of a pair), scalar rewards `r(x, y)` for a
    /// reward model.
    pub fn pair_scores(
        &mut self,
        pairs: &[&TokenizedPair],
        dropout: Option<DropoutKey>,
    ) -> Result<(Tensor, Tensor)> {
        if self.config.objective == Objective::Dpo {
            self.reference
                .extend(&mut self.arm, pairs, self.config.micro_batch)?;
            let (c, r) = self.pair_logprobs(pairs, dropout)?;
            return self.reference.log_ratios(pairs, &c, &r);
        }
        if self.head.is_none() {
            return self.pair_logprobs(pairs, dropout);
        }
        let (seqs, _) = pair_sequences(pairs);
        let r = self
            .sequence_rewards(&seqs, dropout)?
            .reshape((pairs.len(), 2))?;
        Ok((
            r.narrow(1, 0, 1)?.squeeze(1)?,
            r.narrow(1, 1, 1)?.squeeze(1)?,
        ))
    }

    /// The reward model's `r` of whole sequences (prompt + response); an error when
    /// training an ARM.
    pub fn sequence_rewards(
        &mut self,
        seqs: &[Vec<u32>],
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::Request("an ARM has no scalar rewards".into()))?;
        head.rewards(&mut self.arm, seqs, dropout)
    }

    /// The mean training loss over `pairs` from their `pair_scores`.
    pub fn pair_loss(
        &self,
        pairs: &[&TokenizedPair],
        chosen: &Tensor,
        rejected: &Tensor,
    ) -> Result<Tensor> {
        if self.head.is_some() {
            return bradley_terry_loss(chosen, rejected);
        }
        let loss = genarm_loss(chosen, rejected, self.config.beta_r, self.config.gamma)?;
        if self.config.sft_weight == 0.0 {
            return Ok(loss);
        }
        let lens: Vec<usize> = pairs.iter().map(|p| p.chosen.len()).collect();
        Ok((loss + sft_term(chosen, &lens, self.config.sft_weight)?)?)
    }

    fn pair_loss_f64(&self, pair: &TokenizedPair, chosen: f64, rejected: f64) -> f64 {
        if self.head.is_some() {
            return bradley_terry_loss_f64(chosen, rejected);
        }
        genarm_loss_f64(chosen, rejected, self.config.beta_r, self.config.gamma)
            + sft_term_f64(chosen, pair.chosen.len(), self.config.sft_weight)
    }

    /// Summed response log-probs of chosen and rejected for a slice of pairs.
    pub fn pair_logprobs(
        &mut self,
        pairs: &[&TokenizedPair],
        dropout: Option<DropoutKey>,
    ) -> Result<(Tensor, Tensor)> {
        let (seqs, starts) = pair_sequences(pairs);
        let lp = self.arm.response_logprobs(&seqs, &starts, dropout)?;
        let n = pairs.len();
        let lp = lp.reshape((n, 2))?;
        Ok((
            lp.narrow(1, 0, 1)?.squeeze(1)?,
            lp.narrow(1, 1, 1)?.squeeze(1)?,
        ))
    }

    /// Pairwise accuracy and mean loss on `pairs`, without dropout or gradients.
    pub fn evaluate(&mut self, pairs: &[TokenizedPair]) -> Result<(f64, f64)> {
        if pairs.is_empty() {
            return Ok((f64::NAN, f64::NAN));
        }
        let (mut correct, mut loss) = (0usize, 0f64);
        for chunk in pairs.chunks(self.config.micro_batch) {
            let refs: Vec<&TokenizedPair> = chunk.iter().collect();
            let (c, r) = self.pair_scores(&refs, None)?;
            let (c, r) = (to_f64(&c.detach())?, to_f64(&r.detach())?);
            for ((pair, cw), rl) in chunk.iter().zip(&c).zip(&r) {
                correct += usize::from(cw > rl);
                loss += self.pair_loss_f64(pair, *cw, *rl);
            }
        }
        Ok((
            correct as f64 / pairs.len() as f64,
            loss / pairs.len() as f64,
        ))
    }

    /// Trains on `train`, evaluating on `eval` after each epoch. With `resume`, continues
    /// from `out/checkpoint` when present. `max_steps` stops early (after checkpointing),
    /// as a kill would, for tests and for time-boxed runs.
    pub fn train(
        &mut self,
        train: &[TokenizedPair],
        eval: &[TokenizedPair],
        label: &ArmLabel,
        resume: bool,
        max_steps: Option<usize>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<TrainSummary> {
        if train.is_empty() {
            return Err(Error::Request("no training pairs".into()));
        }
        let cfg = self.config.clone();
        let schedule: Schedule = cfg.schedule.parse().map_err(Error::Request)?;
        let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
        let total_steps = steps_per_epoch * cfg.epochs;
        let mut opt = AdamW::new(self.trainable_vars(), cfg.weight_decay)?;
        let mut start_step = 0;
        let mut resumed_from = None;
        if resume {
            if let Some(step) = self.load_checkpoint(&mut opt, train.len())? {
                start_step = step;
                resumed_from = Some(step);
            }
            // Steps logged after the checkpoint are done again: drop their lines.
            self.truncate_log(start_step)?;
        } else {
            let _ = std::fs::remove_file(self.out.join(LOG));
        }
        if cfg.objective == Objective::Dpo {
            // The reference once per pair before the first step (a resumed run computes
            // the same values again: the base is frozen and checked unchanged).
            let all: Vec<&TokenizedPair> = train.iter().chain(eval).collect();
            self.reference
                .extend(&mut self.arm, &all, cfg.micro_batch)?;
        }
        let mut final_eval = None;
        let stop_at = max_steps.map_or(total_steps, |m| m.min(total_steps));
        for step in start_step..stop_at {
            let started = Instant::now();
            let epoch = step / steps_per_epoch;
            let order = shuffled(train.len(), cfg.seed.wrapping_add(epoch as u64));
            let in_epoch = step % steps_per_epoch;
            let batch: Vec<&TokenizedPair> = order
                [in_epoch * cfg.batch_size..((in_epoch + 1) * cfg.batch_size).min(train.len())]
                .iter()
                .map(|&i| &train[i])
                .collect();
            let mut grads = Vec::new();
            let (mut loss_sum, mut correct) = (0f64, 0usize);
            for (micro, chunk) in batch.chunks(cfg.micro_batch).enumerate() {
                let key = DropoutKey {
                    seed: cfg.seed,
                    step: step as u64,
                    micro: micro as u64,
                };
                let (c, r) = self.pair_scores(chunk, Some(key))?;
                let loss = self.pair_loss(chunk, &c, &r)?;
                // Each micro-batch's mean weighted by its share of the batch.
                let weight = chunk.len() as f64 / batch.len() as f64;
                let store = (&loss * weight)?.backward()?;
                accumulate(&mut grads, collect_grads(&store, &opt.vars, 1.0)?)?;
                loss_sum += to_f64(&loss)?[0] * chunk.len() as f64;
                let (c, r) = (to_f64(&c.detach())?, to_f64(&r.detach())?);
                correct += c.iter().zip(&r).filter(|(a, b)| a > b).count();
            }
            let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
            let lr = learning_rate(cfg.lr, step, cfg.warmup, total_steps, schedule);
            opt.step(&grads, lr)?;
            let log = StepLog {
                step: step + 1,
                total_steps,
                epoch,
                loss: loss_sum / batch.len() as f64,
                accuracy: correct as f64 / batch.len() as f64,
                lr,
                grad_norm,
                pairs_per_second: batch.len() as f64 / started.elapsed().as_secs_f64(),
            };
            self.append_log(&log)?;
            on_event(Event::Step(&log));
            let done = step + 1;
            let epoch_end = done % steps_per_epoch == 0;
            if epoch_end {
                let (acc, loss) = self.evaluate(eval)?;
                let e = EvalLog {
                    step: done,
                    epoch,
                    eval_pairs: eval.len(),
                    eval_accuracy: acc,
                    eval_loss: loss,
                };
                self.append_log(&e)?;
                on_event(Event::Eval(&e));
                final_eval = Some(acc);
            }
            if done % cfg.checkpoint_every.max(1) == 0 || done == stop_at || epoch_end {
                self.save_checkpoint(&opt, done, train.len())?;
                on_event(Event::Checkpoint(done));
            }
        }
        if self.config.full {
            self.write_full_model(label)?;
        } else {
            self.write_adapter(label)?;
        }
        Ok(TrainSummary {
            steps: stop_at,
            train_pairs: train.len(),
            eval_pairs: eval.len(),
            final_eval,
            resumed_from,
        })
    }

    /// Keeps the log's lines up to `step` (the checkpoint a resumed run starts from); a
    /// line cut by a kill is dropped too.
    fn truncate_log(&self, step: usize) -> Result<()> {
        let path = self.out.join(LOG);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let kept: String = text
            .lines()
            .map_while(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                let logged = v["step"].as_u64()? as usize;
                (logged <= step).then(|| format!("{line}\n"))
            })
            .collect();
        if kept.len() != text.len() {
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    fn append_log<T: Serialize>(&self, entry: &T) -> Result<()> {
        let path = self.out.join(LOG);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{}", serde_json::to_string(entry)?).map_err(|e| Error::io(&path, e))
    }

    /// The trained weights under their saved names (PEFT's for LoRA, HF's for full
    /// fine-tuning), in `dtype`.
    fn trained_tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut map = HashMap::new();
        for (name, var) in self.arm.named_vars() {
            map.insert(name, var.as_tensor().to_dtype(dtype)?);
        }
        Ok(map)
    }

    /// The head under its saved name.
    fn head_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut map = HashMap::new();
        if let Some(h) = &self.head {
            map.insert(
                SCORE_HEAD_TENSOR.to_string(),
                h.weight.as_tensor().to_dtype(DType::F32)?,
            );
        }
        Ok(map)
    }

    /// Writes the adapter (PEFT format) and `genarm.json` into `out`, each atomically;
    /// for a reward model also `score_head.safetensors`, and `genarm.json` says
    /// `"kind": "scalar_reward_model"`.
    pub fn write_adapter(&self, label: &ArmLabel) -> Result<()> {
        let cfg = &self.config;
        let layers: Vec<usize> = self.arm.trainable_layers().collect();
        let base = self.base_name(label);
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "target_modules": cfg.lora_targets,
            "layers_to_transform": layers,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "inference_mode": true,
        });
        save_safetensors(
            &self.trained_tensors(DType::F32)?,
            &self.out.join(ADAPTER_WEIGHTS),
        )?;
        if self.head.is_some() {
            save_safetensors(&self.head_tensors()?, &self.out.join(SCORE_HEAD_WEIGHTS))?;
        }
        write_atomic(
            &self.out.join(ADAPTER_CONFIG),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        self.write_info(label, None)
    }

    /// `base_model_name_or_path`: the label's base name, else the base's full path.
    fn base_name(&self, label: &ArmLabel) -> String {
        match &label.base_name {
            Some(name) => name.clone(),
            None => self
                .base_path
                .canonicalize()
                .unwrap_or_else(|_| self.base_path.clone())
                .display()
                .to_string(),
        }
    }

    fn write_info(&self, label: &ArmLabel, base_model: Option<String>) -> Result<()> {
        let cfg = &self.config;
        let kind = match (cfg.objective, cfg.scalar_head) {
            (Objective::Dpo, _) => AdapterKind::Policy,
            (Objective::Genarm, true) => AdapterKind::ScalarRewardModel,
            (Objective::Genarm, false) => AdapterKind::Arm,
        };
        let info = ArmInfo {
            name: label.name.clone(),
            objective: label.objective.clone(),
            beta_r: (kind == AdapterKind::Arm).then_some(cfg.beta_r),
            kind,
        };
        let mut json = serde_json::to_value(&info)?;
        if kind == AdapterKind::Policy {
            json["dpo_beta"] = cfg.beta_r.into();
        }
        if let Some(base) = base_model {
            // Only fully tuned ARMs carry it (a LoRA names its base in its config);
            // readers of `ArmInfo` ignore it.
            json["base_model"] = base.into();
        }
        if let Some(k) = cfg.keep_layers {
            // A weak ARM: the base's bottom K layers (readers of `ArmInfo` ignore it).
            json["keep_layers"] = k.into();
        }
        write_atomic(
            &self.out.join(ARM_INFO),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )
    }

    /// Writes the fully tuned ARM as a standalone HF model directory (see
    /// `super::full::write_model_dir`) plus `genarm.json`, whose `base_model` records
    /// the checkpoint it was tuned from.
    pub fn write_full_model(&self, label: &ArmLabel) -> Result<()> {
        let mut base = Checkpoint::open(&self.base_path)?;
        if let Some(k) = self.config.keep_layers {
            base.config = super::full::keep_bottom_layers(&base.config, k)?;
        }
        let trained = self.trained_tensors(self.save_dtype)?;
        super::full::write_model_dir(&base, &trained, &self.out, self.save_dtype)?;
        self.write_info(label, Some(self.base_name(label)))
    }

    /// Writes `checkpoint.tmp/` then swaps it in for `checkpoint/`, so a kill at any
    /// moment leaves either the old or the new checkpoint whole.
    fn save_checkpoint(&self, opt: &AdamW, step: usize, train_pairs: usize) -> Result<()> {
        let dir = self.out.join(CHECKPOINT);
        let tmp = self.out.join(format!("{CHECKPOINT}.tmp"));
        let old = self.out.join(format!("{CHECKPOINT}.old"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut tensors = self.trained_tensors(DType::F32)?;
        tensors.extend(self.head_tensors()?);
        for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
            tensors.insert(format!("adam.m.{i}"), m.clone());
            tensors.insert(format!("adam.v.{i}"), v.clone());
        }
        save_safetensors(&tensors, &tmp.join("state.safetensors"))?;
        let meta = CheckpointMeta {
            step,
            adam_t: opt.t,
            config: self.config.clone(),
            train_pairs,
            inputs: self.inputs.clone(),
        };
        std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&meta)?)
            .map_err(|e| Error::io(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Restores the trained weights and optimizer state; `None` when there is no checkpoint.
    fn load_checkpoint(&mut self, opt: &mut AdamW, train_pairs: usize) -> Result<Option<usize>> {
        let mut dir = self.out.join(CHECKPOINT);
        if !dir.join("state.json").is_file() {
            // A kill between the two renames leaves only the previous checkpoint.
            dir = self.out.join(format!("{CHECKPOINT}.old"));
            if !dir.join("state.json").is_file() {
                return Ok(None);
            }
        }
        let meta_path = dir.join("state.json");
        let bytes = std::fs::read(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: CheckpointMeta = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format(&meta_path, format!("invalid checkpoint: {e}")))?;
        let fix = "resume with the same settings and inputs, or start over with --overwrite";
        if let (Some(was), Some(now)) = (&meta.inputs, &self.inputs) {
            for (what, a, b) in [
                ("model", &was.model, &now.model),
                ("data", &was.data, &now.data),
            ] {
                if let Some(diff) = first_difference(a, b) {
                    return Err(Error::format(
                        &meta_path,
                        format!("the checkpoint's run had another {what} ({diff}); {fix}"),
                    ));
                }
            }
        }
        if let Some(diff) = first_difference(&meta.config, &self.config) {
            return Err(Error::format(
                &meta_path,
                format!("the checkpoint's run had other settings ({diff}); {fix}"),
            ));
        }
        if meta.train_pairs != train_pairs {
            return Err(Error::format(
                &meta_path,
                format!(
                    "the checkpoint's run had {} training pairs, this one {train_pairs}; {fix}",
                    meta.train_pairs
                ),
            ));
        }
        let state_path = dir.join("state.safetensors");
        let tensors = candle_core::safetensors::load(&state_path, &Device::Cpu).map_err(|e| {
            Error::format(
                &state_path,
                format!("unreadable training state ({e}); remove the checkpoint or start with --overwrite"),
            )
        })?;
        let get = |name: &str| -> Result<Tensor> {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| Error::MissingTensor {
                    path: state_path.clone(),
                    name: name.into(),
                })
        };
        let device = opt
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        for (name, var) in self.arm.named_vars() {
            var.set(&get(&name)?.to_dtype(var.dtype())?.to_device(&device)?)?;
        }
        if let Some(h) = &self.head {
            let w = get(SCORE_HEAD_TENSOR)?;
            h.weight
                .set(&w.to_dtype(h.weight.dtype())?.to_device(&device)?)?;
        }
        for i in 0..opt.m.len() {
            opt.m[i] = get(&format!("adam.m.{i}"))?.to_device(&device)?;
            opt.v[i] = get(&format!("adam.v.{i}"))?.to_device(&device)?;
        }
        opt.t = meta.adam_t;
        Ok(Some(meta.step))
    }
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}
