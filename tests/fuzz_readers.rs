//! Mutation fuzzing of every reader of user-supplied files: GGUF, safetensors
//! directories (single and sharded), LoRA adapters, tokenizer.json, chat templates and
//! preference JSONL. Each reader gets 20,000+ mutants of small seed files built here
//! (bit flips, bytes set to 0x00/0xFF, truncations, insertions, huge counts, wrapped
//! products, wrong value types); each must come back as `Ok` or a clean `Err`. A panic
//! is counted and the test fails listing the first seeds; an absurd allocation would
//! abort the binary, so sizes must be checked before anything is allocated.
//!
//! Seeds are fixed, so a failure reproduces: `mutate(seed_file, SEED_BASE + i)`.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::{char_vocabulary, temp_dir, SplitMix64, TinyConfig, TinyLora, TinyModel};
use genarm::cpu::CpuEngine;
use genarm::model::arm_plan::ArmPlan;
use genarm::model::lora::LoraAdapter;
use genarm::model::tokenizer::{ChatMessage, TextTokenizer};
use genarm::model::weights::Bytes;
use genarm::model::Checkpoint;

const MUTANTS: usize = 20_000;
/// A mutant slower than this is reported as a hang.
const HANG: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------

/// Integers that make lengths, counts and dims lie: maxima, values just past 2^32
/// and 2^56 (a flipped high byte), zero, and halves whose product wraps to 0.
const HUGE: [u64; 9] = [
    u32::MAX as u64,
    u64::MAX,
    1 << 40,
    (1 << 56) + 64,
    0,
    1 << 32,
    1 << 63,
    i64::MAX as u64,
    (1 << 31) + 1,
];

/// Text that makes JSON and templates lie: huge or negative numbers, wrong types,
/// deep nesting, runaway loops.
const TEXT_SNIPPETS: [&str; 16] = [
    "18446744073709551615",
    "1099511627776",
    "-1",
    "1e400",
    "null",
    "\"x\"",
    "[]",
    "{}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "\"../../../../etc/passwd\"",
    "/etc/passwd",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'a' * 4294967295 }}",
    "{% for i in range(10000000) %}abcdefghij{% endfor %}",
    "{{ messages[99999999].content }}",
    "\u{0}\u{ffff}",
];

thread_local! {
    /// Whether panics on this thread are expected (counted, not printed).
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Silences the panic messages of mutants (thousands would bury the report) while
/// keeping them for every other panic, this test's own assertion included.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info)
            }
        }));
    });
}

/// One mutation of `seed`, chosen by `rng`. `header` is how many leading bytes hold
/// structure (the rest is tensor data, where mutations are only rarely interesting).
fn mutate(seed: &[u8], rng: &mut SplitMix64, header: usize, text: bool) -> Vec<u8> {
    let mut b = seed.to_vec();
    let rounds = 1 + (rng.next_u64() % 3) as usize;
    for _ in 0..rounds {
        let len = b.len().max(1);
        let span = if !rng.next_u64().is_multiple_of(5) {
            header.clamp(1, len)
        } else {
            len
        };
        let at = (rng.next_u64() as usize) % span;
        let choice = rng.next_u64() % if text { 9 } else { 7 };
        let last = b.len().saturating_sub(1);
        match choice {
            0 if !b.is_empty() => {
                let bit = rng.next_u64() % 8;
                b[at.min(last)] ^= 1 << bit;
            }
            1 if !b.is_empty() => b[at.min(last)] = 0x00,
            2 if !b.is_empty() => b[at.min(last)] = 0xFF,
            3 => b.truncate(at),
            4 => {
                let n = 1 + (rng.next_u64() % 16) as usize;
                let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                let at = at.min(b.len());
                b.splice(at..at, junk);
            }
            5 => {
                // A huge little-endian integer over a 4- or 8-byte field; aligned
                // most of the time, as GGUF and safetensors fields are.
                let v = HUGE[(rng.next_u64() as usize) % HUGE.len()];
                let wide = rng.next_u64().is_multiple_of(2);
                let width = if wide { 8 } else { 4 };
                let at = if !rng.next_u64().is_multiple_of(4) {
                    at & !(width - 1)
                } else {
                    at
                };
                let bytes = v.to_le_bytes();
                for (i, byte) in bytes[..width].iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = *byte;
                    }
                }
            }
            6 => {
                // A copy of another part of the file (duplicated keys, shifted fields).
                let from = (rng.next_u64() as usize) % len;
                let n = 1 + (rng.next_u64() % 64) as usize;
                let chunk: Vec<u8> = b.get(from..(from + n).min(b.len())).unwrap_or(&[]).to_vec();
                let at = at.min(b.len());
                b.splice(at..at, chunk);
            }
            7 => {
                let s = TEXT_SNIPPETS[(rng.next_u64() as usize) % TEXT_SNIPPETS.len()];
                let at = at.min(b.len());
                b.splice(at..at, s.bytes());
            }
            _ => {
                // Replace a number-looking run of digits with a huge one.
                let at = at.min(b.len());
                if let Some(start) = b[at..].iter().position(u8::is_ascii_digit) {
                    let start = at + start;
                    let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
                    let s = TEXT_SNIPPETS[(rng.next_u64() as usize) % 5];
                    b.splice(start..end, s.bytes());
                }
            }
        }
    }
    b
}

