//! Baselines under the same prompts, seeds and scorers as the α sweep:
//! - **best-of-N** (`bon-rm:N`, `bon-arm:N`): N base samples, keep the one the scalar
//!   reward model (or the ARMs' trajectory reward) ranks highest;
//! - **ARGS** (`args:K:W`, Khanov et al. 2024, greedy variant): each step the base's
//!   top-K tokens, each partial response scored by the scalar reward model, the token
//!   maximising `log π_base + W · r` taken;
//! - **a trained policy** (`dpo:DIR`, e.g. `genarm train --loss dpo`): plain sampling
//!   from base + that LoRA, with the base sample's seed.
//!
//! Each response records its cost (`cost`): forward passes per model and seconds.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use web_time::Instant;

use super::arm_reward::ArmRewardModel;
use super::cost::{Cost, CountingEngine, ForwardPasses};
use super::kl::policy_kl;
use super::reward_model::ScalarRewardModel;
use super::run::{sample_seed, score_all, SampleRecord, Setting, SweepSpec};
use super::scorers::Scorer;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerateOptions, StopReason};
use crate::guide::{mix64, SPLITMIX_GAMMA};
use crate::model::tokenizer::TextTokenizer;

/// How best-of-N ranks its candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranker {
    /// The scalar reward model, `r(x, y)`.
    RewardModel,
    /// The ARMs' trajectory reward `Σ_i α_i Σ_t log π_arm_i(y_t | x, y_<t)`.
    Arm,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Baseline {
    BestOfN {
        n: usize,
        ranker: Ranker,
    },
    /// Greedy ARGS over the base's top `k` tokens with reward weight `w`.
    Args {
        k: usize,
        w: f32,
    },
}

/// ARGS's default candidate count (the paper's).
pub const ARGS_DEFAULT_K: usize = 10;

impl Baseline {
    /// The `method` name in records and summaries: `bon-rm:N`, `bon-arm:N`, `args:K:W`.
    pub fn method(&self) -> String {
        match self {
            Self::BestOfN {
                n,
                ranker: Ranker::RewardModel,
            } => format!("bon-rm:{n}"),
            Self::BestOfN {
                n,
                ranker: Ranker::Arm,
            } => format!("bon-arm:{n}"),
            Self::Args { k, w } => format!("args:{k}:{w}"),
        }
    }
}

/// A `--baseline` as written: `bon:N` (every ranker that has a model), `bon-rm:N`,
/// `bon-arm:N`, `args:W` (K = 10) or `args:K:W`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BaselineSpec {
    kind: SpecKind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SpecKind {
    BestOfN { n: usize, ranker: Option<Ranker> },
    Args { k: usize, w: f32 },
}

impl FromStr for BaselineSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let count = |v: &str, what: &str| -> std::result::Result<usize, String> {
            match v.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!(
                    "{what} must be a whole number ≥ 1, got `{v}` in `{s}`"
                )),
            }
        };
        let weight = |v: &str| -> std::result::Result<f32, String> {
            v.parse::<f32>()
                .ok()
                .filter(|w| w.is_finite())
                .ok_or_else(|| {
                    format!("the ARGS weight must be a finite number, got `{v}` in `{s}`")
                })
        };
        let kind = match parts.as_slice() {
            ["bon", n] => SpecKind::BestOfN {
                n: count(n, "N")?,
                ranker: None,
            },
            ["bon-rm", n] => SpecKind::BestOfN {
                n: count(n, "N")?,
                ranker: Some(Ranker::RewardModel),
            },
            ["bon-arm", n] => SpecKind::BestOfN {
                n: count(n, "N")?,
                ranker: Some(Ranker::Arm),
            },
            ["args", w] => SpecKind::Args {
                k: ARGS_DEFAULT_K,
                w: weight(w)?,
            },
            ["args", k, w] => SpecKind::Args {
                k: count(k, "K")?,
                w: weight(w)?,
            },
            _ => {
                return Err(format!(
                "unknown baseline `{s}` (bon:N, bon-rm:N, bon-arm:N, args:W, args:K:W or dpo:DIR)"
            ))
            }
        };
        Ok(Self { kind })
    }
}

