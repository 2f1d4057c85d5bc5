//! Tests of `model::tokenizer`: the GGUF byte-level BPE path against the real
//! SmolLM2-135M-Instruct file, the Hugging Face JSON path on a hand-written tokenizer,
//! streaming detokenisation, chat templates and error reporting.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use common::demo_tokenizer;
use genarm::error::Error;
use genarm::model::tokenizer::{same_vocabulary, ChatMessage, TextTokenizer, TokenOutputStream};

/// The France prompt and its ids, from `fixtures/smollm2-france-reference.json`
/// (produced by Hugging Face transformers' tokenizer).
const FRANCE_PROMPT: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
const FRANCE_IDS: [u32; 16] = [
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];

const NON_ASCII: &str = "café — naïve 日本";

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

/// GGUF metadata for a four-token byte-level BPE vocabulary.
fn tiny_gguf_metadata() -> HashMap<String, Value> {
    HashMap::from([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            strings(&["a", "b", "ab", "<|x|>"]),
        ),
        ("tokenizer.ggml.merges".to_string(), strings(&["a b"])),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(vec![
                Value::I32(1),
                Value::I32(1),
                Value::I32(1),
                Value::I32(3),
            ]),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(3)),
    ])
}

#[test]
fn smollm2_encodes_the_reference_prompt() {
    let tok = demo_tokenizer();
    assert_eq!(tok.encode(FRANCE_PROMPT, true).unwrap(), FRANCE_IDS);
    assert_eq!(tok.encode(FRANCE_PROMPT, false).unwrap(), FRANCE_IDS);
    assert_eq!(tok.decode(&FRANCE_IDS, false).unwrap(), FRANCE_PROMPT);
    assert_eq!(
        tok.decode(&FRANCE_IDS, true).unwrap(),
        "user\nWhat is the capital of France?\nassistant\n"
    );
}

#[test]
fn smollm2_special_ids() {
    let tok = demo_tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert!(tok.eos_ids().contains(&2), "eos ids {:?}", tok.eos_ids());
    assert_eq!(tok.token_str(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.token_str(4093).as_deref(), Some("user"));
    assert_eq!(tok.token_str(3575).as_deref(), Some("Ġcapital"));
    assert_eq!(tok.token_str(1_000_000), None);
}

#[test]
fn smollm2_splits_digits() {
    let tok = demo_tokenizer();
    let ids = tok.encode("12345", false).unwrap();
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert_eq!(tok.decode(&ids, true).unwrap(), "12345");
}

#[test]
fn smollm2_round_trips_non_ascii() {
    let tok = demo_tokenizer();
    let ids = tok.encode(NON_ASCII, false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), NON_ASCII);
}

#[test]
fn stream_reproduces_the_full_decode() {
    let tok = demo_tokenizer();
    for text in [
        NON_ASCII,
        "What is the capital of France? Paris.\n\n12 + 30 = 42",
    ] {
        let ids = tok.encode(text, false).unwrap();
        let mut stream = TokenOutputStream::new(tok.clone());
        let mut out = String::new();
        let mut held_back = 0;
        for &id in &ids {
            match stream.next_token(id).unwrap() {
                Some(piece) => {
                    assert!(
                        !piece.contains('\u{FFFD}'),
                        "partial character in {piece:?}"
                    );
                    out.push_str(&piece);
                }
                None => held_back += 1,
            }
        }
        if text == NON_ASCII {
            // Byte-level BPE splits some of these characters' UTF-8 bytes across tokens.
            assert!(
                held_back > 0,
                "expected a token holding a partial character"
            );
        }
        if let Some(rest) = stream.flush().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, tok.decode(&ids, true).unwrap());
        assert_eq!(out, text);
        assert_eq!(stream.tokens(), ids.as_slice());
    }
}

