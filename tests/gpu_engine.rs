//! The WebGPU engine against the f64 reference and the candle engine: tiny random
//! models in every weight format with LoRA and full-weight ARMs, greedy decoding,
//! sampling on the device, and the demo model. Natively this needs a Vulkan adapter
//! (lavapipe without a GPU: `apt-get install mesa-vulkan-drivers libvulkan1`).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::*;
use genarm::cpu::{CpuEngine, Precision};
use genarm::gpu::{GpuContext, GpuEngine};
use genarm::guide::{combine, Sampler, SamplingParams};
use genarm::model::Checkpoint;
use genarm::{Engine, GenerateOptions};

/// f32 activations against f64 over two layers: a few ulps per op, as for the CPU
/// engine (tests/engine.rs); the GPU sums in another order, not with less precision.
const F32_ATOL: f64 = 1e-4;

const TOKENS: [u32; 12] = [3, 17, 42, 0, 59, 8, 8, 23, 1, 60, 31, 5];

/// One device for the whole test binary: opening lavapipe costs a second or so.
fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    Arc::clone(CTX.get_or_init(|| {
        let ctx = GpuContext::new_blocking().unwrap_or_else(|e| {
            panic!("{e}\n(no GPU here? install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1)")
        });
        eprintln!("adapter: {}", ctx.adapter_name());
        Arc::new(ctx)
    }))
}

fn gpu(base: &Path, arms: &[PathBuf], context: Option<usize>) -> GpuEngine {
    gpu_engine_on(ctx(), base, arms, context)
}

/// The reference: the CPU engine with f32 activations, as the WebGPU engine computes.
fn cpu(base: &Path, arms: &[PathBuf], context: Option<usize>) -> CpuEngine {
    CpuEngine::load_with(base, arms, context, &Device::Cpu, Precision::F32)
        .expect("CPU engine loads")
}

fn reference_logprobs(model: &TinyModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    reference_logits(model, tokens)
        .iter()
        .map(|l| log_softmax(l))
        .collect()
}

/// `model` written as a GGUF in every weight format the GPU engine reads as stored
/// (and F32), into `dir`.
fn gguf_in_every_format(model: &TinyModel, dir: &Path) -> Vec<(GgmlDType, PathBuf)> {
    let formats = [
        GgmlDType::F32,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
    ];
    formats
        .into_iter()
        .map(|dtype| {
            let path = dir.join(format!("{dtype:?}.gguf"));
            model.write_gguf(&path, dtype);
            (dtype, path)
        })
        .collect()
}

#[test]
fn tiny_models_with_lora_arms_match_the_f64_reference_in_every_format() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 30);
    let full = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, 300);
    let partial = TinyLora::random(&cfg, 2, 2.0, &["q_proj", "k_proj", "down_proj"], 301);
    let dir = temp_dir("gpu-formats");
    let (arm_a, arm_b) = (dir.join("arm-a"), dir.join("arm-b"));
    write_lora_dir(&arm_a, &full, "hub/name");
    write_lora_dir(&arm_b, &partial, "hub/name");
    let hf = dir.join("hf");
    model.write_hf_dir(&hf, DType::F32, 1);
    let mut cases = vec![(hf, model.clone(), "hf f32 (half-split RoPE)".to_string())];
    for (dtype, path) in gguf_in_every_format(&model, &dir) {
        let stored = if dtype == GgmlDType::F32 {
            model.clone()
        } else {
            model.gguf_rounded(dtype)
        };
        cases.push((path, stored, format!("gguf {dtype:?} (interleaved RoPE)")));
    }
    for (path, stored, what) in cases {
        let want = [
            reference_logprobs(&stored, &TOKENS),
            reference_logprobs(&stored.with_lora_merged(&full), &TOKENS),
            reference_logprobs(&stored.with_lora_merged(&partial), &TOKENS),
        ];
        let mut engine = gpu(&path, &[arm_a.clone(), arm_b.clone()], None);
        let got = engine.teacher_forced(&TOKENS).unwrap();
        assert_eq!(got.len(), 3);
        for (m, want_m) in want.iter().enumerate() {
            for pos in 0..TOKENS.len() {
                let label = format!("{what} model {m} position {pos}");
                assert_close(&got[m][pos], &want_m[pos], F32_ATOL, 0.0, &label);
            }
        }
        // The cached path: a prefix, then one token.
        engine.reset();
        engine.step(&TOKENS[..TOKENS.len() - 1]).unwrap();
        let last = engine.step(&TOKENS[TOKENS.len() - 1..]).unwrap();
        let n = TOKENS.len() - 1;
        assert_close(
            &last.base,
            &want[0][n],
            F32_ATOL,
            0.0,
            &format!("{what} cached base"),
        );
        assert_close(
            &last.arms[1],
            &want[2][n],
            F32_ATOL,
            0.0,
            &format!("{what} cached arm"),
        );
    }
}