struct Report {
    mutants: usize,
    ok: usize,
    panics: Vec<(u64, String)>,
    slowest: Duration,
}

/// Runs `read` on `MUTANTS` mutants of `seeds` and fails listing the first seeds
/// that panicked or hung.
fn fuzz(name: &str, seeds: &[Vec<u8>], header: usize, text: bool, read: impl Fn(&[u8]) -> bool) {
    install_quiet_hook();
    // Sanity: every seed file reads, so mutants start from a file that reaches deep.
    for (i, s) in seeds.iter().enumerate() {
        assert!(read(s), "{name}: seed file {i} does not read");
    }
    let started = Instant::now();
    let mut report = Report {
        mutants: 0,
        ok: 0,
        panics: Vec::new(),
        slowest: Duration::ZERO,
    };
    let base = fnv(name);
    // `FUZZ_SEED=<seed>` replays one mutant with its panic message and backtrace.
    let replay: Option<u64> = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok());
    for i in 0..MUTANTS {
        let seed = base.wrapping_add(i as u64);
        if replay.is_some_and(|r| r != seed) {
            continue;
        }
        let mut rng = SplitMix64::new(seed);
        let file = &seeds[(rng.next_u64() as usize) % seeds.len()];
        let mutant = mutate(file, &mut rng, header, text);
        QUIET.with(|q| q.set(replay.is_none()));
        let t = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| read(&mutant)));
        let took = t.elapsed();
        QUIET.with(|q| q.set(false));
        report.mutants += 1;
        report.slowest = report.slowest.max(took);
        match result {
            Ok(true) => report.ok += 1,
            Ok(false) => {}
            Err(payload) => report.panics.push((seed, panic_text(&payload))),
        }
        if took > HANG {
            report.panics.push((seed, format!("took {took:?}")));
        }
    }
    eprintln!(
        "fuzz {name}: {} mutants ({} read Ok, {} clean errors, {} panics) in {:.1?}, slowest {:.1?}",
        report.mutants,
        report.ok,
        report.mutants - report.ok - report.panics.len(),
        report.panics.len(),
        started.elapsed(),
        report.slowest
    );
    let first: Vec<String> = report
        .panics
        .iter()
        .take(8)
        .map(|(seed, msg)| format!("seed {seed}: {msg}"))
        .collect();
    assert!(
        report.panics.is_empty(),
        "{name}: {} of {} mutants panicked or hung; first:\n{}",
        report.panics.len(),
        report.mutants,
        first.join("\n")
    );
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// FNV-1a: each reader gets its own seed range.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------
// Seed files
// ---------------------------------------------------------------------------

/// Small enough that a mutant is cheap; hidden 32 so Q4_0/Q8_0 blocks fit.
fn tiny_config() -> TinyConfig {
    TinyConfig {
        vocab_size: 40,
        hidden_size: 32,
        intermediate_size: 32,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        max_position_embeddings: 64,
        ..TinyConfig::default()
    }
}

fn tiny_model() -> TinyModel {
    TinyModel::random(&tiny_config(), 7)
}

/// Opens a checkpoint and, when it opens, builds the CPU engine on it (the loader is
/// where per-layer state is sized from the config).
fn load_engine(ckpt: genarm::error::Result<Checkpoint>, arms: Vec<ArmPlan>) -> bool {
    let Ok(ckpt) = ckpt else { return false };
    let plans = arms
        .into_iter()
        .map(|p| (std::path::PathBuf::from("arm"), p))
        .collect();
    CpuEngine::from_parts(ckpt, plans, Some(8), &Device::Cpu).is_ok()
}

