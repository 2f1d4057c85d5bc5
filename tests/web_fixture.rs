//! The tiny model and ARM that the browser tests (`tests/web/browser.rs`) loads from bytes, with
//! the greedy tokens the native engine gives on them: the wasm engine must give the
//! same. Both at the wasm build's precision, `Precision::Int16` (16-bit integer activations:
//! without AVX-512 VNNI the portable kernel is the simd128 one lane for lane; with it the
//! same integer products are summed in another order, and the greedy tokens must still
//! agree). The fixture is committed (the browser cannot run the writers in
//! `tests/common`); `GENARM_BLESS=1 cargo test --test web_fixture` rewrites it.
//! Also: an HF model folder opened from bytes (`Checkpoint::from_hf_files`, the
//! playground's folder picker) gives the same log-probs as opened from disk.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::*;
use genarm::cpu::{CpuEngine, Precision};
use genarm::model::Checkpoint;
use genarm::{Engine, GenerateOptions, SamplingParams};

const DIR: &str = "tests/fixtures/web";
const PROMPT: &str = "hello world";
const MAX_NEW_TOKENS: usize = 12;
const GUIDED_ALPHA: f32 = 1.5;

/// What `tests/web.rs` checks the wasm engine against.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Expected {
    prompt: String,
    max_new_tokens: usize,
    guided_alpha: f32,
    /// Greedy tokens with the ARM at α = 0 and α = `guided_alpha`.
    greedy_base: Vec<u32>,
    greedy_guided: Vec<u32>,
}

fn write_fixture(dir: &Path) {
    let cfg = TinyConfig::default();
    let model = TinyModel::random(&cfg, 501);
    model.write_gguf_with_tokens(
        &dir.join("base.gguf"),
        GgmlDType::Q8_0,
        Some(&char_vocabulary(cfg.vocab_size)),
    );
    let lora = TinyLora::random(&cfg, 4, 8.0, &["q_proj", "v_proj", "down_proj"], 502);
    let arm = dir.join("arm");
    write_lora_dir(&arm, &lora, "base.gguf");
    let info = serde_json::json!({ "name": "tiny-arm", "objective": "a random test ARM" });
    std::fs::write(arm.join("genarm.json"), info.to_string()).expect("write genarm.json");
}

fn greedy(engine: &mut CpuEngine, alpha: f32) -> Vec<u32> {
    let facts = engine.facts().clone();
    let tokenizer = facts.tokenizer.expect("fixture has a tokenizer");
    let prompt = tokenizer.encode_prompt(PROMPT, false, None).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: MAX_NEW_TOKENS,
        alphas: vec![alpha],
        sampling: SamplingParams {
            greedy: true,
            ..Default::default()
        },
        eos_ids: facts.stop_ids,
        ..Default::default()
    };
    genarm::generate(engine, Some(&tokenizer), &prompt, &opts, &mut |_| true)
        .unwrap()
        .tokens
}

#[test]
fn native_greedy_tokens_match_the_web_fixture() {
    let dir = PathBuf::from(DIR);
    let bless = std::env::var_os("GENARM_BLESS").is_some();
    if bless {
        std::fs::create_dir_all(&dir).unwrap();
        write_fixture(&dir);
    }
    let mut engine = CpuEngine::load_with(
        &dir.join("base.gguf"),
        &[dir.join("arm")],
        None,
        &Device::Cpu,
        Precision::Int16,
    )
    .expect("fixture loads (GENARM_BLESS=1 rewrites it)");
    assert_eq!(engine.arm_labels(), vec!["tiny-arm".to_string()]);
    let got = Expected {
        prompt: PROMPT.into(),
        max_new_tokens: MAX_NEW_TOKENS,
        guided_alpha: GUIDED_ALPHA,
        greedy_base: greedy(&mut engine, 0.0),
        greedy_guided: greedy(&mut engine, GUIDED_ALPHA),
    };
    assert_ne!(
        got.greedy_base, got.greedy_guided,
        "the ARM must change the greedy tokens, or the browser test proves nothing"
    );
    let path = dir.join("expected.json");
    if bless {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
    }
    let want: Expected =
        serde_json::from_slice(&std::fs::read(&path).expect("expected.json")).unwrap();
    assert_eq!(got, want, "native tokens differ from {}", path.display());
}

#[test]
fn hf_folder_from_bytes_matches_hf_folder_from_disk() {
    let dir = std::env::temp_dir().join(format!("genarm-web-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = TinyConfig::default();
    TinyModel::random(&cfg, 503).write_hf_dir(&dir, DType::F32, 2);
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    let from_bytes = Checkpoint::from_hf_files(Path::new("tiny"), files).unwrap();
    let from_disk = Checkpoint::open_hf_dir(&dir).unwrap();
    let tokens = [3u32, 17, 42, 5];
    let mut a = CpuEngine::from_parts(from_bytes, vec![], None, &Device::Cpu).unwrap();
    let mut b = CpuEngine::from_parts(from_disk, vec![], None, &Device::Cpu).unwrap();
    assert_eq!(
        a.teacher_forced(&tokens).unwrap(),
        b.teacher_forced(&tokens).unwrap()
    );

    let no_weights = vec![("config.json".to_string(), b"{}".to_vec())];
    let err = Checkpoint::from_hf_files(Path::new("tiny"), no_weights)
        .err()
        .expect("an HF folder without weights is refused");
    assert!(err.to_string().contains("safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
