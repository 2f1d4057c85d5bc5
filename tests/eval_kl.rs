//! The KL column of `genarm eval` on tiny random models: each response's estimate
//! `Σ_t log π_dec(y_t) − log π_base(y_t)` against a direct f64 computation (GenARM with a
//! LoRA ARM and an ARM of its own, at a temperature, with and without top-p; a policy
//! LoRA against its base), exactly 0 for α = 0 at T = 1, and the eval outputs that
//! carry it (samples, summary JSON/CSV, results.md, reward_vs_kl.svg).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use common::*;
use genarm::cpu::CpuEngine;
use genarm::eval::kl::{guided_kl, policy_kl};
use genarm::model::arm_plan::plan_policy;
use genarm::model::Checkpoint;
use genarm::{generate, GenerateOptions, SamplingParams};

const PROMPT: [u32; 4] = [3, 17, 42, 8];

/// f32 log-probs against f64 over two tiny layers are good to ~1e-5 per entry; a
/// response's estimate sums two of them per token over ≤ 12 tokens, α-weighted.
const KL_ATOL: f64 = 2e-3;

struct Fixture {
    base: PathBuf,
    lora_arm: PathBuf,
    own_arm: PathBuf,
    model: TinyModel,
    /// The base with the LoRA merged: the LoRA ARM's (and the policy's) model.
    merged: TinyModel,
    other: TinyModel,
}

/// A tiny base, a random LoRA on it (used as an ARM and as a policy) and a second
/// random model of the same shape (an ARM of its own).
fn fixture(name: &str, seed: u64) -> Fixture {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, seed);
    let other = TinyModel::random(&cfg, seed + 1);
    let lora = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, seed + 2);
    let dir = temp_dir(name);
    let (base, own_arm, lora_arm) = (
        dir.join("base.gguf"),
        dir.join("own.gguf"),
        dir.join("lora"),
    );
    let vocab = char_vocabulary(cfg.vocab_size);
    model.write_gguf_with_tokens(&base, GgmlDType::F32, Some(&vocab));
    other.write_gguf_with_tokens(&own_arm, GgmlDType::F32, Some(&vocab));
    write_lora_dir(&lora_arm, &lora, "a-hub-name");
    Fixture {
        merged: model.with_lora_merged(&lora),
        base,
        lora_arm,
        own_arm,
        model,
        other,
    }
}

/// `log π_dec(y)` for guided scores in f64: the softmax at `temperature`, cut to the
/// smallest most-likely set whose mass reaches `top_p` and renormalised (a token outside
/// it counted in with its own weight, as the library does for rounding at the edge).
fn decoding_logprob_f64(scores: &[f64], temperature: f64, top_p: f64, y: usize) -> f64 {
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores
        .iter()
        .map(|s| ((s - max) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    let (mut kept, mut has_y) = (0.0, false);
    for i in order {
        kept += w[i];
        has_y |= i == y;
        if top_p < 1.0 && kept >= top_p * total {
            break;
        }
    }
    if !has_y {
        kept += w[y];
    }
    (scores[y] - max) / temperature - kept.ln()
}

/// The estimate in f64: per response token, the guided scores from the f64 reference of
/// the base and each ARM model, then `log π_dec(y) − log π_base(y)`.
fn guided_kl_f64(
    base: &TinyModel,
    arms: &[&TinyModel],
    alphas: &[f64],
    response: &[u32],
    params: &SamplingParams,
) -> f64 {
    let mut seq = PROMPT.to_vec();
    seq.extend_from_slice(response);
    let base_lp = reference_logprobs(base, &seq);
    let arm_lp: Vec<Vec<Vec<f64>>> = arms.iter().map(|m| reference_logprobs(m, &seq)).collect();
    (0..response.len())
        .map(|t| {
            let p = PROMPT.len() - 1 + t;
            let y = response[t] as usize;
            let scores: Vec<f64> = (0..base_lp[p].len())
                .map(|v| {
                    base_lp[p][v]
                        + arm_lp
                            .iter()
                            .zip(alphas)
                            .map(|(a, w)| w * a[p][v])
                            .sum::<f64>()
                })
                .collect();
            decoding_logprob_f64(&scores, params.temperature as f64, params.top_p as f64, y)
                - base_lp[p][y]
        })
        .sum()
}

fn sample(engine: &mut dyn genarm::Engine, alphas: &[f32], params: &SamplingParams) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: 12,
        alphas: alphas.to_vec(),
        sampling: params.clone(),
        ignore_eos: true,
        ..Default::default()
    };
    generate(engine, None, &PROMPT, &opts, &mut |_| true)
        .unwrap()
        .tokens
}

#[test]
fn guided_kl_matches_the_f64_computation() {
    let f = fixture("kl-guided", 70);
    let arms = [f.lora_arm.clone(), f.own_arm.clone()];
    let mut engine = CpuEngine::load(&f.base, &arms, None, &Device::Cpu).unwrap();
    let alphas = [0.7f32, 1.3];
    for (seed, temperature, top_p) in [(1, 1.0f32, 1.0f32), (2, 0.8, 1.0), (3, 1.2, 0.9)] {
        let params = SamplingParams {
            temperature,
            top_p,
            seed,
            ..Default::default()
        };
        let response = sample(&mut engine, &alphas, &params);
        let got = guided_kl(&mut engine, &PROMPT, &response, &alphas, &params).unwrap();
        let want = guided_kl_f64(
            &f.model,
            &[&f.merged, &f.other],
            &[0.7, 1.3],
            &response,
            &params,
        );
        assert!(
            (got - want).abs() < KL_ATOL && want.abs() > 0.05,
            "T {temperature}, top-p {top_p}: {got} vs f64 {want}"
        );
    }
}

