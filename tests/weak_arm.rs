//! Weak ARMs (`genarm train --full --keep-layers K`) on tiny random models: the ARM
//! starts as the base cut to its bottom K layers (checked against the f64 reference of
//! that cut), writes a standalone K-layer HF model, learns a synthetic preference, guides
//! the whole base as an ARM of its own on the CPU and WebGPU engines, resumes, and bad
//! K values are refused by the library and the CLI.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use common::*;
use genarm::cpu::CpuEngine;
use genarm::gpu::GpuContext;
use genarm::model::Checkpoint;
use genarm::train::trainer::{split_pairs, ArmLabel, TrainConfig, Trainer};
use genarm::{generate, Engine, GenerateOptions, SamplingParams};

/// f32 activations against f64 over a few tiny layers (as tests/engine.rs budgets it).
const F32_ATOL: f64 = 1e-4;

const PROBE: [u32; 7] = [3, 4, 5, 6, 9, 8, 7];

/// A tiny three-layer GGUF base with a character tokenizer (so the weak ARM's exported
/// tokenizer must agree with the base's).
fn three_layer_base(name: &str, seed: u64) -> (PathBuf, TinyModel) {
    let cfg = TinyConfig {
        num_layers: 3,
        ..TinyConfig::default()
    };
    let model = TinyModel::random(&cfg, seed);
    let path = temp_dir(name).join("base.gguf");
    model.write_gguf_with_tokens(
        &path,
        GgmlDType::F32,
        Some(&char_vocabulary(cfg.vocab_size)),
    );
    (path, model)
}

/// `model` cut to its bottom `k` layers, as the f64 reference reads it.
fn bottom_layers(model: &TinyModel, k: usize) -> TinyModel {
    let mut cut = model.clone();
    cut.config.num_layers = k;
    cut.tensors
        .retain(|name, _| match name.strip_prefix("model.layers.") {
            Some(rest) => rest.split('.').next().unwrap().parse::<usize>().unwrap() < k,
            None => true,
        });
    cut
}

fn weak_config(keep: usize) -> TrainConfig {
    TrainConfig {
        full: true,
        keep_layers: Some(keep),
        ..tiny_train_config(usize::MAX)
    }
}

/// Checks every position's log-probs of `rows` (`[position][vocab]`) against `want`.
fn assert_rows_close(rows: &[Vec<f32>], want: &[Vec<f64>], what: &str) {
    assert_eq!(rows.len(), want.len(), "{what}: positions");
    for (t, (got, want)) in rows.iter().zip(want).enumerate() {
        assert_close(got, want, F32_ATOL, 0.0, &format!("{what}, position {t}"));
    }
}

#[test]
fn keep_layers_starts_as_the_base_cut_to_k_layers() {
    let (path, model) = three_layer_base("weak-cut", 60);
    let base = Checkpoint::open(&path).unwrap();
    for keep in [1, 2] {
        let cut = bottom_layers(&model, keep);
        let out = temp_dir(&format!("weak-cut-{keep}"));
        let mut t = Trainer::new(&base, weak_config(keep), &out, 32, &Device::Cpu).unwrap();
        // The trainer's own forward pass: the response's summed log-prob under the cut.
        let probe = pair(&PROBE[..3], &PROBE[3..], &[1, 2]);
        let (c, _) = t.pair_logprobs(&[&probe], None).unwrap();
        let want_sum: f64 = {
            let lp = reference_logprobs(&cut, &PROBE);
            (3..PROBE.len()).map(|i| lp[i - 1][PROBE[i] as usize]).sum()
        };
        let got_sum = c.to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            (got_sum - want_sum).abs() < 1e-3,
            "keep {keep}: trainer {got_sum} vs f64 cut {want_sum}"
        );
        // Written untrained: a K-layer HF model whose forward pass is the cut's.
        t.write_full_model(&ArmLabel::default()).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["num_hidden_layers"], keep);
        let weights =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        // Embedding, head, final norm, and 9 tensors per kept layer.
        assert_eq!(weights.len(), 3 + 9 * keep, "keep {keep}");
        assert!(weights
            .keys()
            .all(|n| !n.starts_with(&format!("model.layers.{keep}."))));
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("genarm.json")).unwrap()).unwrap();
        assert_eq!(info["keep_layers"], keep);
        let want = reference_logprobs(&cut, &PROBE);
        let mut alone = CpuEngine::load(&out, &[], None, &Device::Cpu).unwrap();
        assert_rows_close(
            &alone.teacher_forced(&PROBE).unwrap()[0],
            &want,
            &format!("the {keep}-layer model on its own"),
        );
        // As an ARM of its own on the three-layer base: row 0 the base, row 1 the cut.
        let mut guided =
            CpuEngine::load(&path, std::slice::from_ref(&out), None, &Device::Cpu).unwrap();
        let rows = guided.teacher_forced(&PROBE).unwrap();
        assert_rows_close(&rows[0], &reference_logprobs(&model, &PROBE), "the base");
        assert_rows_close(&rows[1], &want, &format!("the {keep}-layer ARM"));
    }
}