#[test]
fn smollm2_chat_template() {
    let tok = demo_tokenizer();
    assert!(tok.chat_template().is_some());
    let messages = [ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let prompt = tok.apply_chat_template(&messages, true).unwrap();
    assert!(prompt.starts_with("<|im_start|>"), "{prompt:?}");
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    assert!(
        prompt.contains("What is the capital of France?<|im_end|>"),
        "{prompt:?}"
    );
    let without = tok.apply_chat_template(&messages, false).unwrap();
    assert!(!without.ends_with("<|im_start|>assistant\n"), "{without:?}");
}

/// The chat opening is the prefix of every chat prompt with that system turn, and it
/// stops right where the user's words begin: the system turn and the user header.
#[test]
fn smollm2_chat_opening_prefixes_every_chat_prompt() {
    let tok = demo_tokenizer();
    for system in [None, Some("You answer in French.")] {
        let opening = tok.chat_opening(system).unwrap();
        let text = tok.decode(&opening, false).unwrap();
        assert!(text.starts_with("<|im_start|>system\n"), "{text:?}");
        assert!(text.ends_with("<|im_start|>user\n"), "{text:?}");
        if let Some(system) = system {
            assert!(text.contains(system), "{text:?}");
        }
        for user in [
            "What is the capital of France?",
            " spaced",
            "\nnewline",
            "日本",
        ] {
            let prompt = tok.encode_prompt(user, true, system).unwrap();
            assert!(prompt.starts_with(&opening), "{user:?} after {system:?}");
            assert!(prompt.len() > opening.len());
        }
    }
    // No template, no opening: the error encode_prompt gives.
    let bare = TextTokenizer::from_bytes(TINY_TOKENIZER_JSON.as_bytes(), None).unwrap();
    let err = bare.chat_opening(None).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err}");
}
#[test]
fn same_vocabulary_compares_token_strings() {
    let a = demo_tokenizer();
    assert_eq!(same_vocabulary(&a, &a.clone()), Ok(()));
    let tiny = TextTokenizer::from_gguf(&tiny_gguf_metadata(), Path::new("tiny.gguf"))
        .unwrap()
        .unwrap();
    let err = same_vocabulary(&a, &tiny).unwrap_err();
    assert!(err.contains("token 0"), "{err}");
}

#[test]
fn gguf_byte_level_bpe_from_metadata() {
    let tok = TextTokenizer::from_gguf(&tiny_gguf_metadata(), Path::new("tiny.gguf"))
        .unwrap()
        .unwrap();
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.encode("ab<|x|>ba", false).unwrap(), [2, 3, 1, 0]);
    assert_eq!(tok.decode(&[2, 3, 1], false).unwrap(), "ab<|x|>b");
    assert_eq!(tok.decode(&[2, 3, 1], true).unwrap(), "abb");
    assert_eq!(tok.eos_ids(), [3]);
    assert_eq!(tok.bos_id(), None);
    let err = tok.apply_chat_template(&[], true).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err}");
}

#[test]
fn gguf_without_tokenizer_is_none() {
    let metadata = HashMap::from([(
        "general.architecture".to_string(),
        Value::String("llama".into()),
    )]);
    assert!(TextTokenizer::from_gguf(&metadata, Path::new("x.gguf"))
        .unwrap()
        .is_none());
}

#[test]
fn gguf_errors_name_the_key() {
    let mut metadata = tiny_gguf_metadata();
    metadata.remove("tokenizer.ggml.merges");
    let err = TextTokenizer::from_gguf(&metadata, Path::new("tiny.gguf")).unwrap_err();
    match &err {
        Error::Field { path, field, .. } => {
            assert_eq!(field, "tokenizer.ggml.merges");
            assert_eq!(path, Path::new("tiny.gguf"));
        }
        other => panic!("expected a Field error, got {other}"),
    }

    let mut metadata = tiny_gguf_metadata();
    metadata.insert("tokenizer.ggml.merges".into(), Value::U32(7));
    let err = TextTokenizer::from_gguf(&metadata, Path::new("tiny.gguf")).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let mut metadata = tiny_gguf_metadata();
    metadata.insert("tokenizer.ggml.merges".into(), strings(&["a z"]));
    let err = TextTokenizer::from_gguf(&metadata, Path::new("tiny.gguf")).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let mut metadata = tiny_gguf_metadata();
    metadata.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let err = TextTokenizer::from_gguf(&metadata, Path::new("tiny.gguf")).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
}

const TINY_TOKENIZER_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {
    "type": "WordLevel",
    "vocab": {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4},
    "unk_token": "<unk>"
  }
}"#;

const TINY_CONFIG_JSON: &str = r#"{
  "bos_token": "<s>",
  "eos_token": {"content": "</s>", "special": true},
  "add_bos_token": true,
  "chat_template": [
    {"name": "default", "template": "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}{% endif %}{{ bos_token }}{{ m.role }} {{ m.content.strip() }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant{% endif %}"},
    {"name": "tool_use", "template": "unused"}
  ]
}"#;

