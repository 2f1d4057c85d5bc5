//! The genarm command line: `main` only dispatches, one function per subcommand.
// The CLI is native only; on wasm32 (`wasm-pack test` builds every target) it is empty.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use genarm::cpu::{CpuEngine, DEFAULT_CONTEXT};
use genarm::engine::{Chosen, StepLogProbs};
use genarm::gpu::GpuEngine;
use genarm::model::tokenizer::TextTokenizer;
use genarm::outdir::{refuse_existing, refuse_input_as_output, OutputLock};
use genarm::{ArmSpec, Engine, GenerateOptions, SamplingParams};

/// GenARM: reward-guided generation with autoregressive reward models.
///
/// Each step samples from softmax((log_softmax(base) + Σ α_i·log_softmax(arm_i)) / T).
#[derive(Parser)]
#[command(name = "genarm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a base model guided by ARMs.
    Generate(GenerateArgs),
    /// Teacher-forced log-probabilities of given tokens (debugging and parity checks).
    Logits(LogitsArgs),
    /// Decode speed: tokens/s base-only and with the given ARMs.
    Bench(BenchArgs),
    /// Write a PEFT LoRA adapter with random weights for a model (for timing and tests).
    InitLora(InitLoraArgs),
    /// Train an ARM (LoRA, or with --full all weights of its top layers) on preference
    /// pairs with the GenARM loss, or with --scalar-head a conventional scalar reward
    /// model (Bradley–Terry loss).
    Train(TrainArgs),
    /// Make synthetic preference pairs: sample K continuations per prompt, keep best/worst by a scorer.
    Prefs(PrefsArgs),
    /// Build a prompt set from a corpus of sentences, split into train and held-out files.
    Prompts(PromptsArgs),
    /// Sweep ARM weights over held-out prompts and score every response; optionally
    /// compare with baselines (best-of-N, ARGS) on the same prompts, seeds and scorers.
    Eval(EvalArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// candle on the CPU.
    Cpu,
    /// candle on the first CUDA device (build with `--features cuda`).
    Cuda,
    /// wgpu on the first native GPU adapter (Vulkan; lavapipe without a GPU).
    Webgpu,
}

/// The models: a base and any number of ARMs.
#[derive(Args)]
struct ModelArgs {
    /// Base model: a GGUF file or an HF model directory.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// An ARM as PATH[:ALPHA] (GGUF, HF dir or PEFT LoRA dir; ALPHA defaults to 1). Repeatable.
    #[arg(long = "arm", value_name = "PATH[:ALPHA]")]
    arms: Vec<ArmSpec>,
    /// Which engine runs the models.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// KV-cache length in tokens, 1..=1048576 (capped at the model's context).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONTEXT, value_parser = int_in(1, MAX_TOKENS))]
    context: usize,
}

#[derive(Args)]
#[group(id = "prompt_source", required = true, multiple = false)]
struct PromptArgs {
    /// The prompt text.
    #[arg(long, group = "prompt_source")]
    prompt: Option<String>,
    /// Read the prompt text from a file.
    #[arg(long, value_name = "FILE", group = "prompt_source")]
    prompt_file: Option<PathBuf>,
    /// The prompt as token ids (for models without a tokenizer).
    #[arg(
        long,
        value_name = "ID,ID,...",
        value_delimiter = ',',
        group = "prompt_source"
    )]
    prompt_tokens: Option<Vec<u32>>,
}

