//! The decoding loop over an `Engine`: prefill, then one guided step per token, with
//! streaming events and the usual stops (EOS, stop strings, max tokens, context).

use web_time::Instant;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::guide::{combine, Sampler, SamplingParams};
use crate::model::tokenizer::{TextTokenizer, TokenOutputStream};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// One weight per ARM, in the engine's ARM order.
    pub alphas: Vec<f32>,
    pub sampling: SamplingParams,
    /// Token ids that end generation (usually the tokenizer's EOS ids).
    pub eos_ids: Vec<u32>,
    /// Keep going past EOS (for benchmarks).
    pub ignore_eos: bool,
    /// Text that ends generation; the text is cut before it.
    pub stop_strings: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            alphas: Vec::new(),
            sampling: SamplingParams::default(),
            eos_ids: Vec::new(),
            ignore_eos: false,
            stop_strings: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

/// One generated token, as it is streamed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TokenEvent {
    pub id: u32,
    /// Newly complete text (empty while a multi-byte character is still split).
    pub text: String,
    /// `log π_base(id)`.
    pub base_logprob: f32,
    /// `log π_arm_i(id)` per ARM: times α_i, the token's reward under that ARM.
    pub arm_logprobs: Vec<f32>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// The decoded continuation; `None` without a tokenizer.
    pub text: Option<String>,
    pub prompt_tokens: usize,
    pub stop: StopReason,
    pub prefill_seconds: f64,
    /// Time of all decode steps after the first token (prefill excluded).
    pub decode_seconds: f64,
}

impl Generation {
    /// Decode speed: tokens after the first over the time they took.
    pub fn tokens_per_second(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 || self.decode_seconds <= 0.0 {
            0.0
        } else {
            n as f64 / self.decode_seconds
        }
    }
}

/// Generates a continuation of `prompt`. `on_token` sees each token as it is chosen
/// and returns `false` to stop.
pub fn generate(
    engine: &mut dyn Engine,
    tokenizer: Option<&TextTokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent) -> bool,
) -> Result<Generation> {
    let n_arms = engine.arm_labels().len();
    if opts.alphas.len() != n_arms {
        return Err(Error::Request(format!(
            "{} ARM weights given for {n_arms} ARMs",
            opts.alphas.len()
        )));
    }
    opts.sampling.validate().map_err(Error::Request)?;
    if prompt.is_empty() {
        return Err(Error::Request("the prompt is empty".into()));
    }
    let context = engine.context_len();
    if prompt.len() >= context {
        return Err(Error::Request(format!(
            "the prompt has {} tokens but the context holds {context} (prompt plus at least one new token)",
            prompt.len()
        )));
    }

    engine.reset();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stream = tokenizer.map(|t| TokenOutputStream::new(t.clone()));
    let mut text = String::new();
    let mut tokens = Vec::new();
    let started = Instant::now();
    let mut first_token_at = None;
    let mut feed: Vec<u32> = prompt.to_vec();
    let stop = loop {
        if tokens.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if engine.position() + feed.len() > context {
            break StopReason::ContextFull;
        }
        let lp = engine.step(&feed)?;
        let arm_rows: Vec<&[f32]> = lp.arms.iter().map(Vec::as_slice).collect();
        let scores = combine(&lp.base, &arm_rows, &opts.alphas);
        if scores.iter().all(|s| !s.is_finite()) {
            return Err(Error::Request(
                "the guided scores are not finite (NaN or infinite logits)".into(),
            ));
        }
        let id = sampler.sample(&scores);
        if first_token_at.is_none() {
            first_token_at = Some(Instant::now());
        }
        tokens.push(id);
        let is_eos = !opts.ignore_eos && opts.eos_ids.contains(&id);
        let piece = match stream.as_mut() {
            Some(s) if !is_eos => s.next_token(id)?.unwrap_or_default(),
            _ => String::new(),
        };
        text.push_str(&piece);
        let event = TokenEvent {
            id,
            text: piece,
            base_logprob: lp.base[id as usize],
            arm_logprobs: lp.arms.iter().map(|a| a[id as usize]).collect(),
        };
        let keep_going = on_token(&event);
        if is_eos {
            break StopReason::Eos;
        }
        if let Some(cut) = find_stop(&text, &opts.stop_strings) {
            text.truncate(cut);
            break StopReason::StopString;
        }
        if !keep_going {
            break StopReason::Cancelled;
        }
        feed = vec![id];
    };
    let finished = Instant::now();
    if let Some(s) = stream.as_mut() {
        if stop != StopReason::StopString {
            if let Some(rest) = s.flush()? {
                text.push_str(&rest);
            }
        }
    }
    let first = first_token_at.unwrap_or(finished);
    Ok(Generation {
        text: tokenizer.map(|_| text),
        prompt_tokens: prompt.len(),
        stop,
        prefill_seconds: (first - started).as_secs_f64(),
        decode_seconds: (finished - first).as_secs_f64(),
        tokens,
    })
}

/// The byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}