/// A `--baseline` of `genarm eval`: a decoding-time method on the base, or a trained
/// policy to sample from.
#[derive(Clone, Debug, PartialEq)]
pub enum BaselineArg {
    Decoding(BaselineSpec),
    /// `dpo:DIR`: a policy LoRA directory (`genarm train --loss dpo`).
    Policy(PathBuf),
}

impl FromStr for BaselineArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.strip_prefix("dpo:") {
            Some("") => Err("dpo:DIR needs the policy's directory".into()),
            Some(dir) => Ok(Self::Policy(dir.into())),
            None => s.parse().map(Self::Decoding),
        }
    }
}

/// The summary row of the policy in `dir`: `dpo:DIR`, decoded with no ARM.
pub fn policy_setting(dir: &Path, n_arms: usize) -> Setting {
    Setting {
        method: format!("dpo:{}", dir.display()),
        alphas: vec![0.0; n_arms],
    }
}

/// Samples every prompt and seed of `spec` from `policy` (base + a policy LoRA, no
/// ARMs) exactly as the sweep samples the base: the same seeds, options and scorers.
/// Records are numbered `setting` and carry `setting_row`'s method; each response's KL
/// is the policy's log-probs against `base`'s (the sweep's base, no ARMs).
#[allow(clippy::too_many_arguments)]
pub fn run_policy(
    policy: &mut dyn Engine,
    base: &mut dyn Engine,
    tokenizer: &TextTokenizer,
    eos_ids: &[u32],
    prompts: &[String],
    scorers: &[Box<dyn Scorer>],
    spec: &SweepSpec,
    (setting, setting_row): (usize, &Setting),
    on_sample: &mut dyn FnMut(&SampleRecord),
) -> Result<Vec<SampleRecord>> {
    let mut records = Vec::new();
    for (pi, line) in prompts.iter().enumerate() {
        let ids = tokenizer.encode_prompt(&spec.template.replace("{}", line), spec.chat, None)?;
        for k in 0..spec.samples {
            let seed = sample_seed(spec.seed, k, pi);
            // One candidate: candidate 0 of a pool is sampled with the base sample's seed.
            let c =
                sample_candidates(policy, tokenizer, &ids, 1, seed, spec, eos_ids)?.swap_remove(0);
            let kl = policy_kl(policy, base, &ids, &c.tokens, &spec.sampling(seed))?;
            let rec = SampleRecord {
                setting,
                method: setting_row.method.clone(),
                alphas: setting_row.alphas.clone(),
                prompt_index: pi,
                seed,
                scores: score_all(scorers, &c.text, c.tokens.len(), c.complete),
                text: c.text,
                tokens: c.tokens.len(),
                complete: c.complete,
                seconds: c.cost.seconds,
                forward_passes: c.cost.passes,
                kl: Some(kl),
            };
            on_sample(&rec);
            records.push(rec);
        }
    }
    Ok(records)
}

/// The baselines the specs ask for, given which ranking models exist; each named once.
pub fn expand_baselines(
    specs: &[BaselineSpec],
    have_reward_model: bool,
    have_arms: bool,
) -> Result<Vec<Baseline>> {
    let mut out: Vec<Baseline> = Vec::new();
    for spec in specs {
        let wanted = match spec.kind {
            SpecKind::BestOfN { n, ranker: None } => {
                let rankers: Vec<Ranker> = [
                    (have_reward_model, Ranker::RewardModel),
                    (have_arms, Ranker::Arm),
                ]
                .into_iter()
                .filter_map(|(have, r)| have.then_some(r))
                .collect();
                if rankers.is_empty() {
                    return Err(Error::Request(
                        "best-of-N needs something to rank by: --reward-model or --arm".into(),
                    ));
                }
                rankers
                    .into_iter()
                    .map(|ranker| Baseline::BestOfN { n, ranker })
                    .collect()
            }
            SpecKind::BestOfN {
                n,
                ranker: Some(ranker),
            } => vec![Baseline::BestOfN { n, ranker }],
            SpecKind::Args { k, w } => vec![Baseline::Args { k, w }],
        };
        for b in wanted {
            let needs_rm = matches!(
                b,
                Baseline::Args { .. }
                    | Baseline::BestOfN {
                        ranker: Ranker::RewardModel,
                        ..
                    }
            );
            if needs_rm && !have_reward_model {
                return Err(Error::Request(format!(
                    "baseline {} needs a scalar reward model (--reward-model DIR)",
                    b.method()
                )));
            }
            let needs_arms = matches!(
                b,
                Baseline::BestOfN {
                    ranker: Ranker::Arm,
                    ..
                }
            );
            if needs_arms && !have_arms {
                return Err(Error::Request(format!(
                    "baseline {} needs at least one --arm",
                    b.method()
                )));
            }
            if !out.contains(&b) {
                out.push(b);
            }
        }
    }
    let ks: Vec<usize> = out
        .iter()
        .filter_map(|b| match b {
            Baseline::Args { k, .. } => Some(*k),
            Baseline::BestOfN { .. } => None,
        })
        .collect();
    if ks.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Request(
            "all ARGS baselines of one run must use the same K (the reward model's candidate rows)"
                .into(),
        ));
    }
    Ok(out)
}

