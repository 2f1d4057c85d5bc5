//! `genarm train`: an ARM (or a scalar reward model) from preference pairs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use genarm::outdir::{refuse_existing, refuse_input_as_output, OutputLock};
use genarm::train::data::{read_numbered_pairs, tokenize_pair, LengthLimits, PrefFormat};
use genarm::train::trainer::{split_pairs, ArmLabel, Event, RunInputs, TrainConfig, Trainer};

use crate::args::*;
use crate::load::progress_bar;

#[derive(Args)]
pub struct TrainArgs {
    /// The base model the ARM is trained from (GGUF or HF dir).
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Preference pairs (JSONL).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// trl, hh-rlhf, pku-better, pku-safer or ultrafeedback [default: detected from the first record].
    #[arg(long)]
    pub format: Option<String>,
    /// Output directory: the PEFT adapter (with --full an HF model), genarm.json,
    /// train_log.jsonl and checkpoint/. Refused when it exists and is not empty, unless
    /// --resume or --overwrite.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Start a new run in an existing output directory, replacing its files.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Apply the model's chat template to prompts (needed for conversational data).
    #[arg(long)]
    pub chat: bool,
    /// The loss: genarm (an ARM, the loss below) or dpo (a policy: LoRA on the base
    /// with −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))] − γ),
    /// the reference being the frozen base; β is --beta-r, alias --beta). A DPO policy is
    /// decoded with `--lora OUT`, not guided with as an ARM; genarm.json says
    /// "kind": "policy". Not with --full, --scalar-head or --sft-weight. (--objective is
    /// the words saying what the model prefers.)
    #[arg(long, default_value = "genarm", value_parser = ["genarm", "dpo"])]
    pub loss: String,
    /// β_r of the loss −log σ(β_r·(Σ log π(y_w) − Σ log π(y_l)) − γ) (with --loss dpo,
    /// DPO's β), > 0.
    #[arg(long, visible_alias = "beta", default_value_t = 0.05, value_parser = finite_positive)]
    pub beta_r: f64,
    /// Margin γ of the loss (finite).
    #[arg(long, default_value_t = 0.0, value_parser = finite)]
    pub gamma: f64,
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
    pub sft_weight: f64,
    /// LoRA rank, 1..=the model's hidden size.
    #[arg(long, default_value_t = 8, conflicts_with = "full", value_parser = int_in(1, MAX_TOKENS))]
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank), > 0.
    #[arg(long, default_value_t = 16.0, conflicts_with = "full", value_parser = finite_positive)]
    pub lora_alpha: f64,
    /// LoRA dropout probability, in [0, 1).
    #[arg(long, default_value_t = 0.05, conflicts_with = "full", value_parser = fraction_below_one)]
    pub lora_dropout: f64,
    /// Projections with LoRA (short names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q,k,v,o,gate,up,down",
        conflicts_with = "full"
    )]
    pub lora_targets: Vec<String>,
    /// Train the top N layers only (LoRA on them, or all their weights with --full); the
    /// layers below stay frozen and run without autograd on the fast kernels
    /// [default: all layers]. 1..=the model's layer count.
    #[arg(long = "layers", visible_alias = "lora-layers", value_name = "N", value_parser = int_in(1, MAX_TOKENS))]
    pub layers: Option<usize>,
    /// Full fine-tuning instead of LoRA: every weight of the top --layers N blocks
    /// (projections, biases, norms) and the final norm trains, with AdamW moments for
    /// each in the checkpoint (1-D weights get no weight decay). OUT becomes a standalone
    /// HF model directory (config.json, model.safetensors with HF names and row order,
    /// the base's tokenizer) that `--arm OUT` loads as an ARM of its own. The LoRA
    /// flags do not apply.
    #[arg(long)]
    pub full: bool,
    /// With --full, train the LM head too; a base with tied embeddings gets an untied
    /// head (the input embeddings never train).
    #[arg(long, requires = "full")]
    pub train_head: bool,
    /// With --full, start from the base's bottom K decoder layers only (its embedding,
    /// layers 0..K, final norm and head): OUT is a K-layer HF model, a smaller ARM for
    /// the same base (weak-to-strong guidance, `--arm OUT` on the full base). --layers
    /// then counts from the top of those K [default: all K train]. 1..=the model's layer
    /// count.
    #[arg(long, value_name = "K", requires = "full", value_parser = int_in(1, MAX_TOKENS))]
    pub keep_layers: Option<usize>,
    /// With --full, the dtype of the saved weights: f32 (exactly what was trained) or
    /// bf16 (half the size).
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = ["f32", "bf16"], requires = "full")]
    pub save_dtype: String,
    /// Train a conventional scalar reward model instead of an ARM: the same LoRA plus a
    /// linear head on the last token's final hidden state, loss −log σ(r(x,y_w) − r(x,y_l))
    /// (--beta-r and --gamma are unused). OUT gets score_head.safetensors next to the
    /// adapter and genarm.json says "kind": "scalar_reward_model"; use it with
    /// `genarm eval --reward-model OUT`. LoRA only (not with --full).
    #[arg(long, conflicts_with = "full")]
    pub scalar_head: bool,
    /// Peak learning rate, > 0 [default: 5e-4 for LoRA, 2e-5 with --full].
    #[arg(long, value_parser = finite_positive)]
    pub lr: Option<f64>,
    /// Passes over the training pairs, 1..=10000.
    #[arg(long, default_value_t = 1, value_parser = int_in(1, 10_000))]
    pub epochs: usize,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 32, value_parser = int_in(1, MAX_TOKENS))]
    pub batch_size: usize,
    /// Pairs per forward/backward pass (gradients accumulate over a batch).
    #[arg(long, default_value_t = 4, value_parser = int_in(1, MAX_TOKENS))]
    pub micro_batch: usize,
    /// Warmup steps.
    #[arg(long, default_value_t = 100, value_parser = int_in(0, 1_000_000_000))]
    pub warmup: usize,
    /// Learning-rate decay after warmup: cosine or linear.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// AdamW weight decay, ≥ 0.
    #[arg(long, default_value_t = 0.05, value_parser = finite_non_negative)]
    pub weight_decay: f64,
    /// Prompt tokens kept (the prompt's end is kept).
    #[arg(long, default_value_t = 512, value_parser = int_in(1, MAX_TOKENS))]
    pub max_prompt_len: usize,
    /// Prompt + response tokens kept (responses are cut on the right).
    #[arg(long, default_value_t = 1024, value_parser = int_in(2, MAX_TOKENS))]
    pub max_len: usize,
    /// Fraction of pairs held out for the per-epoch pairwise accuracy, in [0, 1).
    #[arg(long, default_value_t = 0.05, value_parser = fraction_below_one)]
    pub eval_frac: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from OUT/checkpoint if present (same model, data, seed and settings).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many optimizer steps (the run stays resumable).
    #[arg(long, value_parser = int_in(1, usize::MAX))]
    pub max_steps: Option<usize>,
    /// Optimizer steps between checkpoints.
    #[arg(long, default_value_t = 10, value_parser = int_in(1, usize::MAX))]
    pub checkpoint_every: usize,
    /// The ARM's short name (the playground's slider label).
    #[arg(long)]
    pub name: Option<String>,
    /// What the ARM prefers, in words.
    #[arg(long)]
    pub objective: Option<String>,
    /// `base_model_name_or_path` written to adapter_config.json (with --full `base_model`
    /// in genarm.json) [default: the --model path].
    #[arg(long)]
    pub base_name: Option<String>,
}

