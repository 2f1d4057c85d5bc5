//! The candle engine against a direct f64 implementation of the transformer, on tiny
//! random models written in every format the loaders read.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::*;
use genarm::cpu::{CpuEngine, Precision};
use genarm::Engine;

/// f32 activations and weights against f64: a few ulps per op over two layers.
const F32_ATOL: f64 = 1e-4;

const TOKENS: [u32; 12] = [3, 17, 42, 0, 59, 8, 8, 23, 1, 60, 31, 5];

/// The engine with f32 activations, the precision the f64 references check (the
/// default rounds quantised weights' activations to 16 bits on some CPUs).
fn load(base: &Path, arms: &[PathBuf]) -> CpuEngine {
    CpuEngine::load_with(base, arms, None, &Device::Cpu, Precision::F32).expect("engine loads")
}

/// Reference log-probs at every position.
fn reference_logprobs(model: &TinyModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    reference_logits(model, tokens)
        .iter()
        .map(|l| log_softmax(l))
        .collect()
}

fn assert_matches_reference(engine: &mut CpuEngine, model: &TinyModel, atol: f64, what: &str) {
    let got = engine.teacher_forced(&TOKENS).unwrap();
    let want = reference_logprobs(model, &TOKENS);
    for (pos, (g, w)) in got[0].iter().zip(&want).enumerate() {
        assert_close(g, w, atol, 0.0, &format!("{what}, position {pos}"));
    }
}

#[test]
fn gguf_f32_matches_f64_reference() {
    let model = TinyModel::random(&TinyConfig::default(), 1);
    let dir = temp_dir("gguf-f32");
    let path = dir.join("tiny.gguf");
    model.write_gguf(&path, GgmlDType::F32);
    assert_matches_reference(&mut load(&path, &[]), &model, F32_ATOL, "gguf f32");
}

#[test]
fn hf_dir_matches_f64_reference() {
    let model = TinyModel::random(&TinyConfig::default(), 2);
    let dir = temp_dir("hf-f32");
    model.write_hf_dir(&dir, DType::F32, 1);
    assert_matches_reference(&mut load(&dir, &[]), &model, F32_ATOL, "hf f32");
}

#[test]
fn gguf_and_safetensors_of_the_same_weights_agree() {
    let model = TinyModel::random(&TinyConfig::default(), 3);
    let dir = temp_dir("same-weights");
    let gguf = dir.join("tiny.gguf");
    model.write_gguf(&gguf, GgmlDType::F32);
    let hf = dir.join("hf");
    model.write_hf_dir(&hf, DType::F32, 1);
    let a = load(&gguf, &[]).teacher_forced(&TOKENS).unwrap();
    let b = load(&hf, &[]).teacher_forced(&TOKENS).unwrap();
    for (pos, (x, y)) in a[0].iter().zip(&b[0]).enumerate() {
        let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        // Same weights, different RoPE pairing (interleaved on permuted rows vs
        // half-split): equal up to f32 summation order.
        assert_close(
            x,
            &y,
            2e-5,
            0.0,
            &format!("gguf vs safetensors, position {pos}"),
        );
    }
}

#[test]
fn sharded_bf16_qwen2_style_dir_matches_reference() {
    let cfg = TinyConfig {
        attention_bias: true,
        tie_word_embeddings: true,
        ..Default::default()
    };
    let model = TinyModel::random(&cfg, 4);
    let dir = temp_dir("hf-bf16-sharded");
    model.write_hf_dir(&dir, DType::BF16, 3);
    let stored = model.hf_rounded(DType::BF16);
    assert_matches_reference(
        &mut load(&dir, &[]),
        &stored,
        F32_ATOL,
        "bf16 sharded, bias, tied",
    );
}

#[test]
fn quantized_gguf_matches_reference_on_dequantised_weights() {
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::F16,
    ] {
        let model = TinyModel::random(&TinyConfig::default(), 5);
        let dir = temp_dir("gguf-quant");
        let path = dir.join("tiny.gguf");
        model.write_gguf(&path, dtype);
        let stored = model.gguf_rounded(dtype);
        assert_matches_reference(
            &mut load(&path, &[]),
            &stored,
            F32_ATOL,
            &format!("{dtype:?}"),
        );
    }
}

