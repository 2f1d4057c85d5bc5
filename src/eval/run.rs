//! α sweeps: generate for every held-out prompt under every ARM-weight setting, score
//! each response with every scorer, and summarise per setting (mean ± 95% CI, win rate
//! against base-only decoding on the same prompts and seeds, length, distinct-n, cost in
//! forward passes and seconds, KL to the base). The baselines (`baselines`) write the
//! same records.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use super::cost::{CountingEngine, ForwardPasses};
use super::kl::guided_kl;
use super::scorers::Scorer;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerateOptions};
use crate::guide::SamplingParams;
use crate::model::tokenizer::TextTokenizer;

#[derive(Clone, Debug)]
pub struct SweepSpec {
    /// One α vector (one weight per ARM) per setting.
    pub settings: Vec<Vec<f32>>,
    /// Samples per prompt and setting (seeds `seed..seed+samples`).
    pub samples: usize,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub chat: bool,
    /// `{}` stands for the prompt line.
    pub template: String,
}

impl SweepSpec {
    /// How every method of the run samples a response seeded `seed`.
    pub fn sampling(&self, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed,
            ..Default::default()
        }
    }
}

/// Every α combination of `values` over `n_arms` ARMs (the full grid), base first.
pub fn alpha_grid(values: &[f32], n_arms: usize) -> Vec<Vec<f32>> {
    let mut grid: Vec<Vec<f32>> = vec![Vec::new()];
    for _ in 0..n_arms {
        grid = grid
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |&v| {
                    let mut p = prefix.clone();
                    p.push(v);
                    p
                })
            })
            .collect();
    }
    let zero = vec![0.0; n_arms];
    grid.retain(|s| *s != zero);
    grid.insert(0, zero);
    grid
}

/// One row of the comparison: a decoding method and the ARM weights it decodes with.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    /// `base`, `genarm:A[,A…]`, `bon-rm:N`, `bon-arm:N` or `args:K:W`.
    pub method: String,
    /// The α guiding decoding (all zero for base sampling and the baselines).
    pub alphas: Vec<f32>,
}

impl Setting {
    /// The sweep's setting for one α vector: `base` when every α is 0.
    pub fn genarm(alphas: &[f32]) -> Self {
        let method = if alphas.iter().all(|&a| a == 0.0) {
            "base".to_string()
        } else {
            let a: Vec<String> = alphas.iter().map(f32::to_string).collect();
            format!("genarm:{}", a.join(","))
        };
        Self {
            method,
            alphas: alphas.to_vec(),
        }
    }
}

/// The seed of sample `k` of prompt `prompt`: every method uses the same ones, so win
/// rates compare responses to the same prompt under the same seed.
pub fn sample_seed(seed: u64, k: usize, prompt: usize) -> u64 {
    seed.wrapping_add(k as u64)
        .wrapping_mul(1_000_003)
        .wrapping_add(prompt as u64)
}

