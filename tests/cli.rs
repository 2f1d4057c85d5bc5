//! The `genarm` binary end to end: the demo model answers, JSON shapes are what
//! scripts rely on, and bad input is a clear error with a non-zero exit, never a panic.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn demo_model_answers_the_capital_of_france() {
    let model = demo_model();
    let out = json(&genarm(&[
        "generate",
        "--model",
        s(&model),
        "--chat",
        "--greedy",
        "--json",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
    ]));
    let text = out["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(out["backend"], "cpu");
    assert!(out["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(out["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(!out["tokens"].as_array().unwrap().is_empty());
}

#[test]
fn demo_model_matches_the_transformers_reference() {
    let model = demo_model();
    // Computed by HF transformers from the same GGUF's dequantised weights (see "what").
    let fixture_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-france-reference.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_path).unwrap()).unwrap();
    let ids: Vec<String> = fixture["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let out = json(&genarm(&[
        "logits",
        "--model",
        s(&model),
        "--tokens",
        &ids.join(","),
        "--json",
    ]));
    let got: Vec<f64> = out["next_token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want: Vec<f64> = fixture["next_token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    // Same dequantised weights, f32 activations throughout: the fixture's own f32-vs-f64
    // noise is ~1e-5; allow 1e-3 for a different summation order over 30 layers.
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < 1e-3,
            "position {i}: got {g}, transformers {w}"
        );
    }
    assert_eq!(out["last_logprobs"].as_array().unwrap().len(), 49152);
}

#[test]
fn arm_equal_to_the_base_keeps_the_greedy_text() {
    let model = demo_model();
    let args = |arm: bool| {
        let mut a = vec![
            "generate",
            "--model",
            s(&model),
            "--chat",
            "--greedy",
            "--json",
            "--prompt",
            "Name three colours.",
            "--max-new-tokens",
            "16",
        ];
        if arm {
            a.extend(["--arm", s(&model)]);
        }
        a
    };
    let base = json(&genarm(&args(false)));
    let guided = json(&genarm(&args(true)));
    // base + 1·base = 2·log π_base: the same argmax every step.
    assert_eq!(base["tokens"], guided["tokens"]);
    assert_eq!(guided["arms"].as_array().unwrap().len(), 1);
}

