//! `genarm bench`: prefill and decode speed base-only and with each added ARM.

use anyhow::{bail, Result};
use clap::Args;
use genarm::bench::{bench_prompt, decode_round_robin, peak_rss_bytes};
use genarm::Engine;

use crate::args::{int_in, ModelArgs, MAX_RUNS, MAX_TOKENS};
use crate::load::load_engine;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub models: ModelArgs,
    /// New tokens per run (≥ 2).
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = int_in(2, MAX_TOKENS))]
    pub tokens: usize,
    /// Timed runs per configuration, 1..=10000 (the median is reported).
    #[arg(long, value_name = "R", default_value_t = 3, value_parser = int_in(1, MAX_RUNS))]
    pub runs: usize,
    /// Prompt length in tokens (a fixed synthetic prompt).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = int_in(1, MAX_TOKENS))]
    pub prompt_len: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    // One engine per configuration: base, + 1 ARM, + 2 ARMs, …
    let mut configs = (0..=args.models.arms.len())
        .map(|n_arms| load_engine(&args.models, &args.models.arms[..n_arms]))
        .collect::<Result<Vec<_>>>()?;
    let base = &configs[0];
    let context = base.engine.context_len();
    if args.prompt_len + args.tokens > context {
        bail!(
            "--prompt-len {} + --tokens {} exceed the context of {context} tokens (see --context)",
            args.prompt_len,
            args.tokens
        );
    }
    let prompt = bench_prompt(args.prompt_len, base.engine.vocab_size());
    let (backend, weight_bytes) = (base.engine.backend(), base.weight_bytes);
    let dispatches: Vec<Option<usize>> = configs.iter().map(|c| c.dispatches).collect();
    let prompt_dispatches: Vec<Option<usize>> = configs
        .iter()
        .map(|c| c.prompt_dispatches.map(|d| d.for_len(args.prompt_len)))
        .collect();
    let mut engines: Vec<(&mut dyn Engine, Vec<f32>)> = configs
        .iter_mut()
        .enumerate()
        .map(|(n_arms, c)| {
            let alphas = args.models.arms[..n_arms].iter().map(|a| a.alpha).collect();
            (c.engine.as_mut() as &mut dyn Engine, alphas)
        })
        .collect();
    let rows = decode_round_robin(&mut engines, &prompt, args.tokens, args.runs)?;
    let threads = candle_core::utils::get_num_threads();
    // What quantised weights meet on the CPU engine (`--precision`).
    let activations = (backend == "cpu").then(|| {
        match genarm::cpu::Precision::from(args.models.precision).block_activations() {
            genarm::cpu::quant::Activations::F32 => "f32",
            genarm::cpu::quant::Activations::Int16 => "int16",
        }
    });
    // Every configuration's engine is loaded at once, so this is their sum.
    let peak_rss = peak_rss_bytes();
    if args.json {
        let results: Vec<_> = rows
            .iter()
            .zip(dispatches.iter().zip(&prompt_dispatches))
            .map(|(row, (dispatches, prompt))| {
                let mut v = serde_json::to_value(row).unwrap_or_default();
                v["dispatches_per_token"] = serde_json::json!(dispatches);
                v["dispatches_per_prompt"] = serde_json::json!(prompt);
                v
            })
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "backend": backend,
                "threads": threads,
                "block_activations": activations,
                "weight_bytes_per_token": weight_bytes,
                "peak_rss_bytes": peak_rss,
                "prompt_len": args.prompt_len,
                "results": results,
            })
        );
        return Ok(());
    }
    outln!(
        "decode tokens/s on {backend}, median of {} runs of {} tokens ({threads} CPU threads{})",
        args.runs,
        args.tokens,
        activations.map_or(String::new(), |a| format!(
            ", {a} activations for quantised weights"
        ))
    );
    for (row, dispatches) in rows.iter().zip(&dispatches) {
        let dispatches = dispatches.map_or(String::new(), |d| format!("   {d} dispatches/token"));
        outln!(
            "  {:<16} {:>8.1} tok/s   {:.2}× base time/token{dispatches}",
            row.config,
            row.tokens_per_second,
            row.time_per_token_vs_base
        );
    }
    if let Some(peak) = peak_rss {
        outln!(
            "  peak resident memory: {:.0} MB (all {} configurations loaded together)",
            peak as f64 / 1e6,
            rows.len()
        );
    }
    if let Some(bytes) = weight_bytes {
        // Divide by the card's memory bandwidth for the fraction achieved.
        outln!(
            "  weights read per base token: {:.1} MB → {:.2} GB/s at the base-only speed",
            bytes as f64 / 1e6,
            bytes as f64 * rows[0].tokens_per_second / 1e9
        );
    }
    outln!(
        "prefill tokens/s of a {}-token prompt (up to the first new token), median of {} runs",
        args.prompt_len,
        args.runs
    );
    for (row, dispatches) in rows.iter().zip(&prompt_dispatches) {
        let dispatches = dispatches.map_or(String::new(), |d| format!("   {d} dispatches/prompt"));
        outln!(
            "  {:<16} {:>8.1} tok/s{dispatches}",
            row.config,
            row.prefill_tokens_per_second
        );
    }
    Ok(())
}