#[test]
fn from_bytes_reads_tokenizer_and_config() {
    let tok = TextTokenizer::from_bytes(
        TINY_TOKENIZER_JSON.as_bytes(),
        Some(TINY_CONFIG_JSON.as_bytes()),
    )
    .unwrap();
    assert_eq!(tok.vocab_size(), 5);
    assert_eq!(tok.bos_id(), Some(0));
    assert_eq!(tok.eos_ids(), [1]);
    assert_eq!(tok.encode("hello world", false).unwrap(), [3, 4]);
    assert_eq!(tok.encode("hello world", true).unwrap(), [0, 3, 4]);
    assert_eq!(tok.encode("hello</s>", false).unwrap(), [3, 1]);
    assert_eq!(tok.decode(&[0, 3, 4, 1], true).unwrap(), "hello world");

    let user = ChatMessage {
        role: "user".into(),
        content: "  hello ".into(),
    };
    assert_eq!(
        tok.apply_chat_template(std::slice::from_ref(&user), true)
            .unwrap(),
        "<s>user hello</s><s>assistant"
    );
    let system = ChatMessage {
        role: "system".into(),
        content: "x".into(),
    };
    let err = tok.apply_chat_template(&[system, user], false).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err}");
    assert!(err.to_string().contains("no system turns"), "{err}");

    // Without a config: no BOS added, no template.
    let bare = TextTokenizer::from_bytes(TINY_TOKENIZER_JSON.as_bytes(), None).unwrap();
    assert_eq!(bare.encode("hello world", true).unwrap(), [3, 4]);
    assert!(bare.chat_template().is_none());
}

#[test]
fn from_bytes_rejects_invalid_json() {
    assert!(TextTokenizer::from_bytes(b"{not json", None).is_err());
    assert!(TextTokenizer::from_bytes(b"{}", None).is_err());
    let err =
        TextTokenizer::from_bytes(TINY_TOKENIZER_JSON.as_bytes(), Some(b"[1, 2")).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    let err = TextTokenizer::from_bytes(
        TINY_TOKENIZER_JSON.as_bytes(),
        Some(br#"{"chat_template": 5}"#),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Field { .. }), "{err}");
}

/// A fresh directory under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("genarm-tokenizer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn from_hf_dir_reads_all_configs() {
    let dir = temp_dir("hf");
    assert!(TextTokenizer::from_hf_dir(&dir).unwrap().is_none());

    std::fs::write(dir.join("tokenizer.json"), TINY_TOKENIZER_JSON).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), TINY_CONFIG_JSON).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"eos_token_id": [1, 4], "bos_token_id": 0}"#,
    )
    .unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 3}"#).unwrap();
    let tok = TextTokenizer::from_hf_dir(&dir).unwrap().unwrap();
    assert_eq!(tok.eos_ids(), [1, 4, 3]);
    assert_eq!(tok.bos_id(), Some(0));
    assert!(tok.chat_template().is_some());

    std::fs::write(dir.join("tokenizer.json"), "garbage").unwrap();
    let err = TextTokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_pre_tokenizer_variants_build() {
    for pre in [
        "gpt2",
        "smollm",
        "llama-bpe",
        "llama3",
        "qwen2",
        "something-new",
    ] {
        let mut metadata = tiny_gguf_metadata();
        metadata.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
        let tok = TextTokenizer::from_gguf(&metadata, Path::new("tiny.gguf"))
            .unwrap_or_else(|e| panic!("pre {pre}: {e}"))
            .unwrap();
        assert_eq!(tok.encode("ab<|x|>", false).unwrap(), [2, 3], "pre {pre}");
    }
}

/// The SentencePiece model of `tests/fixtures/spm` (trained and encoded by Google's
/// `sentencepiece` with Llama 2's settings, see `make_fixture.py`) as GGUF metadata.
#[derive(serde::Deserialize)]
struct SpmFixture {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    unk_id: u32,
    bos_id: u32,
    eos_id: u32,
    cases: Vec<SpmCase>,
}

#[derive(serde::Deserialize)]
struct SpmCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn spm_fixture() -> SpmFixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm/fixture.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn spm_gguf_metadata(f: &SpmFixture) -> HashMap<String, Value> {
    let pieces: Vec<&str> = f.pieces.iter().map(String::as_str).collect();
    HashMap::from([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), strings(&pieces)),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array(f.scores.iter().map(|&s| Value::F32(s)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(f.types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.unknown_token_id".to_string(),
            Value::U32(f.unk_id),
        ),
        (
            "tokenizer.ggml.bos_token_id".to_string(),
            Value::U32(f.bos_id),
        ),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            Value::U32(f.eos_id),
        ),
    ])
}