#[test]
fn kv_cached_decoding_equals_full_recomputation() {
    let model = TinyModel::random(&TinyConfig::default(), 6);
    let dir = temp_dir("kv-cache");
    let path = dir.join("tiny.gguf");
    model.write_gguf(&path, GgmlDType::F32);
    let mut engine = load(&path, &[]);
    let full = engine.teacher_forced(&TOKENS).unwrap();
    // Prefill a prefix, then one token at a time, then a chunk of two.
    engine.reset();
    let mut stepped = vec![engine.step(&TOKENS[..4]).unwrap().base];
    for i in 4..9 {
        stepped.push(engine.step(&TOKENS[i..i + 1]).unwrap().base);
    }
    stepped.push(engine.step(&TOKENS[9..11]).unwrap().base);
    let positions = [3, 4, 5, 6, 7, 8, 10];
    for (s, &p) in stepped.iter().zip(&positions) {
        let want: Vec<f64> = full[0][p].iter().map(|&v| v as f64).collect();
        assert_close(s, &want, 1e-5, 0.0, &format!("cached step at position {p}"));
    }
    assert_eq!(engine.position(), 11);
}

#[test]
fn lora_arm_rows_match_merged_reference_on_both_rope_layouts() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 7);
    let targets = genarm::model::lora::TARGETS;
    let lora_a = TinyLora::random(&cfg, 4, 8.0, &targets, 70);
    let lora_b = TinyLora::random(&cfg, 2, 4.0, &["q_proj", "v_proj", "down_proj"], 71);
    let dir = temp_dir("lora");
    let gguf = dir.join("tiny.gguf");
    model.write_gguf(&gguf, GgmlDType::F32);
    let hf = dir.join("hf");
    model.write_hf_dir(&hf, DType::F32, 1);
    let (arm_a, arm_b) = (dir.join("arm-a"), dir.join("arm-b"));
    write_lora_dir(&arm_a, &lora_a, "some/hub-name");
    write_lora_dir(&arm_b, &lora_b, "some/hub-name");

    let want_base = reference_logprobs(&model, &TOKENS);
    let want_a = reference_logprobs(&model.with_lora_merged(&lora_a), &TOKENS);
    let want_b = reference_logprobs(&model.with_lora_merged(&lora_b), &TOKENS);
    for base in [&gguf, &hf] {
        let mut engine = load(base, &[arm_a.clone(), arm_b.clone()]);
        let got = engine.teacher_forced(&TOKENS).unwrap();
        assert_eq!(got.len(), 3);
        for pos in 0..TOKENS.len() {
            let what = |m: &str| format!("{} {m} position {pos}", base.display());
            assert_close(&got[0][pos], &want_base[pos], F32_ATOL, 0.0, &what("base"));
            assert_close(&got[1][pos], &want_a[pos], F32_ATOL, 0.0, &what("arm a"));
            assert_close(&got[2][pos], &want_b[pos], F32_ATOL, 0.0, &what("arm b"));
        }
    }
}

#[test]
fn full_weight_arm_is_its_own_model() {
    let cfg = TinyConfig::default();
    let base = TinyModel::random(&cfg, 8);
    let arm = TinyModel::random(&cfg, 9);
    let dir = temp_dir("full-arm");
    let base_path = dir.join("base.gguf");
    base.write_gguf(&base_path, GgmlDType::F32);
    let arm_path = dir.join("arm");
    arm.write_hf_dir(&arm_path, DType::F32, 1);
    let got = load(&base_path, &[arm_path])
        .teacher_forced(&TOKENS)
        .unwrap();
    let want = reference_logprobs(&arm, &TOKENS);
    for pos in 0..TOKENS.len() {
        assert_close(
            &got[1][pos],
            &want[pos],
            F32_ATOL,
            0.0,
            &format!("full arm position {pos}"),
        );
    }
}

