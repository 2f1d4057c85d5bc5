//! ARM training on tiny random models: the loss against a direct f64 computation,
//! LoRA gradients against finite differences, learning a synthetic preference,
//! resuming, and the saved adapter reloading with the same log-probabilities; the same
//! for full fine-tuning (`--full`), whose output is an HF model directory; and DPO
//! (`--loss dpo`), whose output is a policy.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::*;
use genarm::cpu::CpuEngine;
use genarm::model::arm_plan::plan_arm;
use genarm::model::Checkpoint;
use genarm::train::data::TokenizedPair;
use genarm::train::loss::{dpo_loss_f64, genarm_loss, genarm_loss_f64, Objective};
use genarm::train::trainer::{split_pairs, ArmLabel, TrainConfig, Trainer};
use genarm::Engine;

fn tiny_base(name: &str, seed: u64) -> (PathBuf, TinyModel) {
    let model = TinyModel::random(&TinyConfig::default(), seed);
    let path = temp_dir(name).join("base.gguf");
    model.write_gguf(&path, GgmlDType::F32);
    (path, model)
}

fn sum_reference(model: &TinyModel, prompt: &[u32], resp: &[u32]) -> f64 {
    let mut seq = prompt.to_vec();
    seq.extend_from_slice(resp);
    let logits = reference_logits(model, &seq);
    (prompt.len()..seq.len())
        .map(|t| log_softmax(&logits[t - 1])[seq[t] as usize])
        .sum()
}