#[test]
fn tiny_model_without_tokenizer_takes_token_ids() {
    let dir = temp_dir("cli-tiny");
    let path = dir.join("tiny.gguf");
    TinyModel::random(&TinyConfig::default(), 21).write_gguf(&path, GgmlDType::F32);
    let arm = dir.join("arm");
    init_lora(&path, &arm);
    let out = json(&genarm(&[
        "generate",
        "--model",
        s(&path),
        "--arm",
        &format!("{}:0.5", s(&arm)),
        "--prompt-tokens",
        "1,2,3",
        "--max-new-tokens",
        "5",
        "--seed",
        "3",
        "--json",
    ]));
    assert!(out["text"].is_null());
    assert_eq!(out["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(out["prompt_tokens"], 3);

    let lg = json(&genarm(&[
        "logits",
        "--model",
        s(&path),
        "--arm",
        &format!("{}:2", s(&arm)),
        "--tokens",
        "4,5,6,7",
        "--json",
    ]));
    assert_eq!(lg["next_token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lg["last_logprobs"].as_array().unwrap().len(), 61);
    let arm0 = &lg["arms"][0];
    assert_eq!(arm0["alpha"], 2.0);
    // combined = base + 2·arm at every vocabulary entry.
    let f = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (b, a, c) = (
        f(&lg["last_logprobs"]),
        f(&arm0["last_logprobs"]),
        f(&lg["combined_last_scores"]),
    );
    for i in 0..b.len() {
        assert!((c[i] - (b[i] + 2.0 * a[i])).abs() < 1e-4, "entry {i}");
    }
    // A random LoRA changes the model.
    assert_ne!(a, b);
}

fn init_lora(model: &Path, out: &Path) {
    let o = genarm(&[
        "init-lora",
        "--model",
        s(model),
        "--out",
        s(out),
        "--rank",
        "4",
        "--b-std",
        "0.05",
    ]);
    assert!(o.status.success(), "init-lora: {}", stderr(&o));
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let dir = temp_dir("cli-truncated");
    let path = dir.join("tiny.gguf");
    TinyModel::random(&TinyConfig::default(), 22).write_gguf(&path, GgmlDType::Q8_0);
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 100, bytes.len() / 2, 40] {
        let cut = dir.join(format!("cut-{keep}.gguf"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let o = genarm(&["generate", "--model", s(&cut), "--prompt-tokens", "1"]);
        assert_clean_error(&o, s(&cut));
        assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    }
}

#[test]
fn wrong_magic_is_a_clear_error() {
    let dir = temp_dir("cli-magic");
    let path = dir.join("not.gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip, not a model").unwrap();
    let o = genarm(&["generate", "--model", s(&path), "--prompt-tokens", "1"]);
    assert_clean_error(&o, "not a GGUF file");
}

#[test]
fn lying_safetensors_header_is_a_clear_error() {
    let dir = temp_dir("cli-safetensors");
    TinyModel::random(&TinyConfig::default(), 23).write_hf_dir(&dir, DType::F32, 1);
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    // Drop the last kilobyte: the header now promises more data than the file holds.
    bytes.truncate(bytes.len() - 1024);
    std::fs::write(&file, &bytes).unwrap();
    let o = genarm(&["generate", "--model", s(&dir), "--prompt-tokens", "1"]);
    assert_clean_error(&o, "model.safetensors");
    assert!(stderr(&o).contains("invalid safetensors"), "{}", stderr(&o));
}

#[test]
fn arm_with_another_vocabulary_is_refused() {
    let dir = temp_dir("cli-vocab");
    let cfg = TinyConfig::default();
    let tokens = |prefix: &str| -> Vec<String> {
        (0..cfg.vocab_size)
            .map(|i| format!("{prefix}{i}"))
            .collect()
    };
    let base = dir.join("base.gguf");
    let arm = dir.join("arm.gguf");
    TinyModel::random(&cfg, 24).write_gguf_with_tokens(&base, GgmlDType::F32, Some(&tokens("a")));
    let mut other = tokens("a");
    other[17] = "zebra".into();
    TinyModel::random(&cfg, 25).write_gguf_with_tokens(&arm, GgmlDType::F32, Some(&other));
    let o = genarm(&[
        "generate",
        "--model",
        s(&base),
        "--arm",
        s(&arm),
        "--prompt-tokens",
        "1,2",
    ]);
    assert_clean_error(&o, "tokenizer differs");
    assert!(
        stderr(&o).contains("17"),
        "names the first differing id: {}",
        stderr(&o)
    );

    // A smaller vocabulary cannot score the base's tokens at all.
    let small = dir.join("small.gguf");
    TinyModel::random(
        &TinyConfig {
            vocab_size: 40,
            ..cfg.clone()
        },
        26,
    )
    .write_gguf(&small, GgmlDType::F32);
    let plain_base = dir.join("plain.gguf");
    TinyModel::random(&cfg, 27).write_gguf(&plain_base, GgmlDType::F32);
    let o = genarm(&[
        "generate",
        "--model",
        s(&plain_base),
        "--arm",
        s(&small),
        "--prompt-tokens",
        "1",
    ]);
    assert_clean_error(&o, "fewer than the base's");
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let dir = temp_dir("cli-context");
    let path = dir.join("tiny.gguf");
    TinyModel::random(&TinyConfig::default(), 28).write_gguf(&path, GgmlDType::F32);
    // The tiny model's context is 96 tokens.
    let ids: Vec<String> = (0..120).map(|i| (i % 50).to_string()).collect();
    let o = genarm(&[
        "generate",
        "--model",
        s(&path),
        "--prompt-tokens",
        &ids.join(","),
    ]);
    assert_clean_error(&o, "context");
    let o = genarm(&["logits", "--model", s(&path), "--tokens", &ids.join(",")]);
    assert_clean_error(&o, "context");
}

#[test]
fn out_of_vocabulary_ids_and_missing_files_are_clear_errors() {
    let dir = temp_dir("cli-misc");
    let path = dir.join("tiny.gguf");
    TinyModel::random(&TinyConfig::default(), 29).write_gguf(&path, GgmlDType::F32);
    let o = genarm(&["generate", "--model", s(&path), "--prompt-tokens", "1,999"]);
    assert_clean_error(&o, "outside the vocabulary");
    let o = genarm(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert_clean_error(&o, "/nonexistent/model.gguf");
    let o = genarm(&["generate", "--model", s(&path), "--prompt", "hi"]);
    assert_clean_error(&o, "no tokenizer");
}

#[test]
fn eval_writes_every_documented_file() {
    let model = demo_model();
    let dir = temp_dir("cli-eval");
    let arm = dir.join("arm");
    init_lora(&model, &arm);
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "The weather today is\nMy favourite food is\n").unwrap();
    let out = dir.join("out");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/data");
    let o = genarm(&[
        "eval",
        "--model",
        s(&model),
        "--arm",
        s(&arm),
        "--prompts",
        s(&prompts),
        "--scorer",
        "sentiment",
        "--scorer",
        "concise",
        "--alphas",
        "0,1",
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--data-dir",
        s(&data),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "eval failed: {}", stderr(&o));
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    // 2 prompts × 2 settings × 2 samples.
    assert_eq!(samples.lines().count(), 8);
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    for field in [
        "setting",
        "alphas",
        "prompt_index",
        "seed",
        "text",
        "tokens",
        "complete",
        "scores",
        "seconds",
    ] {
        assert!(first.get(field).is_some(), "samples.jsonl lacks {field}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let settings = summary.as_array().unwrap();
    assert_eq!(settings.len(), 2);
    assert_eq!(settings[0]["alphas"][0], 0.0);
    let score = &settings[1]["scores"]["sentiment"];
    for field in ["mean", "ci95", "win_rate_vs_base"] {
        assert!(score[field].is_number(), "summary lacks {field}: {score}");
    }
    // Base against itself: every comparison is a tie.
    assert_eq!(settings[0]["scores"]["concise"]["win_rate_vs_base"], 0.5);
    for field in [
        "mean_tokens",
        "complete_rate",
        "distinct_1",
        "distinct_2",
        "seconds_per_response",
    ] {
        assert!(settings[1][field].is_number(), "summary lacks {field}");
    }
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    assert!(csv.starts_with("alphas,n,concise_mean"));
    for svg in ["reward_vs_alpha.svg", "pareto.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.starts_with("<svg"), "{svg}");
    }
    let pareto: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pareto.json")).unwrap()).unwrap();
    assert!(pareto["hypervolume"].as_f64().unwrap() >= 0.0);
    // The front trades off the first two scorers in the order given, not sorted.
    assert_eq!(
        pareto["objectives"],
        serde_json::json!(["sentiment", "concise"])
    );
}

#[test]
fn prefs_pairs_resume_after_a_kill() {
    let model = demo_model();
    let dir = temp_dir("cli-prefs");
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "What colour is the sky? One word.\nName a fruit.\nWhat is 2 + 2?\nName an animal.\n",
    )
    .unwrap();
    let run = |out: &Path, resume: bool| {
        let mut a = vec![
            "prefs",
            "--model",
            s(&model),
            "--prompts",
            s(&prompts),
            "--samples",
            "3",
            "--scorer",
            "concise",
            "--chat",
            "--max-new-tokens",
            "32",
            "--seed",
            "5",
            "--out",
            s(out),
        ];
        if resume {
            a.push("--resume");
        }
        let o = genarm(&a);
        assert!(o.status.success(), "prefs failed: {}", stderr(&o));
    };
    let full = dir.join("full.jsonl");
    run(&full, false);
    let text = std::fs::read_to_string(&full).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty(), "expected pairs, got none");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["chosen_score"].as_f64().unwrap() > v["rejected_score"].as_f64().unwrap());
        assert!(v["prompt"].is_string() && v["chosen"].is_string() && v["rejected"].is_string());
    }
    // A run killed mid-way through writing a line (after its first pair, if it had two).
    let resumed = dir.join("resumed.jsonl");
    let half = |line: &str| -> String {
        let cut = (0..=line.len() / 2)
            .rev()
            .find(|&i| line.is_char_boundary(i))
            .unwrap_or(0);
        line[..cut].to_string()
    };
    let part = match lines.as_slice() {
        [one] => half(one),
        [first, second, ..] => format!("{first}\n{}", half(second)),
        [] => unreachable!(),
    };
    std::fs::write(resumed.with_extension("jsonl.part"), part).unwrap();
    run(&resumed, true);
    assert_eq!(std::fs::read_to_string(&resumed).unwrap(), text);
}

#[test]
fn unsupported_embedded_tokenizer_still_runs_on_token_ids() {
    // A WordPiece (BERT) vocabulary: a tokenizer type genarm does not build from GGUF.
    let dir = temp_dir("cli-wordpiece");
    let cfg = TinyConfig::default();
    let tokens: Vec<String> = (0..cfg.vocab_size).map(|i| format!("##t{i}")).collect();
    let path = dir.join("wordpiece.gguf");
    TinyModel::random(&cfg, 30).write_gguf_with_tokenizer(
        &path,
        GgmlDType::F32,
        Some(&tokens),
        "bert",
    );
    let out = json(&genarm(&[
        "generate",
        "--model",
        s(&path),
        "--prompt-tokens",
        "1,2,3",
        "--max-new-tokens",
        "3",
        "--json",
    ]));
    assert_eq!(out["tokens"].as_array().unwrap().len(), 3);
    let o = genarm(&["generate", "--model", s(&path), "--prompt", "hello"]);
    assert_clean_error(&o, "tokenizer.ggml.model");
    assert!(stderr(&o).contains("--prompt-tokens"), "{}", stderr(&o));
}
