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
    let want: Vec<f64> = fixture["next_token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let logits = |precision: &str| {
        json(&genarm(&[
            "logits",
            "--model",
            s(&model),
            "--tokens",
            &ids.join(","),
            "--precision",
            precision,
            "--json",
        ]))
    };
    let logprobs = |out: &serde_json::Value| -> Vec<f64> {
        out["next_token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    // Same dequantised weights, f32 activations throughout: the fixture's own f32-vs-f64
    // noise is ~1e-5; allow 1e-3 for a different summation order over 30 layers.
    let out = logits("f32");
    let got = logprobs(&out);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < 1e-3,
            "position {i}: got {g}, transformers {w}"
        );
    }
    // 16-bit integer activations (the default where their kernel is faster; README
    // "Precision"): within 1e-2 nats of transformers at every position.
    for (i, (g, w)) in logprobs(&logits("int16")).iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < 1e-2,
            "int16, position {i}: got {g}, transformers {w}"
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
        "distinct_1_per_response",
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
    // `prefs` on these prompts with `seed` into `out`, plus `extra` flags.
    let prefs = |out: &Path, seed: &str, extra: &[&str]| {
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
            seed,
            "--out",
            s(out),
        ];
        a.extend_from_slice(extra);
        genarm(&a)
    };
    let run = |out: &Path, resume: bool| {
        let o = prefs(out, "5", if resume { &["--resume"] } else { &[] });
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
    let part_path = resumed.with_extension("jsonl.part");
    std::fs::write(&part_path, part).unwrap();
    // The record the killed run left next to its part (what a fresh run writes first).
    let fingerprint = |p: &Path| genarm::outdir::FileFingerprint::stat(p).unwrap();
    let record = genarm::train::prefs::PrefsRun {
        model: fingerprint(&model),
        prompts: genarm::outdir::FileFingerprint::of(&prompts).unwrap(),
        seed: 5,
        samples: 3,
        scorer: "concise".into(),
        template: "{}".into(),
        chat: true,
        max_new_tokens: 32,
        temperature: 1.0,
        top_p: 1.0,
    };
    record.write(&part_path).unwrap();
    // Another seed does not continue it.
    assert_refused(
        &prefs(&resumed, "6", &["--resume"]),
        &["seed: was 5, now 6"],
        "prefs resume, other seed",
    );
    assert_refused(
        &prefs(&resumed, "6", &[]),
        &["--resume", "--overwrite"],
        "prefs over a part",
    );
    run(&resumed, true);
    assert!(!genarm::train::prefs::PrefsRun::record_path(&part_path).exists());
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

// ---------------------------------------------------------------------------
// Malformed flags, closed pipes, full disks and existing outputs
// ---------------------------------------------------------------------------

/// A tiny GGUF model with a character vocabulary (so it has a tokenizer), in `dir`.
fn tiny_text_model(dir: &Path) -> std::path::PathBuf {
    let cfg = TinyConfig::default();
    let path = dir.join("tiny-text.gguf");
    let vocab = char_vocabulary(cfg.vocab_size);
    TinyModel::random(&cfg, 40).write_gguf_with_tokens(&path, GgmlDType::F32, Some(&vocab));
    path
}

/// Preference pairs in TRL's JSONL form, lower-case text the character vocabulary encodes.
fn write_pairs(path: &Path, n: usize) {
    let words = ["good", "bad", "fine", "poor", "nice", "dull"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("say {}", words[i % 6]),
                "chosen": format!(" {} day", words[(i + 1) % 6]),
                "rejected": format!(" {} night", words[(i + 2) % 6]),
            })
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// The run failed with exit code 1, did not panic, and its message contains every needle.
fn assert_refused(o: &std::process::Output, needles: &[&str], what: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: exit status, stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    for needle in needles {
        assert!(
            err.contains(needle),
            "{what}: stderr lacks {needle:?}: {err}"
        );
    }
}

#[test]
fn bad_flag_values_name_the_flag_and_its_range() {
    let dir = temp_dir("cli-flags");
    let model = tiny_text_model(&dir);
    let m = s(&model);
    let out = dir.join("out");
    let o = s(&out);
    let (data, prompts) = (dir.join("pairs.jsonl"), dir.join("prompts.txt"));
    write_pairs(&data, 4);
    std::fs::write(&prompts, "say good\n").unwrap();
    let (d, p) = (s(&data), s(&prompts));
    let train = ["train", "--model", m, "--data", d, "--out", o];
    let prefs = [
        "prefs",
        "--model",
        m,
        "--prompts",
        p,
        "--scorer",
        "length",
        "--out",
        o,
    ];
    let eval = [
        "eval",
        "--model",
        m,
        "--prompts",
        p,
        "--scorer",
        "length",
        "--out",
        o,
    ];
    let prompts_cmd = ["prompts", "--corpus", p, "--out-train", o, "--out-eval", o];
    let gen = ["generate", "--model", m, "--prompt-tokens", "1"];
    let bench = ["bench", "--model", m];
    let init = ["init-lora", "--model", m, "--out", o];
    // (command, flag, bad value, the range its message must state)
    let table: Vec<(&[&str], &str, &str, &str)> = vec![
        (&gen, "--context", "0", "1..=1048576"),
        (&gen, "--max-new-tokens", "0", "1..=1048576"),
        (&gen, "--temperature", "NaN", "> 0"),
        (&gen, "--temperature", "-1", "> 0"),
        (&gen, "--top-p", "0", "(0, 1]"),
        (&gen, "--top-k", "0", "1..=1048576"),
        (&bench, "--runs", "1000000000000", "1..=10000"),
        (&bench, "--runs", "0", "1..=10000"),
        (&bench, "--tokens", "1", "2..=1048576"),
        (&bench, "--prompt-len", "5000000000", "1..=1048576"),
        (&bench, "--context", "99999999999", "1..=1048576"),
        (&init, "--rank", "0", "1..="),
        (&init, "--rank", "1000000000000", "1..="),
        (&init, "--alpha", "NaN", "> 0"),
        (&init, "--b-std", "-1", "≥ 0"),
        (&train, "--lr", "NaN", "> 0"),
        (&train, "--lr", "inf", "> 0"),
        (&train, "--lr", "-1", "> 0"),
        (&train, "--beta-r", "NaN", "> 0"),
        (&train, "--gamma", "inf", "finite"),
        (&train, "--weight-decay", "NaN", "≥ 0"),
        (&train, "--lora-dropout", "1", "[0, 1)"),
        (&train, "--eval-frac", "1.5", "[0, 1)"),
        (&train, "--eval-frac", "-0.1", "[0, 1)"),
        (&train, "--layers", "0", "1..="),
        (&train, "--lora-alpha", "NaN", "> 0"),
        (&train, "--lora-rank", "1000000", "1..=64"),
        (&train, "--layers", "3", "1..=2"),
        (&train, "--epochs", "0", "1..=10000"),
        (&train, "--batch-size", "0", "1..="),
        (&train, "--max-len", "0", "2..="),
        (&train, "--checkpoint-every", "0", "1..="),
        (&prefs, "--samples", "100000", "2..=256"),
        (&prefs, "--samples", "1", "2..=256"),
        (&prefs, "--temperature", "0", "> 0"),
        (&prefs, "--top-p", "2", "(0, 1]"),
        (&prefs, "--max-new-tokens", "5000", "1..=1023"),
        (&prefs, "--limit", "0", "1..="),
        (&eval, "--samples", "0", "1..=256"),
        (&eval, "--limit", "0", "1..="),
        (&eval, "--alphas", "0,NaN", "finite"),
        (&eval, "--hv-ref", "1,2,3", "X,Y"),
        (&eval, "--top-p", "-1", "(0, 1]"),
        (&prompts_cmd, "--eval-frac", "2", "[0, 1]"),
        (&prompts_cmd, "--n", "0", "1..=10000000"),
    ];
    for (cmd, flag, value, range) in table {
        let mut args = cmd.to_vec();
        // FLAG=VALUE so that negative numbers read as values.
        let pair = format!("{flag}={value}");
        args.push(&pair);
        let what = format!("{} {flag} {value}", cmd[0]);
        assert_refused(&genarm(&args), &[flag, range], &what);
        assert!(!out.exists(), "{what} wrote {}", out.display());
    }
    // Runtime limits that depend on the model: an id outside its vocabulary, a prompt and
    // continuation longer than the context.
    let o = genarm(&["logits", "--model", m, "--tokens", "1,61"]);
    assert_refused(&o, &["--tokens", "0..61"], "logits out-of-vocabulary id");
    let o = genarm(&["bench", "--model", m, "--context", "8", "--prompt-len", "8"]);
    assert_refused(
        &o,
        &["--prompt-len", "context of 8"],
        "bench longer than the context",
    );
    // The syntax --help shows for --hv-ref is accepted (the run then stops at the prompts).
    std::fs::write(&prompts, "\n\n").unwrap();
    let mut args = eval.to_vec();
    args.extend(["--hv-ref", "-1,2.5"]);
    assert_refused(
        &genarm(&args),
        &["no prompts"],
        "eval with an empty prompt file",
    );
    assert!(
        !out.exists(),
        "eval without prompts wrote {}",
        out.display()
    );
}

/// Runs genarm with stdout closed by its reader before anything is written, or sent to
/// /dev/full.
fn genarm_to(args: &[&str], stdout: &str) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_genarm"));
    cmd.args(args).stderr(Stdio::piped());
    if stdout == "closed" {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        return child.wait_with_output().unwrap();
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(stdout)
        .unwrap();
    cmd.stdout(file).output().unwrap()
}

#[test]
fn closed_pipes_and_full_disks_end_without_a_panic() {
    let dir = temp_dir("cli-pipes");
    let model = tiny_text_model(&dir);
    let m = s(&model);
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "say good\n").unwrap();
    let eval_out = dir.join("eval");
    let ids: Vec<String> = (1..40).map(|i| i.to_string()).collect();
    let ids = ids.join(",");
    let logits = vec!["logits", "--model", m, "--tokens", &ids];
    let bench = vec!["bench", "--model", m, "--tokens", "2", "--runs", "1"];
    let eval = vec![
        "eval",
        "--model",
        m,
        "--prompts",
        s(&prompts),
        "--scorer",
        "length",
        "--alphas",
        "0",
        "--max-new-tokens",
        "2",
        "--overwrite",
        "--out",
        s(&eval_out),
    ];
    for cmd in [&logits, &bench, &eval] {
        let o = genarm_to(cmd, "closed");
        let err = stderr(&o);
        assert!(
            !err.contains("panicked"),
            "{} to a closed pipe panicked: {err}",
            cmd[0]
        );
        assert_eq!(
            o.status.code(),
            Some(0),
            "{} to a closed pipe: {err}",
            cmd[0]
        );
        if Path::new("/dev/full").exists() {
            let o = genarm_to(cmd, "/dev/full");
            let what = format!("{} to /dev/full", cmd[0]);
            assert_refused(&o, &["writing to stdout", "No space left"], &what);
        }
    }
}

