//! `genarm prefs`: synthetic preference pairs from a base and a scorer.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use genarm::cpu::llama::Llama;
use genarm::eval::prompts::read_lines;
use genarm::eval::scorers::scorer_from_spec;
use genarm::model::Checkpoint;
use genarm::outdir::{refuse_existing, refuse_input_as_output, FileFingerprint, OutputLock};
use genarm::train::prefs::{write_pairs, PairsProgress, PrefsRun};

use crate::args::{int_in, probability, temperature, MAX_SAMPLES};

#[derive(Args)]
pub struct PrefsArgs {
    /// The base model that samples.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Prompts, one per line.
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Continuations sampled per prompt, 2..=256 (the best and worst make the pair).
    #[arg(long, value_name = "K", default_value_t = 4, value_parser = int_in(2, MAX_SAMPLES))]
    pub samples: usize,
    /// sentiment, sentiment-afinn, sentiment-once, concise or wordlist:FILE.
    #[arg(long)]
    pub scorer: String,
    /// Output JSONL (TRL style: prompt, chosen, rejected, plus the scores). Refused when
    /// it exists, unless --overwrite.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace an existing output file.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Wrap prompts in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// New tokens per continuation, 1..=1023 (prompt and continuation share 1024 tokens).
    #[arg(long, default_value_t = 48, value_parser = int_in(1, PREFS_CONTEXT - 1))]
    pub max_new_tokens: usize,
    /// Sampling temperature, > 0.
    #[arg(long, default_value_t = 1.0, value_parser = temperature)]
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = probability)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use only the first N prompts (≥ 1).
    #[arg(long, value_parser = int_in(1, usize::MAX))]
    pub limit: Option<usize>,
    /// Wrap each prompt line, `{}` standing for the line (e.g. "Complete this sentence: {}").
    #[arg(long, default_value = "{}")]
    pub template: String,
    /// Where the scorers' lexicons are (`./build.sh fetch-data`).
    #[arg(long, default_value = "models/data")]
    pub data_dir: PathBuf,
    /// Continue an interrupted run from OUT.part (same model, prompts, seed and settings).
    #[arg(long)]
    pub resume: bool,
}

/// The KV-cache length `prefs` samples with (prompt and continuation).
pub const PREFS_CONTEXT: usize = 1024;

pub fn run(args: PrefsArgs) -> Result<()> {
    let part = args.out.with_extension("jsonl.part");
    refuse_input_as_output(
        &args.out,
        "--out",
        &[("--model", &args.model), ("--prompts", &args.prompts)],
    )?;
    refuse_existing(&args.out, args.overwrite, "pass --overwrite to replace it")?;
    refuse_existing(
        &part,
        args.resume || args.overwrite,
        "an interrupted run left it: pass --resume to continue it or --overwrite to start over",
    )?;
    let _lock = OutputLock::file(&args.out)?;
    let run = PrefsRun {
        model: FileFingerprint::stat(&args.model)?,
        prompts: FileFingerprint::of(&args.prompts)?,
        seed: args.seed,
        samples: args.samples,
        scorer: args.scorer.clone(),
        template: args.template.clone(),
        chat: args.chat,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
    };
    let scorer = scorer_from_spec(&args.scorer, &args.data_dir)?;
    let base = Checkpoint::open(&args.model)?;
    let facts = base.base_facts();
    let tok = facts
        .tokenizer
        .as_ref()
        .with_context(|| format!("{} has no tokenizer", args.model.display()))?;
    let mut prompts = read_lines(&args.prompts)?;
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    let rows = vec![None; args.samples];
    let mut model = Llama::load(
        base.source.as_ref(),
        &base.config,
        &rows,
        PREFS_CONTEXT,
        &Device::Cpu,
    )?;
    if args.resume && part.is_file() {
        noteln!("continuing {}", part.display());
    }
    let started = std::time::Instant::now();
    let mut on_progress = |p: &PairsProgress| {
        if p.prompts_done.is_multiple_of(25) || p.prompts_done == p.prompts {
            noteln!(
                "{}/{} prompts, {} pairs, {} ties skipped, {:.1} s",
                p.prompts_done,
                p.prompts,
                p.pairs,
                p.ties,
                started.elapsed().as_secs_f64()
            );
        }
    };
    let done = write_pairs(
        &mut model,
        tok,
        &facts.stop_ids,
        &prompts,
        scorer.as_ref(),
        &run,
        &part,
        args.resume,
        &mut on_progress,
    )?;
    std::fs::rename(&part, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    let _ = std::fs::remove_file(PrefsRun::record_path(&part));
    noteln!(
        "wrote {} pairs to {} ({} ties skipped)",
        done.pairs,
        args.out.display(),
        done.ties
    );
    Ok(())
}
