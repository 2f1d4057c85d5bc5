//! Decoding with a policy LoRA (`--lora`, `eval --baseline dpo:DIR`) on tiny random
//! models: logits of base + LoRA on both engines against the f64 reference of the merged
//! weights, and eval's policy rows sampled with the base's seeds. DPO training itself is
//! tested in tests/train.rs.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::BTreeMap;

use candle_core::quantized::GgmlDType;
use common::*;

/// A tiny random GGUF with a character tokenizer in a fresh directory: (dir, file).
fn base_with_tokenizer(name: &str, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let cfg = TinyConfig::default();
    let dir = temp_dir(name);
    let path = dir.join("base.gguf");
    TinyModel::random(&cfg, seed).write_gguf_with_tokens(
        &path,
        GgmlDType::F32,
        Some(&char_vocabulary(cfg.vocab_size)),
    );
    (dir, path)
}

/// `logits --lora DIR` on both engines: base + the LoRA merged as the base's own row,
/// against the f64 reference transformer of the merged weights; a scalar reward model or
/// a non-adapter is refused as `--lora`.
#[test]
fn logits_with_lora_match_the_merged_f64_reference() {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 54);
    let dir = temp_dir("dpo-lora-logits");
    let path = dir.join("base.gguf");
    model.write_gguf(&path, GgmlDType::F32);
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let lora = TinyLora::random(&cfg, 4, 8.0, &targets, 9);
    let adapter = dir.join("policy");
    write_lora_dir(&adapter, &lora, "a-hub-name");
    let merged = model.with_lora_merged(&lora);
    let tokens = [3u32, 17, 5, 40, 22, 9];
    let want = reference_logits(&merged, &tokens);
    let want_next: Vec<f64> = (1..tokens.len())
        .map(|t| log_softmax(&want[t - 1])[tokens[t] as usize])
        .collect();
    let want_last = log_softmax(want.last().unwrap());
    let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for backend in ["cpu", "webgpu"] {
        let o = genarm(&[
            "logits",
            "--model",
            &s(&path),
            "--lora",
            &s(&adapter),
            "--tokens",
            &ids.join(","),
            "--backend",
            backend,
            "--json",
        ]);
        let lg = json(&o);
        // f32 weights and activations against f64: a few ulps of the log-probs' size.
        let what = format!("{backend} next-token log-probs");
        assert_close(
            &floats(&lg["next_token_logprobs"]),
            &want_next,
            2e-4,
            1e-4,
            &what,
        );
        let what = format!("{backend} last log-probs");
        assert_close(&floats(&lg["last_logprobs"]), &want_last, 2e-4, 1e-4, &what);
    }
    let base_only = reference_logits(&model, &tokens);
    assert!(
        (log_softmax(base_only.last().unwrap())[0] - want_last[0]).abs() > 1e-3,
        "the random LoRA changes the model"
    );

    let o = genarm(&[
        "logits",
        "--model",
        &s(&path),
        "--lora",
        &s(&dir),
        "--tokens",
        "1,2",
    ]);
    assert_clean_error(&o, "PEFT LoRA directory");
}

/// `eval --baseline dpo:DIR`: each policy samples every prompt with the base samples'
/// seeds; a policy whose LoRA is zero is the base, so its responses are the base's
/// exactly, and a random one's differ.
#[test]
fn eval_samples_policies_with_the_base_seeds() {
    let cfg = TinyConfig::default();
    let (dir, path) = base_with_tokenizer("dpo-eval", 55);
    let random = TinyLora::random(&cfg, 4, 8.0, &["q_proj", "v_proj", "down_proj"], 10);
    let mut zero = random.clone();
    for p in zero.pairs.values_mut() {
        p.b.iter_mut().for_each(|b| *b = 0.0);
    }
    let (random_dir, zero_dir) = (dir.join("random"), dir.join("zero"));
    write_lora_dir(&random_dir, &random, "a-hub-name");
    write_lora_dir(&zero_dir, &zero, "a-hub-name");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "the cat\na dog is\nsee\n").unwrap();
    let out = dir.join("out");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let o = genarm(&[
        "eval",
        "--model",
        &s(&path),
        "--prompts",
        &s(&prompts),
        "--scorer",
        "concise",
        "--alphas",
        "0",
        "--samples",
        "3",
        "--max-new-tokens",
        "8",
        "--out",
        &s(&out),
        "--baseline",
        &format!("dpo:{}", s(&zero_dir)),
        "--baseline",
        &format!("dpo:{}", s(&random_dir)),
    ]);
    assert!(o.status.success(), "eval failed: {}", stderr(&o));
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    let mut by_method: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    for line in samples.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        by_method
            .entry(r["method"].as_str().unwrap().to_string())
            .or_default()
            .push((
                r["prompt_index"].as_u64().unwrap(),
                r["seed"].as_u64().unwrap(),
                r["text"].as_str().unwrap().to_string(),
            ));
    }
    let base = &by_method["base"];
    let zero_rows = &by_method[&format!("dpo:{}", s(&zero_dir))];
    let random_rows = &by_method[&format!("dpo:{}", s(&random_dir))];
    assert_eq!(base.len(), 9);
    assert_eq!(zero_rows, base, "a zero LoRA decodes as the base");
    assert_eq!(random_rows.len(), 9);
    let same_seeds = |a: &[(u64, u64, String)], b: &[(u64, u64, String)]| {
        a.iter().zip(b).all(|(x, y)| (x.0, x.1) == (y.0, y.1))
    };
    assert!(same_seeds(random_rows, base));
    assert!(
        random_rows.iter().zip(base).any(|(x, y)| x.2 != y.2),
        "the random policy samples the base's texts"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let text = summary.to_string();
    assert!(text.contains(&format!("dpo:{}", s(&random_dir))), "{text}");
}

/// The CLI end to end: `train --loss dpo --beta B` writes a policy, `--arm` refuses it,
/// `generate --lora` decodes with it, and DPO refuses `--full`.
#[test]
fn cli_trains_a_policy_and_decodes_with_it() {
    let (dir, base) = base_with_tokenizer("dpo-cli", 56);
    let data = dir.join("pairs.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            let prompt = ["a", "b", "c"][i % 3];
            format!(r#"{{"prompt": "say {prompt}", "chosen": "yes", "rejected": "no {i}"}}"#)
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.join("policy");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (b, d, o) = (s(&base), s(&data), s(&out));
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--model", &b, "--data", &d, "--out", &o];
        args.extend_from_slice(extra);
        genarm(&args)
    };
    assert_clean_error(&train(&["--loss", "dpo", "--full"]), "--loss dpo");
    let run = train(&[
        "--loss",
        "dpo",
        "--beta",
        "0.3",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--overwrite",
    ]);
    assert!(run.status.success(), "train failed: {}", stderr(&run));
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("genarm.json")).unwrap()).unwrap();
    assert_eq!(info["kind"], "policy");
    assert_eq!(info["dpo_beta"], 0.3);

    let generate = |flag: &str| {
        genarm(&[
            "generate",
            "--model",
            &b,
            flag,
            &o,
            "--prompt",
            "say a",
            "--max-new-tokens",
            "4",
            "--json",
        ])
    };
    assert_clean_error(&generate("--arm"), "--lora");
    let g = json(&generate("--lora"));
    assert_eq!(g["tokens"].as_array().unwrap().len(), 4);
}
