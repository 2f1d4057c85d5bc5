//! HF `config.json` → `LlamaConfig`, by allow-list: every key is either read, known not
//! to change the logits (bookkeeping, generation defaults), or refused by name. A field
//! genarm does not know may change the math, so it is never silently skipped.
//!
//! RoPE settings come in two layouts: transformers 4 writes `rope_theta` and
//! `rope_scaling` at the top level, transformers 5 writes `rope_parameters`
//! (`{"rope_type", "rope_theta", "factor", …}`). Both are read; if both give a value
//! they must agree.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::config::{Activation, Arch, Llama3RopeScaling, LlamaConfig, RopeLayout, RopeScaling};
use crate::error::{Error, Result};

/// Keys that never change a causal LM's logits: provenance, bookkeeping, training-only
/// settings and generation defaults (genarm takes sampling settings from its caller).
const INERT_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "pretraining_tp",
    "is_llama_config",
    "transformers.js_config",
    "auto_map",
    "tokenizer_class",
    "name_or_path",
    "model_name",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "tie_encoder_decoder",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "chunk_size_feed_forward",
    "finetuning_task",
    "id2label",
    "label2id",
    "problem_type",
    "task_specific_params",
    "prefix",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// Keys read into `LlamaConfig` for every architecture.
const COMMON_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "bos_token_id",
    "eos_token_id",
];

