//! Prefill and decode speed, timed fairly: the configurations (base only, with 1 ARM,
//! with 2 ARMs, …) run round-robin, so a slow spell on a shared machine hits each
//! alike, and each reports the median of its runs.

use serde::Serialize;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerateOptions};
use crate::guide::SamplingParams;

/// One configuration's result.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// "base only", "base + 1 ARM", …
    pub config: String,
    /// The median of `runs`.
    pub tokens_per_second: f64,
    /// Every timed run's decode speed, sorted.
    pub runs: Vec<f64>,
    /// Time per token relative to the first configuration (the base alone).
    pub time_per_token_vs_base: f64,
    /// The median of `prefill_runs`.
    pub prefill_tokens_per_second: f64,
    /// Every timed run's prefill speed (prompt tokens per second up to the first new
    /// token: the prompt's forward passes and the first pick), sorted.
    pub prefill_runs: Vec<f64>,
}

/// The label of a configuration with `n_arms` ARMs.
pub fn config_label(n_arms: usize) -> String {
    match n_arms {
        0 => "base only".into(),
        1 => "base + 1 ARM".into(),
        n => format!("base + {n} ARMs"),
    }
}

/// A fixed prompt of ordinary ids, the same for every configuration.
pub fn bench_prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((i * 7 + 100) % vocab.max(1) as u64) as u32)
        .collect()
}

/// Times `runs` greedy decodes of exactly `tokens` tokens (EOS ignored) after `prompt`
/// on each engine, guided by its `alphas`, after one untimed warm-up round: the prefill
/// (up to the first new token) and the decode after it. Rows come in the engines'
/// order.
pub fn decode_round_robin(
    engines: &mut [(&mut dyn Engine, Vec<f32>)],
    prompt: &[u32],
    tokens: usize,
    runs: usize,
) -> Result<Vec<BenchRow>> {
    if engines.is_empty() || runs == 0 {
        return Err(Error::Request(
            "nothing to time: no engine or no run".into(),
        ));
    }
    for (engine, _) in engines.iter() {
        let context = engine.context_len();
        if prompt.len() + tokens > context {
            return Err(Error::Request(format!(
                "a prompt of {} tokens + {tokens} new tokens exceed the context of {context} tokens",
                prompt.len()
            )));
        }
    }
    let options: Vec<GenerateOptions> = engines
        .iter()
        .map(|(_, alphas)| GenerateOptions {
            max_new_tokens: tokens,
            alphas: alphas.clone(),
            sampling: SamplingParams {
                greedy: true,
                ..Default::default()
            },
            ignore_eos: true,
            ..Default::default()
        })
        .collect();
    let mut speeds = vec![Vec::with_capacity(runs); engines.len()];
    let mut prefill = vec![Vec::with_capacity(runs); engines.len()];
    for round in 0..=runs {
        for (((engine, _), opts), (speeds, prefill)) in engines
            .iter_mut()
            .zip(&options)
            .zip(speeds.iter_mut().zip(&mut prefill))
        {
            let gen = generate(*engine, None, prompt, opts, &mut |_| true)?;
            if round > 0 {
                speeds.push(gen.tokens_per_second());
                prefill.push(prompt.len() as f64 / gen.prefill_seconds.max(1e-9));
            }
        }
    }
    let prefill_medians: Vec<(f64, Vec<f64>)> = prefill
        .into_iter()
        .map(|mut runs| {
            runs.sort_by(f64::total_cmp);
            (runs[runs.len() / 2], runs)
        })
        .collect();
    let medians: Vec<f64> = speeds
        .iter_mut()
        .map(|runs| {
            runs.sort_by(f64::total_cmp);
            runs[runs.len() / 2]
        })
        .collect();
    Ok(speeds
        .into_iter()
        .zip(&medians)
        .zip(engines.iter().zip(prefill_medians))
        .map(
            |((runs, &median), ((engine, _), (prefill, prefill_runs)))| BenchRow {
                config: config_label(engine.arm_labels().len()),
                tokens_per_second: median,
                runs,
                time_per_token_vs_base: medians[0] / median,
                prefill_tokens_per_second: prefill,
                prefill_runs,
            },
        )
        .collect())
}

/// The process's peak resident memory so far (Linux's `VmHWM`), in bytes; `None` where
/// the system does not report it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_prompt() {
        assert_eq!(config_label(0), "base only");
        assert_eq!(config_label(2), "base + 2 ARMs");
        let p = bench_prompt(40, 30);
        assert_eq!(p.len(), 40);
        assert!(p.iter().all(|&id| id < 30));
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let peak = peak_rss_bytes().expect("VmHWM in /proc/self/status");
            // A running test binary holds at least a megabyte.
            assert!(peak > 1 << 20, "{peak} bytes");
        }
    }
}