/// q, k and v stored in three formats: the engine's stacked q/k/v weight then holds
/// all three as f32, which must match the candle engine reading each in its own format.
#[test]
fn qkv_in_mixed_formats_match_the_cpu_engine() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 35);
    let lora = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, 350);
    let dir = temp_dir("gpu-mixed");
    let path = dir.join("mixed.gguf");
    model.write_gguf_mixed(&path, &|name| {
        if name.contains(".q_proj.") {
            GgmlDType::Q4_0
        } else if name.contains(".k_proj.") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q4_1
        }
    });
    let arm = dir.join("arm");
    write_lora_dir(&arm, &lora, "hub/name");
    let arms = [arm];
    let want = cpu(&path, &arms, None).teacher_forced(&TOKENS).unwrap();
    let got = gpu(&path, &arms, None).teacher_forced(&TOKENS).unwrap();
    for (m, (g, w)) in got.iter().zip(&want).enumerate() {
        for pos in 0..TOKENS.len() {
            let w: Vec<f64> = w[pos].iter().map(|&v| f64::from(v)).collect();
            let label = format!("mixed q/k/v model {m} position {pos}");
            assert_close(&g[pos], &w, F32_ATOL, 0.0, &label);
        }
    }
}

#[test]
fn qwen2_biases_and_tied_embeddings() {
    let cfg = TinyConfig {
        attention_bias: true,
        tie_word_embeddings: true,
        ..Default::default()
    };
    let model = TinyModel::random(&cfg, 31);
    let dir = temp_dir("gpu-qwen2");
    model.write_hf_dir(&dir, DType::F32, 2);
    let got = gpu(&dir, &[], None).teacher_forced(&TOKENS).unwrap();
    let want = reference_logprobs(&model, &TOKENS);
    for pos in 0..TOKENS.len() {
        assert_close(
            &got[0][pos],
            &want[pos],
            F32_ATOL,
            0.0,
            &format!("position {pos}"),
        );
    }
}

#[test]
fn full_weight_arm_with_a_larger_vocabulary_is_cut_to_the_base() {
    let cfg = TinyConfig::default();
    let base = TinyModel::random(&cfg, 32);
    let big = TinyModel::random(
        &TinyConfig {
            vocab_size: cfg.vocab_size + 3,
            ..cfg.clone()
        },
        33,
    );
    let lora = TinyLora::random(&cfg, 3, 6.0, &["v_proj", "up_proj"], 330);
    let dir = temp_dir("gpu-full-arm");
    let base_path = dir.join("base.gguf");
    base.write_gguf(&base_path, GgmlDType::F32);
    let big_path = dir.join("big.gguf");
    big.write_gguf(&big_path, GgmlDType::F32);
    let lora_dir = dir.join("lora");
    write_lora_dir(&lora_dir, &lora, "hub/name");
    // ARM order: full, LoRA — the LoRA row lives in group 0, the full ARM in group 1.
    let mut engine = gpu(&base_path, &[big_path, lora_dir], None);
    let got = engine.teacher_forced(&TOKENS).unwrap();
    // GenARM's rule: the ARM's logits cut to the base vocabulary, then normalised.
    let want_big: Vec<Vec<f64>> = reference_logits(&big, &TOKENS)
        .iter()
        .map(|l| log_softmax(&l[..cfg.vocab_size]))
        .collect();
    let want_lora = reference_logprobs(&base.with_lora_merged(&lora), &TOKENS);
    for pos in 0..TOKENS.len() {
        assert_eq!(got[1][pos].len(), cfg.vocab_size);
        let cut = &want_big[pos];
        assert_close(&got[1][pos], cut, F32_ATOL, 0.0, &format!("full arm {pos}"));
        assert_close(
            &got[2][pos],
            &want_lora[pos],
            F32_ATOL,
            0.0,
            &format!("lora {pos}"),
        );
    }
}

