//! genarm — GenARM reward-guided generation: a frozen base LLM steered at decoding
//! time by autoregressive reward models (ARMs), on CPU and CUDA (candle) and on GPUs
//! through WebGPU.
//!
//! Data flows one way: weights (`model`) → engine (`cpu` on candle, `gpu` on wgpu) →
//! guide (`guide`) → tokens (`generate`). In the browser, `web` is the wasm-bindgen API
//! that the playground's worker uses.

pub mod bench;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gpu;
pub mod guide;
pub mod model;
pub mod outdir;
#[cfg(not(target_arch = "wasm32"))]
pub mod train;
#[cfg(target_arch = "wasm32")]
pub mod web;

/// The tests' one PRNG (`tests/common/rng.rs`), for the unit and browser tests.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/common/rng.rs"]
mod test_rng;

pub use engine::{ArmSpec, Engine, StepLogProbs};
pub use error::{Error, Result};
pub use generate::{generate, GenerateOptions, Generation, StopReason, TokenEvent};
pub use guide::{Sampler, SamplingParams};
