//! `genarm logits`: teacher-forced log-probabilities, for parity checks.

use anyhow::{bail, Result};
use clap::Args;

use crate::args::ModelArgs;
use crate::load::load_engine;

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub models: ModelArgs,
    /// The token ids to score.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// Print JSON (`next_token_logprobs`, `last_logprobs`, per-ARM values, `combined_last_scores`).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    if args.tokens.is_empty() {
        bail!("--tokens is empty");
    }
    let mut engine = load_engine(&args.models, &args.models.arms)?.engine;
    let vocab = engine.vocab_size();
    if let Some(&id) = args.tokens.iter().find(|&&id| id as usize >= vocab) {
        bail!("--tokens: id {id} is outside the vocabulary (ids 0..{vocab})");
    }
    if args.tokens.len() > engine.context_len() {
        bail!(
            "{} tokens exceed the context of {} tokens",
            args.tokens.len(),
            engine.context_len()
        );
    }
    let per_model = engine.teacher_forced(&args.tokens)?;
    let next_token = |lp: &Vec<Vec<f32>>| -> Vec<f32> {
        args.tokens[1..]
            .iter()
            .enumerate()
            .map(|(i, &t)| lp[i][t as usize])
            .collect()
    };
    let last = |lp: &Vec<Vec<f32>>| lp.last().cloned().unwrap_or_default();
    let alphas: Vec<f32> = args.models.arms.iter().map(|a| a.alpha).collect();
    let arm_last: Vec<Vec<f32>> = per_model[1..].iter().map(last).collect();
    let arm_rows: Vec<&[f32]> = arm_last.iter().map(Vec::as_slice).collect();
    let combined = genarm::guide::combine(&last(&per_model[0]), &arm_rows, &alphas);
    if args.json {
        let mut out = serde_json::json!({
            "next_token_logprobs": next_token(&per_model[0]),
            "last_logprobs": last(&per_model[0]),
            "backend": engine.backend(),
        });
        if !args.models.arms.is_empty() {
            out["arms"] = per_model[1..]
                .iter()
                .zip(&alphas)
                .map(|(lp, a)| {
                    serde_json::json!({
                        "alpha": a,
                        "next_token_logprobs": next_token(lp),
                        "last_logprobs": last(lp),
                    })
                })
                .collect();
            out["combined_last_scores"] = combined.into();
        }
        outln!("{out}");
        return Ok(());
    }
    let tok = engine.facts().tokenizer.as_ref();
    let show = |id: u32| match tok.and_then(|t| t.decode(&[id], false).ok()) {
        Some(s) => format!("{id} {s:?}"),
        None => id.to_string(),
    };
    outln!("position  next token  log p (base)");
    for (i, lp) in next_token(&per_model[0]).iter().enumerate() {
        outln!("{:>8}  {:<28}  {lp:.6}", i, show(args.tokens[i + 1]));
    }
    outln!("top 10 guided scores at the last position:");
    let mut order: Vec<usize> = (0..combined.len()).collect();
    order.sort_unstable_by(|&a, &b| combined[b].total_cmp(&combined[a]));
    for &i in order.iter().take(10) {
        outln!("  {:<28}  {:.6}", show(i as u32), combined[i]);
    }
    Ok(())
}
