//! The argument types several commands share (the models, the prompt, sampling) and
//! the value parsers: each flag is checked when parsed, and a bad value's message
//! (clap adds the flag's name) says the allowed range.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use genarm::engine::DEFAULT_CONTEXT;
use genarm::ArmSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// candle on the CPU.
    Cpu,
    /// candle on the first CUDA device (build with `--features cuda`).
    Cuda,
    /// wgpu on the first native GPU adapter (Vulkan; lavapipe without a GPU).
    Webgpu,
}

/// How the CPU and CUDA engines compute (`genarm::cpu::Precision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// `int16` on CPUs where its kernel is the faster one (AVX-512 VNNI; WebAssembly),
    /// `f32` on other CPUs; on CUDA, half-precision checkpoints stay in their own type.
    Auto,
    /// f32 activations throughout: transformers' numbers up to summation order.
    F32,
    /// GGUF Q4_0/Q4_1/Q8_0 weights multiplied by activations rounded to 16-bit integers
    /// per 32 values (a relative error of ~1e-5 per product).
    Int16,
}

impl From<PrecisionArg> for genarm::cpu::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Auto => Self::Auto,
            PrecisionArg::F32 => Self::F32,
            PrecisionArg::Int16 => Self::Int16,
        }
    }
}

/// The models: a base and any number of ARMs.
#[derive(Args)]
pub struct ModelArgs {
    /// Base model: a GGUF file or an HF model directory.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// An ARM as PATH[:ALPHA] (GGUF, HF dir or PEFT LoRA dir; ALPHA defaults to 1). Repeatable.
    #[arg(long = "arm", value_name = "PATH[:ALPHA]")]
    pub arms: Vec<ArmSpec>,
    /// A policy LoRA the base decodes with (e.g. `genarm train --loss dpo`): base + this
    /// LoRA is the model, with no guidance of its own; ARMs guide it as they would the
    /// base. A PEFT LoRA directory trained on --model.
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
    /// Which engine runs the models.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// How the cpu and cuda backends multiply block-quantised (GGUF Q4_0/Q4_1/Q8_0)
    /// weights; dense weights compute in f32 on the CPU either way.
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: PrecisionArg,
    /// KV-cache length in tokens, 1..=1048576 (capped at the model's context).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONTEXT, value_parser = int_in(1, MAX_TOKENS))]
    pub context: usize,
}

#[derive(Args)]
#[group(id = "prompt_source", required = true, multiple = false)]
pub struct PromptArgs {
    /// The prompt text.
    #[arg(long, group = "prompt_source")]
    pub prompt: Option<String>,
    /// Read the prompt text from a file.
    #[arg(long, value_name = "FILE", group = "prompt_source")]
    pub prompt_file: Option<PathBuf>,
    /// The prompt as token ids (for models without a tokenizer).
    #[arg(
        long,
        value_name = "ID,ID,...",
        value_delimiter = ',',
        group = "prompt_source"
    )]
    pub prompt_tokens: Option<Vec<u32>>,
}

#[derive(Args)]
pub struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = int_in(1, MAX_TOKENS))]
    pub max_new_tokens: usize,
    /// Softmax temperature of the guided scores (> 0).
    #[arg(long, value_name = "T", default_value_t = 1.0, value_parser = temperature)]
    pub temperature: f32,
    /// Sample from the K most likely tokens only [default: all].
    #[arg(long, value_name = "K", value_parser = int_in(1, MAX_TOKENS))]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, value_name = "P", default_value_t = 1.0, value_parser = probability)]
    pub top_p: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Take the most likely token each step (ignores temperature, top-k, top-p).
    #[arg(long)]
    pub greedy: bool,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop when this text appears (repeatable); the output is cut before it.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
}

/// Upper bound of token counts and lengths: far above any context this crate serves,
/// low enough that no buffer sized by it aborts on allocation.
pub const MAX_TOKENS: usize = 1 << 20;

/// Samples per prompt (each a row of one batch) in `prefs` and `eval`.
pub const MAX_SAMPLES: usize = 256;

/// Timed runs of `bench`.
pub const MAX_RUNS: usize = 10_000;

/// An integer in `lo..=hi`.
pub fn int_in(lo: usize, hi: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s| match s.trim().parse::<usize>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("must be an integer in {lo}..={hi}")),
    }
}

pub fn float(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .map_err(|_| "not a number".to_string())
}

pub fn finite(s: &str) -> Result<f64, String> {
    float(s)
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| "must be a finite number".into())
}

pub fn finite_positive(s: &str) -> Result<f64, String> {
    finite(s)
        .ok()
        .filter(|&v| v > 0.0)
        .ok_or_else(|| "must be a finite number > 0".into())
}

pub fn finite_non_negative(s: &str) -> Result<f64, String> {
    finite(s)
        .ok()
        .filter(|&v| v >= 0.0)
        .ok_or_else(|| "must be a finite number ≥ 0".into())
}

/// A sampling temperature: finite and > 0.
pub fn temperature(s: &str) -> Result<f32, String> {
    finite_positive(s).map(|v| v as f32)
}

/// A probability mass in (0, 1] (top-p).
pub fn probability(s: &str) -> Result<f32, String> {
    float(s)
        .ok()
        .filter(|&v| v > 0.0 && v <= 1.0)
        .map(|v| v as f32)
        .ok_or_else(|| "must be in (0, 1]".into())
}

/// A fraction in [0, 1].
pub fn fraction(s: &str) -> Result<f64, String> {
    float(s)
        .ok()
        .filter(|v| (0.0..=1.0).contains(v))
        .ok_or_else(|| "must be in [0, 1]".into())
}

/// A fraction in [0, 1) (dropout, a held-out share that leaves pairs to train on).
pub fn fraction_below_one(s: &str) -> Result<f64, String> {
    float(s)
        .ok()
        .filter(|v| (0.0..1.0).contains(v))
        .ok_or_else(|| "must be in [0, 1)".into())
}

/// An ARM weight: any finite number.
pub fn alpha(s: &str) -> Result<f32, String> {
    finite(s).map(|v| v as f32)
}

/// A point X,Y of two finite numbers.
pub fn point(s: &str) -> Result<(f64, f64), String> {
    let parts: Vec<&str> = s.split(',').collect();
    match parts.as_slice() {
        [x, y] => Ok((finite(x)?, finite(y)?)),
        _ => Err("must be two finite numbers X,Y".into()),
    }
}
