//! Model configuration in two steps: `HfConfig` mirrors an HF `config.json` (optional
//! fields, "one id or a list" for EOS); `LlamaConfig` is the normalised runtime config
//! the engines use, with no `Option`s left to interpret.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The architectures this crate runs. All are the Llama block (RMSNorm, RoPE,
/// grouped-query attention, SwiGLU); they differ in details carried by the config.
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
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rope_layout: RopeLayout,
    pub rms_norm_eps: f64,
    /// The longest sequence (prompt + generated) the model supports.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 has biases on q/k/v projections.
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Per-dimension inverse frequencies of the rotary embedding, with Llama 3.1 scaling.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let freq = 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64);
                match &self.rope_scaling {
                    None => freq,
                    Some(s) => llama3_scale(freq, s),
                }
            })
            .collect()
    }

    /// The HF `config.json` of this model with its weights in HF's row order: the RoPE
    /// layout is always HF's half-split (a GGUF's interleaved Q/K rows must have been
    /// un-permuted), and `tie_word_embeddings` is given because the writer decides
    /// whether it saves an `lm_head`. `torch_dtype` names the saved weights' dtype.
    pub fn to_hf_json(&self, tie_word_embeddings: bool, torch_dtype: &str) -> serde_json::Value {
        let (model_type, architecture) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Mistral => ("mistral", "MistralForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        let rope_scaling = self.rope_scaling.as_ref().map(|s| {
            serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            })
        });
        serde_json::json!({
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
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "hidden_act": "silu",
            "torch_dtype": torch_dtype,
        })
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let check = |ok: bool, field: &str, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(Error::field(path, field, msg))
            }
        };
        check(self.vocab_size > 0, "vocab_size", "must be > 0".into())?;
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

/// `eos_token_id` is one id in some configs and a list in others.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![id],
            Self::Many(ids) => ids,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// The fields of an HF `config.json` that the Llama family uses.
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<OneOrMany>,
}

impl HfConfig {
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, format!("invalid config.json: {e}")))
    }

    pub fn into_runtime(self, path: &Path) -> Result<LlamaConfig> {
        let model_type = self.model_type.clone().unwrap_or_else(|| "llama".into());
        let arch = Arch::parse(&model_type)
            .ok_or_else(|| Error::unsupported(path, format!("model_type `{model_type}`")))?;
        let rope_scaling = match self.rope_scaling {
            Some(s) if s.rope_type.as_deref() == Some("llama3") => Some(Llama3RopeScaling {
                factor: s.factor.unwrap_or(8.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: s
                    .original_max_position_embeddings
                    .unwrap_or(8192),
            }),
            Some(s) if matches!(s.rope_type.as_deref(), None | Some("default")) => None,
            Some(s) => {
                return Err(Error::unsupported(
                    path,
                    format!("rope_scaling type {:?}", s.rope_type),
                ))
            }
            None => None,
        };
        let cfg = LlamaConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rope_theta: self.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_layout: RopeLayout::HalfSplit,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: self.attention_bias.unwrap_or(arch == Arch::Qwen2),
            bos_token_id: self.bos_token_id,
            eos_token_ids: self
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(json: &serde_json::Value) -> LlamaConfig {
        let path = Path::new("config.json");
        let bytes = serde_json::to_vec(json).unwrap();
        HfConfig::from_json(&bytes, path)
            .unwrap()
            .into_runtime(path)
            .unwrap()
    }

    #[test]
    fn hf_json_round_trips() {
        let cfg = runtime(&serde_json::json!({
            "model_type": "qwen2", "vocab_size": 61, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_theta": 5e5, "rms_norm_eps": 1e-5,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0},
            "max_position_embeddings": 96, "tie_word_embeddings": true,
            "bos_token_id": 0, "eos_token_id": [1, 2],
        }));
        assert!(cfg.attention_bias && cfg.rope_scaling.is_some());
        assert_eq!(runtime(&cfg.to_hf_json(true, "float32")), cfg);
        let untied = runtime(&cfg.to_hf_json(false, "bfloat16"));
        assert!(!untied.tie_word_embeddings);
    }
}