/// max |a − b| over two engines' `[model][position][token]` log-probs.
fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f64 {
    assert_eq!(a.len(), b.len(), "models");
    let mut max = 0f64;
    for (ma, mb) in a.iter().zip(b) {
        assert_eq!(ma.len(), mb.len(), "positions");
        for (pa, pb) in ma.iter().zip(mb) {
            assert_eq!(pa.len(), pb.len(), "vocabulary");
            for (x, y) in pa.iter().zip(pb) {
                max = max.max(f64::from((x - y).abs()));
            }
        }
    }
    max
}

/// A tiny model with config features beyond the plain Llama: the GPU engine
/// (teacher-forced, and prefilled by single steps) against the candle engine, and the
/// candle engine against the f64 reference, all within F32_ATOL. Prints the max |Δ|.
/// `without` is the config minus the features under test: the reference must move by
/// far more than the tolerance when they are dropped, or the test would prove nothing.
fn gpu_matches_cpu_and_reference(cfg: &TinyConfig, without: TinyConfig, seed: u64, label: &str) {
    let model = TinyModel::random(cfg, seed);
    let dir = temp_dir(label);
    model.write_hf_dir(&dir, DType::F32, 1);
    let want = reference_logprobs(&model, &TOKENS);
    let plain = TinyModel {
        config: without,
        ..model.clone()
    };
    let moved = reference_logprobs(&plain, &TOKENS)
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        moved > 100.0 * F32_ATOL,
        "{label}: the features move logits by {moved}"
    );
    let cpu_lp = cpu(&dir, &[], None).teacher_forced(&TOKENS).unwrap();
    let mut gpu_engine = gpu(&dir, &[], None);
    let gpu_lp = gpu_engine.teacher_forced(&TOKENS).unwrap();
    eprintln!(
        "{label}: {} dispatches per token",
        gpu_engine.dispatches_per_token()
    );
    let mut stepped = vec![Vec::new()];
    for &t in &TOKENS {
        stepped[0].push(gpu_engine.step(&[t]).unwrap().base);
    }
    let mut vs_ref = [0f64; 2];
    for pos in 0..TOKENS.len() {
        for (k, (engine, lp)) in [("cpu", &cpu_lp), ("gpu", &gpu_lp)].iter().enumerate() {
            let what = format!("{label}: {engine} vs f64, position {pos}");
            assert_close(&lp[0][pos], &want[pos], F32_ATOL, 0.0, &what);
            for (g, w) in lp[0][pos].iter().zip(&want[pos]) {
                vs_ref[k] = vs_ref[k].max((f64::from(*g) - w).abs());
            }
        }
        let what = format!("{label}: gpu stepped vs cpu, position {pos}");
        let w: Vec<f64> = cpu_lp[0][pos].iter().map(|&v| f64::from(v)).collect();
        assert_close(&stepped[0][pos], &w, F32_ATOL, 0.0, &what);
    }
    eprintln!(
        "{label}: max |Δ| gpu−cpu teacher-forced {:e}, gpu stepped−cpu {:e}, cpu−f64 {:e}, \
         gpu−f64 {:e}",
        max_diff(&gpu_lp, &cpu_lp),
        max_diff(&stepped, &cpu_lp),
        vs_ref[0],
        vs_ref[1]
    );
}

#[test]
fn llama_attention_and_mlp_biases_with_gelu() {
    let cfg = TinyConfig {
        o_bias: true,
        mlp_bias: true,
        hidden_act: "gelu",
        ..Default::default()
    };
    let without = TinyConfig {
        o_bias: false,
        mlp_bias: false,
        hidden_act: "silu",
        ..cfg.clone()
    };
    gpu_matches_cpu_and_reference(&cfg, without, 34, "llama-bias-gelu");
}

#[test]
fn llama_mlp_bias_with_tanh_gelu_and_linear_rope_scaling() {
    let cfg = TinyConfig {
        mlp_bias: true,
        hidden_act: "gelu_pytorch_tanh",
        rope_linear_factor: Some(2.5),
        ..Default::default()
    };
    let without = TinyConfig {
        mlp_bias: false,
        hidden_act: "silu",
        rope_linear_factor: None,
        ..cfg.clone()
    };
    gpu_matches_cpu_and_reference(&cfg, without, 35, "llama-tanh-gelu-rope-linear");
}