/// Messages on stderr are for a person: with stderr closed a command still does its
/// work and succeeds, and a failing one still exits with 1, neither with a panic.
#[test]
fn a_closed_stderr_ends_nothing() {
    use std::process::{Command, Stdio};
    let dir = temp_dir("cli-stderr");
    let model = tiny_text_model(&dir);
    let arm = dir.join("arm");
    let run = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_genarm"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stderr.take());
        child.wait_with_output().unwrap()
    };
    let init = run(&[
        "init-lora",
        "--model",
        s(&model),
        "--rank",
        "2",
        "--out",
        s(&arm),
    ]);
    assert_eq!(init.status.code(), Some(0), "init-lora with stderr closed");
    assert!(arm.join("adapter_model.safetensors").is_file());
    let generate = run(&[
        "generate",
        "--model",
        s(&model),
        "--arm",
        s(&arm),
        "--prompt",
        "say",
        "--max-new-tokens",
        "3",
    ]);
    assert_eq!(
        generate.status.code(),
        Some(0),
        "generate with stderr closed"
    );
    assert!(
        !generate.stdout.is_empty(),
        "generate still prints its text"
    );
    let missing = dir.join("missing.gguf");
    let failed = run(&["generate", "--model", s(&missing), "--prompt", "say"]);
    assert_eq!(
        failed.status.code(),
        Some(1),
        "a failure with stderr closed"
    );
}

