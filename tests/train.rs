//! ARM training on tiny random models: the loss against a direct f64 computation,
//! LoRA gradients against finite differences, learning a synthetic preference,
//! resuming, and the saved adapter reloading with the same log-probabilities.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::*;
use genarm::cpu::CpuEngine;
use genarm::model::Checkpoint;
use genarm::train::data::TokenizedPair;
use genarm::train::loss::{genarm_loss, genarm_loss_f64};
use genarm::train::trainer::{split_pairs, ArmLabel, TrainConfig, Trainer};
use genarm::{generate, Engine, GenerateOptions, SamplingParams};

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
    // B starts at zero (as in PEFT), which would make A's gradient vanish: randomise it.
    for l in t.arm().lora_vars().to_vec().iter() {
        let shape = l.b.shape().clone();
        let noise = Tensor::rand(-0.3f64, 0.3, shape, &Device::Cpu).unwrap();
        l.b.set(&noise).unwrap();
    }
    let pairs = [
        pair(&[1, 2, 3], &[4, 5, 6], &[7, 8]),
        pair(&[9], &[10, 11], &[12]),
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let loss_of = |t: &mut Trainer| -> Tensor {
        let (c, r) = t.pair_logprobs(&refs, None).unwrap();
        genarm_loss(&c, &r, 0.7, 0.0).unwrap()
    };
    let grads = loss_of(&mut t).backward().unwrap();
    let vars: Vec<(String, candle_core::Var)> = t
        .arm()
        .lora_vars()
        .iter()
        .step_by(3)
        .flat_map(|l| {
            [
                (format!("{} A", l.module), l.a.clone()),
                (format!("{} B", l.module), l.b.clone()),
            ]
        })
        .collect();
    let checked = assert_gradients_match_finite_differences(&vars, &grads, &mut || {
        loss_of(&mut t).to_scalar::<f64>().unwrap()
    });
    assert!(checked >= 12);
}

fn marker_frequency(base: &Path, arm: Option<&Path>, alpha: f32, marker: u32) -> f64 {
    let arms: Vec<PathBuf> = arm.map(|a| vec![a.to_path_buf()]).unwrap_or_default();
    let mut engine = CpuEngine::load(base, &arms, None, &Device::Cpu).unwrap();
    let (mut hits, mut total) = (0usize, 0usize);
    for seed in 0..40u64 {
        let opts = GenerateOptions {
            max_new_tokens: 4,
            alphas: if arm.is_some() { vec![alpha] } else { vec![] },
            sampling: SamplingParams {
                seed,
                ..Default::default()
            },
            ignore_eos: true,
            ..Default::default()
        };
        let prompt = [2 + (seed % 50) as u32, 7, 9];
        let g = generate(&mut engine, None, &prompt, &opts, &mut |_| true).unwrap();
        hits += g.tokens.iter().filter(|&&t| t == marker).count();
        total += g.tokens.len();
    }
    hits as f64 / total as f64
}

#[test]
fn learns_a_synthetic_preference_and_guidance_follows_it() {
    let (path, _) = tiny_base("train-learn", 42);
    let base = Checkpoint::open(&path).unwrap();
    let marker = 13;
    let (train, eval) = split_pairs(marker_pairs(400, marker, 7), 0.2, 1);
    let out = temp_dir("train-learn-out");
    let cfg = TrainConfig {
        lr: 1e-2,
        epochs: 4,
        beta_r: 0.5,
        lora_dropout: 0.05,
        checkpoint_every: 1000,
        ..tiny_train_config(usize::MAX)
    };
    let mut t = Trainer::new(&base, cfg, &out, 32, &Device::Cpu).unwrap();
    let before = t.evaluate(&eval).unwrap().0;
    let label = ArmLabel {
        name: Some("marker".into()),
        objective: Some("contains token 13".into()),
        base_name: None,
    };
    let summary = t
        .train(&train, &eval, &label, false, None, &mut |_| {})
        .unwrap();
    let acc = summary.final_eval.unwrap();
    assert!(
        acc >= 0.95,
        "held-out pairwise accuracy {acc} (before training {before})"
    );
    let plain = marker_frequency(&path, None, 0.0, marker);
    let guided = marker_frequency(&path, Some(&out), 3.0, marker);
    assert!(
        guided > plain * 2.0 && guided > 0.1,
        "marker frequency {plain} → {guided} with α = 3"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("genarm.json")).unwrap()).unwrap();
    assert_eq!(info["name"], "marker");
    assert_eq!(info["beta_r"], 0.5);
}

#[test]
fn resumed_training_equals_uninterrupted() {
    let (path, _) = tiny_base("train-resume", 43);
    let base = Checkpoint::open(&path).unwrap();
    let (train, eval) = split_pairs(marker_pairs(80, 5, 3), 0.1, 2);
    let cfg = TrainConfig {
        lr: 5e-3,
        epochs: 2,
        lora_dropout: 0.1,
        checkpoint_every: 3,
        ..tiny_train_config(usize::MAX)
    };
    let label = ArmLabel::default();
    let straight = temp_dir("train-straight");
    Trainer::new(&base, cfg.clone(), &straight, 32, &Device::Cpu)
        .unwrap()
        .train(&train, &eval, &label, false, None, &mut |_| {})
        .unwrap();
    // "Killed" after 7 of 20 steps (the last checkpoint is at 7), then resumed by a new process.
    let broken = temp_dir("train-broken");
    Trainer::new(&base, cfg.clone(), &broken, 32, &Device::Cpu)
        .unwrap()
        .train(&train, &eval, &label, false, Some(7), &mut |_| {})
        .unwrap();
    let summary = Trainer::new(&base, cfg, &broken, 32, &Device::Cpu)
        .unwrap()
        .train(&train, &eval, &label, true, None, &mut |_| {})
        .unwrap();
    assert_eq!(summary.resumed_from, Some(7));
    assert_same_safetensors(
        &straight.join("adapter_model.safetensors"),
        &broken.join("adapter_model.safetensors"),
    );
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
        let probe = pair(&[3, 4, 5], &[6, 9, 8, 7], &[1, 2]);
        let (c, _) = t.pair_logprobs(&[&probe], None).unwrap();
        let trained = c.to_vec1::<f32>().unwrap()[0] as f64;
        let mut engine =
            CpuEngine::load(&path, std::slice::from_ref(&out), None, &Device::Cpu).unwrap();
        let seq = [3, 4, 5, 6, 9, 8, 7];
        let lp = engine.teacher_forced(&seq).unwrap();
        let loaded: f64 = (3..seq.len())
            .map(|t| lp[1][t - 1][seq[t] as usize] as f64)
            .sum();
        let plain: f64 = (3..seq.len())
            .map(|t| lp[0][t - 1][seq[t] as usize] as f64)
            .sum();
        assert!(
            (trained - loaded).abs() < 1e-3,
            "{dtype:?}: trained {trained} vs reloaded {loaded}"
        );
        assert!(
            (loaded - plain).abs() > 1e-3,
            "{dtype:?}: the adapter changed nothing"
        );
    }
}
