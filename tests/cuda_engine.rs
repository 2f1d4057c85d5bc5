//! What the candle engine does differently on a GPU, checked on the CPU device: half
//! precision checkpoints loaded and run in their own type, and the guided pick made
//! where the log-probs are (`cpu::device_sample`) against the host sampler.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::*;
use genarm::cpu::device_sample::DeviceSampler;
use genarm::cpu::llama::Llama;
use genarm::cpu::{CpuEngine, Precision};
use genarm::guide::{combine, log_softmax, Sampler};
use genarm::model::weights::Weight;
use genarm::model::Checkpoint;
use genarm::{generate, Engine, GenerateOptions, SamplingParams};

const TOKENS: [u32; 12] = [3, 17, 42, 0, 59, 8, 8, 23, 1, 60, 31, 5];

fn bf16_model_dir(name: &str) -> (PathBuf, TinyModel) {
    let model = TinyModel::random(&TinyConfig::default(), 7);
    let dir = temp_dir(name);
    model.write_hf_dir(&dir, DType::BF16, 2);
    (dir, model.hf_rounded(DType::BF16))
}

fn teacher_forced(dir: &Path, precision: Precision) -> Vec<Vec<f32>> {
    let mut engine = CpuEngine::load_with(dir, &[], None, &Device::Cpu, precision).unwrap();
    engine.teacher_forced(&TOKENS).unwrap().remove(0)
}

#[test]
fn stored_precision_keeps_bf16_weights_and_activations() {
    let (dir, _) = bf16_model_dir("bf16-dtype");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let load = |p| {
        Llama::load_with(
            ckpt.source.as_ref(),
            &ckpt.config,
            &[None],
            64,
            &Device::Cpu,
            p,
        )
        .unwrap()
    };
    assert_eq!(load(Precision::Stored).dtype(), DType::BF16);
    // The CPU default stays the f32 reference.
    assert_eq!(load(Precision::Auto).dtype(), DType::F32);
    assert_eq!(load(Precision::F32).dtype(), DType::F32);
    let w = ckpt
        .source
        .load_as(
            "model.layers.1.mlp.down_proj.weight",
            DType::BF16,
            &Device::Cpu,
        )
        .unwrap();
    let Weight::Dense(t) = w else {
        panic!("a safetensors weight is dense");
    };
    assert_eq!(t.dtype(), DType::BF16);
}

/// bf16 keeps 8 significant bits: every rounding of an activation moves it by up to
/// 2^-9 relative. Two layers with a few roundings each (norm output, q/k/v, scores,
/// attention output, MLP, residual sums) of activations of order 1, and logits of
/// order 3 here: the log-probs move by a few hundredths. 0.06 allows that and still
/// catches a wrong op (those move log-probs by whole units).
const BF16_LOGPROB_ATOL: f64 = 0.06;

#[test]
fn bf16_model_in_bf16_is_close_to_the_f32_path() {
    let (dir, rounded) = bf16_model_dir("bf16-vs-f32");
    let f32_path = teacher_forced(&dir, Precision::F32);
    let bf16_path = teacher_forced(&dir, Precision::Stored);
    let reference: Vec<Vec<f64>> = reference_logits(&rounded, &TOKENS)
        .iter()
        .map(|l| common::log_softmax(l))
        .collect();
    let mut max_diff = 0.0f64;
    for (pos, ((a, b), want)) in f32_path.iter().zip(&bf16_path).zip(&reference).enumerate() {
        // The f32 path is the reference's own precision; bf16 within its budget.
        assert_close(a, want, 1e-4, 0.0, &format!("f32 path, position {pos}"));
        assert_close(
            b,
            want,
            BF16_LOGPROB_ATOL,
            0.0,
            &format!("bf16 path, position {pos}"),
        );
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs() as f64);
        }
    }
    // It really ran in bf16: the two paths differ by more than f32 rounding.
    assert!(max_diff > 1e-4, "bf16 path identical to f32 ({max_diff:e})");
    eprintln!("bf16 vs f32 log-probs: max |diff| {max_diff:.4}");
}

// ---------------------------------------------------------------------------
// The pick on the device against guide::Sampler
// ---------------------------------------------------------------------------

/// Log-prob rows of `models` models over `vocab` tokens; with `coarse` the logits are
/// rounded to steps of 0.25 so that many tokens tie.
fn random_rows(vocab: usize, models: usize, seed: u64, coarse: bool) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64::new(seed);
    (0..models)
        .map(|_| {
            let logits: Vec<f32> = (0..vocab)
                .map(|_| {
                    let x = rng.uniform(-6.0, 6.0) as f32;
                    if coarse {
                        (x * 4.0).round() / 4.0
                    } else {
                        x
                    }
                })
                .collect();
            log_softmax(&logits)
        })
        .collect()
}

fn settings() -> Vec<SamplingParams> {
    let mut out = vec![SamplingParams {
        greedy: true,
        ..Default::default()
    }];
    for temperature in [0.6f32, 1.0, 1.7] {
        for (top_k, top_p) in [
            (None, 1.0f32),
            (Some(1), 1.0),
            (Some(7), 1.0),
            (Some(300), 1.0),
            (None, 0.3),
            (None, 0.9),
            (Some(40), 0.8),
        ] {
            out.push(SamplingParams {
                temperature,
                top_k,
                top_p,
                ..Default::default()
            });
        }
    }
    out
}