#[test]
fn existing_outputs_and_inputs_are_not_overwritten_without_overwrite() {
    let dir = temp_dir("cli-overwrite");
    let model = tiny_text_model(&dir);
    let m = s(&model);
    let arm = dir.join("arm");
    let init = |extra: &[&str]| {
        let mut a = vec!["init-lora", "--model", m, "--rank", "2", "--out", s(&arm)];
        a.extend(extra);
        genarm(&a)
    };
    assert!(init(&[]).status.success());
    let weights = arm.join("adapter_model.safetensors");
    let first = std::fs::read(&weights).unwrap();
    assert_refused(
        &init(&["--seed", "1"]),
        &[s(&arm), "--overwrite"],
        "init-lora again",
    );
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        first,
        "refused run changed the adapter"
    );
    assert!(init(&["--seed", "1", "--overwrite"]).status.success());
    assert_ne!(
        std::fs::read(&weights).unwrap(),
        first,
        "--overwrite kept the old adapter"
    );
    // train into an existing ARM folder.
    let data = dir.join("pairs.jsonl");
    write_pairs(&data, 4);
    let o = genarm(&["train", "--model", m, "--data", s(&data), "--out", s(&arm)]);
    assert_refused(
        &o,
        &["--resume", "--overwrite"],
        "train into an existing ARM",
    );
    assert!(!arm.join("train_log.jsonl").exists());
    // Outputs equal to inputs, compared by resolved path.
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, "the cat sat on the mat\n").unwrap();
    let same = dir.join(".").join("corpus.txt");
    let o = genarm(&[
        "prompts",
        "--corpus",
        s(&corpus),
        "--out-train",
        s(&same),
        "--out-eval",
        s(&dir.join("e.txt")),
        "--overwrite",
    ]);
    assert_refused(&o, &["--out-train", "--corpus"], "prompts over its corpus");
    assert_eq!(
        std::fs::read_to_string(&corpus).unwrap(),
        "the cat sat on the mat\n"
    );
    let o = genarm(&[
        "prefs",
        "--model",
        m,
        "--prompts",
        s(&corpus),
        "--scorer",
        "length",
        "--out",
        s(&corpus),
        "--overwrite",
    ]);
    assert_refused(&o, &["--out", "--prompts"], "prefs over its prompts");
    let o = genarm(&[
        "train",
        "--model",
        m,
        "--data",
        s(&data),
        "--out",
        s(&data),
        "--overwrite",
    ]);
    assert_refused(&o, &["--out", "--data"], "train over its data");
    // An existing output file of prompts.
    let (train_txt, eval_txt) = (dir.join("t.txt"), dir.join("e.txt"));
    std::fs::write(&train_txt, "keep me\n").unwrap();
    let o = genarm(&[
        "prompts",
        "--corpus",
        s(&corpus),
        "--n",
        "1",
        "--out-train",
        s(&train_txt),
        "--out-eval",
        s(&eval_txt),
    ]);
    assert_refused(
        &o,
        &[s(&train_txt), "--overwrite"],
        "prompts over an existing file",
    );
    assert_eq!(std::fs::read_to_string(&train_txt).unwrap(), "keep me\n");
}

