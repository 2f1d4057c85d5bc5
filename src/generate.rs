//! The decoding loop over an `Engine`: prefill, then one guided step per token, with
//! streaming events and the usual stops (EOS, stop strings, max tokens, context).

use web_time::Instant;

use crate::engine::{check_alphas, resolve_ready, AsyncEngine, Chosen, Engine, Ready};
use crate::error::{Error, Result};
use crate::guide::{Sampler, SamplingParams};
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
    let mut decoder = Decoder::new(engine, tokenizer, prompt, opts.clone())?;
    while let Some(event) = decoder.next(engine)? {
        if !on_token(&event) {
            decoder.cancel();
        }
    }
    decoder.finish()
}

/// How much of the prompt is in the engine (see [`Decoder::prefill`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PromptProgress {
    /// Prompt tokens in the engine.
    pub fed: usize,
    pub total: usize,
    /// Nothing more to feed ahead (or the run stopped): the next step picks a token.
    pub done: bool,
}

/// The decoding loop one token at a time, for callers that must return to their
/// event loop between tokens (the browser worker): weights and sampling settings may
/// change between calls to [`Decoder::next`] — the sliders move while text streams.
/// [`Decoder::next_async`] is the loop itself; `next` runs it on a synchronous engine.
pub struct Decoder {
    opts: GenerateOptions,
    sampler: Sampler,
    stream: Option<TokenOutputStream>,
    has_tokenizer: bool,
    text: String,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    /// What the next step feeds: the prompt first, then the last chosen token.
    feed: Vec<u32>,
    /// How many of `feed` are already in the engine (prompt chunks fed ahead).
    fed_ahead: usize,
    stop: Option<StopReason>,
    started: Instant,
    first_token_at: Option<Instant>,
    finished_at: Option<Instant>,
}

impl Decoder {
    /// Checks the request and resets `engine` for a new sequence.
    pub fn new(
        engine: &mut dyn Engine,
        tokenizer: Option<&TextTokenizer>,
        prompt: &[u32],
        opts: GenerateOptions,
    ) -> Result<Self> {
        Self::after_prefix(engine, tokenizer, prompt, opts, 0)
    }

    /// [`Decoder::new`] for an engine that already holds the first `held` tokens of
    /// `prompt` (a second run on the same prompt, e.g. the page's base-only column
    /// after its guided one): the engine is rewound to them instead of reset, and only
    /// the rest of the prompt is read. `held` is clamped to what the engine has fed and
    /// to all but the prompt's last token (the first pick reads its log-probs); the
    /// caller vouches that those tokens are the prompt's.
    pub fn after_prefix(
        engine: &mut dyn Engine,
        tokenizer: Option<&TextTokenizer>,
        prompt: &[u32],
        opts: GenerateOptions,
        held: usize,
    ) -> Result<Self> {
        check_alphas(&opts.alphas, engine.arm_labels().len())?;
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
        // Rewinding to 0 is a reset.
        let held = held.min(prompt.len() - 1).min(engine.position());
        engine.rewind(held)?;
        Ok(Self {
            sampler: Sampler::new(opts.sampling.clone()),
            opts,
            stream: tokenizer.map(|t| TokenOutputStream::new(t.clone())),
            has_tokenizer: tokenizer.is_some(),
            text: String::new(),
            tokens: Vec::new(),
            prompt_tokens: prompt.len(),
            feed: prompt.to_vec(),
            fed_ahead: held,
            stop: None,
            started: Instant::now(),
            first_token_at: None,
            finished_at: None,
        })
    }

    /// New ARM weights, from the next token on.
    pub fn set_alphas(&mut self, engine: &dyn Engine, alphas: Vec<f32>) -> Result<()> {
        check_alphas(&alphas, engine.arm_labels().len())?;
        self.opts.alphas = alphas;
        Ok(())
    }

    /// New temperature / top-k / top-p / greedy, from the next token on. The draw
    /// counter carries on, so a run stays reproducible from its seed and its changes.
    pub fn set_sampling(&mut self, sampling: crate::guide::SamplingParams) -> Result<()> {
        sampling.validate().map_err(Error::Request)?;
        self.sampler.set_params(sampling.clone());
        self.opts.sampling = sampling;
        Ok(())
    }

    pub fn alphas(&self) -> &[f32] {
        &self.opts.alphas
    }

    /// Why decoding stopped, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// The text so far (cut before a stop string once one is found).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Ends decoding after the token already returned.
    pub fn cancel(&mut self) {
        self.end(StopReason::Cancelled);
    }

    fn end(&mut self, reason: StopReason) {
        if self.stop.is_none() {
            self.stop = Some(reason);
            self.finished_at = Some(Instant::now());
        }
    }