/// Window 4 over 12 tokens: positions 4.. see only their last 4 keys.
#[test]
fn mistral_sliding_window_shorter_than_the_sequence() {
    let cfg = TinyConfig {
        sliding_window: Some(4),
        ..Default::default()
    };
    assert!(TOKENS.len() >= 2 * 4);
    let without = TinyConfig {
        sliding_window: None,
        ..cfg.clone()
    };
    gpu_matches_cpu_and_reference(&cfg, without, 36, "mistral-window-4");
}

#[test]
fn qwen2_sliding_window_shorter_than_the_sequence() {
    let cfg = TinyConfig {
        attention_bias: true,
        sliding_window: Some(5),
        ..Default::default()
    };
    assert!(TOKENS.len() >= 2 * 5);
    let without = TinyConfig {
        sliding_window: None,
        ..cfg.clone()
    };
    gpu_matches_cpu_and_reference(&cfg, without, 37, "qwen2-window-5");
}

/// A full-weight ARM with 3 tokens more than the base: its GPU log-probs, teacher-forced
/// and in guided steps (the on-device pick), equal the candle engine's, which cuts the
/// logits to the base vocabulary before normalising. The extra tokens carry enough
/// mass that normalising first would differ by far more than the tolerance.
#[test]
fn larger_vocabulary_arm_log_probs_match_the_cpu_engine() {
    let cfg = TinyConfig::default();
    let base = TinyModel::random(&cfg, 38);
    let big_cfg = TinyConfig {
        vocab_size: cfg.vocab_size + 3,
        ..cfg.clone()
    };
    let big = TinyModel::random(&big_cfg, 39);
    let dir = temp_dir("gpu-big-vocab-arm");
    let (base_dir, big_dir) = (dir.join("base"), dir.join("big"));
    base.write_hf_dir(&base_dir, DType::F32, 1);
    big.write_hf_dir(&big_dir, DType::F32, 1);
    let arms = [big_dir];
    let (mut g, mut c) = (gpu(&base_dir, &arms, None), cpu(&base_dir, &arms, None));
    let (got, want) = (
        g.teacher_forced(&TOKENS).unwrap(),
        c.teacher_forced(&TOKENS).unwrap(),
    );
    let mut shift = 0f64;
    for (pos, logits) in reference_logits(&big, &TOKENS).iter().enumerate() {
        let full = log_softmax(logits);
        let cut = log_softmax(&logits[..cfg.vocab_size]);
        shift = shift.max((full[0] - cut[0]).abs());
        let w: Vec<f64> = want[1][pos].iter().map(|&v| f64::from(v)).collect();
        assert_close(&got[1][pos], &w, F32_ATOL, 0.0, &format!("arm {pos}"));
    }
    assert!(
        shift > 100.0 * F32_ATOL,
        "the extra tokens shift by {shift}"
    );
    let teacher = max_diff(&got, &want);
    let params = SamplingParams {
        greedy: true,
        ..Default::default()
    };
    let (mut gs, mut cs) = (Sampler::new(params.clone()), Sampler::new(params));
    let mut guided = 0f64;
    let mut token = TOKENS[0];
    for step in 0..8 {
        let gc = g.guided_step(&[token], &[0.7], &mut gs).unwrap();
        let cc = c.guided_step(&[token], &[0.7], &mut cs).unwrap();
        assert_eq!(gc.id, cc.id, "guided step {step}");
        let pairs = [
            (gc.base_logprob, cc.base_logprob),
            (gc.arm_logprobs[0], cc.arm_logprobs[0]),
        ];
        for (a, b) in pairs {
            assert!(
                (a - b).abs() <= F32_ATOL as f32,
                "step {step}: gpu {a} cpu {b}"
            );
            guided = guided.max(f64::from((a - b).abs()));
        }
        token = gc.id;
    }
    eprintln!(
        "big-vocab ARM: normalise-then-cut would shift by {shift:e}; max |Δ| gpu−cpu \
         teacher-forced {teacher:e}, guided picks {guided:e}"
    );
}

