//! The normalised runtime config the engines use, with no `Option`s left to interpret.
//! It is read from an HF `config.json` (`hf_config`) or GGUF metadata (`gguf`); every
//! field here changes the math, and each reader refuses what it cannot map onto one.

use std::path::Path;

use crate::error::{Error, Result};

/// The architectures this crate runs. All are the Llama block (RMSNorm, RoPE,
/// grouped-query attention, a gated MLP); they differ in details carried by the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" | "smollm" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// Llama 3.1's frequency-dependent RoPE rescaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// How the rotary frequencies are rescaled. Every kind genarm implements only changes
/// the per-dimension inverse frequencies, so the engines read `rope_inv_freq` and know
/// nothing of the kinds.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// HF `"linear"`: every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// HF `"llama3"` (Llama 3.1+).
    Llama3(Llama3RopeScaling),
    /// llama.cpp's `rope_freqs.weight`: frequency `i` divided by `factors[i]` (how its
    /// converter stores Llama 3.1's scaling).
    FreqFactors(Vec<f64>),
}

/// The MLP's gate activation (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (`silu`, `swish`).
    Silu,
    /// The exact GELU, `x·Φ(x)` (`gelu`).
    Gelu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    /// The activation in f64, the reference the kernels are tested against.
    pub fn apply_f64(self, x: f64) -> f64 {
        match self {
            Self::Silu => x / (1.0 + (-x).exp()),
            Self::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            Self::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
        }
    }
}