/// The K of the run's ARGS baselines (the reward model's candidate rows), 0 for none.
pub fn args_candidate_rows(baselines: &[Baseline]) -> usize {
    baselines
        .iter()
        .find_map(|b| match b {
            Baseline::Args { k, .. } => Some(*k),
            Baseline::BestOfN { .. } => None,
        })
        .unwrap_or(0)
}

/// The models the baselines run on. `base` must be the base alone (no ARM rows), so
/// that base sampling costs only base forward passes.
pub struct BaselineModels<'a> {
    pub base: &'a mut dyn Engine,
    pub reward_model: Option<&'a mut ScalarRewardModel>,
    pub arms: Option<&'a mut ArmRewardModel>,
}

/// One base sample of a best-of-N pool, with what it cost.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub tokens: Vec<u32>,
    pub text: String,
    pub complete: bool,
    pub cost: Cost,
}

/// The seed of candidate `j` for the response seeded `seed`: candidate 0 is the base
/// sample itself (so best-of-1 is base sampling), the others are hashed from it, and a
/// pool of N is the first N of a pool of M > N.
pub fn candidate_seed(seed: u64, j: usize) -> u64 {
    if j == 0 {
        seed
    } else {
        mix64(seed ^ (j as u64).wrapping_mul(SPLITMIX_GAMMA))
    }
}

/// `n` base samples of `prompt` seeded from `seed`.
pub fn sample_candidates(
    base: &mut dyn Engine,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    n: usize,
    seed: u64,
    spec: &SweepSpec,
    eos_ids: &[u32],
) -> Result<Vec<Candidate>> {
    let mut base = CountingEngine::new(base);
    if !base.arm_labels().is_empty() {
        return Err(Error::Request(
            "best-of-N samples from the base alone; its engine must have no ARMs".into(),
        ));
    }
    (0..n)
        .map(|j| {
            let opts = GenerateOptions {
                max_new_tokens: spec.max_new_tokens,
                sampling: spec.sampling(candidate_seed(seed, j)),
                eos_ids: eos_ids.to_vec(),
                ..Default::default()
            };
            let started = Instant::now();
            let g = generate(&mut base, Some(tokenizer), prompt, &opts, &mut |_| true)?;
            Ok(Candidate {
                complete: g.stop == StopReason::Eos,
                text: g.text.unwrap_or_default(),
                tokens: g.tokens,
                cost: Cost {
                    passes: base.take(),
                    seconds: started.elapsed().as_secs_f64(),
                },
            })
        })
        .collect()
}

/// The tokens a reward scores: the response, with a final end-of-sequence token only
/// when `score_eos` (chat data ends responses with the end-of-turn token; plain-text
/// pairs never contain EOS, so a reward model never saw one there).
pub fn scored_tokens<'t>(tokens: &'t [u32], eos_ids: &[u32], score_eos: bool) -> &'t [u32] {
    match tokens.split_last() {
        Some((last, rest)) if !score_eos && eos_ids.contains(last) => rest,
        _ => tokens,
    }
}

/// Rewards of a pool's candidates by one ranker: the shared prompt's cost (computed
/// once for the pool) and each candidate's reward and cost.
#[derive(Clone, Debug)]
pub struct PoolRewards {
    pub prompt_cost: Cost,
    pub rewards: Vec<f64>,
    pub costs: Vec<Cost>,
}