#[derive(Args)]
struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = int_in(1, MAX_TOKENS))]
    max_new_tokens: usize,
    /// Softmax temperature of the guided scores (> 0).
    #[arg(long, value_name = "T", default_value_t = 1.0, value_parser = temperature)]
    temperature: f32,
    /// Sample from the K most likely tokens only [default: all].
    #[arg(long, value_name = "K", value_parser = int_in(1, MAX_TOKENS))]
    top_k: Option<usize>,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, value_name = "P", default_value_t = 1.0, value_parser = probability)]
    top_p: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// Take the most likely token each step (ignores temperature, top-k, top-p).
    #[arg(long)]
    greedy: bool,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when this text appears (repeatable); the output is cut before it.
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    /// A system turn for --chat.
    #[arg(long, value_name = "TEXT", requires = "chat")]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// The token ids to score.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Print JSON (`next_token_logprobs`, `last_logprobs`, per-ARM values, `combined_last_scores`).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// New tokens per run (≥ 2).
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = int_in(2, MAX_TOKENS))]
    tokens: usize,
    /// Timed runs per configuration, 1..=10000 (the median is reported).
    #[arg(long, value_name = "R", default_value_t = 3, value_parser = int_in(1, MAX_RUNS))]
    runs: usize,
    /// Prompt length in tokens (a fixed synthetic prompt).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = int_in(1, MAX_TOKENS))]
    prompt_len: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InitLoraArgs {
    /// The model the adapter is for (GGUF or HF dir).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Output directory (refused when it exists and is not empty, unless --overwrite).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace the files of an existing output directory.
    #[arg(long)]
    overwrite: bool,
    /// LoRA rank, 1..=the model's hidden size.
    #[arg(long, default_value_t = 8, value_parser = int_in(1, MAX_TOKENS))]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank), > 0.
    #[arg(long, default_value_t = 16.0, value_parser = finite_positive)]
    alpha: f64,
    /// Standard deviation of B's entries (A is Kaiming-uniform as in PEFT), ≥ 0.
    #[arg(long, default_value_t = 0.01, value_parser = finite_non_negative)]
    b_std: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct TrainArgs {
    /// The base model the ARM is trained from (GGUF or HF dir).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Preference pairs (JSONL).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// trl, hh-rlhf, pku-better, pku-safer or ultrafeedback [default: detected from the first record].
    #[arg(long)]
    format: Option<String>,
    /// Output directory: the PEFT adapter (with --full an HF model), genarm.json,
    /// train_log.jsonl and checkpoint/. Refused when it exists and is not empty, unless
    /// --resume or --overwrite.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Start a new run in an existing output directory, replacing its files.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Apply the model's chat template to prompts (needed for conversational data).
    #[arg(long)]
    chat: bool,
    /// β_r of the loss −log σ(β_r·(Σ log π(y_w) − Σ log π(y_l)) − γ), > 0.
    #[arg(long, default_value_t = 0.05, value_parser = finite_positive)]
    beta_r: f64,
    /// Margin γ of the loss (finite).
    #[arg(long, default_value_t = 0.0, value_parser = finite)]
    gamma: f64,
    /// λ of an anchor term λ·(−Σ log π(y_w) / |y_w|), the chosen response's mean NLL, added
    /// to the loss (0: the plain GenARM loss). Use it when rejected responses are
    /// systematically longer: the plain loss then also falls by lowering every token's
    /// probability, and guidance by such an ARM samples junk.
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "λ",
        conflicts_with = "scalar_head",
        value_parser = finite_non_negative
    )]
    sft_weight: f64,
    /// LoRA rank, 1..=the model's hidden size.
    #[arg(long, default_value_t = 8, conflicts_with = "full", value_parser = int_in(1, MAX_TOKENS))]
    lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank), > 0.
    #[arg(long, default_value_t = 16.0, conflicts_with = "full", value_parser = finite_positive)]
    lora_alpha: f64,
    /// LoRA dropout probability, in [0, 1).
    #[arg(long, default_value_t = 0.05, conflicts_with = "full", value_parser = fraction_below_one)]
    lora_dropout: f64,
    /// Projections with LoRA (short names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q,k,v,o,gate,up,down",
        conflicts_with = "full"
    )]
    lora_targets: Vec<String>,
    /// Train the top N layers only (LoRA on them, or all their weights with --full); the
    /// layers below stay frozen and run without autograd on the fast kernels
    /// [default: all layers]. 1..=the model's layer count.
    #[arg(long = "layers", visible_alias = "lora-layers", value_name = "N", value_parser = int_in(1, MAX_TOKENS))]
    layers: Option<usize>,
    /// Full fine-tuning instead of LoRA: every weight of the top --layers N blocks
    /// (projections, biases, norms) and the final norm trains, with AdamW moments for
    /// each in the checkpoint (1-D weights get no weight decay). OUT becomes a standalone
    /// HF model directory (config.json, model.safetensors with HF names and row order,
    /// the base's tokenizer) that `--arm OUT` loads as an ARM of its own. The LoRA
    /// flags do not apply.
    #[arg(long)]
    full: bool,
    /// With --full, train the LM head too; a base with tied embeddings gets an untied
    /// head (the input embeddings never train).
    #[arg(long, requires = "full")]
    train_head: bool,
    /// With --full, the dtype of the saved weights: f32 (exactly what was trained) or
    /// bf16 (half the size).
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = ["f32", "bf16"], requires = "full")]
    save_dtype: String,
    /// Train a conventional scalar reward model instead of an ARM: the same LoRA plus a
    /// linear head on the last token's final hidden state, loss −log σ(r(x,y_w) − r(x,y_l))
    /// (--beta-r and --gamma are unused). OUT gets score_head.safetensors next to the
    /// adapter and genarm.json says "kind": "scalar_reward_model"; use it with
    /// `genarm eval --reward-model OUT`. LoRA only (not with --full).
    #[arg(long, conflicts_with = "full")]
    scalar_head: bool,
    /// Peak learning rate, > 0 [default: 5e-4 for LoRA, 2e-5 with --full].
    #[arg(long, value_parser = finite_positive)]
    lr: Option<f64>,
    /// Passes over the training pairs, 1..=10000.
    #[arg(long, default_value_t = 1, value_parser = int_in(1, 10_000))]
    epochs: usize,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 32, value_parser = int_in(1, MAX_TOKENS))]
    batch_size: usize,
    /// Pairs per forward/backward pass (gradients accumulate over a batch).
    #[arg(long, default_value_t = 4, value_parser = int_in(1, MAX_TOKENS))]
    micro_batch: usize,
    /// Warmup steps.
    #[arg(long, default_value_t = 100, value_parser = int_in(0, 1_000_000_000))]
    warmup: usize,
    /// Learning-rate decay after warmup: cosine or linear.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// AdamW weight decay, ≥ 0.
    #[arg(long, default_value_t = 0.05, value_parser = finite_non_negative)]
    weight_decay: f64,
    /// Prompt tokens kept (the prompt's end is kept).
    #[arg(long, default_value_t = 512, value_parser = int_in(1, MAX_TOKENS))]
    max_prompt_len: usize,
    /// Prompt + response tokens kept (responses are cut on the right).
    #[arg(long, default_value_t = 1024, value_parser = int_in(2, MAX_TOKENS))]
    max_len: usize,
    /// Fraction of pairs held out for the per-epoch pairwise accuracy, in [0, 1).
    #[arg(long, default_value_t = 0.05, value_parser = fraction_below_one)]
    eval_frac: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT/checkpoint if present (same model, data, seed and settings).
    #[arg(long)]
    resume: bool,
    /// Stop after this many optimizer steps (the run stays resumable).
    #[arg(long, value_parser = int_in(1, usize::MAX))]
    max_steps: Option<usize>,
    /// Optimizer steps between checkpoints.
    #[arg(long, default_value_t = 10, value_parser = int_in(1, usize::MAX))]
    checkpoint_every: usize,
    /// The ARM's short name (the playground's slider label).
    #[arg(long)]
    name: Option<String>,
    /// What the ARM prefers, in words.
    #[arg(long)]
    objective: Option<String>,
    /// `base_model_name_or_path` written to adapter_config.json (with --full `base_model`
    /// in genarm.json) [default: the --model path].
    #[arg(long)]
    base_name: Option<String>,
}