/// Keys read only for some architectures (elsewhere they are refused).
fn arch_keys(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Llama => &["attention_bias", "mlp_bias", "rope_interleaved"],
        Arch::Mistral => &["sliding_window"],
        Arch::Qwen2 => &[
            "attention_bias",
            "sliding_window",
            "use_sliding_window",
            "max_window_layers",
            "layer_types",
            "use_mrope",
        ],
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

/// The values genarm reads, typed; presence and allowed keys are checked on the map.
#[derive(Clone, Debug, Deserialize)]
struct Fields {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_interleaved: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    use_mrope: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

/// A parsed `config.json`, ready to become a `LlamaConfig`.
#[derive(Clone, Debug)]
pub struct HfConfig {
    arch: Arch,
    map: Map<String, Value>,
    fields: Fields,
}

impl HfConfig {
    /// Parses `bytes` and checks every key against the allow-list of its architecture.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let map: Map<String, Value> = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, format!("invalid config.json: {e}")))?;
        let model_type = match map.get("model_type") {
            None => "llama",
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                return Err(Error::field(
                    path,
                    "model_type",
                    format!("{v} is not a string"),
                ))
            }
        };
        let arch = Arch::parse(model_type)
            .ok_or_else(|| Error::unsupported(path, format!("model_type `{model_type}`")))?;
        for (key, value) in &map {
            // A null setting is an absent one, in transformers as here.
            let known = value.is_null()
                || key.starts_with('_')
                || INERT_KEYS.contains(&key.as_str())
                || COMMON_KEYS.contains(&key.as_str())
                || arch_keys(arch).contains(&key.as_str());
            if !known {
                return Err(Error::unsupported(
                    path,
                    format!(
                        "config field `{key}` (= {}) for model_type `{model_type}`: genarm does \
                         not implement it and it may change the model's outputs",
                        short(value)
                    ),
                ));
            }
        }
        let fields: Fields = serde_json::from_value(Value::Object(map.clone()))
            .map_err(|e| Error::format(path, format!("invalid config.json: {e}")))?;
        Ok(Self { arch, map, fields })
    }

    pub fn into_runtime(self, path: &Path) -> Result<LlamaConfig> {
        let f = &self.fields;
        let arch = self.arch;
        let (rope_theta, rope_scaling) = rope(&self.map, path)?;
        let hidden_act = match f.hidden_act.as_deref() {
            None => Activation::Silu,
            Some(name) => Activation::parse(name).ok_or_else(|| {
                Error::unsupported(
                    path,
                    format!(
                        "hidden_act `{name}` (genarm implements silu, gelu, gelu_pytorch_tanh)"
                    ),
                )
            })?,
        };
        if f.rope_interleaved == Some(true) {
            // transformers ignores the key, but whoever wrote `true` meant another layout.
            return Err(Error::unsupported(path, "rope_interleaved = true"));
        }
        if f.use_mrope == Some(true) {
            return Err(Error::unsupported(
                path,
                "use_mrope = true (multimodal RoPE)",
            ));
        }
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Llama => {
                let b = f.attention_bias.unwrap_or(false);
                (b, b, f.mlp_bias.unwrap_or(false))
            }
            Arch::Mistral => (false, false, false),
            // transformers' Qwen2 always has q/k/v biases and reads no attention_bias.
            Arch::Qwen2 => {
                if f.attention_bias == Some(false) {
                    return Err(Error::field(
                        path,
                        "attention_bias",
                        "false, but Qwen2 always has q/k/v biases (transformers ignores the field)",
                    ));
                }
                (true, false, false)
            }
        };
        let sliding_windows = sliding_windows(arch, f, path)?;
        let cfg = LlamaConfig {
            arch,
            vocab_size: f.vocab_size,
            hidden_size: f.hidden_size,
            intermediate_size: f.intermediate_size,
            num_layers: f.num_hidden_layers,
            num_heads: f.num_attention_heads,
            num_kv_heads: f.num_key_value_heads.unwrap_or(f.num_attention_heads),
            head_dim: f
                .head_dim
                .unwrap_or(f.hidden_size / f.num_attention_heads.max(1)),
            rope_theta,
            rope_scaling,
            rope_layout: RopeLayout::HalfSplit,
            rms_norm_eps: f.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: f.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: f.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            hidden_act,
            sliding_windows,
            bos_token_id: f.bos_token_id,
            eos_token_ids: f
                .eos_token_id
                .clone()
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

/// A value for an error message, cut to a readable length.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// Keys each RoPE type reads (besides `rope_type`/`type` and `rope_theta`).
fn rope_type_keys(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "default" => Some(&[]),
        "linear" => Some(&["factor"]),
        "llama3" => Some(&[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ]),
        _ => None,
    }
}

/// θ and the scaling, from `rope_parameters` (transformers 5) and/or the top-level
/// `rope_theta` + `rope_scaling` (transformers 4).
fn rope(map: &Map<String, Value>, path: &Path) -> Result<(f64, Option<RopeScaling>)> {
    let object = |key: &str| -> Result<Option<&Map<String, Value>>> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(Error::field(
                path,
                key,
                format!("{} is not an object", short(v)),
            )),
        }
    };
    let params = object("rope_parameters")?;
    let scaling = object("rope_scaling")?;
    if let (Some(p), Some(s)) = (params, scaling) {
        let kind = |o: &Map<String, Value>| o.get("rope_type").or_else(|| o.get("type")).cloned();
        let differs = kind(p) != kind(s)
            || s.iter()
                .any(|(k, v)| !matches!(k.as_str(), "type" | "rope_type") && p.get(k) != Some(v));
        if differs {
            return Err(Error::field(
                path,
                "rope_scaling",
                "disagrees with rope_parameters; keep one of the two",
            ));
        }
    }
    // The scaling settings: rope_parameters wins (transformers 5 derives it from
    // rope_scaling when absent).
    let settings = params.or(scaling);
    let number = |o: &Map<String, Value>, key: &str, field: &str| -> Result<Option<f64>> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::field(path, field, format!("{} is not a number", short(v)))),
        }
    };
    let top_theta = number(map, "rope_theta", "rope_theta")?;
    let inner_theta = match params {
        Some(p) => number(p, "rope_theta", "rope_parameters.rope_theta")?,
        None => None,
    };
    let theta = match (top_theta, inner_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::field(
                path,
                "rope_theta",
                format!("{a} disagrees with rope_parameters.rope_theta {b}"),
            ))
        }
        (a, b) => a.or(b).unwrap_or(10_000.0),
    };
    let Some(s) = settings else {
        return Ok((theta, None));
    };
    let field = if params.is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let kind = match s.get("rope_type").or_else(|| s.get("type")) {
        None | Some(Value::Null) => "default",
        Some(Value::String(t)) => t.as_str(),
        Some(v) => {
            return Err(Error::field(
                path,
                format!("{field}.rope_type"),
                format!("{} is not a string", short(v)),
            ))
        }
    };
    let keys = rope_type_keys(kind).ok_or_else(|| {
        Error::unsupported(
            path,
            format!("{field}.rope_type `{kind}` (genarm implements default, linear, llama3)"),
        )
    })?;
    for key in s.keys() {
        let read = matches!(key.as_str(), "rope_type" | "type" | "rope_theta")
            || keys.contains(&key.as_str());
        if !read {
            return Err(Error::unsupported(
                path,
                format!(
                    "{field}.{key} (= {}) with rope_type `{kind}`",
                    short(&s[key])
                ),
            ));
        }
    }
    let get = |key: &str| number(s, key, &format!("{field}.{key}"));
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: get("factor")?
                .ok_or_else(|| Error::field(path, format!("{field}.factor"), "missing"))?,
        }),
        _ => {
            let original = match s.get("original_max_position_embeddings") {
                None | Some(Value::Null) => 8192,
                Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    Error::field(
                        path,
                        format!("{field}.original_max_position_embeddings"),
                        format!("{} is not a positive integer", short(v)),
                    )
                })?,
            };
            Some(RopeScaling::Llama3(Llama3RopeScaling {
                factor: get("factor")?.unwrap_or(8.0),
                low_freq_factor: get("low_freq_factor")?.unwrap_or(1.0),
                high_freq_factor: get("high_freq_factor")?.unwrap_or(4.0),
                original_max_position_embeddings: original,
            }))
        }
    };
    Ok((theta, scaling))
}