/// Every scorer's score of one response.
pub fn score_all(
    scorers: &[Box<dyn Scorer>],
    text: &str,
    tokens: usize,
    complete: bool,
) -> BTreeMap<String, f64> {
    scorers
        .iter()
        .map(|s| (s.name().to_string(), s.score(text, tokens, complete)))
        .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct SampleRecord {
    pub setting: usize,
    /// See `Setting::method`.
    pub method: String,
    pub alphas: Vec<f32>,
    pub prompt_index: usize,
    pub seed: u64,
    pub text: String,
    pub tokens: usize,
    pub complete: bool,
    pub scores: BTreeMap<String, f64>,
    /// Wall-clock seconds for this response, everything the method needs included.
    pub seconds: f64,
    /// Token positions each model computed for this response.
    pub forward_passes: ForwardPasses,
    /// `Σ_t log π_dec(y_t) − log π_base(y_t)` over this response (`super::kl`), the
    /// per-response estimate of the decoding distribution's KL to the base; `None` for
    /// methods that do not sample token by token from one distribution (best-of-N, ARGS).
    pub kl: Option<f64>,
}

/// Mean forward passes per response, per model.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct MeanPasses {
    pub base: f64,
    pub arm: f64,
    pub rm: f64,
    pub total: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScoreSummary {
    pub mean: f64,
    /// Half-width of the normal-approximation 95% interval: 1.96·s/√n.
    pub ci95: f64,
    /// Fraction of (prompt, seed) where this setting beat base-only (ties count ½).
    pub win_rate_vs_base: f64,
}

/// Mean and 95% CI half-width of the responses' KL estimates.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct KlSummary {
    pub mean: f64,
    pub ci95: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SettingSummary {
    pub method: String,
    pub alphas: Vec<f32>,
    pub n: usize,
    pub scores: BTreeMap<String, ScoreSummary>,
    pub mean_tokens: f64,
    pub complete_rate: f64,
    /// Pooled over all responses: falls when they share words, e.g. a sharper
    /// distribution, even with no word repeated inside a response.
    pub distinct_1: f64,
    pub distinct_2: f64,
    /// Mean of each response's own distinct-1: falls with repetition inside a response
    /// ("love love love"), the degeneration guidance can cause.
    pub distinct_1_per_response: f64,
    pub seconds_per_response: f64,
    /// Mean token positions per response, per model.
    pub forward_passes: MeanPasses,
    /// All forward passes over all generated tokens (sums, not a mean of ratios).
    pub forward_passes_per_token: f64,
    /// KL of the decoding distribution to the base, over the responses that have one.
    pub kl: Option<KlSummary>,
}

/// Mean and 95% CI half-width of `xs`.
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, 1.96 * (var / n).sqrt())
}