#[test]
fn device_pick_draws_what_the_host_sampler_draws() {
    let device = Device::Cpu;
    let mut picked = 0;
    let mut host_fallbacks = 0;
    for (vocab, coarse) in [
        (1usize, false),
        (7, true),
        (1000, false),
        (3001, true),
        (5000, false),
    ] {
        let sampler_dev = DeviceSampler::new(vocab, &device).unwrap();
        for case in 0..4u64 {
            let host = random_rows(vocab, 3, 1000 * vocab as u64 + case, coarse);
            let rows: Vec<Tensor> = host
                .iter()
                .map(|r| Tensor::new(r.as_slice(), &device).unwrap())
                .collect();
            let alphas = [[0.8f32, -0.4], [0.0, 1.5], [2.0, 0.5], [0.0, 0.0]][case as usize];
            let arm_rows: Vec<&[f32]> = host[1..].iter().map(Vec::as_slice).collect();
            let scores = combine(&host[0], &arm_rows, &alphas);
            for params in settings() {
                for seed in 0..3u64 {
                    let params = SamplingParams {
                        seed: seed * 7919 + case,
                        ..params.clone()
                    };
                    let mut sampler = Sampler::new(params.clone());
                    let u = sampler.peek_uniform();
                    let want = sampler.sample(&scores);
                    let what = format!("vocab {vocab}, case {case}, {params:?}");
                    let Some(got) = sampler_dev.pick(&rows, &alphas, &params, u).unwrap() else {
                        // Only a wide top-p nucleus, or ties at the threshold more than
                        // the candidate slots hold, pass the candidate set.
                        assert!(
                            (params.top_p < 1.0 && vocab > 1000) || coarse,
                            "{what}: no device pick"
                        );
                        host_fallbacks += 1;
                        continue;
                    };
                    assert_eq!(got.id, want, "{what}: token");
                    let lp = |r: &[f32]| r[want as usize];
                    assert!(
                        (got.base_logprob - lp(&host[0])).abs() <= 1e-5,
                        "{what}: base lp"
                    );
                    for (g, r) in got.arm_logprobs.iter().zip(&host[1..]) {
                        assert!((g - lp(r)).abs() <= 1e-5, "{what}: ARM lp");
                    }
                    picked += 1;
                }
            }
        }
    }
    eprintln!("{picked} device picks equal to the host's, {host_fallbacks} left to the host");
    assert!(picked > 1000, "too few device picks checked ({picked})");
}

#[test]
fn device_pick_refuses_scores_that_are_not_finite() {
    let device = Device::Cpu;
    let picker = DeviceSampler::new(5, &device).unwrap();
    let nan = Tensor::new(&[f32::NAN; 5], &device).unwrap();
    let inf = Tensor::new(&[f32::NEG_INFINITY; 5], &device).unwrap();
    for params in settings() {
        for row in [&nan, &inf] {
            let err = picker.pick(std::slice::from_ref(row), &[], &params, 0.5);
            assert!(
                matches!(&err, Err(e) if e.to_string().contains("not finite")),
                "{params:?}: {err:?}"
            );
        }
    }
}

/// The engine with the device pick on (the GPU default) decodes the same tokens and
/// log-probs as with the host pick (the CPU default).
#[test]
fn engine_with_device_pick_decodes_like_the_host_pick() {
    let cfg = TinyConfig::default();
    let dir = temp_dir("device-pick-engine");
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = dir.join(format!("m{i}.gguf"));
            TinyModel::random(&cfg, 200 + i).write_gguf(&p, GgmlDType::F32);
            p
        })
        .collect();
    let load = || CpuEngine::load(&paths[0], &paths[1..], None, &Device::Cpu).unwrap();
    let mut host = load();
    let mut device = load();
    device.set_device_pick(true).unwrap();
    // Greedy, the full distribution, top-k, top-p (on the candidates or past them).
    for sampling in settings().into_iter().step_by(3) {
        let opts = GenerateOptions {
            max_new_tokens: 16,
            alphas: vec![0.6, -0.3],
            sampling: SamplingParams {
                seed: 11,
                ..sampling
            },
            ignore_eos: true,
            ..Default::default()
        };
        let mut events = [Vec::new(), Vec::new()];
        for (engine, out) in [&mut host, &mut device].into_iter().zip(events.iter_mut()) {
            generate(engine, None, &[5, 9, 33, 2], &opts, &mut |e| {
                out.push((e.id, e.base_logprob, e.arm_logprobs.clone()));
                true
            })
            .unwrap();
        }
        assert_eq!(events[0].len(), 16);
        for (h, d) in events[0].iter().zip(&events[1]) {
            assert_eq!(h.0, d.0, "{:?}", opts.sampling);
            assert!((h.1 - d.1).abs() <= 1e-5);
            for (a, b) in h.2.iter().zip(&d.2) {
                assert!((a - b).abs() <= 1e-5);
            }
        }
    }
}