#[test]
fn arm_with_larger_vocabulary_is_cut_to_the_base() {
    let cfg = TinyConfig::default();
    let base = TinyModel::random(&cfg, 10);
    let big = TinyModel::random(
        &TinyConfig {
            vocab_size: cfg.vocab_size + 3,
            ..cfg.clone()
        },
        11,
    );
    let dir = temp_dir("cut-vocab");
    let base_path = dir.join("base.gguf");
    base.write_gguf(&base_path, GgmlDType::F32);
    let arm_path = dir.join("arm.gguf");
    big.write_gguf(&arm_path, GgmlDType::F32);
    let mut engine = load(&base_path, &[arm_path]);
    let step = engine.step(&TOKENS[..3]).unwrap();
    assert_eq!(step.base.len(), cfg.vocab_size);
    assert_eq!(step.arms[0].len(), cfg.vocab_size);
    // The official rule: the ARM's logits are cut to the base vocabulary, then
    // normalised over it (not its full log-softmax cut afterwards).
    let logits = &reference_logits(&big, &TOKENS[..3])[2];
    let cut = log_softmax(&logits[..cfg.vocab_size]);
    assert_close(&step.arms[0], &cut, F32_ATOL, 0.0, "cut arm row");
    let teacher = engine.teacher_forced(&TOKENS[..3]).unwrap();
    assert_close(
        &teacher[1][2],
        &cut,
        F32_ATOL,
        0.0,
        "cut arm row, teacher-forced",
    );
}

#[test]
fn int16_activations_on_the_demo_model_are_within_f32_noise() {
    // What the browser's CPU engine computes, on the demo model and its positive ARM:
    // per position, the KL divergence from the f32 engine's next-token distribution and
    // whether the most likely token is the same (README "Speed" cites this output).
    let arms = [Path::new(env!("CARGO_MANIFEST_DIR")).join("www/arms/positive")];
    let load_as = |precision| {
        CpuEngine::load_with(&demo_model(), &arms, None, &Device::Cpu, precision).unwrap()
    };
    let text = "The movie I watched last night was a quiet story about a family who moves \
                to a small town by the sea, where the father works at the harbour.";
    let ids = demo_tokenizer().encode_prompt(text, false, None).unwrap();
    let f32 = load_as(Precision::F32).teacher_forced(&ids).unwrap();
    let int16 = load_as(Precision::Int16).teacher_forced(&ids).unwrap();
    for (model, (a, b)) in f32.iter().zip(&int16).enumerate() {
        let argmax = |r: &[f32]| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap();
        let (mut kl, mut same) = (0f64, 0usize);
        for (p, q) in a.iter().zip(b) {
            kl += p
                .iter()
                .zip(q)
                .map(|(&p, &q)| (p as f64).exp() * (p as f64 - q as f64))
                .sum::<f64>();
            same += usize::from(argmax(p) == argmax(q));
        }
        let kl = kl / a.len() as f64;
        eprintln!(
            "model {model}: mean KL(f32 ‖ int16) {kl:.2e} nats over {} positions, \
             same top token at {same}",
            a.len()
        );
        assert!(kl < 1e-4, "model {model}: KL {kl}");
        assert_eq!(same, a.len(), "model {model}: the top token moved");
    }
}

#[test]
fn lora_rows_on_quantized_weights_match_merged_reference() {
    // The CPU block kernel applies LoRA rows inside its op: check it on every format,
    // with f32 and with 16-bit integer activations.
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 12);
    let targets = genarm::model::lora::TARGETS;
    let lora = TinyLora::random(&cfg, 4, 8.0, &targets, 120);
    let partial = TinyLora::random(&cfg, 2, 2.0, &["k_proj", "up_proj"], 121);
    let dir = temp_dir("lora-quant");
    let (arm, arm2) = (dir.join("arm"), dir.join("arm2"));
    write_lora_dir(&arm, &lora, "hub/name");
    write_lora_dir(&arm2, &partial, "hub/name");
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let path = dir.join(format!("{dtype:?}.gguf"));
        model.write_gguf(&path, dtype);
        let stored = model.gguf_rounded(dtype);
        let want = [
            reference_logprobs(&stored, &TOKENS),
            reference_logprobs(&stored.with_lora_merged(&lora), &TOKENS),
            reference_logprobs(&stored.with_lora_merged(&partial), &TOKENS),
        ];
        let mut engine = load(&path, &[arm.clone(), arm2.clone()]);
        let got = engine.teacher_forced(&TOKENS).unwrap();
        // And through the cached single-token path, which runs rows of one position.
        engine.reset();
        engine.step(&TOKENS[..TOKENS.len() - 1]).unwrap();
        let last = engine.step(&TOKENS[TOKENS.len() - 1..]).unwrap();
        for (m, want_m) in want.iter().enumerate() {
            for pos in 0..TOKENS.len() {
                let what = format!("{dtype:?} model {m} position {pos}");
                assert_close(&got[m][pos], &want_m[pos], F32_ATOL, 0.0, &what);
            }
        }
        let n = TOKENS.len() - 1;
        assert_close(&last.base, &want[0][n], F32_ATOL, 0.0, "cached base");
        assert_close(&last.arms[0], &want[1][n], F32_ATOL, 0.0, "cached arm");
        assert_close(
            &last.arms[1],
            &want[2][n],
            F32_ATOL,
            0.0,
            "cached partial arm",
        );
        // `Precision::Int16` (the wasm build's default) rounds the activations to 16-bit
        // integers: still near the reference, but not the f32 numbers, so the setting
        // demonstrably reaches the kernel.
        let int16 = CpuEngine::load_with(
            &path,
            &[arm.clone(), arm2.clone()],
            None,
            &Device::Cpu,
            Precision::Int16,
        )
        .unwrap()
        .teacher_forced(&TOKENS)
        .unwrap();
        for (m, want_m) in want.iter().enumerate() {
            for pos in 0..TOKENS.len() {
                let what = format!("{dtype:?} Int16 model {m} position {pos}");
                assert_close(&int16[m][pos], &want_m[pos], 1e-3, 0.0, &what);
            }
        }
        assert_ne!(int16, got, "{dtype:?}: Int16 gave the f32 numbers");
    }
}

