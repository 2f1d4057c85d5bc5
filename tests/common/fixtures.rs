//! Tiny random Llama-family models and adapters (f64, HF layout), the demo model, and
//! small training inputs: what the tests build before writing or running anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device};

use super::rng::{stream, SplitMix64};
use super::writers::quantize;

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
}

// ---------------------------------------------------------------------------
// LoRA adapters
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
// Preference pairs
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

// ---------------------------------------------------------------------------
// Training and engines
// ---------------------------------------------------------------------------

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

/// How often `marker` is sampled (40 seeds, 4 tokens each, EOS ignored) from `base`
/// alone or guided by `arm` at `alpha`.
pub fn marker_frequency(base: &Path, arm: Option<&Path>, alpha: f32, marker: u32) -> f64 {
    let arms: Vec<PathBuf> = arm.map(|a| vec![a.to_path_buf()]).unwrap_or_default();
    let mut engine = genarm::cpu::CpuEngine::load(base, &arms, None, &Device::Cpu).unwrap();
    let (mut hits, mut total) = (0usize, 0usize);
    for seed in 0..40u64 {
        let opts = genarm::GenerateOptions {
            max_new_tokens: 4,
            alphas: if arm.is_some() { vec![alpha] } else { vec![] },
            sampling: genarm::SamplingParams {
                seed,
                ..Default::default()
            },
            ignore_eos: true,
            ..Default::default()
        };
        let prompt = [2 + (seed % 50) as u32, 7, 9];
        let g = genarm::generate(&mut engine, None, &prompt, &opts, &mut |_| true).unwrap();
        hits += g.tokens.iter().filter(|&&t| t == marker).count();
        total += g.tokens.len();
    }
    hits as f64 / total as f64
}

/// Trains on `base` with `cfg` straight through, and again "killed" after 7 steps (the
/// last checkpoint is at 7) then resumed by a new trainer; `saved` (the output weights)
/// must be the same. Returns the interrupted run's directory.
pub fn assert_resume_matches_uninterrupted(
    base: &Path,
    name: &str,
    cfg: genarm::train::trainer::TrainConfig,
    saved: &str,
) -> PathBuf {
    use genarm::train::trainer::{split_pairs, ArmLabel, Trainer};
    let base = genarm::model::Checkpoint::open(base).unwrap();
    let (train, eval) = split_pairs(marker_pairs(80, 5, 3), 0.1, 2);
    let label = ArmLabel::default();
    let run = |out: &Path, resume: bool, max_steps: Option<usize>| {
        Trainer::new(&base, cfg.clone(), out, 32, &Device::Cpu)
            .unwrap()
            .train(&train, &eval, &label, resume, max_steps, &mut |_| {})
            .unwrap()
    };
    let straight = super::temp_dir(&format!("{name}-straight"));
    run(&straight, false, None);
    let broken = super::temp_dir(&format!("{name}-broken"));
    run(&broken, false, Some(7));
    let summary = run(&broken, true, None);
    assert_eq!(summary.resumed_from, Some(7));
    super::assert_same_safetensors(&straight.join(saved), &broken.join(saved));
    broken
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
