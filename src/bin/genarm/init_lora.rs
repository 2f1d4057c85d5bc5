//! `genarm init-lora`: a PEFT adapter with random weights.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use genarm::outdir::{refuse_existing, refuse_input_as_output, OutputLock};

use crate::args::{finite_non_negative, finite_positive, int_in, MAX_TOKENS};

#[derive(Args)]
pub struct InitLoraArgs {
    /// The model the adapter is for (GGUF or HF dir).
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Output directory (refused when it exists and is not empty, unless --overwrite).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the files of an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
    /// LoRA rank, 1..=the model's hidden size.
    #[arg(long, default_value_t = 8, value_parser = int_in(1, MAX_TOKENS))]
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank), > 0.
    #[arg(long, default_value_t = 16.0, value_parser = finite_positive)]
    pub alpha: f64,
    /// Standard deviation of B's entries (A is Kaiming-uniform as in PEFT), ≥ 0.
    #[arg(long, default_value_t = 0.01, value_parser = finite_non_negative)]
    pub b_std: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: InitLoraArgs) -> Result<()> {
    refuse_input_as_output(&args.out, "--out", &[("--model", &args.model)])?;
    refuse_existing(&args.out, args.overwrite, "pass --overwrite to replace it")?;
    let ckpt = genarm::model::Checkpoint::open(&args.model)?;
    let hidden = ckpt.config.hidden_size;
    if args.rank > hidden {
        bail!(
            "--rank must be in 1..={hidden} (the model's hidden size), got {}",
            args.rank
        );
    }
    let _lock = OutputLock::directory(&args.out)?;
    genarm::model::lora::write_random_adapter(
        &args.out,
        &ckpt.config,
        &path_string(&args.model),
        args.rank,
        args.alpha,
        args.b_std,
        args.seed,
    )?;
    noteln!("wrote {}", args.out.display());
    Ok(())
}

fn path_string(p: &Path) -> String {
    p.canonicalize()
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