/// Per-layer settings are cut too: a Qwen2 base whose layers attend through a sliding
/// window shorter than the probe keeps K layers' worth of `layer_types`.
#[test]
fn keep_layers_cuts_per_layer_settings() {
    let cfg = TinyConfig {
        num_layers: 3,
        attention_bias: true,
        sliding_window: Some(3),
        ..TinyConfig::default()
    };
    assert!(PROBE.len() > 2 * 3);
    let model = TinyModel::random(&cfg, 65);
    let dir = temp_dir("weak-window");
    model.write_hf_dir(&dir.join("base"), candle_core::DType::F32, 1);
    let base = Checkpoint::open(&dir.join("base")).unwrap();
    let out = dir.join("arm");
    let mut t = Trainer::new(&base, weak_config(2), &out, 32, &Device::Cpu).unwrap();
    assert_eq!(base.config.sliding_windows, vec![Some(3); 3]);
    assert_eq!(t.arm().config().sliding_windows, vec![Some(3); 2]);
    t.write_full_model(&ArmLabel::default()).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["layer_types"].as_array().unwrap().len(), 2);
    let reread = Checkpoint::open(&out).unwrap();
    assert_eq!(reread.config.sliding_windows, vec![Some(3); 2]);
    let mut alone = CpuEngine::load(&out, &[], None, &Device::Cpu).unwrap();
    assert_rows_close(
        &alone.teacher_forced(&PROBE).unwrap()[0],
        &reference_logprobs(&bottom_layers(&model, 2), &PROBE),
        "the two-layer Qwen2 cut",
    );
}

#[test]
fn weak_arm_learns_and_guides_the_whole_base() {
    let (path, _) = three_layer_base("weak-learn", 61);
    let base = Checkpoint::open(&path).unwrap();
    let marker = 13;
    let (train, eval) = split_pairs(marker_pairs(400, marker, 8), 0.2, 1);
    let out = temp_dir("weak-learn-out");
    let cfg = TrainConfig {
        lr: 3e-3,
        epochs: 4,
        beta_r: 0.5,
        checkpoint_every: 1000,
        ..weak_config(1)
    };
    let mut t = Trainer::new(&base, cfg, &out, 32, &Device::Cpu).unwrap();
    let (acc_before, loss_before) = t.evaluate(&eval).unwrap();
    let summary = t
        .train(
            &train,
            &eval,
            &ArmLabel::default(),
            false,
            None,
            &mut |_| {},
        )
        .unwrap();
    let (acc, loss) = t.evaluate(&eval).unwrap();
    assert_eq!(summary.final_eval, Some(acc));
    assert!(
        loss < loss_before * 0.5 && acc >= 0.95,
        "held-out loss {loss_before} → {loss}, accuracy {acc_before} → {acc}"
    );
    let plain = marker_frequency(&path, None, 0.0, marker);
    let guided = marker_frequency(&path, Some(&out), 3.0, marker);
    assert!(
        guided > plain * 2.0 && guided > 0.1,
        "marker frequency {plain} → {guided} with the one-layer ARM at α = 3"
    );
}