/// A ranker of a pool of responses to one prompt.
trait PoolScorer {
    /// Computes the shared prompt; returns the passes it ran.
    fn prefill(&mut self, prompt: &[u32]) -> Result<ForwardPasses>;
    /// The reward of one scored response to that prompt, and the passes it ran.
    fn reward(&mut self, response: &[u32]) -> Result<(f64, ForwardPasses)>;
}

/// The scalar reward model over a pool: the prompt once, then each response on its cache.
struct RewardModelPool<'a> {
    rm: &'a mut ScalarRewardModel,
    prompt_len: usize,
    prompt_reward: f64,
}

impl PoolScorer for RewardModelPool<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<ForwardPasses> {
        self.prompt_reward = self.rm.score_sequence(prompt)? as f64;
        self.prompt_len = prompt.len();
        Ok(ForwardPasses {
            rm: prompt.len() as u64,
            ..Default::default()
        })
    }

    fn reward(&mut self, response: &[u32]) -> Result<(f64, ForwardPasses)> {
        if response.is_empty() {
            // Nothing but EOS: the response adds nothing to the prompt.
            return Ok((self.prompt_reward, ForwardPasses::default()));
        }
        let r = self.rm.score_continuation(self.prompt_len, response)? as f64;
        let passes = ForwardPasses {
            rm: response.len() as u64,
            ..Default::default()
        };
        Ok((r, passes))
    }
}

impl PoolScorer for ArmRewardModel {
    fn prefill(&mut self, prompt: &[u32]) -> Result<ForwardPasses> {
        ArmRewardModel::prefill(self, prompt)?;
        Ok(ForwardPasses {
            arm: (self.n_arms() * prompt.len()) as u64,
            ..Default::default()
        })
    }

    fn reward(&mut self, response: &[u32]) -> Result<(f64, ForwardPasses)> {
        let r = ArmRewardModel::reward(self, response)?;
        // The last response token's prediction is never needed.
        let passes = ForwardPasses {
            arm: (self.n_arms() * response.len().saturating_sub(1)) as u64,
            ..Default::default()
        };
        Ok((r, passes))
    }
}

/// The scalar reward model's `r(x, y)` for each candidate, the prompt computed once.
pub fn reward_model_rewards(
    rm: &mut ScalarRewardModel,
    prompt: &[u32],
    candidates: &[Candidate],
    eos_ids: &[u32],
    score_eos: bool,
) -> Result<PoolRewards> {
    let mut pool = RewardModelPool {
        rm,
        prompt_len: 0,
        prompt_reward: 0.0,
    };
    rank_pool(&mut pool, prompt, candidates, eos_ids, score_eos)
}

/// The ARMs' trajectory reward for each candidate, the prompt computed once per ARM.
pub fn arm_rewards(
    arms: &mut ArmRewardModel,
    prompt: &[u32],
    candidates: &[Candidate],
    eos_ids: &[u32],
    score_eos: bool,
) -> Result<PoolRewards> {
    rank_pool(arms, prompt, candidates, eos_ids, score_eos)
}

/// Ranks a pool with `scorer`, timing the shared prompt and each response.
fn rank_pool(
    scorer: &mut dyn PoolScorer,
    prompt: &[u32],
    candidates: &[Candidate],
    eos_ids: &[u32],
    score_eos: bool,
) -> Result<PoolRewards> {
    let started = Instant::now();
    let passes = scorer.prefill(prompt)?;
    let prompt_cost = Cost {
        passes,
        seconds: started.elapsed().as_secs_f64(),
    };
    let mut rewards = Vec::with_capacity(candidates.len());
    let mut costs = Vec::with_capacity(candidates.len());
    for c in candidates {
        let started = Instant::now();
        let (reward, passes) = scorer.reward(scored_tokens(&c.tokens, eos_ids, score_eos))?;
        rewards.push(reward);
        costs.push(Cost {
            passes,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(PoolRewards {
        prompt_cost,
        rewards,
        costs,
    })
}

/// Best-of-N over the first `n` candidates: the index of the highest reward (the
/// earliest wins ties) and the cost of sampling and ranking those n alone.
pub fn best_of_n(candidates: &[Candidate], ranked: &PoolRewards, n: usize) -> (usize, Cost) {
    let n = n.min(candidates.len()).min(ranked.rewards.len());
    let mut best = 0;
    for j in 1..n {
        if ranked.rewards[j] > ranked.rewards[best] {
            best = j;
        }
    }
    let cost = candidates[..n].iter().map(|c| c.cost).sum::<Cost>()
        + ranked.prompt_cost
        + ranked.costs[..n].iter().copied().sum::<Cost>();
    (best, cost)
}

/// The base's `k` most likely tokens, most likely first (the lower id first on ties).
pub fn top_k_ids(logprobs: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logprobs.len() as u32).collect();
    let by_score = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(ids.len());
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by_score);
        ids.truncate(k);
    }
    ids.sort_by(by_score);
    ids
}

