//! `genarm init-model`: a GGUF Llama model with random weights, of any shape (by default
//! TinyLlama-1.1B's), for timing the engines at the sizes people run (`./build.sh
//! bench-scale`).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use clap::{Args, ValueEnum};
use genarm::model::random_gguf::{write_random_gguf, LlamaShape};
use genarm::outdir::{refuse_existing, refuse_input_as_output};

use crate::args::int_in;

/// The block formats the CPU kernel runs.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
}

#[derive(Args)]
pub struct InitModelArgs {
    /// A GGUF model whose tokenizer and vocabulary the new model takes.
    #[arg(long, value_name = "GGUF")]
    pub like: PathBuf,
    /// Output GGUF file (refused when it exists, unless --overwrite).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
    /// The matrices' block format (norms are f32).
    #[arg(long, value_enum, default_value = "q4-1")]
    pub format: Format,
    #[arg(long, default_value_t = 22, value_parser = int_in(1, 512))]
    pub layers: usize,
    #[arg(long, default_value_t = 2048, value_parser = int_in(32, 65_536))]
    pub hidden: usize,
    #[arg(long, default_value_t = 5632, value_parser = int_in(32, 262_144))]
    pub ffn: usize,
    #[arg(long, default_value_t = 32, value_parser = int_in(1, 1024))]
    pub heads: usize,
    #[arg(long, default_value_t = 4, value_parser = int_in(1, 1024))]
    pub kv_heads: usize,
    /// The context length the file declares.
    #[arg(long, default_value_t = 2048, value_parser = int_in(1, 1 << 20))]
    pub context: usize,
    /// Tie the LM head to the embedding (no separate output matrix).
    #[arg(long)]
    pub tie_embeddings: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: InitModelArgs) -> Result<()> {
    refuse_input_as_output(&args.out, "--out", &[("--like", &args.like)])?;
    refuse_existing(&args.out, args.overwrite, "pass --overwrite to replace it")?;
    let shape = LlamaShape {
        layers: args.layers,
        hidden: args.hidden,
        ffn: args.ffn,
        heads: args.heads,
        kv_heads: args.kv_heads,
        context: args.context,
        tied: args.tie_embeddings,
    };
    let format = match args.format {
        Format::Q4_0 => GgmlDType::Q4_0,
        Format::Q4_1 => GgmlDType::Q4_1,
        Format::Q8_0 => GgmlDType::Q8_0,
    };
    write_random_gguf(&args.out, &shape, format, &args.like, args.seed)?;
    noteln!("wrote {}", args.out.display());
    Ok(())
}
