//! `genarm generate`: one guided completion, streamed.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use genarm::model::BaseFacts;
use genarm::{ArmSpec, GenerateOptions, SamplingParams};

use crate::args::{ModelArgs, PromptArgs, SamplingArgs};
use crate::load::load_engine;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// A system turn for --chat.
    #[arg(long, value_name = "TEXT", requires = "chat")]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut engine = load_engine(&args.models, &args.models.arms)?.engine;
    let facts = engine.facts().clone();
    let prompt = prompt_ids(&facts, &args)?;
    let opts = sampling_options(&args.sampling, &facts, &args.models.arms);
    let tokenizer = facts.tokenizer;
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let gen = genarm::generate(
        engine.as_mut(),
        tokenizer.as_ref(),
        &prompt,
        &opts,
        &mut |ev| {
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
        },
    )?;
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
        noteln!(
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

fn prompt_ids(facts: &BaseFacts, args: &GenerateArgs) -> Result<Vec<u32>> {
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
    let tok = facts
        .tokenizer
        .as_ref()
        .with_context(|| match &facts.tokenizer_note {
            Some(note) => format!("{note}; give the prompt as --prompt-tokens"),
            None => format!(
                "{} has no tokenizer: give the prompt as --prompt-tokens",
                args.models.model.display()
            ),
        })?;
    Ok(tok.encode_prompt(&text, args.chat, args.system.as_deref())?)
}

fn sampling_options(s: &SamplingArgs, facts: &BaseFacts, arms: &[ArmSpec]) -> GenerateOptions {
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
        eos_ids: facts.stop_ids.clone(),
        ignore_eos: s.ignore_eos,
        stop_strings: s.stop.clone(),
    }
}
