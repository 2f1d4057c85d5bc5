//! The evaluation baselines on tiny random models: the scalar reward model (its
//! Bradley–Terry loss and rewards against a direct f64 computation, its gradients
//! against finite differences, learning a synthetic preference, resuming, save → load),
//! KV-cached candidate scoring against full recomputation, best-of-N's choice and cost,
//! ARGS against greedy decoding and against a direct computation, and `genarm eval
//! --baseline` writing every documented file.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::*;
use genarm::cpu::CpuEngine;
use genarm::eval::baselines::{
    args_decode, best_of_n, candidate_seed, reward_model_rewards, sample_candidates, scored_tokens,
    top_k_ids, ArgsOptions,
};
use genarm::eval::reward_model::ScalarRewardModel;
use genarm::eval::run::SweepSpec;
use genarm::model::Checkpoint;
use genarm::train::data::TokenizedPair;
use genarm::train::loss::bradley_terry_loss_f64;
use genarm::train::trainer::{split_pairs, ArmLabel, TrainConfig, Trainer};
use genarm::{generate, Engine, GenerateOptions, SamplingParams};

const EOS: u32 = 1;

/// A tiny GGUF base with a character tokenizer (EOS = 1).
fn tiny_base(name: &str, seed: u64) -> (PathBuf, TinyModel) {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, seed);
    let path = temp_dir(name).join("base.gguf");
    model.write_gguf_with_tokens(
        &path,
        GgmlDType::F32,
        Some(&char_vocabulary(cfg.vocab_size)),
    );
    (path, model)
}

fn rm_config(layers: usize) -> TrainConfig {
    TrainConfig {
        scalar_head: true,
        ..tiny_train_config(layers)
    }
}