#[derive(Args)]
struct PrefsArgs {
    /// The base model that samples.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Prompts, one per line.
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    /// Continuations sampled per prompt, 2..=256 (the best and worst make the pair).
    #[arg(long, value_name = "K", default_value_t = 4, value_parser = int_in(2, MAX_SAMPLES))]
    samples: usize,
    /// sentiment, sentiment-afinn, concise or wordlist:FILE.
    #[arg(long)]
    scorer: String,
    /// Output JSONL (TRL style: prompt, chosen, rejected, plus the scores). Refused when
    /// it exists, unless --overwrite.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing output file.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Wrap prompts in the chat template.
    #[arg(long)]
    chat: bool,
    /// New tokens per continuation, 1..=1023 (prompt and continuation share 1024 tokens).
    #[arg(long, default_value_t = 48, value_parser = int_in(1, PREFS_CONTEXT - 1))]
    max_new_tokens: usize,
    /// Sampling temperature, > 0.
    #[arg(long, default_value_t = 1.0, value_parser = temperature)]
    temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = probability)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use only the first N prompts (≥ 1).
    #[arg(long, value_parser = int_in(1, usize::MAX))]
    limit: Option<usize>,
    /// Wrap each prompt line, `{}` standing for the line (e.g. "Complete this sentence: {}").
    #[arg(long, default_value = "{}")]
    template: String,
    /// Where the scorers' lexicons are (`./build.sh fetch-data`).
    #[arg(long, default_value = "models/data")]
    data_dir: PathBuf,
    /// Continue an interrupted run from OUT.part (same model, prompts, seed and settings).
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct PromptsArgs {
    /// Sentences, one per line.
    #[arg(long, value_name = "FILE")]
    corpus: PathBuf,
    /// Number of prompts, 1..=10000000.
    #[arg(long, default_value_t = 800, value_parser = int_in(1, 10_000_000))]
    n: usize,
    /// Fraction held out for evaluation, in [0, 1].
    #[arg(long, default_value_t = 0.25, value_parser = fraction)]
    eval_frac: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The training prompts (refused when it exists, unless --overwrite).
    #[arg(long, value_name = "FILE")]
    out_train: PathBuf,
    /// The held-out prompts (refused when it exists, unless --overwrite).
    #[arg(long, value_name = "FILE")]
    out_eval: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Prompts, one per line (held out from training).
    #[arg(long, value_name = "FILE")]
    prompts: PathBuf,
    /// Scorers (repeatable): sentiment, sentiment-afinn, concise, length, wordlist:FILE.
    #[arg(long = "scorer", required = true)]
    scorers: Vec<String>,
    /// α values (finite); every ARM takes each (the full grid), base-only first.
    #[arg(long, value_delimiter = ',', default_value = "0,0.5,1,2", value_parser = alpha)]
    alphas: Vec<f32>,
    /// Samples per prompt and setting, 1..=256.
    #[arg(long, default_value_t = 1, value_parser = int_in(1, MAX_SAMPLES))]
    samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use only the first N prompts (≥ 1).
    #[arg(long, value_parser = int_in(1, usize::MAX))]
    limit: Option<usize>,
    /// New tokens per response.
    #[arg(long, default_value_t = 32, value_parser = int_in(1, MAX_TOKENS))]
    max_new_tokens: usize,
    /// Sampling temperature, > 0.
    #[arg(long, default_value_t = 1.0, value_parser = temperature)]
    temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = probability)]
    top_p: f32,
    /// Wrap prompts in the chat template.
    #[arg(long)]
    chat: bool,
    /// Wrap each prompt line, `{}` standing for the line.
    #[arg(long, default_value = "{}")]
    template: String,
    /// Where the scorers' lexicons are.
    #[arg(long, default_value = "models/data")]
    data_dir: PathBuf,
    /// Output directory: samples.jsonl, summary.json, summary.csv, results.md,
    /// reward_vs_alpha.svg, and with two or more scorers
    /// pareto.json + pareto.svg (the front over the first two, in --scorer order).
    /// Refused when it exists and is not empty, unless --overwrite.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace the files of an existing output directory.
    #[arg(long)]
    overwrite: bool,
    /// A baseline to compare with (repeatable), on the same prompts, seeds and scorers:
    /// bon-rm:N — best of N base samples by the scalar reward model; bon-arm:N — by the
    /// ARMs' trajectory reward Σ_i α_i·Σ_t log π_arm_i (α from --arm PATH:ALPHA);
    /// bon:N — both that have a model; args:K:W (or args:W, K = 10) — greedy ARGS: each
    /// step the base's top-K tokens, the one maximising log π_base + W·r(x, y_≤t).
    /// Its rows follow the α sweep's in every output, with their cost in forward passes
    /// and seconds. See docs/evaluation.md.
    #[arg(long = "baseline", value_name = "SPEC")]
    baselines: Vec<genarm::eval::baselines::BaselineSpec>,
    /// The scalar reward model (a `genarm train --scalar-head` output dir) that ranks
    /// bon-rm and guides ARGS.
    #[arg(long, value_name = "DIR")]
    reward_model: Option<PathBuf>,
    /// Hypervolume reference point X,Y for two scorers [default: base-only's mean scores].
    #[arg(long, value_name = "X,Y", value_parser = point, allow_hyphen_values = true)]
    hv_ref: Option<(f64, f64)>,
}

// Value parsers: each flag is checked when parsed, and a bad value's message (clap adds
// the flag's name) says the allowed range.

/// Upper bound of token counts and lengths: far above any context this crate serves,
/// low enough that no buffer sized by it aborts on allocation.
const MAX_TOKENS: usize = 1 << 20;
/// Samples per prompt (each a row of one batch) in `prefs` and `eval`.
const MAX_SAMPLES: usize = 256;
/// Timed runs of `bench`.
const MAX_RUNS: usize = 10_000;

/// An integer in `lo..=hi`.
fn int_in(lo: usize, hi: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s| match s.trim().parse::<usize>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("must be an integer in {lo}..={hi}")),
    }
}

fn float(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .map_err(|_| "not a number".to_string())
}

fn finite(s: &str) -> Result<f64, String> {
    float(s)
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| "must be a finite number".into())
}

fn finite_positive(s: &str) -> Result<f64, String> {
    finite(s)
        .ok()
        .filter(|&v| v > 0.0)
        .ok_or_else(|| "must be a finite number > 0".into())
}

fn finite_non_negative(s: &str) -> Result<f64, String> {
    finite(s)
        .ok()
        .filter(|&v| v >= 0.0)
        .ok_or_else(|| "must be a finite number ≥ 0".into())
}

/// A sampling temperature: finite and > 0.
fn temperature(s: &str) -> Result<f32, String> {
    finite_positive(s).map(|v| v as f32)
}

/// A probability mass in (0, 1] (top-p).
fn probability(s: &str) -> Result<f32, String> {
    float(s)
        .ok()
        .filter(|&v| v > 0.0 && v <= 1.0)
        .map(|v| v as f32)
        .ok_or_else(|| "must be in (0, 1]".into())
}

/// A fraction in [0, 1].
fn fraction(s: &str) -> Result<f64, String> {
    float(s)
        .ok()
        .filter(|v| (0.0..=1.0).contains(v))
        .ok_or_else(|| "must be in [0, 1]".into())
}

/// A fraction in [0, 1) (dropout, a held-out share that leaves pairs to train on).
fn fraction_below_one(s: &str) -> Result<f64, String> {
    float(s)
        .ok()
        .filter(|v| (0.0..1.0).contains(v))
        .ok_or_else(|| "must be in [0, 1)".into())
}

/// An ARM weight: any finite number.
fn alpha(s: &str) -> Result<f32, String> {
    finite(s).map(|v| v as f32)
}

/// A point X,Y of two finite numbers.
fn point(s: &str) -> Result<(f64, f64), String> {
    let parts: Vec<&str> = s.split(',').collect();
    match parts.as_slice() {
        [x, y] => Ok((finite(x)?, finite(y)?)),
        _ => Err("must be two finite numbers X,Y".into()),
    }
}

fn main() -> ExitCode {
    // candle asks for the thread count on every matmul and, without this variable, reads
    // /proc/cpuinfo each time to find it.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // A bad flag exits with 1 like every other error (clap's own default is 2).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Logits(a) => cmd_logits(a),
        Command::Bench(a) => cmd_bench(a),
        Command::InitLora(a) => cmd_init_lora(a),
        Command::Train(a) => cmd_train(a),
        Command::Prefs(a) => cmd_prefs(a),
        Command::Prompts(a) => cmd_prompts(a),
        Command::Eval(a) => cmd_eval(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that closed the pipe (`genarm … | head`) wanted no more: success, as
        // for Unix tools. Any other failed write (a full disk) is an error.
        Err(e) if is_closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: genarm's own errors already quote their
/// source (`path: reason`), which `{:#}` would print a second time.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints a line to stdout; a failed write (a closed pipe, a full disk) ends the command
/// with an error instead of `println!`'s panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        writeln!(out, $($arg)*)
            .and_then(|()| out.flush())
            .context("writing to stdout")?
    }};
}

