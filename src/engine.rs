//! What every engine (candle on CPU/CUDA, wgpu) offers the decoding loop: feed tokens,
//! get the base's and each ARM's next-token log-probabilities over the base vocabulary.

use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::guide::{combine, Sampler, SamplingParams};
use crate::model::BaseFacts;

/// The default KV-cache length when the caller does not choose one.
pub const DEFAULT_CONTEXT: usize = 2048;

/// An ARM on the command line: `PATH[:ALPHA]` (alpha defaults to 1).
#[derive(Clone, Debug, PartialEq)]
pub struct ArmSpec {
    pub path: PathBuf,
    pub alpha: f32,
}

impl FromStr for ArmSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        // The alpha is whatever follows the last ':' if it parses as a number, so paths
        // with colons still work when no alpha is given.
        if let Some((path, alpha)) = s.rsplit_once(':') {
            if let Ok(alpha) = alpha.parse::<f32>() {
                if !alpha.is_finite() {
                    return Err(format!("ARM weight must be finite, got {alpha}"));
                }
                return Ok(Self {
                    path: path.into(),
                    alpha,
                });
            }
        }
        if s.is_empty() {
            return Err("empty ARM path".into());
        }
        Ok(Self {
            path: s.into(),
            alpha: 1.0,
        })
    }
}

/// Next-token log-probabilities at the last fed position.
#[derive(Clone, Debug)]
pub struct StepLogProbs {
    pub base: Vec<f32>,
    /// One per ARM, cut to the base vocabulary.
    pub arms: Vec<Vec<f32>>,
}

/// The token a guided step chose, with its log-probability under the base and under
/// each ARM (times α_i, the ARM's token-level reward).
#[derive(Clone, Debug, PartialEq)]
pub struct Chosen {
    pub id: u32,
    pub base_logprob: f32,
    pub arm_logprobs: Vec<f32>,
}

/// The input contract every engine's entry points check before any work, so that a
/// rule holds on every backend alike: at least one token, every id inside the base
/// vocabulary, and room for them in the context after `position` tokens.
pub fn check_feed(tokens: &[u32], vocab: usize, position: usize, context: usize) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::Request("no tokens to feed".into()));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Request(format!(
            "token id {bad} is outside the vocabulary of {vocab} tokens"
        )));
    }
    if position.saturating_add(tokens.len()) > context {
        return Err(Error::Request(format!(
            "{} tokens after {position} do not fit the context of {context} tokens",
            tokens.len()
        )));
    }
    Ok(())
}

/// The rewind contract: only to a position already fed.
pub fn check_rewind(position: usize, fed: usize) -> Result<()> {
    if position > fed {
        return Err(Error::Request(format!(
            "cannot rewind to position {position}: only {fed} tokens were fed"
        )));
    }
    Ok(())
}

/// The guidance contract: one finite weight per ARM and valid sampling settings.
pub fn check_guidance(alphas: &[f32], arms: usize, sampling: &SamplingParams) -> Result<()> {
    check_alphas(alphas, arms)?;
    sampling.validate().map_err(Error::Request)
}

/// One finite weight per ARM.
pub fn check_alphas(alphas: &[f32], arms: usize) -> Result<()> {
    if alphas.len() != arms {
        return Err(Error::Request(format!(
            "{} ARM weights given for {arms} ARMs",
            alphas.len()
        )));
    }
    if let Some((i, a)) = alphas.iter().enumerate().find(|(_, a)| !a.is_finite()) {
        return Err(Error::Request(format!(
            "the weight of ARM {} is {a}; weights must be finite",
            i + 1
        )));
    }
    Ok(())
}