/// Per-layer windows as transformers applies them: Mistral slides every layer when
/// `sliding_window` is set; Qwen2 follows `layer_types` (or, in transformers 4 configs,
/// slides layers from `max_window_layers` on when `use_sliding_window`).
fn sliding_windows(arch: Arch, f: &Fields, path: &Path) -> Result<Vec<Option<usize>>> {
    let layers = f.num_hidden_layers;
    match arch {
        Arch::Llama => Ok(Vec::new()),
        Arch::Mistral => Ok(match f.sliding_window {
            Some(w) => vec![Some(w); layers],
            None => Vec::new(),
        }),
        Arch::Qwen2 => {
            let sliding: Vec<bool> = match &f.layer_types {
                Some(types) => {
                    if types.len() != layers {
                        return Err(Error::field(
                            path,
                            "layer_types",
                            format!("{} entries for {layers} layers", types.len()),
                        ));
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            "full_attention" => Ok(false),
                            "sliding_attention" => Ok(true),
                            other => Err(Error::unsupported(
                                path,
                                format!("layer_types entry `{other}`"),
                            )),
                        })
                        .collect::<Result<_>>()?
                }
                None => {
                    let from = f.max_window_layers.unwrap_or(layers);
                    let on = f.use_sliding_window.unwrap_or(false);
                    (0..layers).map(|l| on && l >= from).collect()
                }
            };
            if !sliding.iter().any(|&s| s) {
                return Ok(Vec::new());
            }
            let w = f
                .sliding_window
                .ok_or_else(|| Error::field(path, "sliding_window", "missing, but layers slide"))?;
            Ok(sliding.into_iter().map(|s| s.then_some(w)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &Value) -> Result<LlamaConfig> {
        let path = Path::new("config.json");
        let bytes = serde_json::to_vec(json).unwrap();
        HfConfig::from_json(&bytes, path)?.into_runtime(path)
    }

    fn base(model_type: &str) -> Value {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 61, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 96,
            "bos_token_id": 0, "eos_token_id": [1, 2],
        })
    }

    fn with(mut v: Value, extra: Value) -> Value {
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn hf_json_round_trips() {
        let cfg = parse(&with(
            base("qwen2"),
            serde_json::json!({"rope_theta": 5e5, "tie_word_embeddings": true,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0}}),
        ))
        .unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias && cfg.rope_scaling.is_some());
        let path = Path::new("x");
        assert_eq!(
            parse(&cfg.to_hf_json(true, "float32", path).unwrap()).unwrap(),
            cfg
        );
        let untied = parse(&cfg.to_hf_json(false, "bfloat16", path).unwrap()).unwrap();
        assert!(!untied.tie_word_embeddings);
        let llama = parse(&with(
            base("llama"),
            serde_json::json!({"attention_bias": true, "mlp_bias": true, "hidden_act": "gelu",
                "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
        ))
        .unwrap();
        assert_eq!(
            parse(&llama.to_hf_json(false, "float32", path).unwrap()).unwrap(),
            llama
        );
    }

    #[test]
    fn reads_transformers_5_rope_parameters() {
        let cfg = parse(&with(
            base("llama"),
            serde_json::json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}}),
        ))
        .unwrap();
        assert_eq!(cfg.rope_theta, 5e5);
        assert!(
            matches!(cfg.rope_scaling, Some(RopeScaling::Llama3(ref s)) if s.original_max_position_embeddings == 64)
        );
        let linear = parse(&with(
            base("llama"),
            serde_json::json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e5, "factor": 4.0}}),
        ))
        .unwrap();
        assert_eq!(
            linear.rope_scaling,
            Some(RopeScaling::Linear { factor: 4.0 })
        );
        let plain = linear.rope_inv_freq();
        let unscaled = LlamaConfig {
            rope_scaling: None,
            ..linear.clone()
        }
        .rope_inv_freq();
        assert!(plain
            .iter()
            .zip(&unscaled)
            .all(|(a, b)| (a * 4.0 - b).abs() < 1e-15));
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        let err = |extra: Value| parse(&with(base("llama"), extra)).unwrap_err().to_string();
        assert!(err(serde_json::json!({"quantization_config": {"bits": 4}}))
            .contains("quantization_config"));
        assert!(err(serde_json::json!({"hidden_act": "relu"})).contains("hidden_act `relu`"));
        assert!(
            err(serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
                .contains("yarn")
        );
        assert!(err(
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
            "partial_rotary_factor": 0.5}})
        )
        .contains("partial_rotary_factor"));
        assert!(err(serde_json::json!({"sliding_window": 4})).contains("sliding_window"));
        assert!(err(
            serde_json::json!({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}})
        )
        .contains("rope_theta"));
        assert!(err(serde_json::json!({"rope_theta": 0.0})).contains("rope_theta"));
        // Bookkeeping keys are fine.
        parse(&with(
            base("llama"),
            serde_json::json!({"_name_or_path": "x", "torch_dtype": "bfloat16", "use_cache": true,
                "pretraining_tp": 1, "transformers_version": "5.24.0", "rope_scaling": null}),
        ))
        .unwrap();
    }

    #[test]
    fn sliding_windows_follow_transformers() {
        let mistral = parse(&with(
            base("mistral"),
            serde_json::json!({"sliding_window": 4}),
        ))
        .unwrap();
        assert_eq!(mistral.sliding_windows, vec![Some(4), Some(4)]);
        let none = parse(&with(
            base("mistral"),
            serde_json::json!({"sliding_window": null}),
        ))
        .unwrap();
        assert!(none.sliding_windows.is_empty());
        let qwen_v4 = parse(&with(
            base("qwen2"),
            serde_json::json!({"use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1}),
        ))
        .unwrap();
        assert_eq!(qwen_v4.sliding_windows, vec![None, Some(3)]);
        let qwen_v5 = parse(&with(
            base("qwen2"),
            serde_json::json!({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 3}),
        ))
        .unwrap();
        assert_eq!(qwen_v5.sliding_windows, vec![Some(3), None]);
        let off = parse(&with(
            base("qwen2"),
            serde_json::json!({"use_sliding_window": false, "sliding_window": 3, "max_window_layers": 0}),
        ))
        .unwrap();
        assert!(off.sliding_windows.is_empty());
    }
}