fn device(backend: Backend) -> Result<Device> {
    match backend {
        Backend::Cpu | Backend::Webgpu => Ok(Device::Cpu),
        Backend::Cuda => genarm::cpu::cuda_device::open(0)
            .context("cannot open CUDA device 0 (is this binary built with `--features cuda`?)"),
    }
}

/// An engine of either kind, with what the commands need from its base checkpoint.
struct Loaded {
    engine: Box<dyn Engine>,
    tokenizer: Option<TextTokenizer>,
    tokenizer_note: Option<String>,
    stop_ids: Vec<u32>,
    /// Bytes of weights one token reads (the WebGPU engine reports it).
    weight_bytes: Option<u64>,
    /// Compute dispatches per token (the WebGPU engine).
    dispatches: Option<usize>,
}

impl Loaded {
    fn tokenizer(&self) -> Option<&TextTokenizer> {
        self.tokenizer.as_ref()
    }

    fn tokenizer_note(&self) -> Option<&str> {
        self.tokenizer_note.as_deref()
    }

    fn stop_token_ids(&self) -> Vec<u32> {
        self.stop_ids.clone()
    }
}

impl Engine for Loaded {
    fn backend(&self) -> String {
        self.engine.backend()
    }
    fn vocab_size(&self) -> usize {
        self.engine.vocab_size()
    }
    fn arm_labels(&self) -> Vec<String> {
        self.engine.arm_labels()
    }
    fn context_len(&self) -> usize {
        self.engine.context_len()
    }
    fn position(&self) -> usize {
        self.engine.position()
    }
    fn reset(&mut self) {
        self.engine.reset()
    }
    fn step(&mut self, tokens: &[u32]) -> genarm::Result<StepLogProbs> {
        self.engine.step(tokens)
    }
    fn teacher_forced(&mut self, tokens: &[u32]) -> genarm::Result<Vec<Vec<Vec<f32>>>> {
        self.engine.teacher_forced(tokens)
    }
    fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut genarm::guide::Sampler,
    ) -> genarm::Result<Chosen> {
        self.engine.guided_step(tokens, alphas, sampler)
    }
}

/// Loads base and ARMs, with a spinner on stderr when it is a terminal.
fn load_engine(models: &ModelArgs, arms: &[ArmSpec]) -> Result<Loaded> {
    let dev = device(models.backend)?;
    let spinner = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("loading {}", models.model.display()));
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        pb
    });
    let paths: Vec<PathBuf> = arms.iter().map(|a| a.path.clone()).collect();
    let context = Some(models.context);
    let loaded = if models.backend == Backend::Webgpu {
        GpuEngine::load(&models.model, &paths, context).map(|e| Loaded {
            tokenizer: e.tokenizer().cloned(),
            tokenizer_note: e.tokenizer_note().map(str::to_owned),
            stop_ids: e.stop_token_ids(),
            weight_bytes: Some(e.weight_bytes_per_token()),
            dispatches: Some(e.dispatches_per_token()),
            engine: Box::new(e),
        })
    } else {
        CpuEngine::load(&models.model, &paths, context, &dev).map(|e| Loaded {
            tokenizer: e.tokenizer().cloned(),
            tokenizer_note: e.tokenizer_note().map(str::to_owned),
            stop_ids: e.stop_token_ids(),
            weight_bytes: None,
            dispatches: None,
            engine: Box::new(e),
        })
    };
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    Ok(loaded?)
}

/// A progress bar on stderr with an ETA, or `None` when stderr is not a terminal (logs
/// and pipes get plain lines instead). `unit` follows the counts, e.g. "steps {msg}".
fn progress_bar(total: u64, unit: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new(total);
        let template =
            format!("{{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed_precise}} < {{eta_precise}}]");
        if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
            pb.set_style(style);
        }
        pb
    })
}

fn prompt_ids(engine: &Loaded, args: &GenerateArgs) -> Result<Vec<u32>> {
    if let Some(ids) = &args.prompt.prompt_tokens {
        if args.chat {
            bail!("--chat needs a text prompt, not --prompt-tokens");
        }
        return Ok(ids.clone());
    }
    let text = match (&args.prompt.prompt, &args.prompt.prompt_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give --prompt, --prompt-file or --prompt-tokens"),
    };
    let tok = engine
        .tokenizer()
        .with_context(|| match engine.tokenizer_note() {
            Some(note) => format!("{note}; give the prompt as --prompt-tokens"),
            None => format!(
                "{} has no tokenizer: give the prompt as --prompt-tokens",
                args.models.model.display()
            ),
        })?;
    Ok(tok.encode_prompt(&text, args.chat, args.system.as_deref())?)
}

fn sampling_options(s: &SamplingArgs, engine: &Loaded, arms: &[ArmSpec]) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: s.max_new_tokens,
        alphas: arms.iter().map(|a| a.alpha).collect(),
        sampling: SamplingParams {
            greedy: s.greedy,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
        },
        eos_ids: engine.stop_token_ids(),
        ignore_eos: s.ignore_eos,
        stop_strings: s.stop.clone(),
    }
}

fn cmd_generate(args: GenerateArgs) -> Result<()> {
    let mut engine = load_engine(&args.models, &args.models.arms)?;
    let prompt = prompt_ids(&engine, &args)?;
    let opts = sampling_options(&args.sampling, &engine, &args.models.arms);
    let tokenizer = engine.tokenizer().cloned();
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let gen = genarm::generate(&mut engine, tokenizer.as_ref(), &prompt, &opts, &mut |ev| {
        if stream {
            let piece = if tokenizer.is_some() {
                ev.text.clone()
            } else {
                format!("{} ", ev.id)
            };
            // A closed pipe ends generation instead of panicking.
            return write!(stdout, "{piece}")
                .and_then(|_| stdout.flush())
                .is_ok();
        }
        true
    })?;
    if args.json {
        let out = serde_json::json!({
            "text": gen.text,
            "tokens": gen.tokens,
            "prompt_tokens": gen.prompt_tokens,
            "tokens_per_second": gen.tokens_per_second(),
            "backend": engine.backend(),
            "stop_reason": gen.stop,
            "prefill_seconds": gen.prefill_seconds,
            "arms": engine.arm_labels(),
            "alphas": opts.alphas,
        });
        writeln!(stdout, "{out}")
            .and_then(|()| stdout.flush())
            .context("writing to stdout")?;
    } else {
        // A failed streamed write stopped generation; this write reports it.
        writeln!(stdout)
            .and_then(|()| stdout.flush())
            .context("writing to stdout")?;
        eprintln!(
            "[{} prompt tokens, {} new, {:.1} tokens/s decode, stop: {:?}, backend {}]",
            gen.prompt_tokens,
            gen.tokens.len(),
            gen.tokens_per_second(),
            gen.stop,
            engine.backend()
        );
    }
    Ok(())
}