#[derive(Clone, Debug)]
pub struct ArgsOptions {
    pub k: usize,
    pub w: f32,
    pub max_new_tokens: usize,
    pub eos_ids: Vec<u32>,
    /// Whether an end-of-sequence candidate is scored as a token (see `scored_tokens`);
    /// otherwise it is scored as the partial response it would end.
    pub score_eos: bool,
}

#[derive(Clone, Debug)]
pub struct ArgsOutput {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub passes: ForwardPasses,
}

/// Greedy ARGS: each step the base's top-k tokens `c`, each scored
/// `log π_base(c) + w · r(x, y_<t ++ [c])`, the best taken (the more likely token on
/// ties). `log π_base` differs from the logit by a per-step constant, so the choice is
/// the paper's `logit + w · r`. The reward model's k candidate rows share the prefix's
/// KV cache; each costs one position.
pub fn args_decode(
    base: &mut dyn Engine,
    rm: &mut ScalarRewardModel,
    prompt: &[u32],
    opts: &ArgsOptions,
) -> Result<ArgsOutput> {
    if opts.k == 0 || opts.k > base.vocab_size() {
        return Err(Error::Request(format!(
            "ARGS needs 1 ≤ K ≤ the vocabulary ({}), got {}",
            base.vocab_size(),
            opts.k
        )));
    }
    if rm.candidate_rows() != opts.k {
        return Err(Error::Request(format!(
            "ARGS with K = {} needs a reward model with {} candidate rows, it has {}",
            opts.k,
            opts.k,
            rm.candidate_rows()
        )));
    }
    let context = base.context_len().min(rm.context_len());
    if prompt.is_empty() || prompt.len() >= context {
        return Err(Error::Request(format!(
            "the prompt has {} tokens; it must be non-empty and shorter than the context ({context})",
            prompt.len()
        )));
    }
    let mut passes = ForwardPasses {
        base: prompt.len() as u64,
        rm: prompt.len() as u64,
        ..Default::default()
    };
    base.reset();
    let mut logprobs = base.step(prompt)?.base;
    let mut prefix_reward = rm.score_sequence(prompt)?;
    rm.start_candidates()?;
    let mut tokens = Vec::new();
    let stop = loop {
        if tokens.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if prompt.len() + tokens.len() >= context {
            break StopReason::ContextFull;
        }
        let candidates = top_k_ids(&logprobs, opts.k);
        let rewards = rm.score_candidates(&candidates)?;
        passes.rm += opts.k as u64;
        let reward_of = |i: usize| {
            if !opts.score_eos && opts.eos_ids.contains(&candidates[i]) {
                prefix_reward
            } else {
                rewards[i]
            }
        };
        let score = |i: usize| logprobs[candidates[i] as usize] + opts.w * reward_of(i);
        let mut best = 0;
        for i in 1..candidates.len() {
            if score(i) > score(best) {
                best = i;
            }
        }
        let chosen = candidates[best];
        rm.keep_candidate(best)?;
        prefix_reward = reward_of(best);
        tokens.push(chosen);
        if opts.eos_ids.contains(&chosen) {
            break StopReason::Eos;
        }
        if tokens.len() < opts.max_new_tokens {
            logprobs = base.step(&[chosen])?.base;
            passes.base += 1;
        }
    };
    Ok(ArgsOutput {
        tokens,
        stop,
        passes,
    })
}

