//! Shared fixtures for the integration tests: tiny random Llama-family models,
//! writers for the on-disk formats the engine loads (HF safetensors dirs, GGUF,
//! PEFT LoRA adapters), and a plain f64 reference forward pass to judge the
//! engine against.
//!
//! Besides genarm itself, only std, candle-core, safetensors, serde_json and half are
//! used, since those are what the main crate already depends on. Errors panic: this is
//! test code.
#![allow(dead_code)]
// The reference forward is written as plain index loops on purpose: it is the slow,
// obvious version the engine is judged against.
#![allow(clippy::needless_range_loop)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct TinyConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v biases: written as Qwen2 unless `o_bias` (Llama) or a sliding window.
    pub attention_bias: bool,
    /// Llama's `attention_bias`: biases on q/k/v and o_proj (written as Llama).
    pub o_bias: bool,
    /// Llama's `mlp_bias`: biases on gate/up/down.
    pub mlp_bias: bool,
    /// `hidden_act` as config.json spells it (`silu`, `gelu`, `gelu_pytorch_tanh`).
    pub hidden_act: &'static str,
    /// Every layer attends to the last `w` positions only: written as Mistral, or as
    /// Qwen2 with `attention_bias`.
    pub sliding_window: Option<usize>,
    /// Linear RoPE scaling (`rope_scaling: {rope_type: linear, factor}`).
    pub rope_linear_factor: Option<f64>,
}

impl Default for TinyConfig {
    fn default() -> Self {
        TinyConfig {
            // 61 is prime on purpose: catches code that assumes a "nice" vocab size.
            vocab_size: 61,
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 2,
            // head_dim 16, two query heads per kv head (grouped-query attention).
            num_heads: 4,
            num_kv_heads: 2,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 96,
            tie_word_embeddings: false,
            attention_bias: false,
            o_bias: false,
            mlp_bias: false,
            hidden_act: "silu",
            sliding_window: None,
            rope_linear_factor: None,
        }
    }
}