fn cmd_logits(args: LogitsArgs) -> Result<()> {
    if args.tokens.is_empty() {
        bail!("--tokens is empty");
    }
    let mut engine = load_engine(&args.models, &args.models.arms)?;
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
    let tok = engine.tokenizer();
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

fn cmd_bench(args: BenchArgs) -> Result<()> {
    // One engine per configuration (base, +1 ARM, +2 ARMs, …), timed round-robin so a
    // slow spell on a shared machine hits every configuration alike.
    let configs = (0..=args.models.arms.len())
        .map(|n_arms| {
            let arms = &args.models.arms[..n_arms];
            let engine = load_engine(&args.models, arms)?;
            let opts = GenerateOptions {
                max_new_tokens: args.tokens,
                alphas: arms.iter().map(|a| a.alpha).collect(),
                sampling: SamplingParams {
                    greedy: true,
                    ..Default::default()
                },
                ignore_eos: true,
                ..Default::default()
            };
            Ok((engine, opts))
        })
        .collect::<Result<Vec<_>>>()?;
    let context = configs[0].0.context_len();
    if args.prompt_len + args.tokens > context {
        bail!(
            "--prompt-len {} + --tokens {} exceed the context of {context} tokens (see --context)",
            args.prompt_len,
            args.tokens
        );
    }
    let vocab = configs[0].0.vocab_size() as u32;
    // A fixed prompt of ordinary ids; greedy with EOS ignored so every run decodes
    // exactly `tokens` tokens.
    let prompt: Vec<u32> = (0..args.prompt_len as u64)
        .map(|i| ((i * 7 + 100) % u64::from(vocab)) as u32)
        .collect();
    let mut configs = configs;
    let mut speeds = vec![Vec::with_capacity(args.runs); configs.len()];
    // The first round is an untimed warm-up.
    for round in 0..=args.runs {
        for (i, (engine, opts)) in configs.iter_mut().enumerate() {
            let gen = genarm::generate(engine, None, &prompt, opts, &mut |_| true)?;
            if round > 0 {
                speeds[i].push(gen.tokens_per_second());
            }
        }
    }
    let rows: Vec<(String, f64, Vec<f64>, Option<usize>)> = speeds
        .into_iter()
        .enumerate()
        .map(|(n_arms, mut runs)| {
            runs.sort_by(f64::total_cmp);
            let median = runs[runs.len() / 2];
            let label = if n_arms == 0 {
                "base only".to_string()
            } else {
                format!("base + {n_arms} ARM{}", if n_arms > 1 { "s" } else { "" })
            };
            (label, median, runs, configs[n_arms].0.dispatches)
        })
        .collect();
    let base_speed = rows[0].1;
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(label, median, runs, dispatches)| {
                serde_json::json!({
                    "config": label,
                    "tokens_per_second": median,
                    "runs": runs,
                    "time_per_token_vs_base": base_speed / median,
                    "dispatches_per_token": dispatches,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "backend": configs[0].0.backend(),
                "threads": candle_core::utils::get_num_threads(),
                "weight_bytes_per_token": configs[0].0.weight_bytes,
                "results": out,
            })
        );
    } else {
        outln!(
            "decode tokens/s on {}, median of {} runs of {} tokens ({} CPU threads)",
            configs[0].0.backend(),
            args.runs,
            args.tokens,
            candle_core::utils::get_num_threads()
        );
        for (label, median, _, dispatches) in &rows {
            let dispatches =
                dispatches.map_or(String::new(), |d| format!("   {d} dispatches/token"));
            outln!(
                "  {label:<16} {median:>8.1} tok/s   {:.2}× base time/token{dispatches}",
                base_speed / median
            );
        }
        if let Some(bytes) = configs[0].0.weight_bytes {
            // Divide by the card's memory bandwidth for the fraction achieved.
            outln!(
                "  weights read per base token: {:.1} MB → {:.2} GB/s at the base-only speed",
                bytes as f64 / 1e6,
                bytes as f64 * base_speed / 1e9
            );
        }
    }
    Ok(())
}