// ---------------------------------------------------------------------------
// The readers
// ---------------------------------------------------------------------------

#[test]
fn fuzz_gguf() {
    let dir = temp_dir("fuzz-gguf");
    let model = tiny_model();
    let tokens = char_vocabulary(40);
    let mut seeds = Vec::new();
    for (i, dtype) in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4_0]
        .into_iter()
        .enumerate()
    {
        let path = dir.join(format!("m{i}.gguf"));
        let tokens = (i == 0).then_some(tokens.as_slice());
        model.write_gguf_with_tokens(&path, dtype, tokens);
        seeds.push(std::fs::read(&path).unwrap());
    }
    let name = Path::new("fuzz.gguf");
    fuzz("gguf", &seeds, 4096, false, |bytes| {
        load_engine(
            Checkpoint::from_gguf_bytes(bytes.to_vec(), name),
            Vec::new(),
        )
    });
}

/// An HF directory's files: config.json and one or three shards (the index is read
/// only from disk; its checks have their own test below).
fn hf_files(shards: usize) -> Vec<(String, Vec<u8>)> {
    let dir = temp_dir("fuzz-hf");
    tiny_model().write_hf_dir(&dir, DType::F32, shards);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn fuzz_safetensors_dirs() {
    // The fuzzed bytes are one file of the directory: which one is chosen by the
    // mutant's first byte, so config, shards and index each get their share.
    let layouts = [hf_files(1), hf_files(3)];
    let mut seeds = Vec::new();
    for (l, files) in layouts.iter().enumerate() {
        for (f, (_, bytes)) in files.iter().enumerate() {
            let mut seed = vec![l as u8, f as u8];
            seed.extend_from_slice(bytes);
            seeds.push(seed);
        }
    }
    let dir = Path::new("fuzz-model");
    fuzz("safetensors", &seeds, 2048, true, |bytes| {
        let (Some(&l), Some(&f)) = (bytes.first(), bytes.get(1)) else {
            return false;
        };
        let Some(files) = layouts.get(l as usize) else {
            return false;
        };
        let mut files = files.clone();
        if let Some(file) = files.get_mut(f as usize) {
            file.1 = bytes[2..].to_vec();
        }
        load_engine(Checkpoint::from_hf_files(dir, files), Vec::new())
    });
}

#[test]
fn fuzz_lora_adapters() {
    let cfg = tiny_config();
    let lora = TinyLora::random(&cfg, 4, 8.0, &["q_proj", "v_proj", "down_proj"], 3);
    let dir = temp_dir("fuzz-lora");
    common::write_lora_dir(&dir, &lora, "base");
    let config = std::fs::read(dir.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let info = br#"{"name": "positive", "objective": "sentiment", "beta_r": 1.0}"#.to_vec();
    // Byte 0 picks the fuzzed file: 0 config, 1 weights, 2 genarm.json.
    let seeds = [
        [vec![0u8], config.clone()].concat(),
        [vec![1u8], weights.clone()].concat(),
        [vec![2u8], info.clone()].concat(),
    ];
    let base_gguf = {
        let path = dir.join("base.gguf");
        tiny_model().write_gguf(&path, GgmlDType::F32);
        std::fs::read(path).unwrap()
    };
    fuzz("lora", &seeds, 2048, true, |bytes| {
        let Some((&which, rest)) = bytes.split_first() else {
            return false;
        };
        let (mut c, mut w, mut i) = (config.clone(), weights.clone(), info.clone());
        match which {
            0 => c = rest.to_vec(),
            1 => w = rest.to_vec(),
            2 => i = rest.to_vec(),
            _ => return false,
        }
        let adapter = LoraAdapter::from_bytes(
            Path::new("fuzz-adapter"),
            &c,
            Some(&i),
            Bytes::Owned(w),
            &Device::Cpu,
        );
        let Ok(adapter) = adapter else { return false };
        let base = Checkpoint::from_gguf_bytes(base_gguf.clone(), Path::new("base.gguf"));
        load_engine(base, vec![ArmPlan::SharedLora(adapter)])
    });
}

/// A byte-level BPE tokenizer.json (exported from a GGUF vocabulary) and a WordLevel
/// one, with a tokenizer_config.json.
fn tokenizer_seeds() -> Vec<Vec<u8>> {
    let dir = temp_dir("fuzz-tok");
    let path = dir.join("t.gguf");
    tiny_model().write_gguf_with_tokens(&path, GgmlDType::F32, Some(&char_vocabulary(40)));
    let ckpt = Checkpoint::open(&path).unwrap();
    let (bpe, config) = ckpt.tokenizer.unwrap().to_hf_files().unwrap();
    vec![bpe, WORD_LEVEL.as_bytes().to_vec(), config]
}

const WORD_LEVEL: &str = r#"{
  "version": "1.0",
  "added_tokens": [
    {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": {"type": "Lowercase"},
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {
    "type": "WordLevel",
    "vocab": {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4},
    "unk_token": "<unk>"
  }
}"#;

#[test]
fn fuzz_tokenizer_json() {
    let seeds = tokenizer_seeds();
    let config = seeds[2].clone();
    // Byte 0: 0 mutates tokenizer.json (with the config intact), 1 the config.
    let mut tagged = Vec::new();
    for s in &seeds[..2] {
        tagged.push([vec![0u8], s.clone()].concat());
    }
    tagged.push([vec![1u8], config.clone()].concat());
    let bpe = seeds[0].clone();
    fuzz("tokenizer.json", &tagged, 1 << 20, true, |bytes| {
        let Some((&which, rest)) = bytes.split_first() else {
            return false;
        };
        let t = match which {
            0 => TextTokenizer::from_bytes(rest, Some(&config)),
            1 => TextTokenizer::from_bytes(&bpe, Some(rest)),
            _ => return false,
        };
        let Ok(t) = t else { return false };
        let ids = t.encode("hello world, 12 <s>", true);
        if let Ok(ids) = &ids {
            let _ = t.decode(ids, false);
        }
        let _ = t.decode(&[0, 1, 2, 3, 1_000_000], true);
        ids.is_ok()
    });
}

const TEMPLATES: [&str; 3] = [
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}{% endif %}{{ bos_token }}{{ m.role }} {{ m.content.strip() }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant{% endif %}",
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% set ns = namespace(n=0) %}{{ bos_token }}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if loop.first and m.role == 'system' %}{{ m.content | trim }}{% else %}<|{{ m.role }}|>{{ m.content | replace('x', 'y') }}{% endif %}{% endfor %}{% for i in range(3) %}{{ i }}{% endfor %}{{ ns.n }}",
];

#[test]
fn fuzz_chat_templates() {
    let seeds: Vec<Vec<u8>> = TEMPLATES.iter().map(|t| t.as_bytes().to_vec()).collect();
    let messages = [
        ChatMessage {
            role: "user".into(),
            content: "hello world".into(),
        },
        ChatMessage {
            role: "assistant".into(),
            content: "x".into(),
        },
    ];
    fuzz("chat template", &seeds, 1 << 20, true, |bytes| {
        let template = String::from_utf8_lossy(bytes);
        let config =
            serde_json::json!({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"});
        let t =
            TextTokenizer::from_bytes(WORD_LEVEL.as_bytes(), Some(config.to_string().as_bytes()))
                .expect("a template is not parsed at load");
        t.apply_chat_template(&messages, true).is_ok()
    });
}

#[test]
fn fuzz_preference_jsonl() {
    let seeds: Vec<Vec<u8>> = [
        concat!(
            r#"{"prompt": "Say hi", "chosen": "Hi there!", "rejected": "No."}"#, "\n",
            r#"{"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]}"#, "\n",
        ),
        concat!(
            r#"{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}"#, "\n",
        ),
        concat!(
            r#"{"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0}"#, "\n",
        ),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let path = Path::new("prefs.jsonl");
    fuzz("preference JSONL", &seeds, 1 << 20, true, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        genarm::train::data::parse_pairs(&text, path, None).is_ok()
    });
}

// ---------------------------------------------------------------------------
// The reported findings, one test each (each panicked or aborted before)
// ---------------------------------------------------------------------------

const GGUF_U32: u32 = 4;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;
const GGUF_U64: u32 = 10;

/// A GGUF v3 file written byte by byte, so fields can hold what no writer would put
/// there. Tensors: (name, dims innermost first, ggml type id, data offset).
fn raw_gguf(
    kvs: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, &[u64], u32, u64)],
    data_len: usize,
) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (key, ty, value) in kvs {
        string(&mut b, key);
        b.extend(ty.to_le_bytes());
        b.extend(value);
    }
    for (name, dims, ty, offset) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    b.resize(b.len().next_multiple_of(32) + data_len, 0);
    b
}

