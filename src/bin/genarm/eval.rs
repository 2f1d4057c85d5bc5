//! `genarm eval`: an α sweep (and baselines) over held-out prompts, scored.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use genarm::eval::baselines::{
    baseline_settings, expand_baselines, policy_setting, run_policy, BaselineArg, BaselineSpec,
};
use genarm::eval::charts::{write_kl_chart, write_sweep_charts};
use genarm::eval::prompts::read_lines;
use genarm::eval::run::{alpha_grid, run_sweep, summarise, write_summary, Setting, SweepSpec};
use genarm::eval::scorers::scorer_from_spec;
use genarm::model::arm_plan::plan_policy;
use genarm::model::tokenizer::TextTokenizer;
use genarm::outdir::{refuse_existing, refuse_input_as_output, OutputLock};

use crate::args::{
    alpha, int_in, point, probability, temperature, ModelArgs, MAX_SAMPLES, MAX_TOKENS,
};
use crate::load::{device, load_engine, load_engine_with, progress_bar};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub models: ModelArgs,
    /// Prompts, one per line (held out from training).
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Scorers (repeatable): sentiment, sentiment-afinn, sentiment-once, concise, length, wordlist:FILE.
    #[arg(long = "scorer", required = true)]
    pub scorers: Vec<String>,
    /// α values (finite); every ARM takes each (the full grid), base-only first.
    #[arg(long, value_delimiter = ',', default_value = "0,0.5,1,2", value_parser = alpha)]
    pub alphas: Vec<f32>,
    /// Samples per prompt and setting, 1..=256.
    #[arg(long, default_value_t = 1, value_parser = int_in(1, MAX_SAMPLES))]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use only the first N prompts (≥ 1).
    #[arg(long, value_parser = int_in(1, usize::MAX))]
    pub limit: Option<usize>,
    /// New tokens per response.
    #[arg(long, default_value_t = 32, value_parser = int_in(1, MAX_TOKENS))]
    pub max_new_tokens: usize,
    /// Sampling temperature, > 0.
    #[arg(long, default_value_t = 1.0, value_parser = temperature)]
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = probability)]
    pub top_p: f32,
    /// Wrap prompts in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Wrap each prompt line, `{}` standing for the line.
    #[arg(long, default_value = "{}")]
    pub template: String,
    /// Where the scorers' lexicons are.
    #[arg(long, default_value = "models/data")]
    pub data_dir: PathBuf,
    /// Output directory: samples.jsonl, summary.json, summary.csv, results.md,
    /// reward_vs_alpha.svg, reward_vs_kl.svg (mean score against the KL of each row's
    /// decoding distribution to the base), and with two or more scorers
    /// pareto.json + pareto.svg (the front over the first two, in --scorer order).
    /// Refused when it exists and is not empty, unless --overwrite.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the files of an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
    /// A baseline to compare with (repeatable), on the same prompts, seeds and scorers:
    /// bon-rm:N — best of N base samples by the scalar reward model; bon-arm:N — by the
    /// ARMs' trajectory reward Σ_i α_i·Σ_t log π_arm_i (α from --arm PATH:ALPHA);
    /// bon:N — both that have a model; args:K:W (or args:W, K = 10) — greedy ARGS: each
    /// step the base's top-K tokens, the one maximising log π_base + W·r(x, y_≤t);
    /// dpo:DIR — sampling from base + the policy LoRA in DIR (`train --loss dpo`) with the
    /// base samples' seeds, no guidance. Its rows follow the α sweep's in every output, with their cost in forward passes
    /// and seconds. See docs/evaluation.md.
    #[arg(long = "baseline", value_name = "SPEC")]
    pub baselines: Vec<genarm::eval::baselines::BaselineArg>,
    /// The scalar reward model (a `genarm train --scalar-head` output dir) that ranks
    /// bon-rm and guides ARGS.
    #[arg(long, value_name = "DIR")]
    pub reward_model: Option<PathBuf>,
    /// Hypervolume reference point X,Y for two scorers [default: base-only's mean scores].
    #[arg(long, value_name = "X,Y", value_parser = point, allow_hyphen_values = true)]
    pub hv_ref: Option<(f64, f64)>,
}

// Value parsers: each flag is checked when parsed, and a bad value's message (clap adds
// the flag's name) says the allowed range.