fn cmd_init_lora(args: InitLoraArgs) -> Result<()> {
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
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn path_string(p: &Path) -> String {
    p.canonicalize()
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// The default peak learning rates: LoRA's low-rank deltas start at zero and tolerate
/// large steps; full fine-tuning moves pretrained weights and needs small ones.
const DEFAULT_LORA_LR: f64 = 5e-4;
const DEFAULT_FULL_LR: f64 = 2e-5;

fn cmd_train(args: TrainArgs) -> Result<()> {
    use genarm::train::data::{read_numbered_pairs, tokenize_pair, LengthLimits, PrefFormat};
    use genarm::train::trainer::{split_pairs, ArmLabel, Event, RunInputs, TrainConfig, Trainer};
    refuse_input_as_output(
        &args.out,
        "--out",
        &[("--model", &args.model), ("--data", &args.data)],
    )?;
    refuse_existing(
        &args.out,
        args.resume || args.overwrite,
        "pass --resume to continue its run or --overwrite to start a new one there",
    )?;
    let base = genarm::model::Checkpoint::open(&args.model)?;
    let (hidden, n_layers) = (base.config.hidden_size, base.config.num_layers);
    if !args.full && args.lora_rank > hidden {
        bail!(
            "--lora-rank must be in 1..={hidden} (the model's hidden size), got {}",
            args.lora_rank
        );
    }
    if let Some(n) = args.layers.filter(|&n| n > n_layers) {
        bail!("--layers must be in 1..={n_layers} (the model's layers), got {n}");
    }
    let tok = base
        .tokenizer
        .clone()
        .with_context(|| format!("{} has no tokenizer", args.model.display()))?;
    let format = args
        .format
        .as_deref()
        .map(|f| f.parse::<PrefFormat>().map_err(anyhow::Error::msg))
        .transpose()?;
    let pairs = read_numbered_pairs(&args.data, format)?;
    let limits = LengthLimits {
        max_prompt_len: args.max_prompt_len,
        max_len: args.max_len,
    };
    let mut tokenized = Vec::with_capacity(pairs.len());
    for (line, p) in &pairs {
        let t = tokenize_pair(p, &tok, args.chat, limits)
            .with_context(|| format!("{}: line {line}", args.data.display()))?;
        tokenized.extend(t);
    }
    let skipped = pairs.len() - tokenized.len();
    let max_len = tokenized
        .iter()
        .map(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len()))
        .max()
        .unwrap_or(1);
    let targets = args
        .lora_targets
        .iter()
        .map(|t| match t.as_str() {
            "q" | "k" | "v" | "o" => Ok(format!("{t}_proj")),
            "gate" | "up" | "down" => Ok(format!("{t}_proj")),
            other if other.ends_with("_proj") => Ok(other.to_string()),
            other => bail!("unknown LoRA target `{other}` (q,k,v,o,gate,up,down)"),
        })
        .collect::<Result<Vec<_>>>()?;
    let config = TrainConfig {
        beta_r: args.beta_r,
        gamma: args.gamma,
        sft_weight: args.sft_weight,
        lora_rank: args.lora_rank,
        lora_alpha: args.lora_alpha,
        lora_dropout: args.lora_dropout,
        lora_targets: targets,
        lora_layers: args.layers.unwrap_or(usize::MAX),
        lr: args.lr.unwrap_or(if args.full {
            DEFAULT_FULL_LR
        } else {
            DEFAULT_LORA_LR
        }),
        epochs: args.epochs,
        batch_size: args.batch_size,
        micro_batch: args.micro_batch,
        warmup: args.warmup,
        schedule: args.schedule.clone(),
        weight_decay: args.weight_decay,
        max_grad_norm: 1.0,
        eval_frac: args.eval_frac,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        scalar_head: args.scalar_head,
        full: args.full,
        train_head: args.train_head,
    };
    let (train, eval) = split_pairs(tokenized, args.eval_frac, args.seed);
    eprintln!(
        "{} pairs ({} skipped by the length limits): {} train, {} held out; longest sequence {max_len} tokens",
        pairs.len(),
        skipped,
        train.len(),
        eval.len()
    );
    let _lock = OutputLock::directory(&args.out)?;
    let mut trainer = Trainer::new(&base, config, &args.out, max_len, &Device::Cpu)?;
    trainer.inputs = Some(RunInputs::new(&args.model, &args.data)?);
    if args.save_dtype == "bf16" {
        trainer.save_dtype = candle_core::DType::BF16;
    }
    let total = (train.len().div_ceil(args.batch_size) * args.epochs) as u64;
    let bar = progress_bar(total, "steps {msg}");
    let label = ArmLabel {
        name: args.name.clone(),
        objective: args.objective.clone(),
        base_name: args.base_name.clone(),
    };
    let summary = trainer.train(
        &train,
        &eval,
        &label,
        args.resume,
        args.max_steps,
        &mut |ev| match ev {
            Event::Step(s) => {
                let msg = format!(
                    "loss {:.4} acc {:.2} lr {:.2e} {:.2} pairs/s",
                    s.loss, s.accuracy, s.lr, s.pairs_per_second
                );
                match &bar {
                    Some(pb) => {
                        pb.set_position(s.step as u64);
                        pb.set_message(msg);
                    }
                    None => eprintln!("step {}/{} {msg}", s.step, s.total_steps),
                }
            }
            Event::Eval(e) => eprintln!(
                "epoch {}: held-out pairwise accuracy {:.3} over {} pairs, loss {:.4}",
                e.epoch, e.eval_accuracy, e.eval_pairs, e.eval_loss
            ),
            Event::Checkpoint(_) => {}
        },
    )?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    eprintln!(
        "wrote {} ({} steps{})",
        args.out.display(),
        summary.steps,
        summary
            .resumed_from
            .map(|s| format!(", resumed from step {s}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// The KV-cache length `prefs` samples with (prompt and continuation).
const PREFS_CONTEXT: usize = 1024;

fn cmd_prefs(args: PrefsArgs) -> Result<()> {
    use genarm::cpu::llama::Llama;
    use genarm::eval::prompts::read_lines;
    use genarm::eval::scorers::scorer_from_spec;
    use genarm::outdir::FileFingerprint;
    use genarm::train::prefs::{best_and_worst, sample_rows, PrefsRun};
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
    let base = genarm::model::Checkpoint::open(&args.model)?;
    let tok = base
        .tokenizer
        .clone()
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
    let eos = genarm::model::stop_token_ids(&base.config, Some(&tok));
    // Pairs go to OUT.part as they are made (each line tagged with its prompt index), so
    // `--resume` after a kill continues after the last prompt written.
    let (mut written, mut ties, mut first) = (0usize, 0usize, 0usize);
    if args.resume && part.is_file() {
        run.check_continues(&part)?;
        let done = std::fs::read_to_string(&part)?;
        let mut kept = String::new();
        for line in done.lines() {
            // A line cut by the kill is dropped; every complete one is kept.
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                break;
            };
            if let Some(i) = v["prompt_index"].as_u64() {
                first = first.max(i as usize + 1);
            }
            kept.push_str(line);
            kept.push('\n');
            written += 1;
        }
        std::fs::write(&part, kept)?;
        eprintln!("resuming after prompt {first} with {written} pairs");
    } else {
        std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
        run.write(&part)?;
    }
    let mut out = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?,
    );
    let started = std::time::Instant::now();
    for (i, line) in prompts.iter().enumerate().skip(first) {
        let prompt = &args.template.replace("{}", line);
        let ids = tok.encode_prompt(prompt, args.chat, None)?;
        let params = SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed.wrapping_add(i as u64),
            ..Default::default()
        };
        let samples = sample_rows(&mut model, &tok, &ids, args.max_new_tokens, &params, &eos)?;
        let scores: Vec<f64> = samples
            .iter()
            .map(|s| scorer.score(&s.text, s.tokens.len(), s.complete))
            .collect();
        match best_and_worst(&scores) {
            Some((b, w)) => {
                let line = serde_json::json!({
                    "prompt_index": i,
                    "prompt": prompt,
                    "chosen": samples[b].text,
                    "rejected": samples[w].text,
                    "chosen_score": scores[b],
                    "rejected_score": scores[w],
                });
                writeln!(out, "{line}")?;
                out.flush()?;
                written += 1;
            }
            None => ties += 1,
        }
        if (i + 1) % 25 == 0 || i + 1 == prompts.len() {
            eprintln!(
                "{}/{} prompts, {written} pairs, {ties} ties skipped, {:.1} s",
                i + 1,
                prompts.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    out.flush()?;
    drop(out);
    std::fs::rename(&part, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    let _ = std::fs::remove_file(PrefsRun::record_path(&part));
    eprintln!(
        "wrote {written} pairs to {} ({ties} ties skipped)",
        args.out.display()
    );
    Ok(())
}

fn cmd_prompts(args: PromptsArgs) -> Result<()> {
    use genarm::eval::prompts::{build_prompt_set, read_lines, split_train_eval, write_lines};
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
    eprintln!(
        "wrote {} train prompts to {} and {} held-out prompts to {}",
        train.len(),
        args.out_train.display(),
        eval.len(),
        args.out_eval.display()
    );
    Ok(())
}

fn cmd_eval(args: EvalArgs) -> Result<()> {
    use genarm::eval::baselines::{baseline_settings, expand_baselines};
    use genarm::eval::prompts::read_lines;
    use genarm::eval::run::{alpha_grid, run_sweep, summarise, write_summary, Setting, SweepSpec};
    use genarm::eval::scorers::scorer_from_spec;
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("--model", &args.models.model),
        ("--prompts", &args.prompts),
    ];
    inputs.extend(args.models.arms.iter().map(|a| ("--arm", a.path.as_path())));
    inputs.extend(
        args.reward_model
            .iter()
            .map(|p| ("--reward-model", p.as_path())),
    );
    refuse_input_as_output(&args.out, "--out", &inputs)?;
    refuse_existing(
        &args.out,
        args.overwrite,
        "pass --overwrite to replace its files",
    )?;
    let mut prompts = read_lines(&args.prompts)?;
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    if prompts.is_empty() {
        bail!(
            "{}: no prompts (the file has no non-empty line)",
            args.prompts.display()
        );
    }
    let baselines = expand_baselines(
        &args.baselines,
        args.reward_model.is_some(),
        !args.models.arms.is_empty(),
    )?;
    if args.reward_model.is_some() && baselines.is_empty() {
        bail!("--reward-model is used only by baselines: add --baseline bon-rm:N or args:K:W");
    }
    // The baselines run after the whole sweep: a wrong reward model is found now.
    if let Some(dir) = &args.reward_model {
        genarm::eval::reward_model::ScalarRewardModel::open_adapter(dir, &Device::Cpu)?;
    }
    let scorers = args
        .scorers
        .iter()
        .map(|s| scorer_from_spec(s, &args.data_dir))
        .collect::<genarm::Result<Vec<_>>>()?;
    let mut engine = load_engine(&args.models, &args.models.arms)?;
    let tok = engine
        .tokenizer()
        .cloned()
        .with_context(|| format!("{} has no tokenizer", args.models.model.display()))?;
    let settings = alpha_grid(&args.alphas, args.models.arms.len());
    let spec = SweepSpec {
        settings: settings.clone(),
        samples: args.samples,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        chat: args.chat,
        template: args.template.clone(),
    };
    let eos = engine.stop_token_ids();
    let _lock = OutputLock::directory(&args.out)?;
    let samples_path = args.out.join("samples.jsonl");
    let mut samples_file = std::io::BufWriter::new(
        std::fs::File::create(&samples_path)
            .with_context(|| format!("creating {}", samples_path.display()))?,
    );
    // The first failed write of a sample (a full disk) ends the command after the sweep.
    let mut write_error: Option<std::io::Error> = None;
    let total = (prompts.len() * (settings.len() + baselines.len()) * args.samples) as u64;
    let bar = progress_bar(total, "responses");
    let mut done = 0u64;
    let mut on_sample = |r: &genarm::eval::run::SampleRecord| {
        if write_error.is_none() {
            let line = serde_json::to_string(r).unwrap_or_default();
            write_error = writeln!(samples_file, "{line}").err();
        }
        done += 1;
        match &bar {
            Some(pb) => pb.set_position(done),
            None if done.is_multiple_of(50) || done == total => {
                eprintln!("{done}/{total} responses")
            }
            None => {}
        }
    };
    let mut records = run_sweep(
        &mut engine,
        &tok,
        &eos,
        &prompts,
        &scorers,
        &spec,
        &mut on_sample,
    )?;
    // The sweep's models are no longer needed: free them before the baselines load theirs.
    drop(engine);
    if !baselines.is_empty() {
        records.extend(run_eval_baselines(
            &args,
            &baselines,
            &tok,
            &eos,
            &prompts,
            &scorers,
            &spec,
            &mut on_sample,
        )?);
    }
    if let Some(e) = write_error {
        return Err(e).with_context(|| format!("writing {}", samples_path.display()));
    }
    samples_file
        .flush()
        .with_context(|| format!("writing {}", samples_path.display()))?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let mut all_settings: Vec<Setting> = settings.iter().map(|a| Setting::genarm(a)).collect();
    all_settings.extend(baseline_settings(&baselines, args.models.arms.len()));
    let summary = summarise(&records, &all_settings);
    write_summary(&args.out, &summary)?;
    // The plots are about the α grid; the baselines are in the table.
    let mut scorer_names: Vec<String> = Vec::new();
    for s in &scorers {
        if !scorer_names.iter().any(|n| n == s.name()) {
            scorer_names.push(s.name().to_string());
        }
    }
    write_eval_plots(&args, &scorer_names, &summary[..settings.len()])?;
    let command: Vec<String> = std::env::args().collect();
    genarm::eval::report::write_report(&args.out, &summary, &command.join(" "))?;
    for s in &summary {
        let scores: Vec<String> = s
            .scores
            .iter()
            .map(|(n, sc)| {
                format!(
                    "{n} {:+.3} ± {:.3} (win {:.2})",
                    sc.mean, sc.ci95, sc.win_rate_vs_base
                )
            })
            .collect();
        outln!(
            "{} (α = {:?}): {}  | {:.1} tokens, {:.2} s/response, {:.1} forward passes/token",
            s.method,
            s.alphas,
            scores.join(", "),
            s.mean_tokens,
            s.seconds_per_response,
            s.forward_passes_per_token
        );
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Loads what the baselines need (the base alone, the scalar reward model, the ARMs as
/// rankers) and runs them after the sweep.
#[allow(clippy::too_many_arguments)]
fn run_eval_baselines(
    args: &EvalArgs,
    baselines: &[genarm::eval::baselines::Baseline],
    tok: &TextTokenizer,
    eos: &[u32],
    prompts: &[String],
    scorers: &[Box<dyn genarm::eval::scorers::Scorer>],
    spec: &genarm::eval::run::SweepSpec,
    on_sample: &mut dyn FnMut(&genarm::eval::run::SampleRecord),
) -> Result<Vec<genarm::eval::run::SampleRecord>> {
    use genarm::eval::arm_reward::ArmRewardModel;
    use genarm::eval::baselines::{
        args_candidate_rows, run_baselines, Baseline, BaselineModels, Ranker,
    };
    use genarm::eval::reward_model::ScalarRewardModel;
    let dev = device(args.models.backend)?;
    let mut base = load_engine(&args.models, &[])?;
    let mut reward_model = args
        .reward_model
        .as_deref()
        .map(|dir| {
            ScalarRewardModel::load(
                &args.models.model,
                dir,
                args_candidate_rows(baselines),
                args.models.context,
                &dev,
            )
        })
        .transpose()?;
    let ranks_by_arm = baselines.iter().any(|b| {
        matches!(
            b,
            Baseline::BestOfN {
                ranker: Ranker::Arm,
                ..
            }
        )
    });
    let mut arms = ranks_by_arm
        .then(|| {
            ArmRewardModel::load(
                &args.models.model,
                &args.models.arms,
                args.models.context,
                &dev,
            )
        })
        .transpose()?;
    let mut models = BaselineModels {
        base: &mut base,
        reward_model: reward_model.as_mut(),
        arms: arms.as_mut(),
    };
    let first_setting = spec.settings.len();
    Ok(run_baselines(
        &mut models,
        tok,
        eos,
        prompts,
        scorers,
        spec,
        baselines,
        first_setting,
        on_sample,
    )?)
}

/// reward_vs_alpha.svg (each ARM's α with the others at 0), and for two scorers the
/// Pareto front of the settings' mean scores with its hypervolume.
/// `names` are the scorers in `--scorer` order.
fn write_eval_plots(
    args: &EvalArgs,
    names: &[String],
    summary: &[genarm::eval::run::SettingSummary],
) -> Result<()> {
    use genarm::eval::pareto::{hypervolume, pareto_front};
    use genarm::eval::plot::{line_panels, pareto_chart, Series};
    // One panel per scorer (their scales differ), one line per ARM.
    let panels: Vec<(String, Vec<Series>)> = names
        .iter()
        .map(|name| {
            let series = (0..args.models.arms.len())
                .map(|arm| Series {
                    label: format!(
                        "α of {} (the others 0)",
                        args.models.arms[arm].path.display()
                    ),
                    points: summary
                        .iter()
                        .filter(|s| {
                            s.alphas
                                .iter()
                                .enumerate()
                                .all(|(i, &a)| i == arm || a == 0.0)
                        })
                        .map(|s| {
                            (
                                s.alphas[arm] as f64,
                                s.scores[name].mean,
                                s.scores[name].ci95,
                            )
                        })
                        .collect(),
                })
                .collect();
            (name.clone(), series)
        })
        .collect();
    if !args.models.arms.is_empty() {
        let svg = line_panels("mean score vs ARM weight (95% CI)", "α", &panels);
        std::fs::write(args.out.join("reward_vs_alpha.svg"), svg)?;
    }
    // The front is over the first two scorers given; any others are reported, not
    // traded off.
    if names.len() >= 2 {
        let names = &names[..2];
        let points: Vec<(f64, f64)> = summary
            .iter()
            .map(|s| (s.scores[&names[0]].mean, s.scores[&names[1]].mean))
            .collect();
        let reference = args.hv_ref.unwrap_or(points[0]);
        let front = pareto_front(&points);
        let hv = hypervolume(&points, reference);
        let labelled: Vec<((f64, f64), String)> = points
            .iter()
            .zip(summary)
            .map(|(&p, s)| (p, format!("{:?}", s.alphas)))
            .collect();
        std::fs::write(
            args.out.join("pareto.svg"),
            pareto_chart(
                "two objectives over the α grid",
                &names[0],
                &names[1],
                &labelled,
                &front,
            ),
        )?;
        let out = serde_json::json!({
            "objectives": names,
            "points": points,
            "front": front,
            "reference": [reference.0, reference.1],
            "hypervolume": hv,
        });
        std::fs::write(
            args.out.join("pareto.json"),
            serde_json::to_string_pretty(&out)?,
        )?;
        outln!(
            "Pareto front of {} settings, hypervolume {hv:.4} over {reference:?}",
            front.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod option_fuzz {
    //! The CLI's options as a reader of hostile input: 20,000 fixed-seed argument lists,
    //! each a valid command with one option given a hostile value, must parse or be
    //! refused by clap — never panic (a value parser that overflows, divides or indexes).

    use clap::{CommandFactory, Parser};

    use super::Cli;

    const HOSTILE: &[&str] = &[
        "NaN",
        "nan",
        "inf",
        "-inf",
        "-1",
        "0",
        "-0",
        "1e309",
        "-1e309",
        "1e-320",
        "4294967296",
        "18446744073709551616",
        "99999999999999999999999",
        "1e12",
        "0.5",
        "2.5",
        "",
        " ",
        "abc",
        "1,2",
        ",",
        "1,,2",
        "-",
        "--",
        "0x10",
        "1_000",
        "+3",
        "١",
        "1e",
        ".",
        "1.5,NaN",
        "X,Y",
        "3:",
        ":3",
        "bon:0",
        "args:0:1",
        "bon:18446744073709551616",
    ];

    /// A valid invocation of each subcommand (paths need not exist: parsing comes first).
    fn valid(cmd: &str) -> Vec<&'static str> {
        let base: &[&str] = match cmd {
            "generate" => &["generate", "--model", "m.gguf", "--prompt", "hi"],
            "logits" => &["logits", "--model", "m.gguf", "--tokens", "1,2"],
            "bench" => &["bench", "--model", "m.gguf"],
            "init-lora" => &["init-lora", "--model", "m.gguf", "--out", "o"],
            "train" => &[
                "train", "--model", "m.gguf", "--data", "d.jsonl", "--out", "o",
            ],
            "prompts" => &[
                "prompts",
                "--corpus",
                "c",
                "--out-train",
                "a",
                "--out-eval",
                "b",
            ],
            "prefs" => &[
                "prefs",
                "--model",
                "m",
                "--prompts",
                "p",
                "--samples",
                "2",
                "--scorer",
                "length",
                "--out",
                "o",
            ],
            _ => &[
                "eval",
                "--model",
                "m",
                "--prompts",
                "p",
                "--scorer",
                "length",
                "--out",
                "o",
            ],
        };
        std::iter::once("genarm")
            .chain(base.iter().copied())
            .collect()
    }

    #[test]
    fn twenty_thousand_hostile_option_values_parse_or_are_refused() {
        let command = Cli::command();
        let subcommands: Vec<(String, Vec<String>)> = command
            .get_subcommands()
            .map(|s| {
                let options = s
                    .get_arguments()
                    .filter(|a| a.get_action().takes_values())
                    .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
                    .collect();
                (s.get_name().to_owned(), options)
            })
            .collect();
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let (cmd, options) = &subcommands[next() % subcommands.len()];
            let option = &options[next() % options.len()];
            let value = HOSTILE[next() % HOSTILE.len()];
            let mut argv = valid(cmd);
            argv.push(option);
            argv.push(value);
            let parsed = std::panic::catch_unwind(|| Cli::try_parse_from(&argv).is_ok());
            match parsed {
                Ok(true) => accepted += 1,
                Ok(false) => refused += 1,
                Err(_) => panic!("`{}` panicked while parsing", argv.join(" ")),
            }
        }
        println!("20000 hostile option values: {refused} refused, {accepted} accepted, 0 panics");
        assert!(refused > accepted, "{refused} refused, {accepted} accepted");
    }
}