#[test]
fn loss_matches_direct_f64_computation() {
    let (path, model) = tiny_base("train-loss", 40);
    let base = Checkpoint::open(&path).unwrap();
    let pairs = [
        pair(&[1, 2, 3], &[4, 5, 6, 7], &[8, 9]),
        pair(&[10, 20], &[30], &[40, 41, 42, 43, 44]),
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    // All layers trainable, and only the top one (the rest on the inference engine).
    for layers in [usize::MAX, 1] {
        let out = temp_dir("train-loss-out");
        let mut t = Trainer::new(&base, tiny_train_config(layers), &out, 32, &Device::Cpu).unwrap();
        let (c, r) = t.pair_logprobs(&refs, None).unwrap();
        let (c, r) = (c.to_vec1::<f32>().unwrap(), r.to_vec1::<f32>().unwrap());
        let (beta, gamma) = (0.5, 0.1);
        let loss = genarm_loss(
            &Tensor::new(c.as_slice(), &Device::Cpu).unwrap(),
            &Tensor::new(r.as_slice(), &Device::Cpu).unwrap(),
            beta,
            gamma,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        let mut want = 0.0;
        for (i, p) in pairs.iter().enumerate() {
            let cw = sum_reference(&model, &p.prompt, &p.chosen);
            let rl = sum_reference(&model, &p.prompt, &p.rejected);
            assert!(
                (c[i] as f64 - cw).abs() < 2e-4,
                "layers {layers}: chosen {} vs {cw}",
                c[i]
            );
            assert!(
                (r[i] as f64 - rl).abs() < 2e-4,
                "layers {layers}: rejected {} vs {rl}",
                r[i]
            );
            want += genarm_loss_f64(cw, rl, beta, gamma) / pairs.len() as f64;
        }
        assert!((loss - want).abs() < 1e-4, "loss {loss} vs f64 {want}");
    }
}

/// Checks autograd's gradients of the GenARM loss on two fixed pairs against finite
/// differences for `vars` (see `assert_gradients_match_finite_differences`).
fn check_trainer_gradients(t: &mut Trainer, vars: &[(String, candle_core::Var)]) -> usize {
    let pairs = [
        pair(&[1, 2, 3], &[4, 5, 6], &[7, 8]),
        pair(&[9], &[10, 11], &[12]),
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let loss_of = |t: &mut Trainer| -> Tensor {
        let (c, r) = t.pair_logprobs(&refs, None).unwrap();
        genarm_loss(&c, &r, 0.7, 0.0).unwrap()
    };
    let grads = loss_of(t).backward().unwrap();
    assert_gradients_match_finite_differences(vars, &grads, &mut || {
        loss_of(t).to_scalar::<f64>().unwrap()
    })
}

/// Every `step`-th adapter's A and B, named for failure messages, after randomising every
/// B: B starts at zero (as in PEFT), which would make A's gradient vanish.
fn randomised_lora_vars(t: &mut Trainer, step: usize) -> Vec<(String, candle_core::Var)> {
    for l in t.arm().lora_vars() {
        let noise = Tensor::rand(-0.3f64, 0.3, l.b.shape().clone(), &Device::Cpu).unwrap();
        l.b.set(&noise).unwrap();
    }
    t.arm()
        .lora_vars()
        .iter()
        .step_by(step)
        .flat_map(|l| {
            [
                (format!("{} A", l.module), l.a.clone()),
                (format!("{} B", l.module), l.b.clone()),
            ]
        })
        .collect()
}

/// `--sft-weight`: the trainer's anchored loss (GenARM loss + λ·mean NLL of the chosen
/// response) against the f64 reference, and its LoRA gradients against finite
/// differences; the anchor needs an ARM (not a scalar reward model) and λ ≥ 0.
#[test]
fn anchored_loss_matches_f64_and_finite_differences() {
    let (path, model) = tiny_base("train-sft", 42);
    let base = Checkpoint::open(&path).unwrap();
    let pairs = [
        pair(&[1, 2, 3], &[4, 5, 6, 7], &[8, 9]),
        pair(&[10, 20], &[30], &[40, 41, 42, 43, 44]),
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let (beta, gamma, lambda) = (0.5, 0.1, 0.3);
    let cfg = TrainConfig {
        beta_r: beta,
        gamma,
        sft_weight: lambda,
        ..tiny_train_config(2)
    };
    let out = temp_dir("train-sft-out");
    let mut t =
        Trainer::with_dtype(&base, cfg.clone(), &out, 32, DType::F64, &Device::Cpu).unwrap();
    let (c, r) = t.pair_logprobs(&refs, None).unwrap();
    let loss = t
        .pair_loss(&refs, &c, &r)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let want: f64 = pairs
        .iter()
        .map(|p| {
            let cw = sum_reference(&model, &p.prompt, &p.chosen);
            let rl = sum_reference(&model, &p.prompt, &p.rejected);
            genarm_loss_f64(cw, rl, beta, gamma) + lambda * -cw / p.chosen.len() as f64
        })
        .sum::<f64>()
        / pairs.len() as f64;
    assert!((loss - want).abs() < 1e-6, "loss {loss} vs f64 {want}");

    let vars = randomised_lora_vars(&mut t, 5);
    let loss_of = |t: &mut Trainer| -> Tensor {
        let (c, r) = t.pair_logprobs(&refs, None).unwrap();
        t.pair_loss(&refs, &c, &r).unwrap()
    };
    let grads = loss_of(&mut t).backward().unwrap();
    let checked = assert_gradients_match_finite_differences(&vars, &grads, &mut || {
        loss_of(&mut t).to_scalar::<f64>().unwrap()
    });
    assert!(checked >= 6);

    for bad in [
        TrainConfig {
            sft_weight: -0.1,
            ..cfg.clone()
        },
        TrainConfig {
            scalar_head: true,
            ..cfg
        },
    ] {
        let err = Trainer::new(&base, bad, &out, 32, &Device::Cpu)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("sft-weight"), "{err}");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let (path, _) = tiny_base("train-grad", 41);
    let base = Checkpoint::open(&path).unwrap();
    let out = temp_dir("train-grad-out");
    let mut t = Trainer::with_dtype(
        &base,
        tiny_train_config(2),
        &out,
        32,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let vars = randomised_lora_vars(&mut t, 3);
    let checked = check_trainer_gradients(&mut t, &vars);
    assert!(checked >= 12);
}

/// Trains on pairs preferring token 13 (from `base_seed`'s tiny model) and checks the
/// held-out pairwise accuracy reaches 0.95 and guidance with the result raises the
/// token's frequency; returns the output directory.
fn assert_learns_marker(
    name: &str,
    base_seed: u64,
    data_seed: u64,
    cfg: TrainConfig,
    label: &ArmLabel,
) -> PathBuf {
    let (path, _) = tiny_base(name, base_seed);
    let base = Checkpoint::open(&path).unwrap();
    let marker = 13;
    let (train, eval) = split_pairs(marker_pairs(400, marker, data_seed), 0.2, 1);
    let out = temp_dir(&format!("{name}-out"));
    let mut t = Trainer::new(&base, cfg, &out, 32, &Device::Cpu).unwrap();
    let before = t.evaluate(&eval).unwrap().0;
    let summary = t
        .train(&train, &eval, label, false, None, &mut |_| {})
        .unwrap();
    let acc = summary.final_eval.unwrap();
    assert!(
        acc >= 0.95,
        "{name}: held-out pairwise accuracy {acc} (before training {before})"
    );
    let plain = marker_frequency(&path, None, 0.0, marker);
    let guided = marker_frequency(&path, Some(&out), 3.0, marker);
    assert!(
        guided > plain * 2.0 && guided > 0.1,
        "{name}: marker frequency {plain} → {guided} with α = 3"
    );
    out
}

#[test]
fn learns_a_synthetic_preference_and_guidance_follows_it() {
    let cfg = TrainConfig {
        lr: 1e-2,
        epochs: 4,
        beta_r: 0.5,
        lora_dropout: 0.05,
        checkpoint_every: 1000,
        ..tiny_train_config(usize::MAX)
    };
    let label = ArmLabel {
        name: Some("marker".into()),
        objective: Some("contains token 13".into()),
        base_name: None,
    };
    let out = assert_learns_marker("train-learn", 42, 7, cfg, &label);
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("genarm.json")).unwrap()).unwrap();
    assert_eq!(info["name"], "marker");
    assert_eq!(info["beta_r"], 0.5);
}

/// [`assert_resume_matches_uninterrupted`] on a fresh tiny base from `base_seed`.
fn assert_resume_equals_uninterrupted(
    name: &str,
    base_seed: u64,
    cfg: TrainConfig,
    saved: &str,
) -> PathBuf {
    let (path, _) = tiny_base(name, base_seed);
    assert_resume_matches_uninterrupted(&path, name, cfg, saved)
}

#[test]
fn resumed_training_equals_uninterrupted() {
    let cfg = TrainConfig {
        lr: 5e-3,
        epochs: 2,
        lora_dropout: 0.1,
        checkpoint_every: 3,
        ..tiny_train_config(usize::MAX)
    };
    assert_resume_equals_uninterrupted("train-resume", 43, cfg, "adapter_model.safetensors");
}

/// A probe response's summed log-prob (trained, reloaded, base): from the trainer, from
/// the engine with the saved ARM at `arm`, and from the engine's base.
fn probe_reloaded(t: &mut Trainer, base: &Path, arm: &Path) -> (f64, f64, f64) {
    let probe = pair(&[3, 4, 5], &[6, 9, 8, 7], &[1, 2]);
    let (c, _) = t.pair_logprobs(&[&probe], None).unwrap();
    let trained = c.to_vec1::<f32>().unwrap()[0] as f64;
    let mut engine = CpuEngine::load(base, &[arm.to_path_buf()], None, &Device::Cpu).unwrap();
    let seq = [3, 4, 5, 6, 9, 8, 7];
    let lp = engine.teacher_forced(&seq).unwrap();
    let response = |row: usize| -> f64 {
        (3..seq.len())
            .map(|t| lp[row][t - 1][seq[t] as usize] as f64)
            .sum()
    };
    (trained, response(1), response(0))
}

/// The saved ARM at `arm` gives the trainer's log-probs (to 1e-3) and differs from the
/// base; returns the trained value.
fn assert_reloads_as_trained(t: &mut Trainer, base: &Path, arm: &Path, what: &str) -> f64 {
    let (trained, loaded, plain) = probe_reloaded(t, base, arm);
    assert!(
        (trained - loaded).abs() < 1e-3,
        "{what}: trained {trained} vs reloaded {loaded}"
    );
    assert!(
        (loaded - plain).abs() > 1e-3,
        "{what}: the ARM changed nothing"
    );
    trained
}

#[test]
fn saved_adapter_reloads_with_the_trained_logprobs() {
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0] {
        let model = TinyModel::random(&TinyConfig::default(), 44);
        let dir = temp_dir("train-roundtrip");
        let path = dir.join("base.gguf");
        model.write_gguf(&path, dtype);
        let base = Checkpoint::open(&path).unwrap();
        let (train, eval) = split_pairs(marker_pairs(48, 9, 4), 0.1, 3);
        let out = dir.join("arm");
        let cfg = TrainConfig {
            lr: 2e-2,
            epochs: 1,
            ..tiny_train_config(1)
        };
        let mut t = Trainer::new(&base, cfg, &out, 32, &Device::Cpu).unwrap();
        t.train(
            &train,
            &eval,
            &ArmLabel::default(),
            false,
            None,
            &mut |_| {},
        )
        .unwrap();
        assert_reloads_as_trained(&mut t, &path, &out, &format!("{dtype:?}"));
    }
}

// ---------------------------------------------------------------------------
// Full fine-tuning
// ---------------------------------------------------------------------------

fn tiny_full_config(layers: usize) -> TrainConfig {
    TrainConfig {
        full: true,
        ..tiny_train_config(layers)
    }
}

#[test]
fn full_gradients_match_finite_differences() {
    let (path, _) = tiny_base("train-full-grad", 45);
    let base = Checkpoint::open(&path).unwrap();
    let out = temp_dir("train-full-grad-out");
    let cfg = TrainConfig {
        train_head: true,
        ..tiny_full_config(1)
    };
    let mut t = Trainer::with_dtype(&base, cfg, &out, 32, DType::F64, &Device::Cpu).unwrap();
    let full = t.arm().full_vars().to_vec();
    // The top block's 9 weights, the final norm and the head; nothing of layer 0.
    assert_eq!(
        full.len(),
        11,
        "{:?}",
        full.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    assert!(full.iter().all(|(n, _)| !n.starts_with("model.layers.0.")));
    assert!(t.arm().lora_vars().is_empty());
    let checked_names = [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    let vars: Vec<(String, candle_core::Var)> = full
        .into_iter()
        .filter(|(n, _)| checked_names.contains(&n.as_str()))
        .collect();
    assert_eq!(vars.len(), checked_names.len());
    let checked = check_trainer_gradients(&mut t, &vars);
    assert_eq!(checked, 3 * checked_names.len());
}

#[test]
fn full_fine_tuning_learns_a_synthetic_preference() {
    let cfg = TrainConfig {
        lr: 3e-3,
        epochs: 4,
        beta_r: 0.5,
        checkpoint_every: 1000,
        ..tiny_full_config(usize::MAX)
    };
    let out = assert_learns_marker("train-full-learn", 46, 8, cfg, &ArmLabel::default());
    assert!(out.join("model.safetensors").is_file() && !out.join("adapter_config.json").exists());
}

#[test]
fn full_resumed_training_equals_uninterrupted() {
    let cfg = TrainConfig {
        lr: 2e-3,
        epochs: 2,
        checkpoint_every: 3,
        train_head: true,
        ..tiny_full_config(1)
    };
    let broken =
        assert_resume_equals_uninterrupted("train-full-resume", 47, cfg, "model.safetensors");
    // The weights and both AdamW moments of each of the 11 trained tensors.
    let state =
        candle_core::safetensors::load(broken.join("checkpoint/state.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(state.contains_key("model.layers.1.mlp.up_proj.weight"));
    assert_eq!(state.len(), 3 * 11);
}

#[test]
fn full_model_dir_reloads_as_an_arm_with_the_trained_logprobs() {
    let tiny = TinyConfig {
        tie_word_embeddings: true,
        ..TinyConfig::default()
    };
    let model = TinyModel::random(&tiny, 48);
    let dir = temp_dir("train-full-roundtrip");
    let path = dir.join("base.gguf");
    model.write_gguf_with_tokens(
        &path,
        GgmlDType::F32,
        Some(&char_vocabulary(tiny.vocab_size)),
    );
    let base = Checkpoint::open(&path).unwrap();
    let out = dir.join("arm");
    // A LoRA left from an earlier run would make loaders take the dir for an adapter.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("adapter_config.json"), "{}").unwrap();
    let (train, eval) = split_pairs(marker_pairs(48, 9, 4), 0.1, 3);
    let cfg = TrainConfig {
        lr: 5e-3,
        train_head: true,
        ..tiny_full_config(1)
    };
    let label = ArmLabel {
        name: Some("full-marker".into()),
        ..ArmLabel::default()
    };
    let mut t = Trainer::new(&base, cfg, &out, 32, &Device::Cpu).unwrap();
    t.train(&train, &eval, &label, false, None, &mut |_| {})
        .unwrap();
    assert!(!out.join("adapter_config.json").exists());

    // A standalone HF model: untied head (it trained; the embeddings did not), the
    // base's tokenizer, genarm.json naming the base.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["torch_dtype"], "float32");
    let weights =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(weights.len(), 1 + 2 * 9 + 2);
    let embed = weights["model.embed_tokens.weight"].flatten_all().unwrap();
    assert_close(
        &embed.to_vec1::<f32>().unwrap(),
        model.get("model.embed_tokens.weight"),
        1e-6,
        0.0,
        "embeddings stay the base's",
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("genarm.json")).unwrap()).unwrap();
    assert_eq!(info["name"], "full-marker");
    assert!(info["base_model"].as_str().unwrap().ends_with("base.gguf"));
    let arm = Checkpoint::open(&out).unwrap();
    let (bt, at) = (
        base.tokenizer.as_ref().unwrap(),
        arm.tokenizer.as_ref().unwrap(),
    );
    genarm::model::tokenizer::same_vocabulary(bt, at).unwrap();
    assert_eq!(
        bt.encode("hi there", true).unwrap(),
        at.encode("hi there", true).unwrap()
    );

    let trained = assert_reloads_as_trained(&mut t, &path, &out, "full");
    let engine = CpuEngine::load(&path, std::slice::from_ref(&out), None, &Device::Cpu).unwrap();
    assert_eq!(engine.arm_labels(), ["full-marker"]);

    // BF16 output: half the bytes, the same ARM to BF16's precision.
    t.out = dir.join("arm-bf16");
    t.save_dtype = DType::BF16;
    t.write_full_model(&label).unwrap();
    let bf16 =
        candle_core::safetensors::load(t.out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(bf16.values().all(|w| w.dtype() == DType::BF16));
    let bf16_dir = t.out.clone();
    let (_, loaded, _) = probe_reloaded(&mut t, &path, &bf16_dir);
    assert!(
        (trained - loaded).abs() < 0.1,
        "trained {trained} vs BF16 {loaded}"
    );
}

#[test]
fn cli_full_trains_and_rejects_lora_flags() {
    let tiny = TinyConfig::default();
    let dir = temp_dir("train-full-cli");
    let base = dir.join("base.gguf");
    TinyModel::random(&tiny, 49).write_gguf_with_tokens(
        &base,
        GgmlDType::F32,
        Some(&char_vocabulary(tiny.vocab_size)),
    );
    let data = dir.join("pairs.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"prompt": "say {}", "chosen": "yes good", "rejected": "no bad {i}"}}"#,
                ["a", "b", "c"][i % 3]
            )
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.join("arm");
    let (b, d, o) = (
        base.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--model", b, "--data", d, "--out", o];
        args.extend_from_slice(extra);
        genarm(&args)
    };
    for lora_flag in [
        ["--lora-rank", "4"],
        ["--lora-targets", "q,v"],
        ["--lora-dropout", "0"],
    ] {
        let mut args = vec!["--full"];
        args.extend_from_slice(&lora_flag);
        assert_clean_error(&train(&args), "cannot be used with");
    }
    assert_clean_error(&train(&["--full", "--scalar-head"]), "cannot be used with");
    assert_clean_error(&train(&["--train-head"]), "--full");
    let run = train(&[
        "--full",
        "--layers",
        "1",
        "--train-head",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--warmup",
        "1",
        "--lr",
        "1e-3",
        "--eval-frac",
        "0.25",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let v = json(&genarm(&[
        "logits", "--model", b, "--arm", o, "--tokens", "3,4,5", "--json",
    ]));
    assert_eq!(v["arms"].as_array().unwrap().len(), 1);

    let help = stdout(&genarm(&["train", "--help"]));
    for needle in [
        "--full",
        "--train-head",
        "--save-dtype",
        "--layers",
        "standalone HF model",
    ] {
        assert!(
            help.contains(needle),
            "train --help lacks {needle:?}:\n{help}"
        );
    }
}

// ---------------------------------------------------------------------------
// DPO (`--loss dpo`): the policy's loss against the f64 reference transformer (policy =
// base + the LoRA merged, reference = the base), log 2 before any update, gradients,
// resume, and the saved policy refused as an ARM.
// ---------------------------------------------------------------------------

fn dpo_config(beta: f64) -> TrainConfig {
    TrainConfig {
        objective: Objective::Dpo,
        beta_r: beta,
        ..tiny_train_config(usize::MAX)
    }
}

/// The trainer's LoRA as a `TinyLora`, to merge into the f64 reference model.
fn trained_lora(t: &mut Trainer, cfg: &TrainConfig) -> TinyLora {
    let mut pairs = BTreeMap::new();
    for l in t.arm().lora_vars() {
        let flat = |v: &candle_core::Var| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (out, r) = l.b.as_tensor().dims2().unwrap();
        let (_, inp) = l.a.as_tensor().dims2().unwrap();
        assert_eq!(r, cfg.lora_rank);
        let pair = LoraPair {
            in_features: inp,
            out_features: out,
            a: flat(&l.a),
            b: flat(&l.b),
        };
        pairs.insert(l.module.clone(), pair);
    }
    TinyLora {
        r: cfg.lora_rank,
        alpha: cfg.lora_alpha,
        targets: cfg.lora_targets.clone(),
        pairs,
    }
}

fn dpo_loss_of(t: &mut Trainer, refs: &[&TokenizedPair]) -> Tensor {
    let (c, r) = t.pair_scores(refs, None).unwrap();
    t.pair_loss(refs, &c, &r).unwrap()
}

#[test]
fn dpo_loss_is_log_2_at_start_and_matches_f64() {
    let (path, model) = tiny_base("dpo-loss", 50);
    let base = Checkpoint::open(&path).unwrap();
    let pairs = [
        pair(&[1, 2, 3], &[4, 5, 6, 7], &[8, 9]),
        pair(&[10, 20], &[30], &[40, 41, 42, 43, 44]),
        pair(&[7], &[11, 12], &[13, 14, 15]),
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let beta = 0.4;
    let cfg = dpo_config(beta);
    let out = temp_dir("dpo-loss-out");
    let mut t =
        Trainer::with_dtype(&base, cfg.clone(), &out, 32, DType::F64, &Device::Cpu).unwrap();
    // B = 0: the policy is the reference, every log-ratio 0, the loss log 2.
    let start = dpo_loss_of(&mut t, &refs).to_scalar::<f64>().unwrap();
    assert!(
        (start - std::f64::consts::LN_2).abs() < 1e-12,
        "loss before any update {start}, want log 2"
    );
    assert_eq!(t.reference().len(), pairs.len());

    randomised_lora_vars(&mut t, 1);
    let loss = dpo_loss_of(&mut t, &refs).to_scalar::<f64>().unwrap();
    let policy = model.with_lora_merged(&trained_lora(&mut t, &cfg));
    let mut want = 0.0;
    for p in &pairs {
        let reference = [
            sum_reference(&model, &p.prompt, &p.chosen),
            sum_reference(&model, &p.prompt, &p.rejected),
        ];
        // The stored reference is the frozen base, whatever the LoRA is now.
        let stored = t.reference().get(p).unwrap();
        for k in 0..2 {
            assert!(
                (stored[k] - reference[k]).abs() < 1e-6,
                "reference {stored:?} vs f64 {reference:?}"
            );
        }
        let pol = [
            sum_reference(&policy, &p.prompt, &p.chosen),
            sum_reference(&policy, &p.prompt, &p.rejected),
        ];
        want += dpo_loss_f64(pol, reference, beta) / pairs.len() as f64;
    }
    assert!(
        (loss - std::f64::consts::LN_2).abs() > 1e-3,
        "random B leaves the loss at {loss}"
    );
    assert!((loss - want).abs() < 1e-6, "loss {loss} vs f64 {want}");
}

#[test]
fn dpo_gradients_match_finite_differences() {
    let (path, _) = tiny_base("dpo-grad", 51);
    let base = Checkpoint::open(&path).unwrap();
    let pairs = [
        pair(&[1, 2, 3], &[4, 5, 6], &[7, 8]),
        pair(&[9], &[10, 11], &[12]),
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let cfg = TrainConfig {
        lora_layers: 2,
        ..dpo_config(0.7)
    };
    let out = temp_dir("dpo-grad-out");
    let mut t = Trainer::with_dtype(&base, cfg, &out, 32, DType::F64, &Device::Cpu).unwrap();
    // The reference first, from the base (B = 0), then a policy away from it.
    dpo_loss_of(&mut t, &refs);
    let vars = randomised_lora_vars(&mut t, 3);
    let grads = dpo_loss_of(&mut t, &refs).backward().unwrap();
    let checked = assert_gradients_match_finite_differences(&vars, &grads, &mut || {
        dpo_loss_of(&mut t, &refs).to_scalar::<f64>().unwrap()
    });
    assert!(checked >= 12);
}

/// Trains straight through and again killed after 7 steps then resumed by a new trainer
/// (which recomputes the reference): the same policy; the first logged loss is log 2;
/// `genarm.json` says it is a policy, and it is refused as an ARM.
#[test]
fn dpo_resumes_and_saves_a_policy() {
    let cfg = TrainConfig {
        lr: 5e-3,
        epochs: 2,
        lora_dropout: 0.1,
        checkpoint_every: 3,
        ..dpo_config(0.5)
    };
    let saved = "adapter_model.safetensors";
    let out = assert_resume_equals_uninterrupted("dpo-resume", 52, cfg, saved);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first_loss = lines[0]["loss"].as_f64().unwrap();
    // f32 training: the policy's and the reference's sums agree to rounding.
    assert!(
        (first_loss - std::f64::consts::LN_2).abs() < 1e-5,
        "first step's loss {first_loss}, want log 2"
    );
    let accuracy = lines.last().unwrap()["eval_accuracy"].as_f64().unwrap();
    assert!(
        accuracy > 0.6,
        "held-out implicit-reward accuracy {accuracy}"
    );

    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("genarm.json")).unwrap()).unwrap();
    assert_eq!(info["kind"], "policy");
    assert_eq!(info["dpo_beta"], 0.5);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    let base = PathBuf::from(config["base_model_name_or_path"].as_str().unwrap());
    let err = plan_arm(&out, &base, &Device::Cpu)
        .err()
        .expect("a policy is not an ARM");
    assert!(err.to_string().contains("--lora"), "{err}");
}

#[test]
fn dpo_refuses_settings_it_does_not_support() {
    let (path, _) = tiny_base("dpo-refuse", 53);
    let base = Checkpoint::open(&path).unwrap();
    let out = temp_dir("dpo-refuse-out");
    for bad in [
        TrainConfig {
            full: true,
            ..dpo_config(0.1)
        },
        TrainConfig {
            scalar_head: true,
            ..dpo_config(0.1)
        },
        TrainConfig {
            sft_weight: 0.5,
            ..dpo_config(0.1)
        },
    ] {
        let err = Trainer::new(&base, bad, &out, 32, &Device::Cpu)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("dpo"), "{err}");
    }
}