pub fn run(args: EvalArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("--model", &args.models.model),
        ("--prompts", &args.prompts),
    ];
    inputs.extend(args.models.arms.iter().map(|a| ("--arm", a.path.as_path())));
    inputs.extend(args.models.lora.iter().map(|d| ("--lora", d.as_path())));
    let (decoding, policies) = split_baselines(&args.baselines);
    inputs.extend(policies.iter().map(|d| ("--baseline", d.as_path())));
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
        &decoding,
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
    for dir in &policies {
        plan_policy(dir, &args.models.model, &Device::Cpu)?;
    }
    let scorers = args
        .scorers
        .iter()
        .map(|s| scorer_from_spec(s, &args.data_dir))
        .collect::<genarm::Result<Vec<_>>>()?;
    let mut engine = load_engine(&args.models, &args.models.arms)?.engine;
    let facts = engine.facts().clone();
    let tok = facts
        .tokenizer
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
    let eos = facts.stop_ids;
    let _lock = OutputLock::directory(&args.out)?;
    let samples_path = args.out.join("samples.jsonl");
    let mut samples_file = std::io::BufWriter::new(
        std::fs::File::create(&samples_path)
            .with_context(|| format!("creating {}", samples_path.display()))?,
    );
    // The first failed write of a sample (a full disk) ends the command after the sweep.
    let mut write_error: Option<std::io::Error> = None;
    let rows = settings.len() + baselines.len() + policies.len();
    let total = (prompts.len() * rows * args.samples) as u64;
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
                noteln!("{done}/{total} responses")
            }
            None => {}
        }
    };
    let mut records = run_sweep(
        engine.as_mut(),
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
    let n_arms = args.models.arms.len();
    let policy_rows: Vec<Setting> = policies
        .iter()
        .map(|dir| policy_setting(dir, n_arms))
        .collect();
    if !policies.is_empty() {
        // The base the policies' KL is measured against: the sweep's, without ARMs.
        let mut kl_base = load_engine(&args.models, &[])?.engine;
        for (i, (dir, row)) in policies.iter().zip(&policy_rows).enumerate() {
            let mut policy = load_engine_with(&args.models, Some(dir), &[])?.engine;
            let setting = settings.len() + baselines.len() + i;
            records.extend(run_policy(
                policy.as_mut(),
                kl_base.as_mut(),
                &tok,
                &eos,
                &prompts,
                &scorers,
                &spec,
                (setting, row),
                &mut on_sample,
            )?);
        }
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
    all_settings.extend(baseline_settings(&baselines, n_arms));
    all_settings.extend(policy_rows);
    let summary = summarise(&records, &all_settings);
    write_summary(&args.out, &summary)?;
    // The plots are about the α grid; the baselines are in the table.
    let mut scorer_names: Vec<String> = Vec::new();
    for s in &scorers {
        if !scorer_names.iter().any(|n| n == s.name()) {
            scorer_names.push(s.name().to_string());
        }
    }
    let arm_names: Vec<String> = args
        .models
        .arms
        .iter()
        .map(|a| a.path.display().to_string())
        .collect();
    let front = write_sweep_charts(
        &args.out,
        &arm_names,
        &scorer_names,
        &summary[..settings.len()],
        args.hv_ref,
    )?;
    write_kl_chart(&args.out, &arm_names, &scorer_names, &summary)?;
    if let Some(p) = front {
        outln!(
            "Pareto front of {} settings, hypervolume {:.4} over {:?}",
            p.front.len(),
            p.hypervolume,
            p.reference
        );
    }
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
        let kl =
            s.kl.map(|kl| format!(", KL {:.3} ± {:.3}", kl.mean, kl.ci95))
                .unwrap_or_default();
        outln!(
            "{} (α = {:?}): {}{kl}  | {:.1} tokens, {:.2} s/response, {:.1} forward passes/token",
            s.method,
            s.alphas,
            scores.join(", "),
            s.mean_tokens,
            s.seconds_per_response,
            s.forward_passes_per_token
        );
    }
    noteln!("wrote {}", args.out.display());
    Ok(())
}

/// The `--baseline`s that decode on the base, and the policy directories (`dpo:DIR`).
fn split_baselines(args: &[BaselineArg]) -> (Vec<BaselineSpec>, Vec<PathBuf>) {
    let mut decoding = Vec::new();
    let mut policies = Vec::new();
    for a in args {
        match a {
            BaselineArg::Decoding(spec) => decoding.push(*spec),
            BaselineArg::Policy(dir) => {
                if !policies.contains(dir) {
                    policies.push(dir.clone());
                }
            }
        }
    }
    (decoding, policies)
}

/// Loads what the baselines need (the base alone, the scalar reward model, the ARMs as
/// rankers) and runs them after the sweep.
#[allow(clippy::too_many_arguments)]
pub fn run_eval_baselines(
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
    let mut base = load_engine(&args.models, &[])?.engine;
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
        base: base.as_mut(),
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