fn greedy(engine: &mut dyn Engine, prompt: &[u32], alphas: &[f32], n: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        alphas: alphas.to_vec(),
        sampling: SamplingParams {
            greedy: true,
            ..Default::default()
        },
        ignore_eos: true,
        ..Default::default()
    };
    genarm::generate(engine, None, prompt, &opts, &mut |_| true)
        .expect("generation runs")
        .tokens
}

#[test]
fn guided_greedy_tokens_and_logprobs_match_the_cpu_engine() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 34);
    let a = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, 340);
    let b = TinyLora::random(&cfg, 2, 4.0, &["o_proj", "gate_proj"], 341);
    let dir = temp_dir("gpu-greedy");
    let path = dir.join("tiny.gguf");
    model.write_gguf(&path, GgmlDType::Q8_0);
    let (arm_a, arm_b) = (dir.join("a"), dir.join("b"));
    write_lora_dir(&arm_a, &a, "hub/name");
    write_lora_dir(&arm_b, &b, "hub/name");
    let prompt = [5, 9, 2];
    let mut n_arms_cases = vec![(vec![], vec![])];
    n_arms_cases.push((vec![arm_a.clone()], vec![1.5]));
    n_arms_cases.push((vec![arm_a, arm_b], vec![0.7, -1.2]));
    for (arms, alphas) in n_arms_cases {
        let want = greedy(&mut cpu(&path, &arms, None), &prompt, &alphas, 60);
        let mut g = gpu(&path, &arms, None);
        let got = greedy(&mut g, &prompt, &alphas, 60);
        assert_eq!(got, want, "greedy tokens with {} ARMs", arms.len());
        // The per-token log-probs the device reports are the models' own.
        let mut c = cpu(&path, &arms, None);
        let mut sampler = Sampler::new(SamplingParams {
            greedy: true,
            ..Default::default()
        });
        let chosen = g.guided_step_blocking(&prompt, &alphas, &mut sampler);
        let lp = c.step(&prompt).unwrap();
        assert_eq!(chosen.id, want[0]);
        assert!((chosen.base_logprob - lp.base[chosen.id as usize]).abs() < 1e-4);
        for (i, arm) in lp.arms.iter().enumerate() {
            assert!((chosen.arm_logprobs[i] - arm[chosen.id as usize]).abs() < 1e-4);
        }
    }
}

#[test]
fn a_prompt_fed_in_chunks_steps_as_one_fed_whole() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 36);
    let lora = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, 360);
    let dir = temp_dir("gpu-feed");
    let path = dir.join("tiny.gguf");
    model.write_gguf(&path, GgmlDType::Q8_0);
    let arm = dir.join("a");
    write_lora_dir(&arm, &lora, "hub/name");
    let prompt = [5, 9, 2, 7, 1, 3, 8];
    let arms = [arm];
    let mut engines: Vec<Box<dyn Engine>> = vec![
        Box::new(cpu(&path, &arms, None)),
        Box::new(gpu(&path, &arms, None)),
    ];
    for engine in &mut engines {
        let whole = engine.step(&prompt).unwrap();
        engine.reset();
        engine.feed(&prompt[..3]).unwrap();
        engine.feed(&prompt[3..6]).unwrap();
        assert_eq!(engine.position(), 6);
        let chunked = engine.step(&prompt[6..]).unwrap();
        let rows = |lp: &genarm::StepLogProbs| [&lp.base, &lp.arms[0]].map(|r| r.clone());
        for (w, c) in rows(&whole).iter().zip(rows(&chunked).iter()) {
            let diff = w
                .iter()
                .zip(c)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-5,
                "{}: chunked feed differs by {diff}",
                engine.backend()
            );
        }
    }
}