#[test]
fn a_lock_file_stops_a_second_writer_and_a_stale_one_says_how_to_clear_it() {
    let dir = temp_dir("cli-lock");
    let model = tiny_text_model(&dir);
    let arm = dir.join("arm");
    std::fs::create_dir_all(&arm).unwrap();
    let lock = arm.join(".genarm.lock");
    let init = || {
        genarm(&[
            "init-lora",
            "--model",
            s(&model),
            "--rank",
            "2",
            "--out",
            s(&arm),
        ])
    };
    // A live writer: this test process.
    std::fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
    let o = init();
    assert_refused(
        &o,
        &[s(&lock), &std::process::id().to_string(), "another genarm"],
        "lock",
    );
    assert!(!arm.join("adapter_model.safetensors").exists());
    // A writer that died: a process that has exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(&lock, format!("{dead}\n")).unwrap();
    assert_refused(
        &init(),
        &["stale lock", &dead.to_string(), "remove"],
        "stale lock",
    );
    std::fs::remove_file(&lock).unwrap();
    assert!(init().status.success(), "{}", stderr(&init()));
    assert!(!lock.exists(), "the lock outlived its run");
}

/// Step numbers of a train log, in order.
fn logged_steps(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("eval_accuracy"))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn resume_refuses_another_seed_and_leaves_one_log_line_per_step() {
    let dir = temp_dir("cli-resume");
    let model = tiny_text_model(&dir);
    let data = dir.join("pairs.jsonl");
    write_pairs(&data, 8);
    let out = dir.join("arm");
    let train = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--lora-rank",
            "2",
            "--batch-size",
            "2",
            "--micro-batch",
            "2",
            "--eval-frac",
            "0",
            "--warmup",
            "1",
            "--checkpoint-every",
            "1",
        ];
        a.extend(extra);
        let o = genarm(&a);
        (o.status.success(), o)
    };
    let (ok, o) = train(&["--max-steps", "2"]);
    assert!(ok, "{}", stderr(&o));
    let (_, o) = train(&["--resume", "--seed", "1"]);
    assert_refused(
        &o,
        &["seed: was 0, now 1", "--overwrite"],
        "resume with another seed",
    );
    // The same path and size with other contents is another data set.
    let pairs = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, pairs.replacen("good", "goop", 1)).unwrap();
    let (_, o) = train(&["--resume"]);
    assert_refused(&o, &["another data", "fnv1a64"], "resume on other data");
    std::fs::write(&data, pairs).unwrap();
    // A kill after step 3 was logged but before its checkpoint: step 2's checkpoint back.
    let saved = dir.join("checkpoint-2");
    std::fs::rename(out.join("checkpoint"), &saved).unwrap();
    std::fs::create_dir_all(out.join("checkpoint")).unwrap();
    for f in std::fs::read_dir(&saved).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, out.join("checkpoint").join(f.file_name().unwrap())).unwrap();
    }
    let (ok, o) = train(&["--resume", "--max-steps", "3"]);
    assert!(ok, "{}", stderr(&o));
    std::fs::remove_dir_all(out.join("checkpoint")).unwrap();
    std::fs::rename(&saved, out.join("checkpoint")).unwrap();
    let (ok, o) = train(&["--resume"]);
    assert!(ok, "{}", stderr(&o));
    assert_eq!(logged_steps(&out.join("train_log.jsonl")), vec![1, 2, 3, 4]);
}