fn gguf_string(s: &str) -> Vec<u8> {
    [
        (s.len() as u64).to_le_bytes().to_vec(),
        s.as_bytes().to_vec(),
    ]
    .concat()
}

/// Reads `bytes` as a GGUF checkpoint and returns its error message.
fn gguf_error(bytes: Vec<u8>) -> String {
    match Checkpoint::from_gguf_bytes(bytes, Path::new("bad.gguf")) {
        Ok(_) => panic!("a malformed GGUF was accepted"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, needle: &str) {
    assert!(
        message.contains(needle),
        "expected `{needle}` in: {message}"
    );
}

#[test]
fn gguf_alignment_zero_is_refused() {
    let kvs = [("general.alignment", GGUF_U32, 0u32.to_le_bytes().to_vec())];
    let err = gguf_error(raw_gguf(&kvs, &[("output_norm.weight", &[32], 0, 0)], 128));
    assert_mentions(&err, "general.alignment = 0");
}

#[test]
fn gguf_embedding_without_dims_is_refused() {
    let kvs = [("general.architecture", GGUF_STRING, gguf_string("llama"))];
    let err = gguf_error(raw_gguf(&kvs, &[("token_embd.weight", &[], 0, 0)], 64));
    assert_mentions(&err, "token_embd.weight");
    assert_mentions(&err, "0 dimensions");
}

#[test]
fn gguf_dims_that_wrap_or_overflow_are_refused() {
    for dims in [
        &[1u64 << 32, 1 << 32][..],
        &[(1 << 56) + 64, 32],
        &[32, 0],
        &[u64::MAX],
    ] {
        let err = gguf_error(raw_gguf(&[], &[("blk.0.attn_q.weight", dims, 0, 0)], 64));
        assert_mentions(&err, "blk.0.attn_q.weight");
    }
}

#[test]
fn gguf_huge_string_and_array_lengths_are_refused() {
    let huge_string = u64::MAX.to_le_bytes().to_vec();
    let err = gguf_error(raw_gguf(
        &[("general.name", GGUF_STRING, huge_string)],
        &[],
        64,
    ));
    assert_mentions(&err, "general.name");
    let huge_array = [
        GGUF_U64.to_le_bytes().to_vec(),
        (1u64 << 40).to_le_bytes().to_vec(),
    ]
    .concat();
    let err = gguf_error(raw_gguf(
        &[("tokenizer.ggml.tokens", GGUF_ARRAY, huge_array)],
        &[],
        64,
    ));
    assert_mentions(&err, "tokenizer.ggml.tokens");
}

#[test]
fn gguf_unsupported_types_are_named() {
    let err = gguf_error(raw_gguf(
        &[],
        &[("blk.0.attn_q.weight", &[32, 4], 20, 0)],
        4096,
    ));
    assert_mentions(
        &err,
        "tensor `blk.0.attn_q.weight` has type IQ4_NL, which genarm does not support",
    );
    let err = gguf_error(raw_gguf(
        &[],
        &[("blk.0.attn_q.weight", &[32, 4], 39, 0)],
        4096,
    ));
    assert_mentions(&err, "MXFP4");
    let err = gguf_error(raw_gguf(
        &[],
        &[("blk.0.attn_q.weight", &[32, 4], 999, 0)],
        4096,
    ));
    assert_mentions(&err, "unknown ggml type id 999");
}

#[test]
fn gguf_block_count_the_file_cannot_back_is_refused() {
    use candle_core::quantized::gguf_file;
    let dir = temp_dir("fuzz-block-count");
    let path = dir.join("m.gguf");
    tiny_model().write_gguf(&path, GgmlDType::F32);
    let bytes = std::fs::read(&path).unwrap();
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    let mut metadata = content.metadata.clone();
    metadata.insert("llama.block_count".into(), gguf_file::Value::U64(1 << 40));
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            let t = content
                .tensor(&mut std::io::Cursor::new(&bytes), n, &Device::Cpu)
                .unwrap();
            (n.clone(), t)
        })
        .collect();
    let mut out = Vec::new();
    let meta: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::io::Cursor::new(&mut out), &meta, &ts).unwrap();
    let err = gguf_error(out);
    assert_mentions(&err, "llama.block_count = 1099511627776");
}