/// The device's chunked prefill against the candle engine at every position of the
/// prompt: lengths of one token, one short of a chunk, exactly a chunk, one past it and
/// over two chunks; a feed continued mid-chunk where another ended; and the greedy
/// tokens after the prompt. In every weight format, with a LoRA ARM in the base's
/// batch and an ARM with weights of its own (a group of its own), then with two LoRA
/// ARMs (three rows a position, an odd chunk of rows). Both engines compute in f32, so
/// the tolerance is the f64-reference one the other GPU tests use.
#[test]
fn prompt_chunks_match_the_cpu_engine_at_every_position() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 37);
    let own = TinyModel::random(&cfg, 38);
    let full = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, 370);
    let partial = TinyLora::random(&cfg, 2, 4.0, &["o_proj", "gate_proj", "v_proj"], 371);
    let dir = temp_dir("gpu-prefill");
    let (full_dir, partial_dir) = (dir.join("full"), dir.join("partial"));
    write_lora_dir(&full_dir, &full, "hub/name");
    write_lora_dir(&partial_dir, &partial, "hub/name");
    let own_path = dir.join("own.gguf");
    own.write_gguf(&own_path, GgmlDType::Q8_0);
    let mut rng = SplitMix64::new(372);
    let tokens: Vec<u32> = (0..cfg.max_position_embeddings)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    let mut cases = Vec::new();
    for (dtype, path) in gguf_in_every_format(&model, &dir) {
        let arms = vec![full_dir.clone(), own_path.clone()];
        cases.push((
            path,
            arms,
            vec![1.0, -0.5],
            format!("{dtype:?} + LoRA + own-weight ARM"),
        ));
    }
    let q4 = dir.join("Q4_1.gguf");
    let two = vec![full_dir.clone(), partial_dir.clone()];
    cases.push((q4, two, vec![0.7, -1.2], "Q4_1 + two LoRA ARMs".into()));
    for (path, arms, alphas, what) in cases {
        let mut g = gpu(&path, &arms, None);
        let mut c = cpu(&path, &arms, None);
        let n = g.chunk_positions();
        assert!(n > 1 && 2 * n + 3 <= tokens.len(), "{what}: chunks of {n}");
        let all = &tokens[..2 * n + 3];
        let want = c.teacher_forced(all).unwrap();
        let got = g.teacher_forced(all).unwrap();
        assert_eq!(got.len(), want.len(), "{what}: models");
        let close = |got: &[f32], model: usize, pos: usize, how: &str| {
            let w: Vec<f64> = want[model][pos].iter().map(|&v| f64::from(v)).collect();
            let label = format!("{what}: {how}, model {model} position {pos} (chunks of {n})");
            assert_close(got, &w, F32_ATOL, 0.0, &label);
        };
        for (m, per_pos) in got.iter().enumerate() {
            assert_eq!(per_pos.len(), all.len(), "{what}: positions");
            for (pos, lp) in per_pos.iter().enumerate() {
                close(lp, m, pos, "teacher-forced");
            }
        }
        let check_step = |lp: &genarm::StepLogProbs, pos: usize, how: &str| {
            close(&lp.base, 0, pos, how);
            for (i, arm) in lp.arms.iter().enumerate() {
                close(arm, 1 + i, pos, how);
            }
        };
        // Per ChunkPlan: a short remainder goes as decode steps, a longer one as a padded
        // chunk (on lavapipe from half a chunk on); both kinds of feed are here.
        for len in [1, 2, n / 2, n - 1, n, n + 1, n + n / 2 + 1, 2 * n + 3] {
            g.reset();
            let lp = g.step(&all[..len]).unwrap();
            check_step(&lp, len - 1, &format!("a {len}-token step"));
        }
        // A feed that ends mid-chunk, one that crosses a chunk boundary, then a step.
        g.reset();
        g.feed(&all[..5]).unwrap();
        g.feed(&all[5..5 + n]).unwrap();
        assert_eq!(g.position(), 5 + n);
        let lp = g.step(&all[5 + n..]).unwrap();
        check_step(&lp, all.len() - 1, "continued feeds");
        let prompt = &all[..n + 1];
        let want_tokens = greedy(&mut c, prompt, &alphas, 20);
        assert_eq!(
            greedy(&mut g, prompt, &alphas, 20),
            want_tokens,
            "{what}: greedy tokens after a {}-token prompt",
            prompt.len()
        );
    }
}