#[cfg(unix)]
#[test]
fn written_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("cli-umask");
    let model = tiny_text_model(&dir);
    let data = dir.join("pairs.jsonl");
    write_pairs(&data, 4);
    let (arm, trained) = (dir.join("arm"), dir.join("trained"));
    let bin = env!("CARGO_BIN_EXE_genarm");
    let script = format!(
        "umask 027 && {bin} init-lora --model {m} --rank 2 --out {a} && \
         {bin} train --model {m} --data {d} --out {t} --lora-rank 2 --batch-size 4 \
         --eval-frac 0 --warmup 1",
        m = s(&model),
        a = s(&arm),
        d = s(&data),
        t = s(&trained),
    );
    let o = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for file in [
        arm.join("adapter_model.safetensors"),
        arm.join("adapter_config.json"),
        trained.join("adapter_model.safetensors"),
        trained.join("train_log.jsonl"),
        trained.join("checkpoint/state.safetensors"),
    ] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{}: mode {mode:o}", file.display());
    }
}

/// The flags a text mentions: `--name` words.
fn flags_in(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn readme_cli_synopsis_lists_exactly_the_flags_of_help() {
    // The README's synopsis is written by hand; this keeps it in step with `--help`.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let block = readme
        .split("## The CLI")
        .nth(1)
        .and_then(|r| r.split("```sh").nth(1))
        .and_then(|r| r.split("```").next())
        .expect("README has a ```sh block under ## The CLI");
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        match line.strip_prefix("genarm ") {
            Some(rest) => {
                let cmd = rest.split_whitespace().next().unwrap_or_default();
                sections.push((cmd.to_owned(), line.to_owned()));
            }
            None => sections.last_mut().expect("a genarm line first").1 += line,
        }
    }
    let commands: Vec<&str> = sections.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        commands,
        [
            "generate",
            "logits",
            "bench",
            "init-lora",
            "init-model",
            "train",
            "prompts",
            "prefs",
            "eval"
        ]
    );
    let mut drift = Vec::new();
    for (cmd, synopsis) in &sections {
        let help = stdout(&genarm(&[cmd, "--help"]));
        let mut from_help: std::collections::BTreeSet<String> = help
            .lines()
            .filter_map(|l| {
                l.trim_start()
                    .strip_prefix("--")
                    .or_else(|| l.trim_start().split_once(", --").map(|(_, f)| f))
            })
            .map(|f| {
                format!(
                    "--{}",
                    f.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                        .next()
                        .unwrap_or_default()
                )
            })
            .collect();
        from_help.remove("--help");
        from_help.remove("--version");
        let in_readme = flags_in(synopsis);
        let missing: Vec<_> = from_help.difference(&in_readme).collect();
        let stale: Vec<_> = in_readme.difference(&from_help).collect();
        if !missing.is_empty() || !stale.is_empty() {
            drift.push(format!(
                "genarm {cmd}: missing {missing:?}, not in --help {stale:?}"
            ));
        }
    }
    assert!(
        drift.is_empty(),
        "README's CLI synopsis drifted:\n{}",
        drift.join("\n")
    );
}

