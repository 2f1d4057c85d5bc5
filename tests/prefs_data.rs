//! Tests of `train::data`: every preference format on a small JSONL file, format
//! detection, line-numbered errors for bad records, and tokenization with the real
//! SmolLM2-135M-Instruct tokenizer (chat template, end-of-turn token, length limits).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};

use common::demo_tokenizer;
use genarm::error::Error;
use genarm::model::tokenizer::{ChatMessage, TextTokenizer};
use genarm::train::data::{
    detect, parse_pairs, read_pairs, tokenize_pair, LengthLimits, PkuLabel, PrefFormat,
    PreferencePair, Prompt, TokenizedPair,
};

/// A fresh directory under the system temp dir, unique per test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("genarm-prefs-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Writes `lines` as a JSONL file and returns its path.
fn write_jsonl(test: &str, lines: &[&str]) -> PathBuf {
    let path = temp_dir(test).join("prefs.jsonl");
    std::fs::write(&path, lines.join("\n")).expect("write JSONL");
    path
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn pair(prompt: Prompt, chosen: &str, rejected: &str) -> PreferencePair {
    PreferencePair {
        prompt,
        chosen: chosen.into(),
        rejected: rejected.into(),
    }
}

fn read(test: &str, lines: &[&str], format: Option<PrefFormat>) -> Vec<PreferencePair> {
    let path = write_jsonl(test, lines);
    read_pairs(&path, format).unwrap_or_else(|e| panic!("{test}: {e}"))
}

/// The error message of reading `lines`, which must fail.
fn read_error(test: &str, lines: &[&str], format: Option<PrefFormat>) -> String {
    let path = write_jsonl(test, lines);
    match read_pairs(&path, format) {
        Ok(pairs) => panic!("{test}: expected an error, got {pairs:?}"),
        Err(e) => {
            assert!(matches!(e, Error::Format { .. }), "{test}: {e:?}");
            let message = e.to_string();
            assert!(
                message.contains("prefs.jsonl"),
                "error names the file: {message}"
            );
            message
        }
    }
}

const TRL_TEXT: &str = r#"{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}"#;
const TRL_CHAT: &str = r#"{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": [{"role": "assistant", "content": "No."}]}"#;
const HH: &str = r#"{"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6.", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: I don't know."}"#;
const PKU: &str = r#"{"prompt": "How do I pick a lock?", "response_0": "Call a locksmith.", "response_1": "Use a tension wrench.", "better_response_id": 1, "safer_response_id": 0}"#;
const PKU_BOOLS: &str = r#"{"prompt": "Q", "response_0": "A0", "response_1": "A1", "better_response_id": false, "safer_response_id": true}"#;
const ULTRA: &str = r#"{"prompt": "Name a color.", "chosen": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}], "rejected": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Seven."}], "score_chosen": 8.0}"#;

#[test]
fn trl_string_and_conversational_forms() {
    let pairs = read(
        "trl",
        &[TRL_TEXT, "", "   ", TRL_CHAT],
        Some(PrefFormat::Trl),
    );
    assert_eq!(
        pairs,
        [
            pair(Prompt::Text("Say hi.".into()), "Hi!", "No."),
            pair(
                Prompt::Chat(vec![msg("system", "Be kind."), msg("user", "Say hi.")]),
                "Hi!",
                "No."
            ),
        ]
    );
}

#[test]
fn hh_rlhf_splits_at_the_last_shared_assistant_turn() {
    let pairs = read("hh", &[HH], Some(PrefFormat::HhRlhf));
    let prompt = Prompt::Chat(vec![
        msg("user", "What is 2+2?"),
        msg("assistant", "4."),
        msg("user", "And 3+3?"),
    ]);
    assert_eq!(pairs, [pair(prompt, "It is 6.", "I don't know.")]);
}

#[test]
fn hh_rlhf_responses_sharing_a_start_keep_it() {
    // The shared prefix runs into the answers ("It is"); the split is still at the
    // last "\n\nAssistant:" inside it.
    let line = r#"{"chosen": "\n\nHuman: 3+3?\n\nAssistant: It is 6.", "rejected": "\n\nHuman: 3+3?\n\nAssistant: It is 7."}"#;
    let pairs = read("hh-shared", &[line], None);
    assert_eq!(
        pairs,
        [pair(
            Prompt::Chat(vec![msg("user", "3+3?")]),
            "It is 6.",
            "It is 7."
        )]
    );
}

#[test]
fn pku_saferlhf_uses_the_chosen_label() {
    let better = read(
        "pku-better",
        &[PKU, PKU_BOOLS],
        Some(PrefFormat::PkuSafeRlhf(PkuLabel::Better)),
    );
    assert_eq!(
        better,
        [
            pair(
                Prompt::Text("How do I pick a lock?".into()),
                "Use a tension wrench.",
                "Call a locksmith."
            ),
            pair(Prompt::Text("Q".into()), "A0", "A1"),
        ]
    );
    let safer = read(
        "pku-safer",
        &[PKU, PKU_BOOLS],
        Some("pku-safer".parse().expect("name")),
    );
    assert_eq!(
        safer,
        [
            pair(
                Prompt::Text("How do I pick a lock?".into()),
                "Call a locksmith.",
                "Use a tension wrench."
            ),
            pair(Prompt::Text("Q".into()), "A1", "A0"),
        ]
    );
}

#[test]
fn ultrafeedback_prompt_is_all_but_the_last_message() {
    let pairs = read("ultra", &[ULTRA], Some(PrefFormat::UltraFeedback));
    assert_eq!(
        pairs,
        [pair(
            Prompt::Chat(vec![msg("user", "Name a color.")]),
            "Blue.",
            "Seven."
        )]
    );
}

#[test]
fn formats_are_detected_from_the_first_record() {
    let cases = [
        (TRL_TEXT, PrefFormat::Trl),
        (TRL_CHAT, PrefFormat::Trl),
        (HH, PrefFormat::HhRlhf),
        (PKU, PrefFormat::PkuSafeRlhf(PkuLabel::Better)),
        (ULTRA, PrefFormat::UltraFeedback),
    ];
    for (line, want) in cases {
        let value: serde_json::Value = serde_json::from_str(line).expect("test JSON");
        assert_eq!(detect(&value), Some(want), "{line}");
        // Reading with `None` gives what the explicit format gives.
        let path = Path::new("mem.jsonl");
        assert_eq!(
            parse_pairs(line, path, None).expect("detected"),
            parse_pairs(line, path, Some(want)).expect("explicit"),
        );
    }
    assert_eq!(detect(&serde_json::json!({"text": "x"})), None);
    assert_eq!(detect(&serde_json::json!([1, 2])), None);
    let message = read_error("undetected", &["", r#"{"text": "x"}"#], None);
    assert!(message.contains("line 2: cannot detect"), "{message}");
}

#[test]
fn format_names_round_trip() {
    for name in ["trl", "hh-rlhf", "pku-better", "pku-safer", "ultrafeedback"] {
        let format: PrefFormat = name.parse().expect(name);
        assert_eq!(format.to_string(), name);
    }
    let e = "dpo".parse::<PrefFormat>().expect_err("unknown name");
    assert!(e.to_string().contains("pku-safer"), "{e}");
}

#[test]
fn invalid_json_names_its_line() {
    let message = read_error(
        "bad-json",
        &[TRL_TEXT, "", r#"{"prompt": "x", "chosen": }"#, TRL_TEXT],
        None,
    );
    assert!(message.contains("line 3: invalid JSON"), "{message}");
}

#[test]
fn missing_field_names_its_line() {
    let message = read_error(
        "missing",
        &[TRL_TEXT, r#"{"prompt": "x", "chosen": "y"}"#],
        Some(PrefFormat::Trl),
    );
    assert!(
        message.contains(r#"line 2: missing field "rejected""#),
        "{message}"
    );
}

#[test]
fn out_of_range_label_names_its_line() {
    let bad = PKU.replace(r#""better_response_id": 1"#, r#""better_response_id": 2"#);
    let message = read_error("pku-2", &[PKU, PKU_BOOLS, &bad], None);
    assert!(
        message.contains(r#"line 3: field "better_response_id": expected 0 or 1, got 2"#),
        "{message}"
    );
}

#[test]
fn wrong_types_are_errors() {
    let cases: [(&str, PrefFormat, &str); 4] = [
        (
            r#"{"prompt": 5, "chosen": "a", "rejected": "b"}"#,
            PrefFormat::Trl,
            r#"field "prompt""#,
        ),
        (
            r#"{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}"#,
            PrefFormat::Trl,
            "ultrafeedback",
        ),
        (
            r#"{"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}"#,
            PrefFormat::HhRlhf,
            "share no prompt",
        ),
        (
            r#"{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
            PrefFormat::UltraFeedback,
            "assistant",
        ),
    ];
    for (i, (line, format, want)) in cases.into_iter().enumerate() {
        let message = read_error(&format!("types-{i}"), &[line], Some(format));
        assert!(message.contains("line 1: "), "{message}");
        assert!(message.contains(want), "{message}");
    }
    let missing = read_pairs(Path::new("/nonexistent/prefs.jsonl"), None).expect_err("no file");
    assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
}

const WIDE: LengthLimits = LengthLimits {
    max_prompt_len: 512,
    max_len: 1024,
};

fn tokenized(
    pair: &PreferencePair,
    tok: &TextTokenizer,
    chat: bool,
    limits: LengthLimits,
) -> TokenizedPair {
    tokenize_pair(pair, tok, chat, limits)
        .expect("tokenizes")
        .expect("not skipped")
}

#[test]
fn chat_mode_uses_the_template_and_ends_answers_with_im_end() {
    let tok = demo_tokenizer();
    let im_end = tok
        .token_id("<|im_end|>")
        .expect("<|im_end|> in vocabulary");
    let generation_prompt = tok
        .encode("<|im_start|>assistant\n", false)
        .expect("encode");
    // One file per format: detection reads the first record only.
    let pairs: Vec<PreferencePair> = [TRL_TEXT, TRL_CHAT, HH, PKU, ULTRA]
        .iter()
        .flat_map(|line| parse_pairs(line, Path::new("mem.jsonl"), None).expect("parse"))
        .collect();
    for pair in &pairs {
        let t = tokenized(pair, &tok, true, WIDE);
        assert!(t.prompt.ends_with(&generation_prompt), "{:?}", t.prompt);
        let rendered = tok
            .apply_chat_template(&pair.prompt.messages(), true)
            .expect("template");
        assert_eq!(t.prompt, tok.encode(&rendered, false).expect("encode"));
        for (ids, text) in [(&t.chosen, &pair.chosen), (&t.rejected, &pair.rejected)] {
            assert_eq!(ids.last(), Some(&im_end));
            assert_eq!(
                ids[..ids.len() - 1],
                tok.encode(text, false).expect("encode")
            );
        }
    }
    // The text prompt became one user turn.
    let decoded = tok
        .decode(&tokenized(&pairs[0], &tok, true, WIDE).prompt, false)
        .expect("decode");
    assert!(
        decoded.contains("<|im_start|>user\nSay hi.<|im_end|>"),
        "{decoded}"
    );
}

#[test]
fn raw_mode_encodes_text_and_rejects_chat_prompts() {
    let tok = demo_tokenizer();
    let text = pair(Prompt::Text("Say hi.".into()), "Hi!", "No.");
    let t = tokenized(&text, &tok, false, WIDE);
    assert_eq!(t.prompt, tok.encode("Say hi.", true).expect("encode"));
    assert_eq!(t.chosen, tok.encode("Hi!", false).expect("encode"));
    assert!(!t.chosen.iter().any(|id| tok.eos_ids().contains(id)));

    let chat = pair(Prompt::Chat(vec![msg("user", "Say hi.")]), "Hi!", "No.");
    let e = tokenize_pair(&chat, &tok, false, WIDE).expect_err("chat prompt without chat mode");
    assert!(e.to_string().contains("chat"), "{e}");

    // An empty response carries no signal.
    let empty = pair(Prompt::Text("Say hi.".into()), "", "No.");
    assert_eq!(
        tokenize_pair(&empty, &tok, false, WIDE).expect("tokenizes"),
        None
    );

    // An empty prompt leaves the first response token nothing to be scored after.
    let no_prompt = pair(Prompt::Text(String::new()), "Hi!", "No.");
    let e = tokenize_pair(&no_prompt, &tok, false, WIDE).expect_err("empty prompt");
    assert!(e.to_string().contains("prompt is empty"), "{e}");
    // The chat template gives it tokens.
    let chat_empty = pair(Prompt::Chat(vec![msg("user", "")]), "Hi!", "No.");
    assert!(tokenize_pair(&chat_empty, &tok, true, WIDE)
        .expect("tokenizes")
        .is_some());
}

#[test]
fn limits_are_exact_and_keep_the_prompt_end() {
    let tok = demo_tokenizer();
    let question = "Tell me about the sea. ".repeat(20) + "Finally, what colour is it?";
    let long_answer = "The sea is blue because water absorbs red light. ".repeat(10);
    let p = pair(Prompt::Text(question.clone()), &long_answer, "Blue.");
    let full = tokenized(&p, &tok, true, WIDE);
    let limits = LengthLimits {
        max_prompt_len: 24,
        max_len: 40,
    };
    assert!(full.prompt.len() > limits.max_prompt_len);
    assert!(full.chosen.len() > limits.max_len);

    let t = tokenized(&p, &tok, true, limits);
    assert_eq!(t.prompt.len(), limits.max_prompt_len);
    assert_eq!(
        t.prompt[..],
        full.prompt[full.prompt.len() - limits.max_prompt_len..]
    );
    let decoded = tok.decode(&t.prompt, false).expect("decode");
    assert!(
        decoded.ends_with("what colour is it?<|im_end|>\n<|im_start|>assistant\n"),
        "{decoded}"
    );
    // The long answer is cut on the right to fill the budget exactly, losing <|im_end|>.
    assert_eq!(t.prompt.len() + t.chosen.len(), limits.max_len);
    assert_eq!(t.chosen[..], full.chosen[..t.chosen.len()]);
    // The short one fits whole, end-of-turn included.
    assert_eq!(t.rejected, full.rejected);

    let bad = LengthLimits {
        max_prompt_len: 40,
        max_len: 40,
    };
    assert!(tokenize_pair(&p, &tok, true, bad).is_err());
}

#[test]
fn pairs_identical_after_truncation_are_skipped() {
    let tok = demo_tokenizer();
    let shared = "The answer depends on many things, and we should consider them all. ";
    let p = pair(
        Prompt::Text("Question?".into()),
        &format!("{shared}Yes."),
        &format!("{shared}No."),
    );
    let prompt_len = tokenized(&p, &tok, true, WIDE).prompt.len();
    let cut_before_difference = LengthLimits {
        max_prompt_len: prompt_len,
        max_len: prompt_len + 5,
    };
    assert_eq!(
        tokenize_pair(&p, &tok, true, cut_before_difference).expect("tokenizes"),
        None
    );
    let identical = pair(Prompt::Text("Question?".into()), "Same.", "Same.");
    assert_eq!(
        tokenize_pair(&identical, &tok, true, WIDE).expect("tokenizes"),
        None
    );
}