/// Helpers over the engine's blocking API.
trait Blocking {
    fn guided_step_blocking(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> genarm::engine::Chosen;
}

impl Blocking for GpuEngine {
    fn guided_step_blocking(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> genarm::engine::Chosen {
        self.reset();
        self.guided_step(tokens, alphas, sampler)
            .expect("guided step")
    }
}

/// Draws `n` first tokens after `prompt` on the device, one seeded draw each.
fn gpu_draws(
    engine: &mut GpuEngine,
    prompt: &[u32],
    alphas: &[f32],
    params: &SamplingParams,
    n: usize,
) -> Vec<u32> {
    let mut sampler = Sampler::new(params.clone());
    (0..n)
        .map(|_| engine.guided_step_blocking(prompt, alphas, &mut sampler).id)
        .collect()
}

#[test]
fn device_sampling_follows_the_guided_distribution_and_is_reproducible() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 35);
    let lora = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, 350);
    let dir = temp_dir("gpu-sampling");
    let path = dir.join("tiny.gguf");
    model.write_gguf(&path, GgmlDType::F32);
    let arm = dir.join("arm");
    write_lora_dir(&arm, &lora, "hub/name");
    let prompt = [7, 30, 12, 4];
    let alphas = [0.8];
    let lp = cpu(&path, std::slice::from_ref(&arm), None)
        .step(&prompt)
        .unwrap();
    let scores = combine(&lp.base, &[&lp.arms[0]], &alphas);
    let mut engine = gpu(&path, &[arm], None);

    let cases = [
        SamplingParams {
            temperature: 1.3,
            seed: 11,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.8,
            top_k: Some(6),
            seed: 12,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
            seed: 13,
            ..Default::default()
        },
    ];
    let draws = 1500;
    for params in &cases {
        // The target: the CPU sampler's own distribution (top-k / top-p applied).
        let target = Sampler::new(params.clone()).probabilities(&scores);
        let total: f64 = target.iter().map(|p| p.1).sum();
        let mut expected = vec![0.0; cfg.vocab_size];
        for &(i, w) in &target {
            expected[i as usize] = w / total * draws as f64;
        }
        let got = gpu_draws(&mut engine, &prompt, &alphas, params, draws);
        let mut counts = vec![0usize; cfg.vocab_size];
        for &id in &got {
            counts[id as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            assert!(
                c == 0 || expected[i] > 0.0,
                "{params:?}: token {i} drawn {c} times outside the kept set"
            );
        }
        // Pearson χ² over tokens expected ≥ 5 times, the rest pooled.
        let (mut chi2, mut dof, mut pooled_e, mut pooled_c) = (0.0, 0usize, 0.0, 0.0);
        for i in 0..cfg.vocab_size {
            if expected[i] >= 5.0 {
                chi2 += (counts[i] as f64 - expected[i]).powi(2) / expected[i];
                dof += 1;
            } else {
                pooled_e += expected[i];
                pooled_c += counts[i] as f64;
            }
        }
        if pooled_e >= 5.0 {
            chi2 += (pooled_c - pooled_e).powi(2) / pooled_e;
            dof += 1;
        }
        let dof = dof.saturating_sub(1).max(1) as f64;
        // Mean dof, sd √(2·dof): 5 sd is a one-in-millions false alarm, while a wrong
        // temperature or threshold gives χ² in the hundreds at this sample size.
        let bound = dof + 5.0 * (2.0 * dof).sqrt();
        assert!(
            chi2 < bound,
            "{params:?}: χ² = {chi2:.1} over {dof} dof (bound {bound:.1})"
        );

        let again = gpu_draws(&mut engine, &prompt, &alphas, params, 50);
        assert_eq!(&again[..], &got[..50], "{params:?}: same seed, same draws");
    }

    // Without top-k/top-p both samplers walk the vocabulary in index order with the
    // same uniform numbers, so they pick the same tokens (but at f32 rounding edges).
    let params = &cases[0];
    let on_device = gpu_draws(&mut engine, &prompt, &alphas, params, 300);
    let mut host = Sampler::new(params.clone());
    let same = on_device
        .iter()
        .filter(|&&id| id == host.sample(&scores))
        .count();
    assert!(same >= 297, "only {same}/300 draws equal the CPU sampler's");
}

