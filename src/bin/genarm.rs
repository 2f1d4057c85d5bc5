//! The genarm command line: `main` only dispatches, one function per subcommand.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use genarm::cpu::{CpuEngine, DEFAULT_CONTEXT};
use genarm::model::tokenizer::ChatMessage;
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// candle on the CPU.
    Cpu,
    /// candle on the first CUDA device (build with `--features cuda`).
    Cuda,
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
    /// KV-cache length in tokens (capped at the model's context).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONTEXT)]
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
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_new_tokens: usize,
    /// Softmax temperature of the guided scores.
    #[arg(long, value_name = "T", default_value_t = 1.0)]
    temperature: f32,
    /// Sample from the K most likely tokens only [default: all].
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Nucleus sampling mass.
    #[arg(long, value_name = "P", default_value_t = 1.0)]
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
    /// New tokens per run.
    #[arg(long, value_name = "N", default_value_t = 128)]
    tokens: usize,
    /// Timed runs per configuration (the median is reported).
    #[arg(long, value_name = "R", default_value_t = 3)]
    runs: usize,
    /// Prompt length in tokens (a fixed synthetic prompt).
    #[arg(long, value_name = "N", default_value_t = 16)]
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
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Standard deviation of B's entries (A is Kaiming-uniform as in PEFT).
    #[arg(long, default_value_t = 0.01)]
    b_std: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> ExitCode {
    // candle asks for the thread count on every matmul and, without this variable, reads
    // /proc/cpuinfo each time to find it.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Logits(a) => cmd_logits(a),
        Command::Bench(a) => cmd_bench(a),
        Command::InitLora(a) => cmd_init_lora(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn device(backend: Backend) -> Result<Device> {
    match backend {
        Backend::Cpu => Ok(Device::Cpu),
        Backend::Cuda => Device::new_cuda(0)
            .context("cannot open CUDA device 0 (is this binary built with `--features cuda`?)"),
    }
}

/// Loads base and ARMs, with a spinner on stderr when it is a terminal.
fn load_engine(models: &ModelArgs, arms: &[ArmSpec]) -> Result<CpuEngine> {
    let dev = device(models.backend)?;
    let spinner = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("loading {}", models.model.display()));
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        pb
    });
    let paths: Vec<PathBuf> = arms.iter().map(|a| a.path.clone()).collect();
    let engine = CpuEngine::load(&models.model, &paths, Some(models.context), &dev);
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    Ok(engine?)
}

fn prompt_ids(engine: &CpuEngine, args: &GenerateArgs) -> Result<Vec<u32>> {
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
    let tok = engine.tokenizer().with_context(|| {
        format!(
            "{} has no tokenizer: give the prompt as --prompt-tokens",
            args.models.model.display()
        )
    })?;
    if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: text,
        });
        let rendered = tok.apply_chat_template(&messages, true)?;
        Ok(tok.encode(&rendered, false)?)
    } else {
        Ok(tok.encode(&text, true)?)
    }
}

fn sampling_options(s: &SamplingArgs, engine: &CpuEngine, arms: &[ArmSpec]) -> GenerateOptions {
    let mut eos_ids = engine.base_config().eos_token_ids.clone();
    if let Some(t) = engine.tokenizer() {
        eos_ids.extend_from_slice(t.eos_ids());
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();
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
        eos_ids,
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
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
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
        println!("{out}");
        return Ok(());
    }
    let tok = engine.tokenizer();
    let show = |id: u32| match tok.and_then(|t| t.decode(&[id], false).ok()) {
        Some(s) => format!("{id} {s:?}"),
        None => id.to_string(),
    };
    println!("position  next token  log p (base)");
    for (i, lp) in next_token(&per_model[0]).iter().enumerate() {
        println!("{:>8}  {:<28}  {lp:.6}", i, show(args.tokens[i + 1]));
    }
    println!("top 10 guided scores at the last position:");
    let mut order: Vec<usize> = (0..combined.len()).collect();
    order.sort_unstable_by(|&a, &b| combined[b].total_cmp(&combined[a]));
    for &i in order.iter().take(10) {
        println!("  {:<28}  {:.6}", show(i as u32), combined[i]);
    }
    Ok(())
}

fn cmd_bench(args: BenchArgs) -> Result<()> {
    if args.runs == 0 || args.tokens < 2 {
        bail!("--runs must be ≥ 1 and --tokens ≥ 2");
    }
    let mut rows = Vec::new();
    for n_arms in 0..=args.models.arms.len() {
        let arms = &args.models.arms[..n_arms];
        let mut engine = load_engine(&args.models, arms)?;
        let vocab = engine.vocab_size() as u32;
        // A fixed prompt of ordinary ids; greedy with EOS ignored so every run decodes
        // exactly `tokens` tokens.
        let prompt: Vec<u32> = (0..args.prompt_len as u32)
            .map(|i| (i * 7 + 100) % vocab)
            .collect();
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
        // One untimed run warms caches and lazily built kernels.
        genarm::generate(&mut engine, None, &prompt, &opts, &mut |_| true)?;
        let mut speeds = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            let gen = genarm::generate(&mut engine, None, &prompt, &opts, &mut |_| true)?;
            speeds.push(gen.tokens_per_second());
        }
        speeds.sort_by(f64::total_cmp);
        let median = speeds[speeds.len() / 2];
        let label = if n_arms == 0 {
            "base only".to_string()
        } else {
            format!("base + {n_arms} ARM{}", if n_arms > 1 { "s" } else { "" })
        };
        rows.push((label, median, speeds));
    }
    let base_speed = rows[0].1;
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(label, median, runs)| {
                serde_json::json!({
                    "config": label,
                    "tokens_per_second": median,
                    "runs": runs,
                    "time_per_token_vs_base": base_speed / median,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "backend": format!("{:?}", args.models.backend).to_lowercase(), "threads": candle_core::utils::get_num_threads(), "results": out })
        );
    } else {
        println!(
            "decode tokens/s, median of {} runs of {} tokens ({} threads)",
            args.runs,
            args.tokens,
            candle_core::utils::get_num_threads()
        );
        for (label, median, _) in &rows {
            println!(
                "  {label:<16} {median:>8.1} tok/s   {:.2}× base time/token",
                base_speed / median
            );
        }
    }
    Ok(())
}

fn cmd_init_lora(args: InitLoraArgs) -> Result<()> {
    let ckpt = genarm::model::Checkpoint::open(&args.model)?;
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