#[test]
fn k_quant_gguf_runs_through_candle_kernels() {
    // K-quants have 256-weight super-blocks: a model whose rows are multiples of 256.
    let cfg = TinyConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_heads: 4,
        num_kv_heads: 2,
        num_layers: 1,
        ..Default::default()
    };
    let model = TinyModel::random(&cfg, 13);
    for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let dir = temp_dir("gguf-kquant");
        let path = dir.join("tiny.gguf");
        model.write_gguf(&path, dtype);
        let stored = model.gguf_rounded(dtype);
        // candle's K-quant matmul quantizes activations to 8 bits (Q8K), unlike our block
        // kernel: about 1% of a log-probability is its expected error.
        let got = load(&path, &[]).teacher_forced(&TOKENS).unwrap();
        let want = reference_logprobs(&stored, &TOKENS);
        for (pos, (g, w)) in got[0].iter().zip(&want).enumerate() {
            assert_close(g, w, 0.03, 0.01, &format!("{dtype:?}, position {pos}"));
        }
    }
}

#[test]
fn a_kv_cache_larger_than_memory_is_refused_before_allocating() {
    // The config claims a context of 2^40 positions and the caller asks for all of it:
    // the cache would need terabytes, and a failed allocation would abort the process.
    let cfg = TinyConfig {
        max_position_embeddings: 1 << 40,
        ..TinyConfig::default()
    };
    let dir = temp_dir("huge-context");
    TinyModel::random(&cfg, 5).write_hf_dir(&dir.join("m"), DType::F32, 1);
    let err = CpuEngine::load(&dir.join("m"), &[], Some(1 << 40), &Device::Cpu)
        .err()
        .expect("a terabyte cache is refused")
        .to_string();
    assert!(
        err.contains("KV cache") && err.contains("--context"),
        "{err}"
    );
}