#[test]
fn alphas_and_temperature_change_between_tokens_without_rebuilding() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 36);
    let lora = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, 360);
    let dir = temp_dir("gpu-sliders");
    let path = dir.join("tiny.gguf");
    model.write_gguf(&path, GgmlDType::F32);
    let arm = dir.join("arm");
    write_lora_dir(&arm, &lora, "hub/name");
    let mut g = gpu(&path, std::slice::from_ref(&arm), None);
    let mut c = cpu(&path, &[arm], None);
    let mut sampler = Sampler::new(SamplingParams {
        greedy: true,
        ..Default::default()
    });
    let mut feed = vec![1u32, 2, 3];
    g.reset();
    c.reset();
    for step in 0..20 {
        let alpha = [-2.0 + 0.25 * step as f32];
        let chosen = g.guided_step(&feed, &alpha, &mut sampler).unwrap();
        let lp = c.step(&feed).unwrap();
        let want = genarm::guide::argmax(&combine(&lp.base, &[&lp.arms[0]], &alpha));
        assert_eq!(chosen.id, want, "step {step}, alpha {}", alpha[0]);
        feed = vec![chosen.id];
    }
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let model = TinyModel::random(&TinyConfig::default(), 37);
    let dir = temp_dir("gpu-context");
    let path = dir.join("tiny.gguf");
    model.write_gguf(&path, GgmlDType::F32);
    let mut engine = gpu(&path, &[], Some(8));
    assert_eq!(engine.context_len(), 8);
    let err = engine.step(&[1; 9]).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
    let opts = GenerateOptions::default();
    let err = genarm::generate(&mut engine, None, &[1; 8], &opts, &mut |_| true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("context"), "{err}");
}

// ---------------------------------------------------------------------------
// The demo model (SmolLM2-135M-Instruct, Q4_1)
// ---------------------------------------------------------------------------

const PROMPTS: [&str; 12] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "Name a famous painter.",
    "Describe a cat in five words.",
    "What should I eat for breakfast?",
];

fn demo_arms(dir: &Path) -> Vec<PathBuf> {
    let positive = Path::new(env!("CARGO_MANIFEST_DIR")).join("www/arms/positive");
    let random = dir.join("random-lora");
    let base = Checkpoint::open(&demo_model()).unwrap();
    genarm::model::lora::write_random_adapter(&random, &base.config, "base", 8, 16.0, 0.02, 5)
        .unwrap();
    vec![positive, random]
}

#[test]
fn demo_model_logits_and_greedy_text_match_the_cpu_engine() {
    let model = demo_model();
    let tok = demo_tokenizer();
    let dir = temp_dir("gpu-demo");
    let arms = demo_arms(&dir);
    let context = Some(256);

    // Base + both ARMs: last-position log-probs and teacher-forced top-1 per prompt.
    let mut g = gpu(&model, &arms, context);
    let mut c = cpu(&model, &arms, context);
    let (mut agree, mut total) = (0usize, 0usize);
    let mut worst = 0f32;
    // Plain prompts: the chat template's system turn would multiply the positions
    // (and the minutes on lavapipe) without testing anything new.
    for text in PROMPTS {
        let ids = tok.encode_prompt(text, false, None).unwrap();
        let got = g.teacher_forced(&ids).unwrap();
        let want = c.teacher_forced(&ids).unwrap();
        for (gm, wm) in got.iter().zip(&want) {
            for (gp, wp) in gm.iter().zip(wm) {
                total += 1;
                agree += usize::from(genarm::guide::argmax(gp) == genarm::guide::argmax(wp));
            }
            let (gl, wl) = (gm.last().unwrap(), wm.last().unwrap());
            for (a, b) in gl.iter().zip(wl) {
                // Tokens with log-prob above -20: the rest is irrelevant to any pick.
                if *b > -20.0 {
                    worst = worst.max((a - b).abs());
                }
            }
        }
    }
    eprintln!(
        "teacher-forced top-1 agreement {agree}/{total}, worst last-position |Δ log p| {worst:.2e}"
    );
    assert!(
        agree as f64 >= 0.99 * total as f64,
        "top-1 agreement {agree}/{total}"
    );
    // Both engines decode the same Q4_1 blocks with f32 activations; only the order of
    // the f32 sums differs: ~1e-5 relative per dot product, amplified through 30 layers.
    assert!(
        worst < 5e-3,
        "worst last-position log-prob difference {worst}"
    );

    // 64 greedy tokens: base only, one ARM, two ARMs.
    let prompt = tok.encode_prompt(PROMPTS[1], false, None).unwrap();
    for (n, alphas) in [(0, vec![]), (1, vec![1.0]), (2, vec![1.0, 0.5])] {
        let mut g = gpu(&model, &arms[..n], context);
        let mut c = cpu(&model, &arms[..n], context);
        let got = greedy(&mut g, &prompt, &alphas, 64);
        let want = greedy(&mut c, &prompt, &alphas, 64);
        assert_eq!(got, want, "greedy tokens with {n} ARMs");
    }
}