/// Distinct-n: unique word n-grams over all n-grams of the texts.
pub fn distinct_n(texts: &[&str], n: usize) -> f64 {
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for t in texts {
        let words: Vec<&str> = t.split_whitespace().collect();
        for w in words.windows(n) {
            seen.insert(w.join(" "));
            total += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        seen.len() as f64 / total as f64
    }
}

/// Mean over the texts with words of each one's distinct-1 (0 when none has a word).
pub fn distinct_1_per_text(texts: &[&str]) -> f64 {
    let each: Vec<f64> = texts
        .iter()
        .filter(|t| t.split_whitespace().next().is_some())
        .map(|t| distinct_n(&[t], 1))
        .collect();
    if each.is_empty() {
        0.0
    } else {
        each.iter().sum::<f64>() / each.len() as f64
    }
}

/// Runs the sweep; `on_sample` sees each record (for progress and the JSONL file).
pub fn run_sweep(
    engine: &mut dyn Engine,
    tokenizer: &TextTokenizer,
    eos_ids: &[u32],
    prompts: &[String],
    scorers: &[Box<dyn Scorer>],
    spec: &SweepSpec,
    on_sample: &mut dyn FnMut(&SampleRecord),
) -> Result<Vec<SampleRecord>> {
    let mut records = Vec::new();
    let mut engine = CountingEngine::new(engine);
    for (pi, line) in prompts.iter().enumerate() {
        let text = spec.template.replace("{}", line);
        let ids = tokenizer.encode_prompt(&text, spec.chat, None)?;
        for (si, alphas) in spec.settings.iter().enumerate() {
            for k in 0..spec.samples {
                let seed = sample_seed(spec.seed, k, pi);
                let opts = GenerateOptions {
                    max_new_tokens: spec.max_new_tokens,
                    alphas: alphas.clone(),
                    sampling: spec.sampling(seed),
                    eos_ids: eos_ids.to_vec(),
                    ..Default::default()
                };
                let started = web_time::Instant::now();
                let g = generate(&mut engine, Some(tokenizer), &ids, &opts, &mut |_| true)?;
                let seconds = started.elapsed().as_secs_f64();
                let forward_passes = engine.take();
                let kl = guided_kl(engine.uncounted(), &ids, &g.tokens, alphas, &opts.sampling)?;
                let complete = g.stop == crate::generate::StopReason::Eos;
                let text = g.text.unwrap_or_default();
                let scores = score_all(scorers, &text, g.tokens.len(), complete);
                let rec = SampleRecord {
                    setting: si,
                    method: Setting::genarm(alphas).method,
                    alphas: alphas.clone(),
                    prompt_index: pi,
                    seed,
                    text,
                    tokens: g.tokens.len(),
                    complete,
                    scores,
                    seconds,
                    forward_passes,
                    kl: Some(kl),
                };
                on_sample(&rec);
                records.push(rec);
            }
        }
    }
    Ok(records)
}

/// Per-setting summaries; setting 0 must be base-only (all α = 0).
pub fn summarise(records: &[SampleRecord], settings: &[Setting]) -> Vec<SettingSummary> {
    let key = |r: &SampleRecord| (r.prompt_index, r.seed);
    let base: BTreeMap<(usize, u64), &SampleRecord> = records
        .iter()
        .filter(|r| r.setting == 0)
        .map(|r| (key(r), r))
        .collect();
    settings
        .iter()
        .enumerate()
        .map(|(si, setting)| {
            let rs: Vec<&SampleRecord> = records.iter().filter(|r| r.setting == si).collect();
            let names: Vec<String> = rs
                .first()
                .map(|r| r.scores.keys().cloned().collect())
                .unwrap_or_default();
            let scores = names
                .iter()
                .map(|name| {
                    let xs: Vec<f64> = rs.iter().map(|r| r.scores[name]).collect();
                    let (mean, ci95) = mean_ci(&xs);
                    let wins: Vec<f64> = rs
                        .iter()
                        .filter_map(|r| {
                            let b = base.get(&key(r))?.scores[name];
                            let s = r.scores[name];
                            Some(if s > b {
                                1.0
                            } else if s == b {
                                0.5
                            } else {
                                0.0
                            })
                        })
                        .collect();
                    let win = wins.iter().sum::<f64>() / wins.len().max(1) as f64;
                    (
                        name.clone(),
                        ScoreSummary {
                            mean,
                            ci95,
                            win_rate_vs_base: win,
                        },
                    )
                })
                .collect();
            let n = rs.len().max(1) as f64;
            let texts: Vec<&str> = rs.iter().map(|r| r.text.as_str()).collect();
            let passes: ForwardPasses = rs.iter().map(|r| r.forward_passes).sum();
            let tokens: usize = rs.iter().map(|r| r.tokens).sum();
            let kls: Vec<f64> = rs.iter().filter_map(|r| r.kl).collect();
            let kl = (!kls.is_empty()).then(|| {
                let (mean, ci95) = mean_ci(&kls);
                KlSummary { mean, ci95 }
            });
            SettingSummary {
                method: setting.method.clone(),
                alphas: setting.alphas.clone(),
                n: rs.len(),
                scores,
                mean_tokens: rs.iter().map(|r| r.tokens as f64).sum::<f64>() / n,
                complete_rate: rs.iter().filter(|r| r.complete).count() as f64 / n,
                distinct_1: distinct_n(&texts, 1),
                distinct_2: distinct_n(&texts, 2),
                distinct_1_per_response: distinct_1_per_text(&texts),
                seconds_per_response: rs.iter().map(|r| r.seconds).sum::<f64>() / n,
                forward_passes: MeanPasses {
                    base: passes.base as f64 / n,
                    arm: passes.arm as f64 / n,
                    rm: passes.rm as f64 / n,
                    total: passes.total() as f64 / n,
                },
                forward_passes_per_token: passes.total() as f64 / tokens.max(1) as f64,
                kl,
            }
        })
        .collect()
}

/// Writes `summary.json` and `summary.csv` into `dir`.
pub fn write_summary(dir: &Path, summary: &[SettingSummary]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::model::lora::write_atomic(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    let names: Vec<String> = summary
        .first()
        .map(|s| s.scores.keys().cloned().collect())
        .unwrap_or_default();
    let mut csv = Vec::new();
    let mut header = vec!["alphas".to_string(), "n".into()];
    for n in &names {
        header.extend([
            format!("{n}_mean"),
            format!("{n}_ci95"),
            format!("{n}_win_rate"),
        ]);
    }
    header.extend(
        [
            "mean_tokens",
            "complete_rate",
            "distinct_1",
            "distinct_2",
            "seconds_per_response",
            "method",
            "forward_passes_base",
            "forward_passes_arm",
            "forward_passes_rm",
            "forward_passes_total",
            "forward_passes_per_token",
            "kl_mean",
            "kl_ci95",
            "distinct_1_per_response",
        ]
        .map(String::from),
    );
    writeln!(csv, "{}", header.join(",")).map_err(|e| Error::io(dir, e))?;
    for s in summary {
        let alphas: Vec<String> = s.alphas.iter().map(|a| a.to_string()).collect();
        let mut row = vec![alphas.join(" "), s.n.to_string()];
        for n in &names {
            let sc = &s.scores[n];
            row.extend([sc.mean, sc.ci95, sc.win_rate_vs_base].map(|x| format!("{x:.6}")));
        }
        row.extend(
            [
                s.mean_tokens,
                s.complete_rate,
                s.distinct_1,
                s.distinct_2,
                s.seconds_per_response,
            ]
            .map(|x| format!("{x:.6}")),
        );
        row.push(s.method.clone());
        let p = &s.forward_passes;
        row.extend(
            [p.base, p.arm, p.rm, p.total, s.forward_passes_per_token].map(|x| format!("{x:.3}")),
        );
        // Empty cells for the methods without a KL estimate.
        row.extend(match s.kl {
            Some(kl) => [kl.mean, kl.ci95].map(|x| format!("{x:.6}")),
            None => [String::new(), String::new()],
        });
        row.push(format!("{:.6}", s.distinct_1_per_response));
        writeln!(csv, "{}", row.join(",")).map_err(|e| Error::io(dir, e))?;
    }
    crate::model::lora::write_atomic(&dir.join("summary.csv"), &csv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_puts_base_first() {
        let g = alpha_grid(&[0.0, 1.0], 2);
        assert_eq!(
            g,
            vec![
                vec![0.0, 0.0],
                vec![0.0, 1.0],
                vec![1.0, 0.0],
                vec![1.0, 1.0]
            ]
        );
        assert_eq!(
            alpha_grid(&[1.0, 2.0], 1),
            vec![vec![0.0], vec![1.0], vec![2.0]]
        );
    }

    #[test]
    fn ci_of_a_known_sample() {
        // mean 5, sample sd 2·sqrt(5/7)... computed by hand: xs = 2,4,4,4,5,5,7,9
        let (m, ci) = mean_ci(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert!((m - 5.0).abs() < 1e-12);
        let sd = (32.0f64 / 7.0).sqrt();
        assert!((ci - 1.96 * sd / 8f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn distinct_counts_unique_ngrams() {
        assert!((distinct_n(&["a b a b"], 1) - 0.5).abs() < 1e-12);
        assert!((distinct_n(&["a b a b"], 2) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn distinct_per_text_sees_repetition_that_pooling_hides() {
        // Two responses with no repeat inside either, but the same words: pooled 0.5,
        // each 1.
        let same = ["good day", "good day"];
        assert!((distinct_n(&same, 1) - 0.5).abs() < 1e-12);
        assert!((distinct_1_per_text(&same) - 1.0).abs() < 1e-12);
        // One looping response: (1 + 1/4) / 2; an empty text is left out of the mean.
        let looping = ["good day", "love love love love", ""];
        assert!((distinct_1_per_text(&looping) - 0.625).abs() < 1e-12);
        assert_eq!(distinct_1_per_text(&[""]), 0.0);
    }
}