#[test]
fn kl_is_zero_for_alpha_zero_at_temperature_one() {
    let f = fixture("kl-zero", 71);
    let arms = [f.lora_arm.clone(), f.own_arm.clone()];
    let mut engine = CpuEngine::load(&f.base, &arms, None, &Device::Cpu).unwrap();
    let params = SamplingParams {
        seed: 4,
        ..Default::default()
    };
    let response = sample(&mut engine, &[0.0, 0.0], &params);
    let kl = guided_kl(&mut engine, &PROMPT, &response, &[0.0, 0.0], &params).unwrap();
    // The base's own f32 log-probs renormalised: zero up to f32 rounding.
    assert!(kl.abs() < 1e-4, "{kl}");
    assert_eq!(
        guided_kl(&mut engine, &PROMPT, &[], &[1.0, 1.0], &params).unwrap(),
        0.0
    );
    // Not zero once the temperature alone moves the distribution.
    let hot = SamplingParams {
        temperature: 1.5,
        ..params
    };
    let kl = guided_kl(&mut engine, &PROMPT, &response, &[0.0, 0.0], &hot).unwrap();
    let want = guided_kl_f64(&f.model, &[], &[], &response, &hot);
    assert!(
        (kl - want).abs() < KL_ATOL && want.abs() > 0.05,
        "{kl} vs {want}"
    );
}

fn policy_engine(base: &Path, policy: &Path) -> CpuEngine {
    let plan = plan_policy(policy, base, &Device::Cpu).unwrap();
    CpuEngine::from_parts(
        Checkpoint::open(base).unwrap(),
        vec![plan],
        None,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn policy_kl_matches_the_f64_computation() {
    let f = fixture("kl-policy", 72);
    let mut policy = policy_engine(&f.base, &f.lora_arm);
    let mut base = CpuEngine::load(&f.base, &[], None, &Device::Cpu).unwrap();
    for (seed, temperature, top_p) in [(5, 1.0f32, 1.0f32), (6, 0.7, 0.95)] {
        let params = SamplingParams {
            temperature,
            top_p,
            seed,
            ..Default::default()
        };
        let response = sample(&mut policy, &[], &params);
        let got = policy_kl(&mut policy, &mut base, &PROMPT, &response, &params).unwrap();
        // π_dec is the merged model's softmax at T (its "base" row), against the base.
        let mut seq = PROMPT.to_vec();
        seq.extend_from_slice(&response);
        let (pol, plain) = (
            reference_logprobs(&f.merged, &seq),
            reference_logprobs(&f.model, &seq),
        );
        let want: f64 = (0..response.len())
            .map(|t| {
                let p = PROMPT.len() - 1 + t;
                let y = response[t] as usize;
                decoding_logprob_f64(&pol[p], temperature as f64, top_p as f64, y) - plain[p][y]
            })
            .sum();
        assert!(
            (got - want).abs() < KL_ATOL && want.abs() > 0.05,
            "T {temperature}, top-p {top_p}: {got} vs f64 {want}"
        );
    }
}

#[test]
fn eval_reports_the_kl_of_every_sampled_row() {
    let f = fixture("kl-eval", 73);
    let dir = f.base.parent().unwrap().to_path_buf();
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "the cat\na dog is\nsee\n").unwrap();
    let out = dir.join("out");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = genarm(&[
        "eval",
        "--model",
        &s(&f.base),
        "--arm",
        &s(&f.own_arm),
        "--prompts",
        &s(&prompts),
        "--scorer",
        "concise",
        "--scorer",
        "length",
        "--alphas",
        "0,1,2",
        "--samples",
        "3",
        "--max-new-tokens",
        "8",
        "--out",
        &s(&out),
        "--baseline",
        &format!("dpo:{}", s(&f.lora_arm)),
    ]);
    assert!(o.status.success(), "eval failed: {}", stderr(&o));
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    let mut n = 0;
    for line in samples.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let kl = r["kl"].as_f64().unwrap_or_else(|| panic!("no KL: {line}"));
        if r["method"] == "base" {
            assert!(kl.abs() < 1e-4, "base sample KL {kl}");
        }
        n += 1;
    }
    assert_eq!(n, 3 * 3 * 4, "three prompts × three samples × four rows");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let rows = summary.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        let kl = &row["kl"];
        assert!(
            kl["mean"].as_f64().unwrap().is_finite() && kl["ci95"].as_f64().is_some(),
            "{row}"
        );
    }
    let mean = |i: usize| rows[i]["kl"]["mean"].as_f64().unwrap();
    assert!(mean(0).abs() < 1e-4, "base row mean KL {}", mean(0));
    assert!(
        mean(2) > mean(1) && mean(1) > 0.0,
        "α 1 → 2: {} → {}",
        mean(1),
        mean(2)
    );
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert!(
        header.contains(&"kl_mean") && header.contains(&"kl_ci95"),
        "{csv}"
    );
    let results = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(results.contains("KL to base"), "{results}");
    let svg = std::fs::read_to_string(out.join("reward_vs_kl.svg")).unwrap();
    assert!(svg.contains("KL") && svg.contains("dpo:"), "{svg}");
    assert!(stdout(&o).contains("KL "), "{}", stdout(&o));
}