#[test]
fn hf_layer_count_the_weights_cannot_back_is_refused() {
    let mut files = hf_files(1);
    let config = files.iter_mut().find(|(n, _)| n == "config.json").unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&config.1).unwrap();
    json["num_hidden_layers"] = (1u64 << 40).into();
    config.1 = json.to_string().into_bytes();
    let err = match Checkpoint::from_hf_files(Path::new("m"), files) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert_mentions(&err, "declares 1099511627776 layers");
}

#[test]
fn index_shards_must_stay_inside_the_model_folder() {
    let outside = temp_dir("fuzz-outside");
    let dir = temp_dir("fuzz-index");
    tiny_model().write_hf_dir(&dir, DType::F32, 3);
    let index_path = dir.join("model.safetensors.index.json");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let first_shard = dir.join("model-00001-of-00003.safetensors");
    std::fs::copy(&first_shard, outside.join("shard.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        outside.join("shard.safetensors"),
        dir.join("link.safetensors"),
    )
    .unwrap();
    for shard in [
        "../shard.safetensors".to_string(),
        outside.join("shard.safetensors").display().to_string(),
        "link.safetensors".to_string(),
    ] {
        let mut bad = index.clone();
        for v in bad["weight_map"].as_object_mut().unwrap().values_mut() {
            if v == "model-00001-of-00003.safetensors" {
                *v = shard.clone().into();
            }
        }
        std::fs::write(&index_path, bad.to_string()).unwrap();
        let err = match Checkpoint::open(&dir) {
            Ok(_) => panic!("shard `{shard}` was opened"),
            Err(e) => e.to_string(),
        };
        assert_mentions(&err, "weight_map");
        assert_mentions(&err, "inside the model folder");
    }
}

#[test]
fn a_fifo_is_refused_not_waited_on() {
    let dir = temp_dir("fuzz-fifo");
    tiny_model().write_hf_dir(&dir, DType::F32, 1);
    for name in ["tokenizer.json", "model.safetensors"] {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let err = match Checkpoint::open(&dir) {
            Ok(_) => panic!("a FIFO {name} was read"),
            Err(e) => e.to_string(),
        };
        assert_mentions(&err, "not a regular file");
        assert_mentions(&err, name);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn an_adapter_base_path_is_reported_without_its_contents() {
    let dir = temp_dir("fuzz-passwd");
    let base = dir.join("base.gguf");
    tiny_model().write_gguf(&base, GgmlDType::F32);
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, "root:x:0:0:secret-bytes").unwrap();
    let lora = TinyLora::random(&tiny_config(), 2, 4.0, &["q_proj"], 1);
    let adapter = dir.join("adapter");
    for named in [secret.display().to_string(), "../secret.txt".into()] {
        common::write_lora_dir(&adapter, &lora, &named);
        let err = match genarm::model::arm_plan::plan_arm(&adapter, &base, &Device::Cpu) {
            Ok(_) => panic!("a text file was taken for a base model"),
            Err(e) => e.to_string(),
        };
        assert!(!err.contains("root") && !err.contains("72 6f"), "{err}");
        assert_mentions(&err, "is not a model");
    }
}

#[test]
fn malformed_lora_tensors_name_the_file() {
    use candle_core::Tensor;
    let config = br#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#;
    let prefix = "base_model.model.model.layers.0.self_attn.q_proj";
    let save = |tensors: Vec<(String, Tensor)>| {
        let dir = temp_dir("fuzz-lora-shape");
        let path = dir.join("w.safetensors");
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path).unwrap();
        std::fs::read(path).unwrap()
    };
    let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let cases = [
        save(vec![
            (format!("{prefix}.lora_A.weight"), t(&[2])),
            (format!("{prefix}.lora_B.weight"), t(&[32, 2])),
        ]),
        save(vec![
            (format!("{prefix}.lora_A.weight"), t(&[2, 32, 1])),
            (format!("{prefix}.lora_B.weight"), t(&[32, 2])),
        ]),
        save(vec![(format!("{prefix}.lora_B.weight"), t(&[32, 2]))]),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":".to_vec(),
    ];
    for weights in cases {
        let err = LoraAdapter::from_bytes(
            Path::new("ad"),
            config,
            None,
            Bytes::Owned(weights),
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert_mentions(&err, "adapter_model.safetensors");
    }
}