pub trait Engine {
    /// Which backend runs the models, for humans ("cpu", "cuda:0", "webgpu (…)").
    fn backend(&self) -> String;
    /// The base's tokenizer, its note and stop ids.
    fn facts(&self) -> &BaseFacts;
    /// The base vocabulary, which is also the guided one.
    fn vocab_size(&self) -> usize;
    /// A label per ARM (its `genarm.json` name or its file name).
    fn arm_labels(&self) -> Vec<String>;
    /// The longest sequence the engine can hold (prompt + generated).
    fn context_len(&self) -> usize;
    /// Tokens fed since the last reset.
    fn position(&self) -> usize;
    /// Starts a new sequence.
    fn reset(&mut self);
    /// Forgets the tokens from `position` on and keeps those before it (their caches),
    /// so that another continuation of the same prefix need not read it again.
    /// Refused past the tokens fed.
    fn rewind(&mut self, position: usize) -> Result<()>;
    /// Feeds tokens after the ones already seen; returns log-probs at the last one.
    fn step(&mut self, tokens: &[u32]) -> Result<StepLogProbs>;
    /// Feeds tokens without reading any log-prob back (a chunk of a prompt whose
    /// next-token distribution nobody asks for). An engine whose `step` reads rows off
    /// its device overrides this to skip that.
    fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        self.step(tokens).map(drop)
    }
    /// Log-probs at every position of `tokens` from a fresh sequence, for the base
    /// (index 0) and each ARM: `[model][position][vocab]`.
    fn teacher_forced(&mut self, tokens: &[u32]) -> Result<Vec<Vec<Vec<f32>>>>;

    /// One GenARM step: feeds `tokens` and picks the next token from
    /// `base + Σ α_i · arm_i` with `sampler`. This default reads every log-prob row to
    /// the host; an engine that can pick on its device overrides it and reads back only
    /// the choice.
    fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen> {
        check_guidance(alphas, self.arm_labels().len(), sampler.params())?;
        let lp = self.step(tokens)?;
        pick_on_host(&lp, alphas, sampler)
    }
}

/// The two calls the decoding loop makes on an engine, awaitable: in the browser the
/// WebGPU engine must await its device (a page cannot block on a readback), while
/// every [`Engine`] takes part through [`Ready`], whose futures are done when first
/// polled. So [`crate::generate::Decoder`] has one loop for native and browser.
// The loop runs on one thread (the page's, or a blocked caller's): no `Send` bound.
#[allow(async_fn_in_trait)]
pub trait AsyncEngine {
    /// The engine's non-blocking facts: position, context, ARMs.
    fn engine(&self) -> &dyn Engine;
    /// [`Engine::feed`].
    async fn feed(&mut self, tokens: &[u32]) -> Result<()>;
    /// [`Engine::guided_step`].
    async fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen>;
}

/// A synchronous engine seen through [`AsyncEngine`].
pub struct Ready<'a>(pub &'a mut dyn Engine);

impl AsyncEngine for Ready<'_> {
    fn engine(&self) -> &dyn Engine {
        &*self.0
    }

    async fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        self.0.feed(tokens)
    }

    async fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen> {
        self.0.guided_step(tokens, alphas, sampler)
    }
}

/// The output of a future that awaits only [`Ready`] calls: it is done on its first
/// poll, so no executor is needed.
pub fn resolve_ready<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => Err(Error::Request(
            "internal: a synchronous engine step did not complete".into(),
        )),
    }
}

/// The guided pick from log-prob rows on the host (see `Engine::guided_step`).
pub fn pick_on_host(lp: &StepLogProbs, alphas: &[f32], sampler: &mut Sampler) -> Result<Chosen> {
    let arm_rows: Vec<&[f32]> = lp.arms.iter().map(Vec::as_slice).collect();
    let scores = combine(&lp.base, &arm_rows, alphas);
    if scores.iter().all(|s| !s.is_finite()) {
        return Err(Error::Request(
            "the guided scores are not finite (NaN or infinite logits)".into(),
        ));
    }
    let id = sampler.sample(&scores);
    Ok(Chosen {
        id,
        base_logprob: lp.base[id as usize],
        arm_logprobs: lp.arms.iter().map(|a| a[id as usize]).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::ArmSpec;

    #[test]
    fn parses_arm_specs() {
        let a: ArmSpec = "arms/positive:0.5".parse().unwrap();
        assert_eq!(a.path.to_str(), Some("arms/positive"));
        assert_eq!(a.alpha, 0.5);
        let b: ArmSpec = "c:/x/y".parse().unwrap();
        assert_eq!(b.alpha, 1.0);
        assert_eq!(b.path.to_str(), Some("c:/x/y"));
        let c: ArmSpec = "m.gguf:-1".parse().unwrap();
        assert_eq!(c.alpha, -1.0);
    }
}