#[test]
fn gguf_sentencepiece_bpe_matches_sentencepiece() {
    let f = spm_fixture();
    let tok = TextTokenizer::from_gguf(&spm_gguf_metadata(&f), Path::new("spm.gguf"))
        .unwrap()
        .unwrap();
    assert_eq!(tok.vocab_size(), f.pieces.len());
    for case in &f.cases {
        if case.text.contains("<s>") {
            // `sentencepiece` reads control pieces in text as plain characters; like
            // `transformers` and llama.cpp's chat path, genarm matches them whole (a
            // rendered chat template relies on it).
            let ids = tok.encode(&case.text, false).unwrap();
            assert_eq!(ids[0], f.bos_id, "{:?}", case.text);
            assert!(ids.contains(&f.eos_id), "{:?}", case.text);
            continue;
        }
        let ids = tok.encode(&case.text, false).unwrap();
        assert_eq!(ids, case.ids, "encoding {:?}", case.text);
        let text = tok.decode(&case.ids, false).unwrap();
        assert_eq!(text, case.decoded, "decoding {:?}", case.ids);
    }
    // llama.cpp's default for SentencePiece models: BOS first.
    let with_bos = tok.encode("Hello", true).unwrap();
    assert_eq!(with_bos[0], f.bos_id);
    assert_eq!(&with_bos[1..], &tok.encode("Hello", false).unwrap()[..]);
    assert_eq!(tok.eos_ids(), &[f.eos_id]);
}

#[test]
fn gguf_sentencepiece_stream_keeps_the_spaces_between_tokens() {
    let f = spm_fixture();
    let tok = TextTokenizer::from_gguf(&spm_gguf_metadata(&f), Path::new("spm.gguf"))
        .unwrap()
        .unwrap();
    let case = f.cases.iter().max_by_key(|c| c.ids.len()).unwrap();
    let mut stream = TokenOutputStream::new(tok);
    let mut text = String::new();
    for &id in &case.ids {
        text.extend(stream.next_token(id).unwrap());
    }
    text.extend(stream.flush().unwrap());
    assert_eq!(text, case.decoded);
}

#[test]
fn gguf_sentencepiece_errors_name_the_key() {
    let f = spm_fixture();
    let mut metadata = spm_gguf_metadata(&f);
    metadata.remove("tokenizer.ggml.scores");
    let err = TextTokenizer::from_gguf(&metadata, Path::new("spm.gguf")).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.scores"), "{err}");

    let mut metadata = spm_gguf_metadata(&f);
    metadata.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0); 3]),
    );
    let err = TextTokenizer::from_gguf(&metadata, Path::new("spm.gguf")).unwrap_err();
    assert!(
        err.to_string().contains("3 scores for 1200 tokens"),
        "{err}"
    );
}

/// A tokenizer whose chat template is `template`.
fn with_template(template: &str) -> TextTokenizer {
    let config = serde_json::json!({ "chat_template": template });
    TextTokenizer::from_bytes(
        TINY_TOKENIZER_JSON.as_bytes(),
        Some(config.to_string().as_bytes()),
    )
    .unwrap()
}

fn one_user_turn() -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: "hello".into(),
    }]
}

#[test]
fn runaway_chat_template_loops_run_out_of_fuel() {
    let tok = with_template(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    );
    let err = tok.apply_chat_template(&one_user_turn(), true).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err}");
    assert!(err.to_string().contains("loops without bound"), "{err}");
}

#[test]
fn chat_template_output_is_capped() {
    // 2 MiB of output from a cheap loop: the cap, not the fuel, stops it.
    let tok = with_template("{% for i in range(2048) %}{{ 'x' * 1024 }}{% endfor %}");
    let err = tok.apply_chat_template(&one_user_turn(), true).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err}");
    assert!(err.to_string().contains("exceeds 1048576 bytes"), "{err}");
    // Just under the cap renders in full.
    let tok = with_template("{% for i in range(1000) %}{{ 'x' * 1024 }}{% endfor %}");
    let text = tok.apply_chat_template(&one_user_turn(), true).unwrap();
    assert_eq!(text.len(), 1000 * 1024);
}

#[test]
fn malformed_tokenizer_json_is_an_error_naming_the_file() {
    // tokenizers 0.22 panics ("Helper") on a syntax error inside `decoder`.
    let json = TINY_TOKENIZER_JSON.replace(r#""decoder": null"#, r#""decoder": {"type": "Fuse""#);
    assert_ne!(json, TINY_TOKENIZER_JSON, "the fixture changed");
    let err = TextTokenizer::from_bytes(json.as_bytes(), None).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert!(err.to_string().contains("invalid JSON"), "{err}");
}