#[test]
fn weak_arm_guides_the_base_on_the_webgpu_engine_as_on_the_cpu() {
    let (path, model) = three_layer_base("weak-gpu", 62);
    let base = Checkpoint::open(&path).unwrap();
    let out = temp_dir("weak-gpu-out");
    Trainer::new(&base, weak_config(2), &out, 32, &Device::Cpu)
        .unwrap()
        .write_full_model(&ArmLabel::default())
        .unwrap();
    let ctx = GpuContext::new_blocking().unwrap_or_else(|e| {
        panic!("{e}\n(no GPU here? install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1)")
    });
    let arms = [out.clone()];
    let mut gpu = gpu_engine_on(std::sync::Arc::new(ctx), &path, &arms, None);
    let rows = gpu.teacher_forced(&PROBE).unwrap();
    assert_eq!(rows.len(), 2, "base and the weak ARM");
    assert_rows_close(&rows[0], &reference_logprobs(&model, &PROBE), "WebGPU base");
    let cut = reference_logprobs(&bottom_layers(&model, 2), &PROBE);
    assert_rows_close(&rows[1], &cut, "WebGPU two-layer ARM");
    // The same guided greedy tokens.
    let opts = GenerateOptions {
        max_new_tokens: 8,
        alphas: vec![1.5],
        sampling: SamplingParams {
            greedy: true,
            ..Default::default()
        },
        ignore_eos: true,
        ..Default::default()
    };
    let mut cpu = CpuEngine::load(&path, &arms, None, &Device::Cpu).unwrap();
    let a = generate(&mut gpu, None, &PROBE[..3], &opts, &mut |_| true).unwrap();
    let b = generate(&mut cpu, None, &PROBE[..3], &opts, &mut |_| true).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn weak_arm_resumes_as_if_uninterrupted() {
    let (path, _) = three_layer_base("weak-resume", 63);
    let cfg = TrainConfig {
        lr: 2e-3,
        epochs: 2,
        checkpoint_every: 3,
        ..weak_config(2)
    };
    let broken =
        assert_resume_matches_uninterrupted(&path, "weak-resume", cfg.clone(), "model.safetensors");
    let base = Checkpoint::open(&path).unwrap();
    let (train, eval) = split_pairs(marker_pairs(80, 5, 3), 0.1, 2);
    // Another K is another run: refused on resume, naming the setting.
    let other = TrainConfig {
        keep_layers: Some(1),
        ..cfg.clone()
    };
    let err = Trainer::new(&base, other, &broken, 32, &Device::Cpu)
        .unwrap()
        .train(&train, &eval, &ArmLabel::default(), true, None, &mut |_| {})
        .expect_err("a checkpoint of another K is refused");
    assert!(err.to_string().contains("keep_layers"), "{err}");
}

#[test]
fn bad_keep_layers_are_refused() {
    let (path, _) = three_layer_base("weak-refuse", 64);
    let base = Checkpoint::open(&path).unwrap();
    let out = temp_dir("weak-refuse-out");
    let refused = |cfg: TrainConfig| {
        Trainer::new(&base, cfg, &out, 32, &Device::Cpu)
            .err()
            .expect("refused")
            .to_string()
    };
    for keep in [0, 4] {
        let msg = refused(weak_config(keep));
        assert!(
            msg.contains("--keep-layers must be in 1..=3"),
            "{keep}: {msg}"
        );
    }
    let msg = refused(TrainConfig {
        full: false,
        ..weak_config(2)
    });
    assert!(msg.contains("--full"), "{msg}");
    let msg = refused(TrainConfig {
        lora_layers: 3,
        ..weak_config(2)
    });
    assert!(msg.contains("--layers 3"), "{msg}");

    // The CLI: the same refusals, as clean errors.
    let data = temp_dir("weak-refuse-data").join("pairs.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| format!(r#"{{"prompt": "say {i}", "chosen": "yes good", "rejected": "no bad"}}"#))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let cli_out = temp_dir("weak-refuse-cli").join("arm");
    let (b, d, o) = (
        path.to_str().unwrap(),
        data.to_str().unwrap(),
        cli_out.to_str().unwrap(),
    );
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--model", b, "--data", d, "--out", o];
        args.extend_from_slice(extra);
        genarm(&args)
    };
    assert_clean_error(&train(&["--full", "--keep-layers", "0"]), "--keep-layers");
    assert_clean_error(
        &train(&["--full", "--keep-layers", "4"]),
        "--keep-layers must be in 1..=3",
    );
    assert_clean_error(&train(&["--keep-layers", "2"]), "--full");
    assert_clean_error(
        &train(&["--full", "--keep-layers", "2", "--layers", "3"]),
        "--layers must be in 1..=2",
    );
    let run = train(&[
        "--full",
        "--keep-layers",
        "2",
        "--batch-size",
        "2",
        "--micro-batch",
        "2",
        "--warmup",
        "1",
        "--eval-frac",
        "0.25",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cli_out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 2);
    let v = json(&genarm(&[
        "logits", "--model", b, "--arm", o, "--tokens", "3,4,5", "--json",
    ]));
    assert_eq!(v["arms"].as_array().unwrap().len(), 1);
    let help = stdout(&genarm(&["train", "--help"]));
    assert!(help.contains("--keep-layers"), "{help}");
}