    /// Chooses and returns the next token, or `None` once decoding has stopped.
    pub fn next(&mut self, engine: &mut dyn Engine) -> Result<Option<TokenEvent>> {
        resolve_ready(self.next_async(&mut Ready(engine)))
    }

    /// [`Decoder::next`] on an engine that may await its device: feeds what is left of
    /// the prompt (or the last chosen token) and picks the next token.
    pub async fn next_async<E: AsyncEngine + ?Sized>(
        &mut self,
        engine: &mut E,
    ) -> Result<Option<TokenEvent>> {
        if !self.due(engine.engine()) {
            return Ok(None);
        }
        let feed = &self.feed[self.fed_ahead..];
        let chosen = engine
            .guided_step(feed, &self.opts.alphas, &mut self.sampler)
            .await?;
        self.accept(chosen).map(Some)
    }

    /// Feeds up to `max_tokens` more of the prompt ahead of the first pick, so that a
    /// caller can report progress and hear Stop while a long prompt goes in. The last
    /// prompt token is left for the first [`Decoder::next`], which picks from its
    /// log-probs. Optional: without it the first `next` feeds the whole prompt.
    pub fn prefill(
        &mut self,
        engine: &mut dyn Engine,
        max_tokens: usize,
    ) -> Result<PromptProgress> {
        resolve_ready(self.prefill_async(&mut Ready(engine), max_tokens))
    }

    /// [`Decoder::prefill`] on an engine that may await its device.
    pub async fn prefill_async<E: AsyncEngine + ?Sized>(
        &mut self,
        engine: &mut E,
        max_tokens: usize,
    ) -> Result<PromptProgress> {
        let total = self.prompt_tokens;
        if self.tokens.is_empty() && self.due(engine.engine()) && self.fed_ahead + 1 < total {
            let end = (self.fed_ahead + max_tokens.max(1)).min(total - 1);
            engine.feed(&self.feed[self.fed_ahead..end]).await?;
            self.fed_ahead = end;
        }
        Ok(self.prompt_progress())
    }

    /// How much of the prompt is in the engine.
    pub fn prompt_progress(&self) -> PromptProgress {
        let total = self.prompt_tokens;
        let fed = if self.tokens.is_empty() {
            self.fed_ahead
        } else {
            total
        };
        PromptProgress {
            fed,
            total,
            done: self.stop.is_some() || fed + 1 >= total,
        }
    }

    /// Whether another token is due; records the stop (max tokens, full context) when
    /// not.
    fn due(&mut self, engine: &dyn Engine) -> bool {
        if self.stop.is_some() {
            return false;
        }
        if self.tokens.len() >= self.opts.max_new_tokens {
            self.end(StopReason::MaxTokens);
            return false;
        }
        let to_feed = self.feed.len() - self.fed_ahead;
        if engine.position() + to_feed > engine.context_len() {
            self.end(StopReason::ContextFull);
            return false;
        }
        true
    }

    /// Takes the token a step chose: streams its text and checks the stops.
    fn accept(&mut self, chosen: Chosen) -> Result<TokenEvent> {
        let id = chosen.id;
        self.first_token_at.get_or_insert_with(Instant::now);
        self.tokens.push(id);
        let is_eos = !self.opts.ignore_eos && self.opts.eos_ids.contains(&id);
        let piece = match self.stream.as_mut() {
            Some(s) if !is_eos => s.next_token(id)?.unwrap_or_default(),
            _ => String::new(),
        };
        self.text.push_str(&piece);
        if is_eos {
            self.end(StopReason::Eos);
        } else if let Some(cut) = find_stop(&self.text, &self.opts.stop_strings) {
            self.text.truncate(cut);
            self.end(StopReason::StopString);
        }
        self.feed = vec![id];
        self.fed_ahead = 0;
        Ok(TokenEvent {
            id,
            text: piece,
            base_logprob: chosen.base_logprob,
            arm_logprobs: chosen.arm_logprobs,
        })
    }

    /// The result; call after [`Decoder::next`] returned `None` (or to stop early).
    pub fn finish(mut self) -> Result<Generation> {
        self.end(StopReason::Cancelled);
        if let Some(s) = self.stream.as_mut() {
            if self.stop != Some(StopReason::StopString) {
                if let Some(rest) = s.flush()? {
                    self.text.push_str(&rest);
                }
            }
        }
        let finished = self.finished_at.unwrap_or_else(Instant::now);
        let first = self.first_token_at.unwrap_or(finished);
        Ok(Generation {
            text: self.has_tokenizer.then_some(self.text),
            prompt_tokens: self.prompt_tokens,
            stop: self.stop.unwrap_or(StopReason::Cancelled),
            prefill_seconds: (first - self.started).as_secs_f64(),
            decode_seconds: (finished - first).as_secs_f64(),
            tokens: self.tokens,
        })
    }
}

/// The byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}