#[test]
fn init_model_writes_a_runnable_model_of_the_asked_shape() {
    let dir = temp_dir("init-model");
    let out = dir.join("random.gguf");
    let shape = [
        "--layers",
        "2",
        "--hidden",
        "64",
        "--ffn",
        "96",
        "--heads",
        "4",
        "--kv-heads",
        "2",
    ];
    let like = demo_model();
    let mut args = vec!["init-model", "--like", s(&like), "--out", s(&out)];
    args.extend(["--format", "q4-0"]);
    args.extend(shape);
    let o = genarm(&args);
    assert!(o.status.success(), "init-model: {}", stderr(&o));

    // The shape, the format and the reference's vocabulary, as the loader reads them.
    let ckpt = genarm::model::Checkpoint::open(&out).unwrap();
    let cfg = &ckpt.config;
    assert_eq!(
        (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size),
        (2, 64, 96)
    );
    assert_eq!(
        (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size),
        (4, 2, 49_152)
    );
    let mut file = std::fs::File::open(&out).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    assert_eq!(
        content.tensor_infos["blk.1.ffn_down.weight"].ggml_dtype,
        GgmlDType::Q4_0
    );
    assert!(content.tensor_infos.contains_key("output.weight"));

    // It runs, with its tokenizer, and an existing file is not replaced.
    let gen = json(&genarm(&[
        "generate",
        "--model",
        s(&out),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
        "--json",
    ]));
    assert_eq!(gen["tokens"].as_array().unwrap().len(), 4);
    let again = genarm(&args);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