/// The error function (Abramowitz–Stegun 7.1.26 is too coarse for a reference; this is
/// the series/continued-fraction pair, accurate to ~1e-15).
fn erf(x: f64) -> f64 {
    if x < 0.0 {
        return -erf(-x);
    }
    if x < 2.5 {
        // Maclaurin series: erf x = 2/√π Σ (−1)ⁿ x^(2n+1) / (n! (2n+1)).
        let mut term = x;
        let mut sum = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc by its continued fraction (Lentz), converging fast for x ≥ 2.5.
        let tiny = 1e-300;
        let mut f = x;
        let mut c = x;
        let mut d = 0.0;
        for k in 1..200 {
            let a = k as f64 / 2.0;
            d = x + a * d;
            d = if d.abs() < tiny { tiny } else { d };
            c = x + a / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-x * x).exp() / (f * std::f64::consts::PI.sqrt())
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// HF's `rotate_half`: dimension `i` pairs with `i + head_dim/2`.
    HalfSplit,
    /// Adjacent pairs `(2i, 2i+1)`. llama.cpp's "llama" GGUFs store the Q/K rows permuted
    /// so that this layout gives the same result as HF's half-split on the original rows.
    Interleaved,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_layout: RopeLayout,
    pub rms_norm_eps: f64,
    /// The longest sequence (prompt + generated) the model supports.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on o_proj (Llama's `attention_bias`; never Qwen2).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub hidden_act: Activation,
    /// Per layer: `Some(w)` when the layer attends only to the last `w` positions
    /// (the query's own included), as transformers' sliding-window mask does.
    /// Empty means every layer attends to the whole sequence.
    pub sliding_windows: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// The window of layer `layer`, if it slides.
    pub fn sliding_window(&self, layer: usize) -> Option<usize> {
        self.sliding_windows.get(layer).copied().flatten()
    }

    /// Per-dimension inverse frequencies of the rotary embedding, scaled.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let freq = 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64);
                match &self.rope_scaling {
                    None => freq,
                    Some(RopeScaling::Linear { factor }) => freq / factor,
                    Some(RopeScaling::Llama3(s)) => llama3_scale(freq, s),
                    Some(RopeScaling::FreqFactors(f)) => freq / f[i],
                }
            })
            .collect()
    }

    /// The HF `config.json` of this model with its weights in HF's row order: the RoPE
    /// layout is always HF's half-split (a GGUF's interleaved Q/K rows must have been
    /// un-permuted), and `tie_word_embeddings` is given because the writer decides
    /// whether it saves an `lm_head`. `torch_dtype` names the saved weights' dtype.
    /// Written in transformers 4's layout (`rope_theta`, `rope_scaling`), which
    /// transformers 5 still reads. `path` names the model in the error for what
    /// config.json cannot say (llama.cpp's `rope_freqs` factors).
    pub fn to_hf_json(
        &self,
        tie_word_embeddings: bool,
        torch_dtype: &str,
        path: &Path,
    ) -> Result<serde_json::Value> {
        let (model_type, architecture) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Mistral => ("mistral", "MistralForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        let rope_scaling = match &self.rope_scaling {
            None => serde_json::Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3(s)) => serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
            Some(RopeScaling::FreqFactors(_)) => {
                return Err(Error::unsupported(
                    path,
                    "writing a config.json for a model whose RoPE is scaled by a GGUF \
                     `rope_freqs` tensor (transformers has no field for it)",
                ))
            }
        };
        let mut json = serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "hidden_act": self.hidden_act.hf_name(),
            "torch_dtype": torch_dtype,
        });
        let window = self.sliding_windows.iter().flatten().next().copied();
        match self.arch {
            Arch::Llama => {
                json["attention_bias"] = self.o_bias.into();
                json["mlp_bias"] = self.mlp_bias.into();
            }
            Arch::Mistral => json["sliding_window"] = window.into(),
            Arch::Qwen2 => {
                json["use_sliding_window"] = window.is_some().into();
                json["sliding_window"] = window.into();
                json["max_window_layers"] = self.num_layers.into();
                json["layer_types"] = (0..self.num_layers)
                    .map(|l| match self.sliding_window(l) {
                        Some(_) => "sliding_attention",
                        None => "full_attention",
                    })
                    .collect::<Vec<_>>()
                    .into();
            }
        }
        Ok(json)
    }

    /// Checks what the engines rely on: positive sizes, heads that group, an even head
    /// dimension, finite positive RoPE and norm constants, per-layer lists as long as
    /// the model.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let check = |ok: bool, field: &str, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(Error::field(path, field, msg))
            }
        };
        check(self.vocab_size > 0, "vocab_size", "must be > 0".into())?;
        check(self.hidden_size > 0, "hidden_size", "must be > 0".into())?;
        check(
            self.intermediate_size > 0,
            "intermediate_size",
            "must be > 0".into(),
        )?;
        check(
            self.num_layers > 0,
            "num_hidden_layers",
            "must be > 0".into(),
        )?;
        check(
            self.num_heads > 0
                && self.num_kv_heads > 0
                && self.num_heads.is_multiple_of(self.num_kv_heads),
            "num_key_value_heads",
            format!(
                "{} attention heads cannot be grouped over {} key/value heads",
                self.num_heads, self.num_kv_heads
            ),
        )?;
        check(
            self.head_dim > 0 && self.head_dim.is_multiple_of(2),
            "head_dim",
            format!("{} must be even and > 0", self.head_dim),
        )?;
        check(
            self.max_position_embeddings > 0,
            "max_position_embeddings",
            "must be > 0".into(),
        )?;
        check(
            self.rope_theta.is_finite() && self.rope_theta > 0.0,
            "rope_theta",
            format!("{} must be a finite number > 0", self.rope_theta),
        )?;
        check(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0,
            "rms_norm_eps",
            format!("{} must be a finite number ≥ 0", self.rms_norm_eps),
        )?;
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => check(
                factor.is_finite() && *factor > 0.0,
                "rope_scaling.factor",
                format!("{factor} must be a finite number > 0"),
            )?,
            Some(RopeScaling::Llama3(s)) => {
                check(
                    s.factor.is_finite() && s.factor > 0.0,
                    "rope_scaling.factor",
                    format!("{} must be a finite number > 0", s.factor),
                )?;
                check(
                    s.low_freq_factor.is_finite()
                        && s.high_freq_factor.is_finite()
                        && s.low_freq_factor > 0.0
                        && s.high_freq_factor > s.low_freq_factor,
                    "rope_scaling.high_freq_factor",
                    format!(
                        "low_freq_factor {} and high_freq_factor {} must be finite with 0 < low < high",
                        s.low_freq_factor, s.high_freq_factor
                    ),
                )?;
                check(
                    s.original_max_position_embeddings > 0,
                    "rope_scaling.original_max_position_embeddings",
                    "must be > 0".into(),
                )?;
            }
            Some(RopeScaling::FreqFactors(f)) => check(
                f.len() == self.head_dim / 2 && f.iter().all(|x| x.is_finite() && *x > 0.0),
                "rope_freqs.weight",
                format!(
                    "needs {} finite factors > 0 (one per rotary frequency), has {}",
                    self.head_dim / 2,
                    f.len()
                ),
            )?,
        }
        check(
            self.sliding_windows.is_empty() || self.sliding_windows.len() == self.num_layers,
            "layer_types",
            format!(
                "{} entries for {} layers",
                self.sliding_windows.len(),
                self.num_layers
            ),
        )?;
        check(
            self.sliding_windows.iter().flatten().all(|&w| w > 0),
            "sliding_window",
            "must be > 0".into(),
        )?;
        Ok(())
    }
}

fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings as f64 / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // erf(0.5), erf(1), erf(2), erf(3) to 15 digits.
        for (x, want) in [
            (0.5, 0.520_499_877_813_047),
            (1.0, 0.842_700_792_949_715),
            (2.0, 0.995_322_265_018_953),
            (3.0, 0.999_977_909_503_001),
        ] {
            assert!((erf(x) - want).abs() < 1e-14, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-14);
        }
    }
}