/// The default peak learning rates: LoRA's low-rank deltas start at zero and tolerate
/// large steps; full fine-tuning moves pretrained weights and needs small ones.
pub const DEFAULT_LORA_LR: f64 = 5e-4;

pub const DEFAULT_FULL_LR: f64 = 2e-5;

pub fn run(args: TrainArgs) -> Result<()> {
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
    if let Some(k) = args.keep_layers.filter(|&k| k > n_layers) {
        bail!("--keep-layers must be in 1..={n_layers} (the model's layers), got {k}");
    }
    let n_layers = args.keep_layers.unwrap_or(n_layers);
    if let Some(n) = args.layers.filter(|&n| n > n_layers) {
        match args.keep_layers {
            Some(k) => {
                bail!("--layers must be in 1..={k} (the layers --keep-layers keeps), got {n}")
            }
            None => bail!("--layers must be in 1..={n_layers} (the model's layers), got {n}"),
        }
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
        keep_layers: args.keep_layers,
        objective: args.loss.parse().map_err(anyhow::Error::msg)?,
    };
    let (train, eval) = split_pairs(tokenized, args.eval_frac, args.seed);
    noteln!(
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
                    None => noteln!("step {}/{} {msg}", s.step, s.total_steps),
                }
            }
            Event::Eval(e) => noteln!(
                "epoch {}: held-out pairwise accuracy {:.3} over {} pairs, loss {:.4}",
                e.epoch,
                e.eval_accuracy,
                e.eval_pairs,
                e.eval_loss
            ),
            Event::Checkpoint(_) => {}
        },
    )?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    noteln!(
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