impl TinyConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Whether q/k/v carry biases (Qwen2's, or Llama's `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.o_bias
    }

    /// The gate activation, as the engine parses it.
    pub fn activation(&self) -> genarm::model::config::Activation {
        genarm::model::config::Activation::parse(self.hidden_act)
            .unwrap_or_else(|| panic!("unknown hidden_act {}", self.hidden_act))
    }

    /// (out_features, in_features) of a linear module given by its short name.
    pub fn linear_shape(&self, module: &str) -> (usize, usize) {
        let hd = self.head_dim();
        match module {
            "q_proj" => (self.num_heads * hd, self.hidden_size),
            "k_proj" | "v_proj" => (self.num_kv_heads * hd, self.hidden_size),
            "o_proj" => (self.hidden_size, self.num_heads * hd),
            "gate_proj" | "up_proj" => (self.intermediate_size, self.hidden_size),
            "down_proj" => (self.hidden_size, self.intermediate_size),
            other => panic!("unknown linear module {other}"),
        }
    }
}

/// HF name prefix (without `.weight`) of a linear module in layer `layer`.
pub fn hf_linear_prefix(layer: usize, module: &str) -> String {
    let block = match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        other => panic!("unknown linear module {other}"),
    };
    format!("model.layers.{layer}.{block}.{module}")
}

// ---------------------------------------------------------------------------
// Seeded PRNG (splitmix64), so fixtures are identical on every machine.
// ---------------------------------------------------------------------------

pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi), rounded to an f32 value so that F32 files hold the
    /// fixture's weights exactly.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo + (hi - lo) * self.next_f64()) as f32 as f64
    }
}

/// FNV-1a, used to give every tensor its own PRNG stream derived from its name,
/// so e.g. a tied and an untied model share all the weights they have in common.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn stream(seed: u64, name: &str) -> SplitMix64 {
    let mut rng = SplitMix64::new(seed ^ fnv1a(name));
    rng.next_u64(); // decorrelate nearby seeds
    rng
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct TinyModel {
    pub config: TinyConfig,
    /// HF name -> (shape, row-major data), in HF layout.
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

const LM_HEAD_GAIN: f64 = 3.0;

#[derive(Clone, Copy)]
enum Init {
    /// U(-1, 1); U(-a, a) as for lm_head when tied, so that tied logits have the
    /// same O(1..5) scale as untied ones.
    Embedding,
    /// 1 + U(-0.2, 0.2)
    Norm,
    /// U(-a, a), a = gain / sqrt(fan_in): larger than the usual init (gain 1.5
    /// in the layers, 3 for lm_head) so that attention is not flat and logits
    /// are O(1..5) with a clear preference among tokens.
    Linear { fan_in: usize, gain: f64 },
    /// U(-0.1, 0.1)
    Bias,
}

/// Every HF tensor of a config, with its shape and how it is initialised.
fn hf_tensor_specs(cfg: &TinyConfig) -> Vec<(String, Vec<usize>, Init)> {
    let h = cfg.hidden_size;
    let mut specs = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
        Init::Embedding,
    )];
    for i in 0..cfg.num_layers {
        let norm = |n: &str| (format!("model.layers.{i}.{n}.weight"), vec![h], Init::Norm);
        specs.push(norm("input_layernorm"));
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let (out, inp) = cfg.linear_shape(m);
            let prefix = hf_linear_prefix(i, m);
            specs.push((
                format!("{prefix}.weight"),
                vec![out, inp],
                Init::Linear {
                    fan_in: inp,
                    gain: 1.5,
                },
            ));
            if (cfg.qkv_bias() && m != "o_proj") || (cfg.o_bias && m == "o_proj") {
                specs.push((format!("{prefix}.bias"), vec![out], Init::Bias));
            }
        }
        specs.push(norm("post_attention_layernorm"));
        for m in ["gate_proj", "up_proj", "down_proj"] {
            let (out, inp) = cfg.linear_shape(m);
            specs.push((
                format!("{}.weight", hf_linear_prefix(i, m)),
                vec![out, inp],
                Init::Linear {
                    fan_in: inp,
                    gain: 1.5,
                },
            ));
            if cfg.mlp_bias {
                let name = format!("{}.bias", hf_linear_prefix(i, m));
                specs.push((name, vec![out], Init::Bias));
            }
        }
    }
    specs.push(("model.norm.weight".to_string(), vec![h], Init::Norm));
    if !cfg.tie_word_embeddings {
        specs.push((
            "lm_head.weight".to_string(),
            vec![cfg.vocab_size, h],
            Init::Linear {
                fan_in: h,
                gain: LM_HEAD_GAIN,
            },
        ));
    }
    specs
}

impl TinyModel {
    pub fn random(cfg: &TinyConfig, seed: u64) -> TinyModel {
        assert_eq!(cfg.hidden_size % cfg.num_heads, 0, "hidden % heads");
        assert_eq!(cfg.num_heads % cfg.num_kv_heads, 0, "heads % kv_heads");
        assert_eq!(cfg.head_dim() % 2, 0, "RoPE needs an even head_dim");
        let mut tensors = BTreeMap::new();
        for (name, shape, init) in hf_tensor_specs(cfg) {
            let mut rng = stream(seed, &name);
            let n: usize = shape.iter().product();
            let data = (0..n)
                .map(|_| match init {
                    Init::Embedding if cfg.tie_word_embeddings => {
                        let a = LM_HEAD_GAIN / (cfg.hidden_size as f64).sqrt();
                        rng.uniform(-a, a)
                    }
                    Init::Embedding => rng.uniform(-1.0, 1.0),
                    Init::Norm => rng.uniform(0.8, 1.2),
                    Init::Linear { fan_in, gain } => {
                        let a = gain / (fan_in as f64).sqrt();
                        rng.uniform(-a, a)
                    }
                    Init::Bias => rng.uniform(-0.1, 0.1),
                })
                .collect();
            tensors.insert(name, (shape, data));
        }
        TinyModel {
            config: cfg.clone(),
            tensors,
        }
    }

    pub fn get(&self, name: &str) -> &[f64] {
        match self.tensors.get(name) {
            Some((_, data)) => data,
            None => panic!("TinyModel has no tensor {name}"),
        }
    }

    pub fn shape(&self, name: &str) -> &[usize] {
        match self.tensors.get(name) {
            Some((shape, _)) => shape,
            None => panic!("TinyModel has no tensor {name}"),
        }
    }

    /// The same model with every weight rounded through `dtype` (F32, F16, BF16):
    /// what the engine actually sees after loading an HF dir written with `dtype`.
    pub fn hf_rounded(&self, dtype: DType) -> TinyModel {
        let round: fn(f64) -> f64 = match dtype {
            DType::F32 => |v| v as f32 as f64,
            // Via f32 as candle does: half's direct f64 -> bf16 conversion
            // rounds differently in rare cases.
            DType::F16 => |v| half::f16::from_f32(v as f32).to_f64(),
            DType::BF16 => |v| half::bf16::from_f32(v as f32).to_f64(),
            other => panic!("unsupported HF dtype {other:?}"),
        };
        let mut out = self.clone();
        for (_, data) in out.tensors.values_mut() {
            data.iter_mut().for_each(|v| *v = round(*v));
        }
        out
    }

    /// The same model with every weight passed through GGUF quantization to
    /// `dtype` and back, exactly as `write_gguf` stores it (1-D tensors stay F32).
    /// Quantization blocks run along rows, so the Q/K row permutation commutes
    /// with it and can be ignored here.
    pub fn gguf_rounded(&self, dtype: GgmlDType) -> TinyModel {
        let mut out = self.clone();
        for (shape, data) in out.tensors.values_mut() {
            let q = quantize(shape, data, dtype);
            let t = q.dequantize(&Device::Cpu).expect("dequantize");
            let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            *data = values.into_iter().map(|v| v as f64).collect();
        }
        out
    }

    /// Weights W + (alpha / r) * B * A for every LoRA target: the reference for
    /// tests that apply an adapter.
    pub fn with_lora_merged(&self, lora: &TinyLora) -> TinyModel {
        let scale = lora.alpha / lora.r as f64;
        let mut out = self.clone();
        for (prefix, pair) in &lora.pairs {
            let name = format!("{prefix}.weight");
            let (shape, w) = out
                .tensors
                .get_mut(&name)
                .unwrap_or_else(|| panic!("LoRA target {name} not in model"));
            assert_eq!(shape, &vec![pair.out_features, pair.in_features], "{name}");
            for o in 0..pair.out_features {
                for i in 0..pair.in_features {
                    let mut delta = 0.0;
                    for k in 0..lora.r {
                        delta += pair.b[o * lora.r + k] * pair.a[k * pair.in_features + i];
                    }
                    w[o * pair.in_features + i] += scale * delta;
                }
            }
        }
        out
    }

    // -- HF directory --------------------------------------------------------

    /// Writes `config.json` and the weights as `model.safetensors` (shards == 1)
    /// or `model-0000K-of-0000N.safetensors` + `model.safetensors.index.json`.
    pub fn write_hf_dir(&self, dir: &Path, dtype: DType, shards: usize) {
        let cfg = &self.config;
        let torch_dtype = match dtype {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            other => panic!("unsupported HF dtype {other:?}"),
        };
        // Qwen2 is the usual Llama-like architecture with q/k/v biases; Mistral slides
        // without them; Llama has o/MLP biases.
        let qwen2 = cfg.attention_bias && !cfg.o_bias && !cfg.mlp_bias;
        let (arch, model_type) = if qwen2 {
            ("Qwen2ForCausalLM", "qwen2")
        } else if cfg.sliding_window.is_some() {
            assert!(!cfg.qkv_bias() && !cfg.mlp_bias, "Mistral has no biases");
            ("MistralForCausalLM", "mistral")
        } else {
            ("LlamaForCausalLM", "llama")
        };
        let mut config = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "hidden_act": cfg.hidden_act,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "torch_dtype": torch_dtype,
        });
        match model_type {
            "llama" => {
                config["attention_bias"] = cfg.o_bias.into();
                config["mlp_bias"] = cfg.mlp_bias.into();
            }
            "qwen2" => {
                config["attention_bias"] = true.into();
                if let Some(w) = cfg.sliding_window {
                    config["use_sliding_window"] = true.into();
                    config["sliding_window"] = w.into();
                    config["max_window_layers"] = 0.into();
                }
            }
            _ => config["sliding_window"] = cfg.sliding_window.into(),
        }
        assert!(
            model_type != "llama" || cfg.sliding_window.is_none(),
            "a sliding window is written as Mistral or Qwen2"
        );
        if let Some(factor) = cfg.rope_linear_factor {
            config["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
        }
        std::fs::create_dir_all(dir).expect("create HF dir");
        write_json(&dir.join("config.json"), &config);

        let names: Vec<&String> = self.tensors.keys().collect();
        assert!(
            shards >= 1 && shards <= names.len(),
            "shards must be in 1..={}",
            names.len()
        );
        if shards == 1 {
            let all: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            self.save_safetensors(&dir.join("model.safetensors"), &all, dtype);
            return;
        }
        // Contiguous chunks of the sorted names, sizes differing by at most one.
        let mut weight_map = serde_json::Map::new();
        let mut total_size = 0usize;
        let mut start = 0;
        for k in 0..shards {
            let end = start + (names.len() - start) / (shards - k);
            let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
            let chunk: Vec<&str> = names[start..end].iter().map(|s| s.as_str()).collect();
            for name in &chunk {
                weight_map.insert(name.to_string(), serde_json::Value::from(file.clone()));
                total_size += self.get(name).len() * dtype.size_in_bytes();
            }
            self.save_safetensors(&dir.join(&file), &chunk, dtype);
            start = end;
        }
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        write_json(&dir.join("model.safetensors.index.json"), &index);
    }

    fn save_safetensors(&self, path: &Path, names: &[&str], dtype: DType) {
        let mut map = HashMap::new();
        for &name in names {
            let (shape, data) = &self.tensors[name];
            let t = f64_tensor(shape, data)
                .to_dtype(dtype)
                .expect("convert dtype");
            map.insert(name.to_string(), t);
        }
        candle_core::safetensors::save(&map, path).expect("write safetensors");
    }

    // -- GGUF ----------------------------------------------------------------

    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) {
        self.write_gguf_with_tokens(path, dtype, None)
    }

    /// Writes a llama.cpp-style GGUF. Matrices are stored as `dtype`, 1-D tensors
    /// as F32 (as llama.cpp does). Q/K weights and biases get llama.cpp's row
    /// permutation. With `tokens`, a minimal "gpt2" tokenizer is embedded.
    pub fn write_gguf_with_tokens(&self, path: &Path, dtype: GgmlDType, tokens: Option<&[String]>) {
        self.write_gguf_with_tokenizer(path, dtype, tokens, "gpt2")
    }

    /// `write_gguf_with_tokens` with another `tokenizer.ggml.model` (e.g. "llama", the
    /// SentencePiece vocabularies of Llama 2 and Mistral).
    pub fn write_gguf_with_tokenizer(
        &self,
        path: &Path,
        dtype: GgmlDType,
        tokens: Option<&[String]>,
        tokenizer_model: &str,
    ) {
        self.write_gguf_as(path, &|_| dtype, tokens, tokenizer_model)
    }

    /// `write_gguf` with each matrix's type chosen by its HF name (mixed-type files
    /// such as llama.cpp's Q4_K_M).
    pub fn write_gguf_mixed(&self, path: &Path, dtype_of: &dyn Fn(&str) -> GgmlDType) {
        self.write_gguf_as(path, dtype_of, None, "gpt2")
    }

    fn write_gguf_as(
        &self,
        path: &Path,
        dtype_of: &dyn Fn(&str) -> GgmlDType,
        tokens: Option<&[String]>,
        tokenizer_model: &str,
    ) {
        let cfg = &self.config;
        assert!(
            !cfg.o_bias
                && !cfg.mlp_bias
                && cfg.hidden_act == "silu"
                && cfg.sliding_window.is_none()
                && cfg.rope_linear_factor.is_none(),
            "the GGUF writer does not write o/MLP biases, activations, windows or RoPE scaling"
        );
        let mut metadata: Vec<(&str, gguf_file::Value)> = vec![
            (
                "general.architecture",
                gguf_file::Value::String("llama".into()),
            ),
            (
                "general.name",
                gguf_file::Value::String("tiny-llama".into()),
            ),
            (
                "llama.context_length",
                u32_value(cfg.max_position_embeddings),
            ),
            ("llama.embedding_length", u32_value(cfg.hidden_size)),
            ("llama.block_count", u32_value(cfg.num_layers)),
            (
                "llama.feed_forward_length",
                u32_value(cfg.intermediate_size),
            ),
            ("llama.attention.head_count", u32_value(cfg.num_heads)),
            ("llama.attention.head_count_kv", u32_value(cfg.num_kv_heads)),
            ("llama.rope.dimension_count", u32_value(cfg.head_dim())),
            (
                "llama.rope.freq_base",
                gguf_file::Value::F32(cfg.rope_theta as f32),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon",
                gguf_file::Value::F32(cfg.rms_norm_eps as f32),
            ),
            ("llama.vocab_size", u32_value(cfg.vocab_size)),
        ];
        if let Some(tokens) = tokens {
            let strings = tokens
                .iter()
                .map(|t| gguf_file::Value::String(t.clone()))
                .collect();
            let types = tokens.iter().map(|_| gguf_file::Value::I32(1)).collect();
            metadata.extend([
                (
                    "tokenizer.ggml.model",
                    gguf_file::Value::String(tokenizer_model.into()),
                ),
                ("tokenizer.ggml.tokens", gguf_file::Value::Array(strings)),
                ("tokenizer.ggml.merges", gguf_file::Value::Array(vec![])),
                ("tokenizer.ggml.token_type", gguf_file::Value::Array(types)),
                ("tokenizer.ggml.bos_token_id", u32_value(0)),
                ("tokenizer.ggml.eos_token_id", u32_value(1)),
            ]);
        }

        let mut qtensors: Vec<(String, QTensor)> = Vec::new();
        for (hf_name, (shape, data)) in &self.tensors {
            let name = gguf_name(hf_name);
            // Q and K rows are permuted for llama.cpp's interleaved RoPE.
            let n_head = if hf_name.contains(".q_proj.") {
                Some(cfg.num_heads)
            } else if hf_name.contains(".k_proj.") {
                Some(cfg.num_kv_heads)
            } else {
                None
            };
            let data = match n_head {
                Some(n_head) => {
                    let n_cols = if shape.len() == 2 { shape[1] } else { 1 };
                    permute_qk_rows(data, shape[0], n_cols, n_head)
                }
                None => data.clone(),
            };
            qtensors.push((name, quantize(shape, &data, dtype_of(hf_name))));
        }

        let meta_refs: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create GGUF parent dir");
        }
        let mut file = std::fs::File::create(path).expect("create GGUF file");
        gguf_file::write(&mut file, &meta_refs, &tensor_refs).expect("write GGUF");
    }
}

/// llama.cpp tensor name for an HF tensor name.
pub fn gguf_name(hf_name: &str) -> String {
    match hf_name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf_name
        .strip_prefix("model.layers.")
        .unwrap_or_else(|| panic!("no GGUF name for {hf_name}"));
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{short}.{suffix}")
}

fn u32_value(v: usize) -> gguf_file::Value {
    gguf_file::Value::U32(u32::try_from(v).expect("fits in u32"))
}

fn f64_tensor(shape: &[usize], data: &[f64]) -> Tensor {
    let values: Vec<f32> = data.iter().map(|&v| v as f32).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("build tensor")
}

/// QTensor of `dtype` for a matrix; 1-D tensors (norms, biases) always F32. A
/// matrix whose rows do not split into whole blocks also falls back to F32, as
/// llama.cpp's converter does.
fn quantize(shape: &[usize], data: &[f64], dtype: GgmlDType) -> QTensor {
    let row_len = *shape.last().unwrap();
    let dtype = if shape.len() < 2 || !row_len.is_multiple_of(dtype.block_size()) {
        GgmlDType::F32
    } else {
        dtype
    };
    QTensor::quantize(&f64_tensor(shape, data), dtype).expect("quantize")
}

fn write_json(path: &Path, value: &serde_json::Value) {
    let text = serde_json::to_string_pretty(value).unwrap();
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// llama.cpp's Q/K row permutation
// ---------------------------------------------------------------------------

/// HF row (within one head) stored at GGUF row `j` of that head: GGUF row
/// 2*i + s holds HF row s*(hd/2) + i. This turns HF's "rotate_half" RoPE pairs
/// (i, i + hd/2) into llama.cpp's adjacent pairs (2i, 2i + 1).
fn hf_row_for_gguf_row(j: usize, hd: usize) -> usize {
    let (i, s) = (j / 2, j % 2);
    s * (hd / 2) + i
}

/// HF layout -> GGUF layout, for a row-major [n_rows, n_cols] matrix (use
/// n_cols = 1 for a bias) with n_rows = n_head * head_dim.
pub fn permute_qk_rows(w: &[f64], n_rows: usize, n_cols: usize, n_head: usize) -> Vec<f64> {
    assert_eq!(w.len(), n_rows * n_cols);
    assert_eq!(n_rows % n_head, 0);
    let hd = n_rows / n_head;
    assert_eq!(hd % 2, 0);
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for j in 0..hd {
            let dst = h * hd + j;
            let src = h * hd + hf_row_for_gguf_row(j, hd);
            out[dst * n_cols..(dst + 1) * n_cols]
                .copy_from_slice(&w[src * n_cols..(src + 1) * n_cols]);
        }
    }
    out
}

/// GGUF layout -> HF layout; inverse of `permute_qk_rows`.
pub fn unpermute_qk_rows(w: &[f64], n_rows: usize, n_cols: usize, n_head: usize) -> Vec<f64> {
    assert_eq!(w.len(), n_rows * n_cols);
    assert_eq!(n_rows % n_head, 0);
    let hd = n_rows / n_head;
    assert_eq!(hd % 2, 0);
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for j in 0..hd {
            let src = h * hd + j;
            let dst = h * hd + hf_row_for_gguf_row(j, hd);
            out[dst * n_cols..(dst + 1) * n_cols]
                .copy_from_slice(&w[src * n_cols..(src + 1) * n_cols]);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// LoRA adapters (PEFT format)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct LoraPair {
    pub in_features: usize,
    pub out_features: usize,
    /// lora_A, row-major [r, in_features]
    pub a: Vec<f64>,
    /// lora_B, row-major [out_features, r]
    pub b: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct TinyLora {
    pub r: usize,
    pub alpha: f64,
    /// Short module names, e.g. "q_proj".
    pub targets: Vec<String>,
    /// HF prefix (e.g. "model.layers.0.self_attn.q_proj") -> A, B.
    pub pairs: BTreeMap<String, LoraPair>,
}

impl TinyLora {
    /// Random adapter for every layer and target. B is non-zero (unlike PEFT's
    /// init) and scaled so that (alpha/r)·B·A is roughly 0.3x the size of the
    /// base weights whatever r and alpha are: noticeable but moderate.
    pub fn random(cfg: &TinyConfig, r: usize, alpha: f64, targets: &[&str], seed: u64) -> TinyLora {
        assert!(r >= 1);
        let b_bound = 0.8 * (r as f64).sqrt() / alpha;
        let mut pairs = BTreeMap::new();
        for layer in 0..cfg.num_layers {
            for &module in targets {
                let (out, inp) = cfg.linear_shape(module);
                let prefix = hf_linear_prefix(layer, module);
                let mut rng = stream(seed, &format!("lora.{prefix}"));
                let a_bound = 1.0 / (inp as f64).sqrt();
                let a = (0..r * inp)
                    .map(|_| rng.uniform(-a_bound, a_bound))
                    .collect();
                let b = (0..out * r)
                    .map(|_| rng.uniform(-b_bound, b_bound))
                    .collect();
                let pair = LoraPair {
                    in_features: inp,
                    out_features: out,
                    a,
                    b,
                };
                pairs.insert(prefix, pair);
            }
        }
        TinyLora {
            r,
            alpha,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            pairs,
        }
    }
}

/// Writes a PEFT adapter dir: `adapter_config.json` + `adapter_model.safetensors`
/// (F32, keys `base_model.model.<hf prefix>.lora_{A,B}.weight`).
pub fn write_lora_dir(dir: &Path, lora: &TinyLora, base_model: &str) {
    std::fs::create_dir_all(dir).expect("create LoRA dir");
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": lora.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
    });
    write_json(&dir.join("adapter_config.json"), &config);
    let mut map = HashMap::new();
    for (prefix, pair) in &lora.pairs {
        map.insert(
            format!("base_model.model.{prefix}.lora_A.weight"),
            f64_tensor(&[lora.r, pair.in_features], &pair.a),
        );
        map.insert(
            format!("base_model.model.{prefix}.lora_B.weight"),
            f64_tensor(&[pair.out_features, lora.r], &pair.b),
        );
    }
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors"))
        .expect("write adapter safetensors");
}

// ---------------------------------------------------------------------------
// f64 reference forward pass. Deliberately plain loops: it is the yardstick.
// ---------------------------------------------------------------------------

/// y = W x (+ b) for a row-major W of shape [out, in].
fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, out: usize) -> Vec<f64> {
    let inp = x.len();
    assert_eq!(w.len(), out * inp);
    let mut y = vec![0.0; out];
    for o in 0..out {
        let mut acc = 0.0;
        for i in 0..inp {
            acc += w[o * inp + i] * x[i];
        }
        if let Some(b) = b {
            acc += b[o];
        }
        y[o] = acc;
    }
    y
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * inv * w).collect()
}

/// HF "rotate_half" RoPE applied in place to one head vector at position `pos`.
pub fn rope_rotate_half(x: &mut [f64], pos: usize, theta: f64) {
    rope_rotate_half_scaled(x, pos, theta, 1.0);
}

/// [`rope_rotate_half`] with linear RoPE scaling: every frequency divided by `factor`.
pub fn rope_rotate_half_scaled(x: &mut [f64], pos: usize, theta: f64, factor: f64) {
    let hd = x.len();
    let half = hd / 2;
    for i in 0..half {
        let inv_freq = theta.powf(-2.0 * i as f64 / hd as f64) / factor;
        let angle = pos as f64 * inv_freq;
        let (sin, cos) = angle.sin_cos();
        let a = x[i];
        let b = x[i + half];
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn softmax(xs: &[f64]) -> Vec<f64> {
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = xs.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

pub fn log_softmax(xs: &[f64]) -> Vec<f64> {
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = xs.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
    xs.iter().map(|x| x - log_sum).collect()
}

/// Logits at every position of `tokens` (the sequence starts at position 0).
pub fn reference_logits(model: &TinyModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    let cfg = &model.config;
    let h = cfg.hidden_size;
    let hd = cfg.head_dim();
    let n_heads = cfg.num_heads;
    let n_kv = cfg.num_kv_heads;
    let group = n_heads / n_kv;
    let eps = cfg.rms_norm_eps;
    let bias = move |name: String| {
        if cfg.qkv_bias() {
            Some(model.get(&name))
        } else {
            None
        }
    };
    let o_bias = |name: String| cfg.o_bias.then(|| model.get(&name));
    let mlp_bias = |name: String| cfg.mlp_bias.then(|| model.get(&name));
    let act = cfg.activation();
    let rope_factor = cfg.rope_linear_factor.unwrap_or(1.0);

    // Embedding lookup.
    let embed = model.get("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            let t = t as usize;
            assert!(t < cfg.vocab_size, "token {t} out of vocab");
            embed[t * h..(t + 1) * h].to_vec()
        })
        .collect();

    for l in 0..cfg.num_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let attn_norm = model.get(&p("input_layernorm.weight"));
        let wq = model.get(&p("self_attn.q_proj.weight"));
        let wk = model.get(&p("self_attn.k_proj.weight"));
        let wv = model.get(&p("self_attn.v_proj.weight"));
        let wo = model.get(&p("self_attn.o_proj.weight"));
        let bq = bias(p("self_attn.q_proj.bias"));
        let bk = bias(p("self_attn.k_proj.bias"));
        let bv = bias(p("self_attn.v_proj.bias"));

        // q, k, v for every position, RoPE applied per head.
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let xn = rms_norm(x, attn_norm, eps);
            let mut q = linear(&xn, wq, bq, n_heads * hd);
            let mut k = linear(&xn, wk, bk, n_kv * hd);
            let v = linear(&xn, wv, bv, n_kv * hd);
            for head in 0..n_heads {
                let q = &mut q[head * hd..(head + 1) * hd];
                rope_rotate_half_scaled(q, pos, cfg.rope_theta, rope_factor);
            }
            for head in 0..n_kv {
                let k = &mut k[head * hd..(head + 1) * hd];
                rope_rotate_half_scaled(k, pos, cfg.rope_theta, rope_factor);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }

        // Causal attention; query head `head` reads kv head `head / group`; with a
        // sliding window w, only keys t − w < s ≤ t.
        let scale = 1.0 / (hd as f64).sqrt();
        let wo_b = o_bias(p("self_attn.o_proj.bias"));
        for t in 0..xs.len() {
            let first = match cfg.sliding_window {
                Some(w) => (t + 1).saturating_sub(w),
                None => 0,
            };
            let mut attn_out = vec![0.0; n_heads * hd];
            for head in 0..n_heads {
                let kv = head / group;
                let q = &qs[t][head * hd..(head + 1) * hd];
                let mut scores = Vec::new();
                for s in first..=t {
                    let k = &ks[s][kv * hd..(kv + 1) * hd];
                    let dot: f64 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                    scores.push(dot * scale);
                }
                let probs = softmax(&scores);
                for s in first..=t {
                    let v = &vs[s][kv * hd..(kv + 1) * hd];
                    for d in 0..hd {
                        attn_out[head * hd + d] += probs[s - first] * v[d];
                    }
                }
            }
            let o = linear(&attn_out, wo, wo_b, h);
            for d in 0..h {
                xs[t][d] += o[d];
            }
        }

        // MLP: down(act(gate(x)) * up(x)), each with its bias if the config has them.
        let mlp_norm = model.get(&p("post_attention_layernorm.weight"));
        let wg = model.get(&p("mlp.gate_proj.weight"));
        let wu = model.get(&p("mlp.up_proj.weight"));
        let wd = model.get(&p("mlp.down_proj.weight"));
        let inter = cfg.intermediate_size;
        for x in xs.iter_mut() {
            let xn = rms_norm(x, mlp_norm, eps);
            let gate = linear(&xn, wg, mlp_bias(p("mlp.gate_proj.bias")), inter);
            let up = linear(&xn, wu, mlp_bias(p("mlp.up_proj.bias")), inter);
            let gated: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| act.apply_f64(*g) * u)
                .collect();
            let down = linear(&gated, wd, mlp_bias(p("mlp.down_proj.bias")), h);
            for d in 0..h {
                x[d] += down[d];
            }
        }
    }

    let final_norm = model.get("model.norm.weight");
    let lm_head = if cfg.tie_word_embeddings {
        model.get("model.embed_tokens.weight")
    } else {
        model.get("lm_head.weight")
    };
    xs.iter()
        .map(|x| linear(&rms_norm(x, final_norm, eps), lm_head, None, cfg.vocab_size))
        .collect()
}

// ---------------------------------------------------------------------------
// Misc helpers
// ---------------------------------------------------------------------------

/// Panics unless |got - want| <= atol + rtol * |want| everywhere (NaN fails),
/// listing the first 5 mismatches and the max abs diff.
pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length mismatch (got {}, want {})",
        got.len(),
        want.len()
    );
    let mut max_diff = 0.0f64;
    let mut bad = Vec::new();
    let mut n_bad = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g as f64 - w).abs();
        // NaN counts as a mismatch.
        if diff.is_nan() || diff > atol + rtol * w.abs() {
            n_bad += 1;
            if bad.len() < 5 {
                bad.push(format!("  [{i}] got {g} want {w} |diff| {diff:e}"));
            }
        }
        if diff.is_nan() || diff > max_diff {
            max_diff = if diff.is_nan() { f64::NAN } else { diff };
        }
    }
    if n_bad > 0 {
        panic!(
            "{what}: {n_bad} of {} values not close (atol {atol:e}, rtol {rtol:e}), max abs diff {max_diff:e}\n{}",
            got.len(),
            bad.join("\n")
        );
    }
}

/// A fresh, empty directory under the system temp dir, unique per process and call.
pub fn temp_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("genarm-test-{}-{n}-{name}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("clear stale temp dir");
    }
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

// ---------------------------------------------------------------------------
// The demo model
// ---------------------------------------------------------------------------

/// SmolLM2-135M-Instruct (Q4_1 GGUF) in `models/`; fails (never skips) when absent.
pub fn demo_model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run `./build.sh fetch-model` to download the test model",
        p.display()
    );
    p
}

/// The demo model's tokenizer, built from its GGUF metadata.
pub fn demo_tokenizer() -> genarm::model::tokenizer::TextTokenizer {
    let path = demo_model();
    let mut file = std::fs::File::open(&path).expect("demo model opens");
    let content = gguf_file::Content::read(&mut file).expect("GGUF header");
    genarm::model::tokenizer::TextTokenizer::from_gguf(&content.metadata, &path)
        .expect("tokenizer builds")
        .expect("GGUF has a tokenizer")
}

// ---------------------------------------------------------------------------
// A text vocabulary for tiny models
// ---------------------------------------------------------------------------

/// A byte-level vocabulary of single characters for a tiny model: BOS (0), EOS (1),
/// space (`Ġ` in GPT-2's byte mapping), letters, digits, punctuation, then capitals, cut
/// to `size`. Lower-case text without other symbols encodes with it.
pub fn char_vocabulary(size: usize) -> Vec<String> {
    let mut tokens: Vec<String> = vec!["<s>".into(), "</s>".into(), "Ġ".into()];
    tokens.extend(('a'..='z').map(String::from));
    tokens.extend(('0'..='9').map(String::from));
    tokens.extend([".", ",", "!", "?", "'"].map(String::from));
    tokens.extend(('A'..='Z').map(String::from));
    tokens.truncate(size);
    tokens
}

// ---------------------------------------------------------------------------
// Preference pairs and saved tensors
// ---------------------------------------------------------------------------

pub fn pair(
    prompt: &[u32],
    chosen: &[u32],
    rejected: &[u32],
) -> genarm::train::data::TokenizedPair {
    genarm::train::data::TokenizedPair {
        prompt: prompt.to_vec(),
        chosen: chosen.to_vec(),
        rejected: rejected.to_vec(),
    }
}

/// Pairs preferring responses that contain `marker` (at a place the prompt decides).
pub fn marker_pairs(n: usize, marker: u32, seed: u64) -> Vec<genarm::train::data::TokenizedPair> {
    let mut rng = SplitMix64::new(seed);
    let mut tok = |avoid: bool| loop {
        let t = 2 + (rng.next_u64() % 59) as u32;
        if !(avoid && t == marker) {
            return t;
        }
    };
    (0..n)
        .map(|_| {
            let prompt: Vec<u32> = (0..3).map(|_| tok(false)).collect();
            let mut chosen: Vec<u32> = (0..4).map(|_| tok(true)).collect();
            let pos = (prompt[0] % 4) as usize;
            chosen[pos] = marker;
            let rejected: Vec<u32> = (0..4).map(|_| tok(true)).collect();
            pair(&prompt, &chosen, &rejected)
        })
        .collect()
}

/// Two safetensors files hold the same tensors to 1e-6.
pub fn assert_same_safetensors(a: &Path, b: &Path) {
    let a_map = candle_core::safetensors::load(a, &Device::Cpu).expect("first file loads");
    let b_map = candle_core::safetensors::load(b, &Device::Cpu).expect("second file loads");
    assert_eq!(
        a_map.len(),
        b_map.len(),
        "{} vs {}",
        a.display(),
        b.display()
    );
    for (name, ta) in &a_map {
        let diff = (ta - &b_map[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{}: {name} differs by {diff}", a.display());
    }
}

// ---------------------------------------------------------------------------
// The genarm binary
// ---------------------------------------------------------------------------

pub fn genarm(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_genarm"))
        .args(args)
        .output()
        .expect("genarm runs")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "genarm failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON object")
}

/// A failing run must say why (containing `needle`) and must not have panicked.
pub fn assert_clean_error(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

// ---------------------------------------------------------------------------
// Gradients
// ---------------------------------------------------------------------------

/// Checks autograd's gradients of an f64 loss against central finite differences at
/// the first, middle and last entry of each named variable (`loss` recomputes the loss
/// from the variables' current values); returns how many entries were checked.
pub fn assert_gradients_match_finite_differences(
    vars: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
    loss: &mut dyn FnMut() -> f64,
) -> usize {
    let eps = 1e-5;
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut checked = 0;
    for (name, var) in vars {
        let g = flat(
            grads
                .get(var.as_tensor())
                .expect("the variable has a gradient"),
        );
        let values = flat(var.as_tensor());
        let set = |v: Vec<f64>| {
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap()
        };
        for idx in [0, values.len() / 2, values.len() - 1] {
            let mut nudged = |delta: f64| {
                let mut v = values.clone();
                v[idx] += delta;
                set(v);
                loss()
            };
            let fd = (nudged(eps) - nudged(-eps)) / (2.0 * eps);
            set(values.clone());
            let tol = 1e-6 + 1e-4 * fd.abs().max(g[idx].abs());
            assert!(
                (fd - g[idx]).abs() < tol,
                "{name}[{idx}]: autograd {} vs finite difference {fd}",
                g[idx]
            );
            checked += 1;
        }
    }
    checked
}

/// Small, quick training settings for tiny models: LoRA r = 4, α = 8, no dropout, LoRA
/// on the top `layers` layers, batches of 8 in micro-batches of 4, 5 warmup steps.
pub fn tiny_train_config(layers: usize) -> genarm::train::trainer::TrainConfig {
    genarm::train::trainer::TrainConfig {
        lora_rank: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        lora_layers: layers,
        batch_size: 8,
        micro_batch: 4,
        warmup: 5,
        checkpoint_every: 5,
        ..Default::default()
    }
}

/// The WebGPU engine on `ctx` for a base and its ARMs, opened as the CLI opens them.
pub fn gpu_engine_on(
    ctx: std::sync::Arc<genarm::gpu::GpuContext>,
    base: &Path,
    arms: &[PathBuf],
    context: Option<usize>,
) -> genarm::gpu::GpuEngine {
    let plans = arms
        .iter()
        .map(|p| genarm::model::arm_plan::plan_arm(p, base, &Device::Cpu))
        .collect::<genarm::Result<Vec<_>>>()
        .expect("ARMs open");
    let ckpt = genarm::model::Checkpoint::open(base).expect("base opens");
    genarm::gpu::GpuEngine::new(ctx, ckpt, plans, context).expect("GPU engine loads")
}