#[test]
fn lora_tensors_that_cannot_apply_are_refused() {
    let cfg = TinyConfig::default();
    let dir = temp_dir("lora-refused");
    let base = dir.join("base.gguf");
    TinyModel::random(&cfg, 40).write_gguf(&base, GgmlDType::F32);
    let lora = TinyLora::random(&cfg, 2, 4.0, &["q_proj"], 41);
    // Rewrites the adapter's weights with `edit` applied, then loads it as an ARM.
    let load_edited =
        |name: &str,
         edit: &dyn Fn(&mut std::collections::HashMap<String, candle_core::Tensor>)|
         -> String {
            let arm = dir.join(name);
            write_lora_dir(&arm, &lora, "hub/name");
            let path = arm.join("adapter_model.safetensors");
            let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            edit(&mut tensors);
            candle_core::safetensors::save(&tensors, &path).unwrap();
            match CpuEngine::load(&base, &[arm], None, &Device::Cpu) {
                Ok(_) => panic!("{name}: the ARM loaded"),
                Err(e) => e.to_string(),
            }
        };
    let a_name = |t: &std::collections::HashMap<String, candle_core::Tensor>| {
        t.keys()
            .find(|k| k.ends_with("lora_A.weight"))
            .unwrap()
            .clone()
    };
    let err = load_edited("nan", &|t| {
        let name = a_name(t);
        let shape = t[&name].dims().to_vec();
        let n: usize = shape.iter().product();
        let mut v = vec![0.1f32; n];
        v[n / 2] = f32::NAN;
        t.insert(
            name,
            candle_core::Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        err.contains("NaN or infinite") && err.contains("lora_A"),
        "{err}"
    );
    // A module the model does not have (q_proj under mlp) is an error, not skipped.
    let err = load_edited("misplaced", &|t| {
        let moved: Vec<(String, candle_core::Tensor)> = t
            .drain()
            .map(|(k, v)| (k.replace("self_attn.q_proj", "mlp.q_proj"), v))
            .collect();
        t.extend(moved);
    });
    assert!(err.contains("mlp.q_proj"), "{err}");
}

/// ARMs adapted in their top layer only: the rows share the layers below it (one row
/// runs them, every row's cache gets its keys and values). The numbers are each
/// merged model's, whether the prompt goes in whole or token by token, and rows fed
/// different tokens after a shared prefix (candidates) see a whole history.
#[test]
fn arms_adapted_in_top_layers_share_the_layers_below() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 12);
    let top = format!("layers.{}.", cfg.num_layers - 1);
    let top_only = |seed| {
        let mut lora = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, seed);
        lora.pairs.retain(|prefix, _| prefix.contains(&top));
        lora
    };
    let (lora_a, lora_b) = (top_only(80), top_only(81));
    let dir = temp_dir("lora-top");
    let gguf = dir.join("tiny.gguf");
    model.write_gguf(&gguf, GgmlDType::F32);
    let (arm_a, arm_b) = (dir.join("arm-a"), dir.join("arm-b"));
    write_lora_dir(&arm_a, &lora_a, "some/hub-name");
    write_lora_dir(&arm_b, &lora_b, "some/hub-name");
    let models = [
        model.clone(),
        model.with_lora_merged(&lora_a),
        model.with_lora_merged(&lora_b),
    ];
    let want: Vec<_> = models
        .iter()
        .map(|m| reference_logprobs(m, &TOKENS))
        .collect();

    let mut engine = load(&gguf, &[arm_a.clone(), arm_b.clone()]);
    let whole = engine.teacher_forced(&TOKENS).unwrap();
    engine.reset();
    let mut stepped = vec![engine.step(&TOKENS[..5]).unwrap()];
    for t in &TOKENS[5..] {
        stepped.push(engine.step(&[*t]).unwrap());
    }
    for (m, name) in ["base", "arm a", "arm b"].iter().enumerate() {
        for pos in 0..TOKENS.len() {
            let what = format!("{name} position {pos}");
            assert_close(&whole[m][pos], &want[m][pos], F32_ATOL, 0.0, &what);
        }
        for (i, lp) in stepped.iter().enumerate() {
            let row = if m == 0 { &lp.base } else { &lp.arms[m - 1] };
            let what = format!("{name} stepped to position {}", i + 4);
            assert_close(row, &want[m][i + 4], F32_ATOL, 0.0, &what);
        }
    }

    // Rows fed different tokens after a shared prefix.
    let ckpt = genarm::model::Checkpoint::open(&gguf).unwrap();
    let adapters =
        [&arm_a, &arm_b].map(|d| genarm::model::lora::LoraAdapter::open(d, &Device::Cpu).unwrap());
    let rows = [None, Some(&adapters[0]), Some(&adapters[1])];
    let mut llama = genarm::cpu::llama::Llama::load(
        ckpt.source.as_ref(),
        &ckpt.config,
        &rows,
        TOKENS.len(),
        &Device::Cpu,
    )
    .unwrap();
    let prefix = &TOKENS[..6];
    llama.forward(prefix, false).unwrap();
    let next = [TOKENS[6], 50, 9];
    let logits = llama
        .forward_rows(&next.map(|t| vec![t]), false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (m, (row, &t)) in logits.iter().zip(&next).enumerate() {
        let tokens = [prefix, &[t]].concat();
        let want = reference_logits(&models[m], &tokens);
        let what = format!("row {m} fed {t} after the shared prefix");
        assert_close(row, &want[6], F32_ATOL * 10.0, 0.0, &what);
    }
}