/// Runs `baselines` on every prompt and sample seed of `spec` (its `settings` are not
/// used); records are numbered from setting `first_setting` on, in `baselines` order.
#[allow(clippy::too_many_arguments)]
pub fn run_baselines(
    models: &mut BaselineModels,
    tokenizer: &TextTokenizer,
    eos_ids: &[u32],
    prompts: &[String],
    scorers: &[Box<dyn Scorer>],
    spec: &SweepSpec,
    baselines: &[Baseline],
    first_setting: usize,
    on_sample: &mut dyn FnMut(&SampleRecord),
) -> Result<Vec<SampleRecord>> {
    let pool_size = baselines
        .iter()
        .filter_map(|b| match b {
            Baseline::BestOfN { n, .. } => Some(*n),
            Baseline::Args { .. } => None,
        })
        .max()
        .unwrap_or(0);
    let score_eos = spec.chat;
    // The sweep's α vectors are all as long as the ARM list; the baselines decode with none.
    let n_arms = spec.settings.first().map_or(0, Vec::len);
    let settings = baseline_settings(baselines, n_arms);
    let mut records = Vec::new();
    for (pi, line) in prompts.iter().enumerate() {
        let ids = tokenizer.encode_prompt(&spec.template.replace("{}", line), spec.chat, None)?;
        for k in 0..spec.samples {
            let seed = sample_seed(spec.seed, k, pi);
            let pool = if pool_size > 0 {
                sample_candidates(
                    &mut *models.base,
                    tokenizer,
                    &ids,
                    pool_size,
                    seed,
                    spec,
                    eos_ids,
                )?
            } else {
                Vec::new()
            };
            let needs = |r: Ranker| {
                baselines
                    .iter()
                    .any(|b| matches!(b, Baseline::BestOfN { ranker, .. } if *ranker == r))
            };
            let by_rm = match models.reward_model.as_deref_mut() {
                Some(rm) if needs(Ranker::RewardModel) => {
                    Some(reward_model_rewards(rm, &ids, &pool, eos_ids, score_eos)?)
                }
                _ => None,
            };
            let by_arm = match models.arms.as_deref_mut() {
                Some(arms) if needs(Ranker::Arm) => {
                    Some(arm_rewards(arms, &ids, &pool, eos_ids, score_eos)?)
                }
                _ => None,
            };
            for (bi, (baseline, setting)) in baselines.iter().zip(&settings).enumerate() {
                let (tokens, text, complete, cost) = match *baseline {
                    Baseline::BestOfN { n, ranker } => {
                        let ranked = match ranker {
                            Ranker::RewardModel => by_rm.as_ref(),
                            Ranker::Arm => by_arm.as_ref(),
                        }
                        .ok_or_else(|| {
                            Error::Request(format!("no model to rank {}", baseline.method()))
                        })?;
                        let (best, cost) = best_of_n(&pool, ranked, n);
                        let c = &pool[best];
                        (c.tokens.clone(), c.text.clone(), c.complete, cost)
                    }
                    Baseline::Args { k, w } => {
                        let rm = models.reward_model.as_deref_mut().ok_or_else(|| {
                            Error::Request("ARGS needs a scalar reward model".into())
                        })?;
                        let opts = ArgsOptions {
                            k,
                            w,
                            max_new_tokens: spec.max_new_tokens,
                            eos_ids: eos_ids.to_vec(),
                            score_eos,
                        };
                        let started = Instant::now();
                        let out = args_decode(&mut *models.base, rm, &ids, &opts)?;
                        let seconds = started.elapsed().as_secs_f64();
                        let text_ids = scored_tokens(&out.tokens, eos_ids, false);
                        let text = tokenizer.decode(text_ids, false)?;
                        let cost = Cost {
                            passes: out.passes,
                            seconds,
                        };
                        (out.tokens, text, out.stop == StopReason::Eos, cost)
                    }
                };
                let rec = SampleRecord {
                    setting: first_setting + bi,
                    method: setting.method.clone(),
                    alphas: setting.alphas.clone(),
                    prompt_index: pi,
                    seed,
                    scores: score_all(scorers, &text, tokens.len(), complete),
                    text,
                    tokens: tokens.len(),
                    complete,
                    seconds: cost.seconds,
                    forward_passes: cost.passes,
                    kl: None,
                };
                on_sample(&rec);
                records.push(rec);
            }
        }
    }
    Ok(records)
}

/// The summary rows of `baselines`, after the sweep's.
pub fn baseline_settings(baselines: &[Baseline], n_arms: usize) -> Vec<Setting> {
    baselines
        .iter()
        .map(|b| Setting {
            method: b.method(),
            alphas: vec![0.0; n_arms],
        })
        .collect()
}
