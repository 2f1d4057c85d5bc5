//! `genarm prompts`: a prompt set from a sentence corpus, split in two.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use genarm::eval::prompts::{build_prompt_set, read_lines, split_train_eval, write_lines};
use genarm::outdir::{refuse_existing, refuse_input_as_output, OutputLock};

use crate::args::{fraction, int_in};

#[derive(Args)]
pub struct PromptsArgs {
    /// Sentences, one per line.
    #[arg(long, value_name = "FILE")]
    pub corpus: PathBuf,
    /// Number of prompts, 1..=10000000.
    #[arg(long, default_value_t = 800, value_parser = int_in(1, 10_000_000))]
    pub n: usize,
    /// Fraction held out for evaluation, in [0, 1].
    #[arg(long, default_value_t = 0.25, value_parser = fraction)]
    pub eval_frac: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The training prompts (refused when it exists, unless --overwrite).
    #[arg(long, value_name = "FILE")]
    pub out_train: PathBuf,
    /// The held-out prompts (refused when it exists, unless --overwrite).
    #[arg(long, value_name = "FILE")]
    pub out_eval: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: PromptsArgs) -> Result<()> {
    refuse_input_as_output(
        &args.out_train,
        "--out-train",
        &[("--corpus", &args.corpus)],
    )?;
    refuse_input_as_output(
        &args.out_eval,
        "--out-eval",
        &[("--corpus", &args.corpus), ("--out-train", &args.out_train)],
    )?;
    let how = "pass --overwrite to replace it";
    refuse_existing(&args.out_train, args.overwrite, how)?;
    refuse_existing(&args.out_eval, args.overwrite, how)?;
    let _locks = (
        OutputLock::file(&args.out_train)?,
        OutputLock::file(&args.out_eval)?,
    );
    let sentences = read_lines(&args.corpus)?;
    let prompts = build_prompt_set(&sentences, args.n, args.seed);
    if prompts.len() < args.n {
        bail!(
            "the corpus gave only {} distinct prompts, {} asked",
            prompts.len(),
            args.n
        );
    }
    let (train, eval) = split_train_eval(prompts, args.eval_frac, args.seed);
    write_lines(&args.out_train, &train)?;
    write_lines(&args.out_eval, &eval)?;
    noteln!(
        "wrote {} train prompts to {} and {} held-out prompts to {}",
        train.len(),
        args.out_train.display(),
        eval.len(),
        args.out_eval.display()
    );
    Ok(())
}