/// Sets every LoRA B to uniform noise (PEFT starts it at zero, which would make the
/// LoRA change nothing).
fn randomise_lora_b(t: &mut Trainer, dtype: DType) {
    for l in t.arm().lora_vars().to_vec() {
        let noise = Tensor::rand(-0.3f32, 0.3, l.b.shape().clone(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        l.b.set(&noise).unwrap();
    }
}

/// A reward model with random LoRA and head, written to `dir` untrained.
fn random_reward_model(base: &Path, dir: &Path) -> Trainer {
    let ckpt = Checkpoint::open(base).unwrap();
    let mut t = Trainer::new(&ckpt, rm_config(usize::MAX), dir, 64, &Device::Cpu).unwrap();
    randomise_lora_b(&mut t, DType::F32);
    t.write_adapter(&ArmLabel {
        name: Some("random-rm".into()),
        ..Default::default()
    })
    .unwrap();
    t
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

#[test]
fn bradley_terry_loss_and_rewards_match_direct_f64_computation() {
    let (path, model) = tiny_base("rm-loss", 60);
    let base = Checkpoint::open(&path).unwrap();
    let pairs = [
        pair(&[3, 4, 5], &[6, 7, 8, 9], &[10, 11]),
        pair(&[12, 13], &[14], &[15, 16, 17, 18, 19]),
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    // With the head set to the LM head's row v and the LoRA still zero, r(x, y) is the
    // base's logit of token v at the last position: the f64 reference computes it.
    let v = 17;
    let hidden = model.config.hidden_size;
    let row: Vec<f32> = model.get("lm_head.weight")[v * hidden..(v + 1) * hidden]
        .iter()
        .map(|&x| x as f32)
        .collect();
    for layers in [usize::MAX, 1] {
        let out = temp_dir("rm-loss-out");
        let mut t = Trainer::new(&base, rm_config(layers), &out, 32, &Device::Cpu).unwrap();
        let head = Tensor::from_vec(row.clone(), (1, hidden), &Device::Cpu).unwrap();
        t.score_head().unwrap().weight.set(&head).unwrap();
        let (c, r) = t.pair_scores(&refs, None).unwrap();
        let loss = t
            .pair_loss(&refs, &c, &r)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let (c, r) = (to_f64(&c), to_f64(&r));
        let mut want_loss = 0.0;
        for (i, p) in pairs.iter().enumerate() {
            let reward = |resp: &[u32]| {
                let seq = [p.prompt.as_slice(), resp].concat();
                reference_logits(&model, &seq)[seq.len() - 1][v]
            };
            let (rw, rl) = (reward(&p.chosen), reward(&p.rejected));
            assert!(
                (c[i] - rw).abs() < 1e-4,
                "layers {layers}: r_w {} vs {rw}",
                c[i]
            );
            assert!(
                (r[i] - rl).abs() < 1e-4,
                "layers {layers}: r_l {} vs {rl}",
                r[i]
            );
            // −log σ(r_w − r_l), written out.
            let direct = (1.0 + (-(rw - rl)).exp()).ln();
            assert!((bradley_terry_loss_f64(rw, rl) - direct).abs() < 1e-12);
            want_loss += direct / pairs.len() as f64;
        }
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "loss {loss} vs f64 {want_loss}"
        );
    }
}

#[test]
fn score_head_and_lora_gradients_match_finite_differences() {
    let (path, _) = tiny_base("rm-grad", 61);
    let base = Checkpoint::open(&path).unwrap();
    let out = temp_dir("rm-grad-out");
    let mut t =
        Trainer::with_dtype(&base, rm_config(2), &out, 32, DType::F64, &Device::Cpu).unwrap();
    randomise_lora_b(&mut t, DType::F64);
    let pairs = [
        pair(&[3, 4, 5], &[6, 7, 8], &[9, 10]),
        pair(&[11], &[12, 13], &[14]),
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let loss_of = |t: &mut Trainer| -> Tensor {
        let (c, r) = t.pair_scores(&refs, None).unwrap();
        t.pair_loss(&refs, &c, &r).unwrap()
    };
    let grads = loss_of(&mut t).backward().unwrap();
    let mut vars = vec![(
        "score.weight".to_string(),
        t.score_head().unwrap().weight.clone(),
    )];
    for l in t.arm().lora_vars().iter().step_by(5) {
        vars.push((format!("{} A", l.module), l.a.clone()));
        vars.push((format!("{} B", l.module), l.b.clone()));
    }
    let checked = assert_gradients_match_finite_differences(&vars, &grads, &mut || {
        loss_of(&mut t).to_scalar::<f64>().unwrap()
    });
    assert!(checked >= 3 * vars.len());
}

#[test]
fn reward_model_learns_a_preference_and_reloads_with_the_same_rewards() {
    let (path, _) = tiny_base("rm-learn", 62);
    let base = Checkpoint::open(&path).unwrap();
    let (train, eval) = split_pairs(marker_pairs(240, 13, 5), 0.2, 1);
    let out = temp_dir("rm-learn-out");
    let cfg = TrainConfig {
        lr: 1e-2,
        epochs: 3,
        checkpoint_every: 1000,
        ..rm_config(usize::MAX)
    };
    let mut t = Trainer::new(&base, cfg, &out, 32, &Device::Cpu).unwrap();
    let before = t.evaluate(&eval).unwrap().0;
    let label = ArmLabel {
        name: Some("marker-rm".into()),
        ..Default::default()
    };
    let summary = t
        .train(&train, &eval, &label, false, None, &mut |_| {})
        .unwrap();
    let acc = summary.final_eval.unwrap();
    assert!(
        acc >= 0.9,
        "held-out accuracy {acc} (before training {before})"
    );

    // Saved: adapter + head + genarm.json marking a scalar reward model.
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "score_head.safetensors",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("genarm.json")).unwrap()).unwrap();
    assert_eq!(info["kind"], "scalar_reward_model");
    assert_eq!(info["name"], "marker-rm");

    // Loaded for scoring, it gives the trained rewards.
    let mut rm = ScalarRewardModel::load(&path, &out, 0, 64, &Device::Cpu).unwrap();
    let probes = [
        vec![3, 4, 5, 13, 7, 8],
        vec![20, 21, 22, 23, 24, 25, 26],
        vec![9],
    ];
    let trained = to_f64(&t.sequence_rewards(&probes, None).unwrap());
    for (seq, want) in probes.iter().zip(&trained) {
        let got = rm.score_sequence(seq).unwrap() as f64;
        assert!(
            (got - want).abs() < 1e-4,
            "{seq:?}: loaded {got} vs trained {want}"
        );
    }

    // It is not an ARM: guiding with it is a clear error.
    let err = CpuEngine::load(&path, std::slice::from_ref(&out), None, &Device::Cpu)
        .err()
        .expect("a reward model is refused as an ARM")
        .to_string();
    assert!(err.contains("scalar reward model"), "{err}");
}

#[test]
fn resumed_reward_model_training_equals_uninterrupted() {
    let (path, _) = tiny_base("rm-resume", 63);
    let base = Checkpoint::open(&path).unwrap();
    let (train, eval) = split_pairs(marker_pairs(40, 5, 3), 0.1, 2);
    let cfg = TrainConfig {
        lr: 5e-3,
        epochs: 2,
        checkpoint_every: 2,
        ..rm_config(1)
    };
    let label = ArmLabel::default();
    let run = |dir: &Path, resume: bool, max_steps: Option<usize>| {
        Trainer::new(&base, cfg.clone(), dir, 32, &Device::Cpu)
            .unwrap()
            .train(&train, &eval, &label, resume, max_steps, &mut |_| {})
            .unwrap()
    };
    let straight = temp_dir("rm-straight");
    run(&straight, false, None);
    let broken = temp_dir("rm-broken");
    run(&broken, false, Some(3));
    assert_eq!(run(&broken, true, None).resumed_from, Some(3));
    for file in ["score_head.safetensors", "adapter_model.safetensors"] {
        assert_same_safetensors(&straight.join(file), &broken.join(file));
    }
}

#[test]
fn kv_cached_candidate_scoring_equals_full_recomputation() {
    let (path, _) = tiny_base("rm-cache", 64);
    let dir = temp_dir("rm-cache-rm");
    random_reward_model(&path, &dir);
    let mut rm = ScalarRewardModel::load(&path, &dir, 3, 64, &Device::Cpu).unwrap();
    let full = |seq: &[u32]| {
        let mut fresh = ScalarRewardModel::load(&path, &dir, 0, 64, &Device::Cpu).unwrap();
        fresh.score_sequence(seq).unwrap()
    };
    let prompt = [5u32, 9, 14, 2];
    let mut prefix = prompt.to_vec();
    rm.score_sequence(&prompt).unwrap();
    rm.start_candidates().unwrap();
    for (step, (cands, keep)) in [([7u32, 8, 9], 1usize), ([30, 2, 44], 2), ([11, 11, 60], 0)]
        .into_iter()
        .enumerate()
    {
        let got = rm.score_candidates(&cands).unwrap();
        for (i, &c) in cands.iter().enumerate() {
            let want = full(&[prefix.as_slice(), &[c]].concat());
            assert!(
                (got[i] - want).abs() < 1e-4,
                "step {step}, candidate {c}: cached {} vs full {want}",
                got[i]
            );
        }
        rm.keep_candidate(keep).unwrap();
        prefix.push(cands[keep]);
    }
    // A continuation of a scored prefix, computed on its cache.
    rm.score_sequence(&prompt).unwrap();
    let got = rm.score_continuation(prompt.len(), &[40, 41, 42]).unwrap();
    let want = full(&[5, 9, 14, 2, 40, 41, 42]);
    assert!(
        (got - want).abs() < 1e-4,
        "continuation {got} vs full {want}"
    );
}

fn spec(max_new_tokens: usize) -> SweepSpec {
    SweepSpec {
        settings: vec![vec![]],
        samples: 1,
        seed: 3,
        max_new_tokens,
        temperature: 1.0,
        top_p: 1.0,
        chat: false,
        template: "{}".into(),
    }
}

#[test]
fn best_of_n_picks_the_highest_reward_and_counts_its_forward_passes() {
    let (path, _) = tiny_base("bon", 65);
    let dir = temp_dir("bon-rm");
    random_reward_model(&path, &dir);
    let mut base = CpuEngine::load(&path, &[], None, &Device::Cpu).unwrap();
    let tok = base.facts().tokenizer.clone().unwrap();
    let prompt = tok.encode_prompt("the cat", false, None).unwrap();
    let p = prompt.len() as u64;
    let n = 5;
    let pool = sample_candidates(&mut base, &tok, &prompt, n, 11, &spec(6), &[EOS]).unwrap();
    assert_eq!(pool.len(), n);
    // Candidate 0 is the plain base sample with the response's own seed.
    let opts = GenerateOptions {
        max_new_tokens: 6,
        sampling: SamplingParams {
            seed: candidate_seed(11, 0),
            ..Default::default()
        },
        eos_ids: vec![EOS],
        ..Default::default()
    };
    let plain = generate(&mut base, Some(&tok), &prompt, &opts, &mut |_| true).unwrap();
    assert_eq!(pool[0].tokens, plain.tokens);
    assert!(
        pool.iter().any(|c| c.tokens != pool[0].tokens),
        "the samples differ"
    );

    let mut rm = ScalarRewardModel::load(&path, &dir, 0, 64, &Device::Cpu).unwrap();
    let ranked = reward_model_rewards(&mut rm, &prompt, &pool, &[EOS], false).unwrap();
    let mut fresh = ScalarRewardModel::load(&path, &dir, 0, 64, &Device::Cpu).unwrap();
    for (c, &r) in pool.iter().zip(&ranked.rewards) {
        let scored = scored_tokens(&c.tokens, &[EOS], false);
        let want = fresh
            .score_sequence(&[prompt.as_slice(), scored].concat())
            .unwrap() as f64;
        assert!((r - want).abs() < 1e-4, "reward {r} vs full {want}");
    }
    for take in [1, 3, n] {
        let (best, cost) = best_of_n(&pool, &ranked, take);
        let top = ranked.rewards[..take]
            .iter()
            .copied()
            .fold(f64::MIN, f64::max);
        assert!(
            best < take && ranked.rewards[best] == top,
            "N = {take}: picked {best}"
        );
        // The base feeds the prompt and every sampled token but the last, per candidate;
        // the reward model the prompt once and each scored response.
        let want_base: u64 = pool[..take]
            .iter()
            .map(|c| p + c.tokens.len() as u64 - 1)
            .sum();
        let want_rm: u64 = p + pool[..take]
            .iter()
            .map(|c| scored_tokens(&c.tokens, &[EOS], false).len() as u64)
            .sum::<u64>();
        assert_eq!(cost.passes.base, want_base, "N = {take}");
        assert_eq!(cost.passes.rm, want_rm, "N = {take}");
        assert_eq!(cost.passes.arm, 0);
        assert!(cost.seconds > 0.0);
    }
}

/// The base's greedy tokens, stopping at EOS.
fn greedy(base: &mut CpuEngine, prompt: &[u32], max_new_tokens: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams {
            greedy: true,
            ..Default::default()
        },
        eos_ids: vec![EOS],
        ..Default::default()
    };
    generate(base, None, prompt, &opts, &mut |_| true)
        .unwrap()
        .tokens
}

#[test]
fn args_with_zero_weight_is_greedy_base_decoding() {
    let (path, _) = tiny_base("args-greedy", 66);
    let dir = temp_dir("args-greedy-rm");
    random_reward_model(&path, &dir);
    let mut base = CpuEngine::load(&path, &[], None, &Device::Cpu).unwrap();
    let mut rm = ScalarRewardModel::load(&path, &dir, 4, 64, &Device::Cpu).unwrap();
    for prompt in [[3u32, 4, 5], [20, 2, 31]] {
        let opts = ArgsOptions {
            k: 4,
            w: 0.0,
            max_new_tokens: 10,
            eos_ids: vec![EOS],
            score_eos: false,
        };
        let out = args_decode(&mut base, &mut rm, &prompt, &opts).unwrap();
        assert_eq!(
            out.tokens,
            greedy(&mut base, &prompt, 10),
            "prompt {prompt:?}"
        );
        let t = out.tokens.len() as u64;
        assert_eq!(out.passes.base, 3 + t - 1);
        assert_eq!(out.passes.rm, 3 + 4 * t);
    }
}

#[test]
fn args_with_a_huge_weight_takes_the_reward_argmax_among_the_top_k() {
    let (path, _) = tiny_base("args-rm", 67);
    let dir = temp_dir("args-rm-rm");
    random_reward_model(&path, &dir);
    let k = 5;
    let mut base = CpuEngine::load(&path, &[], None, &Device::Cpu).unwrap();
    let mut rm = ScalarRewardModel::load(&path, &dir, k, 64, &Device::Cpu).unwrap();
    let prompt = [7u32, 8, 9, 10];
    let opts = ArgsOptions {
        k,
        w: 1e6,
        max_new_tokens: 8,
        eos_ids: vec![EOS],
        score_eos: false,
    };
    let out = args_decode(&mut base, &mut rm, &prompt, &opts).unwrap();

    // Direct: each step, fresh base log-probs of the prefix, its top k, each candidate
    // scored by a full reward-model pass (an EOS candidate as the prefix it ends).
    let mut reference_base = CpuEngine::load(&path, &[], None, &Device::Cpu).unwrap();
    let mut full = ScalarRewardModel::load(&path, &dir, 0, 64, &Device::Cpu).unwrap();
    let mut seq = prompt.to_vec();
    let mut want = Vec::new();
    while want.len() < 8 {
        reference_base.reset();
        let lp = reference_base.step(&seq).unwrap().base;
        let cands = top_k_ids(&lp, k);
        let prefix_reward = full.score_sequence(&seq).unwrap();
        let rewards: Vec<f32> = cands
            .iter()
            .map(|&c| {
                if c == EOS {
                    prefix_reward
                } else {
                    full.score_sequence(&[seq.as_slice(), &[c]].concat())
                        .unwrap()
                }
            })
            .collect();
        let best = (0..k).fold(0, |b, i| if rewards[i] > rewards[b] { i } else { b });
        want.push(cands[best]);
        seq.push(cands[best]);
        if cands[best] == EOS {
            break;
        }
    }
    assert_eq!(out.tokens, want);
    // The chosen tokens are not simply the base's greedy ones.
    assert_ne!(
        out.tokens,
        greedy(&mut base, &prompt, 8),
        "the reward changed nothing"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn eval_with_baselines_writes_every_documented_file() {
    let (path, _) = tiny_base("eval-baselines", 68);
    let dir = path.parent().unwrap().to_path_buf();
    let arm = dir.join("arm");
    let cfg = TinyConfig::default();
    write_lora_dir(
        &arm,
        &TinyLora::random(&cfg, 4, 8.0, &["q_proj", "v_proj"], 69),
        "base.gguf",
    );
    let rm = dir.join("rm");
    random_reward_model(&path, &rm);
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "the cat\na dog is\n").unwrap();
    let words = dir.join("words.txt");
    std::fs::write(&words, "a\ne\n").unwrap();
    let wordlist = format!("wordlist:{}", words.display());
    let out = dir.join("out");
    let mut args = vec![
        "eval",
        "--model",
        s(&path),
        "--arm",
        s(&arm),
        "--prompts",
        s(&prompts),
        "--scorer",
        "concise",
        "--scorer",
        &wordlist,
        "--alphas",
        "0,1",
        "--samples",
        "2",
        "--max-new-tokens",
        "5",
        "--out",
        s(&out),
        "--reward-model",
        s(&rm),
    ];
    args.extend(["--baseline", "bon:3", "--baseline", "args:4:2"]);
    let o = genarm(&args);
    assert!(o.status.success(), "eval failed: {}", stderr(&o));

    let methods = ["base", "genarm:1", "bon-rm:3", "bon-arm:3", "args:4:2"];
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    // 2 prompts × 5 methods × 2 samples.
    assert_eq!(samples.lines().count(), 20);
    for line in samples.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        for field in [
            "setting",
            "method",
            "alphas",
            "prompt_index",
            "seed",
            "text",
            "tokens",
            "complete",
            "scores",
            "seconds",
            "forward_passes",
        ] {
            assert!(r.get(field).is_some(), "samples.jsonl lacks {field}: {r}");
        }
        let m = r["method"].as_str().unwrap();
        assert!(methods.contains(&m), "unknown method {m}");
        let passes = &r["forward_passes"];
        let (base, arm, rm) = (
            passes["base"].as_u64().unwrap(),
            passes["arm"].as_u64().unwrap(),
            passes["rm"].as_u64().unwrap(),
        );
        assert!(base > 0, "{m}: no base passes");
        // The sweep runs the ARM row next to the base; only the RM methods use the RM.
        match m {
            "base" | "genarm:1" => assert!(arm == base && rm == 0, "{m}: {passes}"),
            "bon-arm:3" => assert!(arm > 0 && rm == 0, "{m}: {passes}"),
            _ => assert!(arm == 0 && rm > 0, "{m}: {passes}"),
        }
    }
    // Every method saw the same (prompt, seed) pairs.
    let keys = |m: &str| -> Vec<(u64, u64)> {
        samples
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["method"] == m)
            .map(|r| {
                (
                    r["prompt_index"].as_u64().unwrap(),
                    r["seed"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    for m in &methods[1..] {
        assert_eq!(keys(m), keys("base"), "{m}");
    }

    let summary = read_json(&out.join("summary.json"));
    let rows = summary.as_array().unwrap();
    let got: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(got, methods);
    for row in rows {
        for field in [
            "mean_tokens",
            "seconds_per_response",
            "forward_passes_per_token",
        ] {
            assert!(row[field].is_number(), "summary lacks {field}: {row}");
        }
        for field in ["base", "arm", "rm", "total"] {
            assert!(
                row["forward_passes"][field].is_number(),
                "forward_passes.{field}: {row}"
            );
        }
        assert!(row["scores"]["concise"]["win_rate_vs_base"].is_number());
    }
    // Best-of-3 samples three times as much as base sampling.
    assert!(
        rows[2]["forward_passes"]["base"].as_f64() > rows[0]["forward_passes"]["base"].as_f64()
    );

    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(header.starts_with("alphas,n,concise_mean"), "{header}");
    for col in [
        "method",
        "forward_passes_base",
        "forward_passes_arm",
        "forward_passes_rm",
        "forward_passes_total",
        "forward_passes_per_token",
    ] {
        assert!(
            header.split(',').any(|c| c == col),
            "summary.csv lacks {col}"
        );
    }
    assert_eq!(csv.lines().count(), 1 + methods.len());

    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("forward passes/token") && md.contains("s/response"),
        "{md}"
    );
    for m in methods {
        assert!(md.contains(&format!("| {m} |")), "results.md lacks {m}");
    }
    assert!(
        md.contains("--baseline bon:3"),
        "results.md lacks the command"
    );
    for plot in ["reward_vs_alpha.svg", "pareto.svg", "pareto.json"] {
        assert!(out.join(plot).is_file(), "{plot} missing");
    }
}

#[test]
fn bad_baseline_input_is_a_clear_error() {
    let (path, _) = tiny_base("eval-bad", 70);
    let dir = path.parent().unwrap().to_path_buf();
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "the cat\n").unwrap();
    let rm = dir.join("rm");
    random_reward_model(&path, &rm);
    let arm = dir.join("arm");
    let cfg = TinyConfig::default();
    write_lora_dir(
        &arm,
        &TinyLora::random(&cfg, 2, 4.0, &["q_proj"], 71),
        "base.gguf",
    );
    let out = dir.join("out");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            "--model",
            s(&path),
            "--prompts",
            s(&prompts),
            "--scorer",
            "concise",
            "--max-new-tokens",
            "2",
            "--out",
            s(&out),
        ];
        a.extend_from_slice(extra);
        genarm(&a)
    };
    for (extra, needle) in [
        (vec!["--baseline", "bogus:3"], "unknown baseline"),
        (vec!["--baseline", "bon:0"], "≥ 1"),
        (vec!["--baseline", "args:3:nan"], "finite"),
        (vec!["--baseline", "args:3:1"], "--reward-model"),
        (
            vec!["--baseline", "bon-arm:2", "--reward-model", s(&rm)],
            "--arm",
        ),
        (vec!["--reward-model", s(&rm)], "--baseline"),
        (vec!["--arm", s(&rm)], "scalar reward model"),
        (
            vec!["--baseline", "bon-rm:2", "--reward-model", s(&arm)],
            "not a scalar reward model",
        ),
        (
            vec!["--baseline", "bon-rm:2", "--reward-model", s(&dir)],
            "not a scalar reward model",
        ),
    ] {
        assert_clean_error(&run(&extra), needle);
    }
}

#[test]
fn help_documents_the_baseline_flags() {
    let eval = String::from_utf8(genarm(&["eval", "--help"]).stdout).unwrap();
    for flag in [
        "--baseline",
        "--reward-model",
        "bon-rm:N",
        "bon-arm:N",
        "args:K:W",
    ] {
        assert!(eval.contains(flag), "eval --help lacks {flag}");
    }
    let train = String::from_utf8(genarm(&["train", "--help"]).stdout).unwrap();
    assert!(
        train.contains("--scalar-head"),
        "train --help lacks --scalar-head"
    );
}
