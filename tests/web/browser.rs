//! The browser API (`src/web.rs`) in headless Chromium, on the tiny model of
//! `tests/fixtures/web` (see `tests/web_fixture.rs`, which checks the native engine's
//! tokens on the same files). A unit-test module of `web` (the integration-test form
//! would make cargo build the native-only CLI for wasm32); `./build.sh test-web` runs it:
//!
//! ```sh
//! CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
//!   cargo test --release --lib --target wasm32-unknown-unknown
//! ```

use super::{ModelFiles, Session};
use serde::Serialize;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const BASE: &[u8] = include_bytes!("../fixtures/web/base.gguf");
const ARM_CONFIG: &[u8] = include_bytes!("../fixtures/web/arm/adapter_config.json");
const ARM_WEIGHTS: &[u8] = include_bytes!("../fixtures/web/arm/adapter_model.safetensors");
const ARM_INFO: &[u8] = include_bytes!("../fixtures/web/arm/genarm.json");
const EXPECTED: &str = include_str!("../fixtures/web/expected.json");

#[derive(serde::Deserialize)]
struct Expected {
    prompt: String,
    max_new_tokens: usize,
    guided_alpha: f32,
    greedy_base: Vec<u32>,
    greedy_guided: Vec<u32>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Token {
    id: u32,
    text: String,
    arm_logprobs: Vec<f32>,
    alphas: Vec<f32>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Info {
    backend: String,
    adapter: Option<String>,
    reason: String,
    arms: Vec<ArmInfo>,
}

#[derive(serde::Deserialize)]
struct ArmInfo {
    name: String,
    objective: Option<String>,
}

fn expected() -> Expected {
    serde_json::from_str(EXPECTED).unwrap()
}

/// A JS object from JSON (plain objects, not `Map`s).
fn js(value: serde_json::Value) -> JsValue {
    value
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .unwrap()
}

fn message(e: impl Into<JsValue>) -> String {
    let v: JsValue = e.into();
    match v.dyn_into::<js_sys::Error>() {
        Ok(e) => String::from(e.message()),
        Err(v) => format!("{v:?}"),
    }
}

fn base_files() -> ModelFiles {
    let mut f = ModelFiles::new("tiny");
    f.add("base.gguf", BASE).unwrap();
    f
}

/// The ARM as the page streams it: each file begun with its size, then in chunks.
fn arm_files() -> ModelFiles {
    let mut f = ModelFiles::new("arm");
    for (name, bytes) in [
        ("arm/adapter_config.json", ARM_CONFIG),
        ("arm/adapter_model.safetensors", ARM_WEIGHTS),
        ("arm/genarm.json", ARM_INFO),
    ] {
        f.begin(name, bytes.len() as f64).unwrap();
        let mut total = 0.0;
        for chunk in bytes.chunks(1000) {
            total = f.push(chunk).unwrap();
        }
        assert_eq!(total, bytes.len() as f64);
    }
    f
}

async fn open(base: ModelFiles, arms: Vec<ModelFiles>, prefer_gpu: bool) -> Session {
    Session::open(
        base,
        arms,
        js(serde_json::json!({ "preferGpu": prefer_gpu })),
    )
    .await
    .map_err(message)
    .expect("session opens")
}

async fn next(session: &Session) -> Option<Token> {
    let v = JsFuture::from(session.next())
        .await
        .map_err(message)
        .unwrap();
    (!v.is_null()).then(|| serde_wasm_bindgen::from_value(v).unwrap())
}

fn start_greedy(session: &Session, alphas: &[f32], max_new_tokens: usize) {
    let e = expected();
    session
        .start(js(serde_json::json!({
            "prompt": e.prompt,
            "maxNewTokens": max_new_tokens,
            "alphas": alphas,
            "sampling": { "greedy": true },
        })))
        .map_err(message)
        .unwrap();
}

async fn greedy(session: &Session, alphas: &[f32]) -> Vec<u32> {
    start_greedy(session, alphas, expected().max_new_tokens);
    let mut ids = Vec::new();
    while let Some(t) = next(session).await {
        assert_eq!(t.arm_logprobs.len(), alphas.len());
        ids.push(t.id);
    }
    let summary = session.finish().map_err(message).unwrap();
    assert!(summary.is_object());
    ids
}

/// The session's greedy tokens at α = 0 and at the guided α are the native engine's.
async fn assert_native_greedy(session: &Session, e: &Expected) {
    assert_eq!(greedy(session, &[0.0]).await, e.greedy_base, "α = 0");
    assert_eq!(
        greedy(session, &[e.guided_alpha]).await,
        e.greedy_guided,
        "α = {}",
        e.guided_alpha
    );
}

#[wasm_bindgen_test]
async fn matches_the_native_engines_greedy_tokens() {
    let e = expected();
    let session = open(base_files(), vec![arm_files()], false).await;
    let info: Info = serde_wasm_bindgen::from_value(session.info().unwrap()).unwrap();
    assert_eq!(info.backend, "CPU (wasm)");
    assert_eq!(info.arms.len(), 1);
    assert_eq!(info.arms[0].name, "tiny-arm");
    assert_eq!(info.arms[0].objective.as_deref(), Some("a random test ARM"));
    assert_native_greedy(&session, &e).await;
}

#[wasm_bindgen_test]
async fn generates_without_arms() {
    let e = expected();
    let session = open(base_files(), vec![], false).await;
    let ids = greedy(&session, &[]).await;
    // The base alone picks what the base row picks next to an ARM at α = 0.
    assert_eq!(ids, e.greedy_base);
}

#[wasm_bindgen_test]
async fn weights_set_mid_run_apply_from_the_next_token() {
    let e = expected();
    let session = open(base_files(), vec![arm_files()], false).await;
    start_greedy(&session, &[0.0], e.max_new_tokens);
    let first = next(&session).await.expect("a token");
    assert_eq!(first.alphas, vec![0.0]);
    session.set_alphas(vec![e.guided_alpha]).unwrap();
    session
        .set_sampling(js(serde_json::json!({ "temperature": 0.7, "topP": 0.9 })))
        .unwrap();
    let second = next(&session).await.expect("a token");
    assert_eq!(second.alphas, vec![e.guided_alpha]);
    assert!(!first.text.is_empty() || !second.text.is_empty());
    session.cancel();
    assert!(next(&session).await.is_none(), "cancel ends the run");
    let summary = session.finish().unwrap();
    let stop = js_sys::Reflect::get(&summary, &"stop".into()).unwrap();
    assert_eq!(stop.as_string().as_deref(), Some("cancelled"));
    assert!(session.finish().unwrap().is_null(), "no run after finish");
}

#[derive(serde::Deserialize)]
struct PromptProgress {
    fed: usize,
    total: usize,
    done: bool,
}

async fn prefill(session: &Session) -> PromptProgress {
    let v = JsFuture::from(session.prefill())
        .await
        .map_err(message)
        .unwrap();
    serde_wasm_bindgen::from_value(v).unwrap()
}

/// Greedy tokens for `prompt`; `chunked`: the prompt fed ahead with `prefill` as the
/// worker does (also returns the tokens fed after each call).
async fn greedy_ids(session: &Session, prompt: &str, chunked: bool) -> (Vec<u32>, Vec<usize>) {
    session
        .start(js(serde_json::json!({
            "prompt": prompt,
            "maxNewTokens": 8,
            "alphas": [expected().guided_alpha],
            "sampling": { "greedy": true },
        })))
        .map_err(message)
        .unwrap();
    let mut fed = Vec::new();
    if chunked {
        loop {
            let p = prefill(session).await;
            fed.push(p.fed);
            if p.done {
                assert_eq!(p.fed + 1, p.total, "all but the last token fed ahead");
                break;
            }
        }
    }
    let mut ids = Vec::new();
    while let Some(t) = next(session).await {
        ids.push(t.id);
    }
    session.finish().unwrap();
    (ids, fed)
}

/// A long prompt fed ahead in chunks (the worker's way to stay stoppable) gives the
/// tokens of the prompt fed at once.
#[wasm_bindgen_test]
async fn a_prompt_fed_in_chunks_gives_the_same_tokens() {
    // 72 tokens (one per character) of the fixture's 96.
    let prompt = "hello world ".repeat(6);
    let whole_session = open(base_files(), vec![arm_files()], false).await;
    let (whole, _) = greedy_ids(&whole_session, &prompt, false).await;
    // A session of its own: a second run on one session keeps the prompt it shares.
    let session = open(base_files(), vec![arm_files()], false).await;
    let (chunked, fed) = greedy_ids(&session, &prompt, true).await;
    assert!(
        fed.len() > 1 && fed.windows(2).all(|w| w[0] < w[1]),
        "chunks: {fed:?}"
    );
    assert_eq!(chunked, whole);
    // The same prompt again: all but its last token are still in the engine.
    let (again, fed) = greedy_ids(&session, &prompt, true).await;
    assert_eq!(fed.len(), 1, "the kept prompt needs no chunk: {fed:?}");
    assert_eq!(again, whole);
}

/// A model without a chat template has no opening to read ahead: `warmChat` holds
/// nothing, and runs after it are the native engine's. Refused during a run.
#[wasm_bindgen_test]
async fn warm_chat_without_a_template_holds_nothing() {
    let e = expected();
    let session = open(base_files(), vec![arm_files()], false).await;
    let held = JsFuture::from(session.warm_chat(None))
        .await
        .map_err(message);
    assert_eq!(held.unwrap().as_f64(), Some(0.0));
    assert_native_greedy(&session, &e).await;
    start_greedy(&session, &[1.0], 2);
    let refused = JsFuture::from(session.warm_chat(None)).await.unwrap_err();
    assert_contains(&message(refused), "finish the run");
}

#[wasm_bindgen_test]
async fn cancel_during_the_prompt_ends_the_run_without_a_token() {
    let e = expected();
    let session = open(base_files(), vec![arm_files()], false).await;
    start_greedy(&session, &[1.0], e.max_new_tokens);
    assert!(!prefill(&session).await.done);
    session.cancel();
    assert!(prefill(&session).await.done, "cancel ends the prompt phase");
    assert!(
        next(&session).await.is_none(),
        "and the run, before any token"
    );
    let summary = session.finish().unwrap();
    let stop = js_sys::Reflect::get(&summary, &"stop".into()).unwrap();
    assert_eq!(stop.as_string().as_deref(), Some("cancelled"));
}

async fn open_error(base: ModelFiles, arms: Vec<ModelFiles>) -> String {
    match Session::open(base, arms, JsValue::UNDEFINED).await {
        Ok(_) => panic!("opened a bad model"),
        Err(e) => message(e),
    }
}

fn assert_contains(got: &str, want: &str) {
    assert!(got.contains(want), "error {got:?} should contain {want:?}");
}

#[wasm_bindgen_test]
async fn bad_files_are_errors() {
    let mut truncated = ModelFiles::new("cut");
    truncated.add("base.gguf", &BASE[..BASE.len() / 2]).unwrap();
    assert_contains(&open_error(truncated, vec![]).await, "base.gguf");

    let mut garbage = ModelFiles::new("junk");
    garbage
        .add("model.gguf", b"this is not a GGUF file")
        .unwrap();
    assert_contains(&open_error(garbage, vec![]).await, "model.gguf");

    let mut other = ModelFiles::new("notes");
    other.add("notes.txt", b"hello").unwrap();
    assert_contains(&open_error(other, vec![]).await, "not a model");

    let mut bad_config = ModelFiles::new("arm");
    bad_config.add("adapter_config.json", b"{ r: 8").unwrap();
    bad_config
        .add("adapter_model.safetensors", ARM_WEIGHTS)
        .unwrap();
    assert_contains(
        &open_error(base_files(), vec![bad_config]).await,
        "adapter_config.json",
    );

    let mut no_weights = ModelFiles::new("arm");
    no_weights.add("adapter_config.json", ARM_CONFIG).unwrap();
    assert_contains(
        &open_error(base_files(), vec![no_weights]).await,
        "adapter_model.safetensors",
    );

    let mut f = ModelFiles::new("x");
    assert_contains(&message(f.push(b"1").unwrap_err()), "before begin");

    let session = open(base_files(), vec![arm_files()], false).await;
    assert_contains(
        &message(session.set_alphas(vec![1.0, 2.0]).unwrap_err()),
        "2 ARM weights given for 1 ARMs",
    );
    assert_contains(
        &message(
            session
                .set_sampling(js(serde_json::json!({ "temperature": -1.0 })))
                .unwrap_err(),
        ),
        "temperature",
    );
    assert_contains(
        &message(session.start(js(serde_json::json!({}))).unwrap_err()),
        "no prompt",
    );
    let err = match session.start(js(serde_json::json!({ "promptIds": [1, 999] }))) {
        Err(e) => message(e),
        Ok(_) => message(
            JsFuture::from(session.next())
                .await
                .expect_err("token id 999 is outside the vocabulary"),
        ),
    };
    assert_contains(&err, "999");
}

/// Mutated model and adapter files through the wasm API: every one opens or is a JS
/// `Error` with genarm's message — never a wasm trap (a Rust panic or an aborted
/// allocation reaches JS as a `RuntimeError: unreachable`). The native harness
/// (`tests/fuzz_readers.rs`) runs 20,000 mutants per reader; this checks the same
/// readers behave the same behind the browser API.
#[wasm_bindgen_test]
async fn mutated_files_are_errors_never_traps() {
    let mut rng = crate::test_rng::SplitMix64::new(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    let huge = [u64::MAX, 1 << 40, (1 << 56) + 64, 0];
    for i in 0..48 {
        let mut gguf = BASE.to_vec();
        let mut config = ARM_CONFIG.to_vec();
        // Header bytes (counts, lengths, dims, type ids) are where readers get tricked.
        let at = (next() % 2048) as usize;
        match i % 3 {
            0 => gguf[at] ^= 1 << (next() % 8),
            1 => gguf[at..at + 8].copy_from_slice(&huge[(next() % 4) as usize].to_le_bytes()),
            _ => {
                let c = (next() as usize) % config.len();
                let junk = b"{}[]\"0-9e";
                config[c] = junk[(next() as usize) % junk.len()];
            }
        }
        let mut base = ModelFiles::new("m");
        base.add("base.gguf", &gguf).unwrap();
        let mut arm = ModelFiles::new("arm");
        arm.add("adapter_config.json", &config).unwrap();
        arm.add("adapter_model.safetensors", ARM_WEIGHTS).unwrap();
        // A trap would not return at all: it fails the test from inside `open`.
        if let Err(e) = Session::open(base, vec![arm], JsValue::UNDEFINED).await {
            let text = message(e);
            assert!(
                text.contains("base.gguf") || text.contains("adapter") || text.contains("arm"),
                "mutant {i}: the error names no file: {text}"
            );
        }
    }
}

/// With `preferGpu` the session runs on WebGPU where the browser has an adapter
/// (SwiftShader here, through `webdriver.json`), and gives the native engine's tokens;
/// elsewhere it falls back to the CPU and says why.
#[wasm_bindgen_test]
async fn prefers_webgpu_and_reports_the_backend_and_why() {
    let e = expected();
    let session = open(base_files(), vec![arm_files()], true).await;
    let info: Info = serde_wasm_bindgen::from_value(session.info().unwrap()).unwrap();
    console_log!(
        "backend {} (adapter {:?}): {}",
        info.backend,
        info.adapter,
        info.reason
    );
    assert!(!info.reason.is_empty());
    match info.backend.as_str() {
        "WebGPU" => assert!(info.adapter.is_some()),
        "CPU (wasm)" => assert!(info.adapter.is_none()),
        other => panic!("unknown backend {other}"),
    }
    assert_native_greedy(&session, &e).await;
}
