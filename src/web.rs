//! The browser API (wasm-bindgen), used by `www/worker.js`.
//!
//! Few coarse calls: collect a model's files ([`ModelFiles`], whole or as streamed
//! chunks), open a [`Session`] on a base and its ARMs, then `start` a run, call
//! `prefill` until the prompt is in, and `next` once per token. Both return promises,
//! so the worker goes back to its event loop between prompt chunks and tokens: weights
//! and sampling settings set meanwhile (`setAlphas`, `setSampling`, `cancel`) are
//! queued here and applied before the next chunk or token. The engine is moved out of
//! its cell while a step runs, so no `RefCell` borrow spans an `await` and a call that
//! arrives mid-step gets a clear error instead of wasm-bindgen's "recursive use of an
//! object".
//!
//! Errors are JS `Error`s carrying the crate's message; the panic hook is installed by
//! every entry point, so anything that still panics is logged with its message.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_time::{Duration, Instant};

use crate::cpu::CpuEngine;
use crate::engine::{check_alphas, AsyncEngine, Chosen, Engine};
use crate::error::{Error, Result};
use crate::generate::{Decoder, GenerateOptions, PromptProgress};
use crate::gpu::{GpuContext, GpuEngine};
use crate::guide::{Sampler, SamplingParams};
use crate::model::arm_plan::ArmPlan;
use crate::model::lora::{LoraAdapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS, ARM_INFO};
use crate::model::weights::Bytes;
use crate::model::{BaseFacts, Checkpoint};

/// KV-cache length when the page does not choose one: the browser's memory is
/// tighter than a native process's (each row of the batch holds its own cache).
pub const WEB_DEFAULT_CONTEXT: usize = 1024;

/// The backend names the page shows: the candle engine on the wasm CPU, the wgpu
/// engine on the browser's WebGPU.
const CPU_BACKEND: &str = "CPU (wasm)";
const GPU_BACKEND: &str = "WebGPU";

fn install_panic_hook() {
    // Tests keep wasm-bindgen-test's own hook (which reports the failing test).
    #[cfg(not(test))]
    console_error_panic_hook::set_once();
}

fn js_error(e: Error) -> JsError {
    JsError::new(&e.to_string())
}

fn to_js<T: Serialize>(value: &T) -> std::result::Result<JsValue, JsError> {
    value
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| JsError::new(&format!("internal: cannot convert a result for JS: {e}")))
}

fn from_js<T: serde::de::DeserializeOwned + Default>(
    value: JsValue,
    what: &str,
) -> std::result::Result<T, JsError> {
    if value.is_undefined() || value.is_null() {
        return Ok(T::default());
    }
    serde_wasm_bindgen::from_value(value).map_err(|e| JsError::new(&format!("invalid {what}: {e}")))
}

/// The size of the wasm memory in bytes (it only grows), for the page's memory readout.
#[wasm_bindgen(js_name = wasmMemoryBytes)]
pub fn wasm_memory_bytes() -> f64 {
    wasm_bindgen::memory()
        .unchecked_into::<js_sys::WebAssembly::Memory>()
        .buffer()
        .unchecked_into::<js_sys::ArrayBuffer>()
        .byte_length() as f64
}

// ---------------------------------------------------------------------------
// Model files
// ---------------------------------------------------------------------------

/// The files of one model, held in wasm memory until a [`Session`] is opened on them
/// (which consumes them): a `.gguf` file, an HF model folder (`config.json`,
/// `*.safetensors`, `tokenizer.json`, `tokenizer_config.json`) or a PEFT LoRA folder
/// (`adapter_config.json`, `adapter_model.safetensors`, optional `genarm.json`).
/// Files are keyed by base name; a path's folders are dropped.
#[wasm_bindgen]
pub struct ModelFiles {
    name: String,
    files: Vec<(String, Vec<u8>)>,
}

fn base_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

fn out_of_memory(what: &str, bytes: usize) -> JsError {
    JsError::new(&format!(
        "out of memory: cannot hold {what} ({:.1} MB) in wasm memory (at most 4 GB, \
         often less in a browser tab); close other tabs or use a smaller model",
        bytes as f64 / 1e6
    ))
}

#[wasm_bindgen]
impl ModelFiles {
    /// An empty set; `name` labels the model in messages (a file or folder name).
    #[wasm_bindgen(constructor)]
    pub fn new(name: &str) -> ModelFiles {
        install_panic_hook();
        ModelFiles {
            name: name.into(),
            files: Vec::new(),
        }
    }

    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// Starts the file `path`; `size` bytes (0 when unknown) are reserved up front so
    /// that streamed chunks are never copied as the buffer grows. A file of the same
    /// name is replaced.
    pub fn begin(&mut self, path: &str, size: f64) -> std::result::Result<(), JsError> {
        let name = base_name(path).to_string();
        self.files.retain(|(n, _)| *n != name);
        let mut bytes = Vec::new();
        if size > 0.0 {
            let size = size as usize;
            bytes
                .try_reserve_exact(size)
                .map_err(|_| out_of_memory(&format!("{}/{name}", self.name), size))?;
        }
        self.files.push((name, bytes));
        Ok(())
    }

    /// Appends a chunk to the file begun last; returns that file's bytes so far.
    pub fn push(&mut self, chunk: &[u8]) -> std::result::Result<f64, JsError> {
        let model = &self.name;
        let (name, bytes) = self
            .files
            .last_mut()
            .ok_or_else(|| JsError::new("ModelFiles.push before begin"))?;
        bytes
            .try_reserve(chunk.len())
            .map_err(|_| out_of_memory(&format!("{model}/{name}"), bytes.len() + chunk.len()))?;
        bytes.extend_from_slice(chunk);
        Ok(bytes.len() as f64)
    }

    /// Adds a whole file.
    pub fn add(&mut self, path: &str, bytes: &[u8]) -> std::result::Result<(), JsError> {
        self.begin(path, bytes.len() as f64)?;
        self.push(bytes).map(|_| ())
    }

    /// All bytes held.
    #[wasm_bindgen(getter, js_name = totalBytes)]
    pub fn total_bytes(&self) -> f64 {
        self.files.iter().map(|(_, b)| b.len()).sum::<usize>() as f64
    }

    #[wasm_bindgen(getter, js_name = fileNames)]
    pub fn file_names(&self) -> Vec<String> {
        self.files.iter().map(|(n, _)| n.clone()).collect()
    }
}

impl ModelFiles {
    fn has(&self, name: &str) -> bool {
        self.files.iter().any(|(n, _)| n == name)
    }

    fn take(&mut self, name: &str) -> Option<Vec<u8>> {
        let i = self.files.iter().position(|(n, _)| n == name)?;
        Some(self.files.swap_remove(i).1)
    }

    fn unrecognised(&self) -> Error {
        let names: Vec<&str> = self.files.iter().map(|(n, _)| n.as_str()).collect();
        let got = if names.is_empty() {
            "no files".to_string()
        } else {
            names.join(", ")
        };
        Error::format(
            &self.name,
            format!(
                "not a model: expected a .gguf file, an HF model folder (config.json + \
                 *.safetensors) or a PEFT LoRA folder (adapter_config.json + \
                 adapter_model.safetensors); got {got}"
            ),
        )
    }

    fn is_lora(&self) -> bool {
        self.has(ADAPTER_CONFIG)
    }

    /// Opens the files as a full checkpoint (GGUF or HF folder).
    fn into_checkpoint(mut self) -> Result<Checkpoint> {
        let ggufs: Vec<String> = self
            .files
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => {
                let bytes = self.take(one).unwrap_or_default();
                let path = Path::new(&self.name).join(one);
                Checkpoint::from_gguf_bytes(bytes, &path)
            }
            [] if self.has("config.json") => {
                let dir = PathBuf::from(&self.name);
                Checkpoint::from_hf_files(&dir, self.files)
            }
            [] => Err(self.unrecognised()),
            many => Err(Error::format(
                &self.name,
                format!("several .gguf files ({}); give one", many.join(", ")),
            )),
        }
    }

    /// Opens the files as an ARM: a LoRA on the base's own weights (the browser has no
    /// other checkpoints to resolve `base_model_name_or_path` against), or a full
    /// checkpoint.
    fn into_arm(mut self, device: &Device) -> Result<(PathBuf, ArmPlan)> {
        let dir = PathBuf::from(&self.name);
        if !self.is_lora() {
            let ckpt = self.into_checkpoint()?;
            return Ok((dir, ArmPlan::Full(ckpt)));
        }
        let config = self.take(ADAPTER_CONFIG).unwrap_or_default();
        let info = self.take(ARM_INFO);
        let weights = self.take(ADAPTER_WEIGHTS).ok_or_else(|| {
            Error::format(&dir, format!("LoRA adapter without {ADAPTER_WEIGHTS}"))
        })?;
        let adapter = LoraAdapter::from_bytes(
            &dir,
            &config,
            info.as_deref(),
            Bytes::Owned(weights),
            device,
        )?;
        Ok((dir, ArmPlan::SharedLora(adapter)))
    }
}

// ---------------------------------------------------------------------------
// Engines
// ---------------------------------------------------------------------------

/// The engines a session can run on: the same calls, whichever was opened.
enum AnyEngine {
    Cpu(CpuEngine),
    Gpu(Box<GpuEngine>),
}

impl AnyEngine {
    fn engine_mut(&mut self) -> &mut dyn Engine {
        match self {
            Self::Cpu(e) => e,
            Self::Gpu(e) => e.as_mut(),
        }
    }
}

/// The CPU engine steps synchronously; the WebGPU engine awaits its device (the
/// browser cannot block on a readback).
impl AsyncEngine for AnyEngine {
    fn engine(&self) -> &dyn Engine {
        match self {
            Self::Cpu(e) => e,
            Self::Gpu(e) => e.as_ref(),
        }
    }

    async fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        match self {
            Self::Cpu(e) => e.feed(tokens),
            Self::Gpu(e) => AsyncEngine::feed(e.as_mut(), tokens).await,
        }
    }

    async fn guided_step(
        &mut self,
        tokens: &[u32],
        alphas: &[f32],
        sampler: &mut Sampler,
    ) -> Result<Chosen> {
        match self {
            Self::Cpu(e) => e.guided_step(tokens, alphas, sampler),
            Self::Gpu(e) => AsyncEngine::guided_step(e.as_mut(), tokens, alphas, sampler).await,
        }
    }
}

/// Which backend runs the session, and why (for the page's status line).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct BackendReport {
    /// "CPU (wasm)" or "WebGPU".
    backend: String,
    /// The WebGPU adapter's name, when one was found.
    adapter: Option<String>,
    /// Why this backend: e.g. why WebGPU was not used.
    reason: String,
}

/// Whether the global scope (window or worker) has `navigator.gpu`.
fn navigator_has_gpu() -> bool {
    let global = js_sys::global();
    js_sys::Reflect::get(&global, &JsValue::from_str("navigator"))
        .ok()
        .filter(|n| n.is_object())
        .and_then(|n| js_sys::Reflect::get(&n, &JsValue::from_str("gpu")).ok())
        .is_some_and(|g| !g.is_undefined() && !g.is_null())
}

/// Opens the engine: WebGPU when asked for and available, else the CPU, with the
/// reason for the choice. A failure of the WebGPU engine itself is an error (it took
/// the checkpoints); the worker then opens again on the CPU with `cpuReason` set.
async fn open_engine(
    base: Checkpoint,
    plans: Vec<(PathBuf, ArmPlan)>,
    context: usize,
    options: &OpenOptions,
) -> Result<(AnyEngine, BackendReport)> {
    let reason = if let Some(reason) = &options.cpu_reason {
        reason.clone()
    } else if !options.prefer_gpu {
        "WebGPU not requested".to_string()
    } else if !navigator_has_gpu() {
        "this browser has no WebGPU (navigator.gpu is missing)".to_string()
    } else {
        match GpuContext::new().await {
            Ok(ctx) => {
                // Browsers give wgpu no adapter name; the page reads `GPUAdapter.info`.
                let name = match ctx.adapter_name() {
                    "" => options
                        .adapter_label
                        .clone()
                        .unwrap_or_else(|| "unnamed adapter".into()),
                    n => n.to_string(),
                };
                // wgpu's browser types are not Send; the engine's API takes an Arc for
                // native threads, and the worker is single-threaded.
                #[allow(clippy::arc_with_non_send_sync)]
                let ctx = Arc::new(ctx);
                let engine = GpuEngine::new(ctx, base, plans, Some(context))?;
                let report = BackendReport {
                    backend: GPU_BACKEND.into(),
                    reason: format!("WebGPU adapter \"{name}\""),
                    adapter: Some(name),
                };
                return Ok((AnyEngine::Gpu(Box::new(engine)), report));
            }
            Err(e) => format!("no WebGPU device: {e}"),
        }
    };
    let engine = CpuEngine::from_parts(base, plans, Some(context), &Device::Cpu)?;
    let report = BackendReport {
        backend: CPU_BACKEND.into(),
        adapter: None,
        reason,
    };
    Ok((AnyEngine::Cpu(engine), report))
}

// ---------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct OpenOptions {
    /// Try WebGPU first (the page sets it when `navigator.gpu` exists).
    prefer_gpu: bool,
    /// KV-cache length (default `WEB_DEFAULT_CONTEXT`, capped by the model's).
    context: Option<usize>,
    /// The WebGPU adapter as the page describes it (`GPUAdapter.info`): wgpu gets no
    /// name from browsers.
    adapter_label: Option<String>,
    /// Why the page chose the CPU (a software WebGPU adapter, an earlier WebGPU
    /// failure): the session opens on the CPU and reports this as the reason.
    cpu_reason: Option<String>,
}

/// Sampling settings from JS; absent fields keep their current values.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SamplingUpdate {
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// 0 keeps every token.
    top_k: Option<usize>,
    seed: Option<u64>,
    greedy: Option<bool>,
}

impl SamplingUpdate {
    fn apply(&self, p: &SamplingParams) -> SamplingParams {
        SamplingParams {
            greedy: self.greedy.unwrap_or(p.greedy),
            temperature: self.temperature.unwrap_or(p.temperature),
            top_k: match self.top_k {
                Some(0) => None,
                Some(k) => Some(k),
                None => p.top_k,
            },
            top_p: self.top_p.unwrap_or(p.top_p),
            seed: self.seed.unwrap_or(p.seed),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct StartRequest {
    /// The prompt text (needs the model's tokenizer) ...
    prompt: Option<String>,
    /// ... or its token ids.
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as one user turn.
    chat: bool,
    system: Option<String>,
    /// Default 128.
    max_new_tokens: Option<usize>,
    /// One per ARM; absent: the current weights.
    alphas: Option<Vec<f32>>,
    sampling: Option<SamplingUpdate>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ArmOut {
    name: String,
    objective: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionInfo {
    #[serde(flatten)]
    backend: BackendReport,
    base: String,
    arms: Vec<ArmOut>,
    vocab_size: usize,
    context_len: usize,
    has_tokenizer: bool,
    tokenizer_note: Option<String>,
    chat_template: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenOut {
    id: u32,
    text: String,
    base_logprob: f32,
    /// `log π_arm_i` of the token per ARM; times `alphas[i]`, its reward.
    arm_logprobs: Vec<f32>,
    /// The ARM weights this token was chosen with.
    alphas: Vec<f32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RunSummary {
    tokens: Vec<u32>,
    text: Option<String>,
    prompt_tokens: usize,
    stop: crate::generate::StopReason,
    /// Prompt processing up to the first token.
    first_token_seconds: f64,
    decode_seconds: f64,
    tokens_per_second: f64,
}

/// How much of the prompt each [`Session::prefill`] call feeds: a chunk should take
/// about `PROMPT_CHUNK_TIME`, so Stop and the sliders are heard within that while a
/// long prompt goes in (the wasm CPU engine takes about 0.1 s per prompt token). Each
/// chunk also computes the log-probs at its last position, work the prompt does not
/// need: the longer the chunk, the less of it (0.25 s chunks made a 555-token prompt
/// about 11% slower than one call).
const PROMPT_CHUNK_TIME: Duration = Duration::from_millis(400);
const FIRST_PROMPT_CHUNK: usize = 4;
const MAX_PROMPT_CHUNK: usize = 64;

/// The size of the next prompt chunk, from how long the last one took.
#[derive(Clone, Copy, Debug)]
struct PromptChunk(usize);

impl PromptChunk {
    fn first() -> Self {
        Self(FIRST_PROMPT_CHUNK)
    }

    fn resize(&mut self, tokens: usize, took: Duration) {
        let per_token = took.as_secs_f64() / tokens.max(1) as f64;
        let fits = PROMPT_CHUNK_TIME.as_secs_f64() / per_token.max(1e-6);
        self.0 = (fits as usize).clamp(1, MAX_PROMPT_CHUNK);
    }
}

/// What the queued setters leave for the next step.
struct Settings {
    alphas: Vec<f32>,
    sampling: SamplingParams,
    /// Weights or sampling changed since the decoder last saw them.
    dirty: bool,
    cancel: bool,
}

/// The state shared with in-flight steps (which own an `Rc` of it).
struct Shared {
    /// `None` while a step runs (the step owns it).
    engine: RefCell<Option<AnyEngine>>,
    decoder: RefCell<Option<Decoder>>,
    busy: Cell<bool>,
    settings: RefCell<Settings>,
    /// The next prompt chunk's size.
    prompt_chunk: Cell<PromptChunk>,
    /// The prompt of the last run: the engine still holds it (and what followed), so
    /// the next run reads only what differs from it.
    held_prompt: RefCell<Vec<u32>>,
}

fn busy_error() -> JsError {
    JsError::new("a token is still being generated: await next() before calling this again")
}

impl Shared {
    /// Moves the engine and decoder out of their cells for one step (`None`: no run).
    fn take(&self) -> std::result::Result<Option<(AnyEngine, Decoder)>, JsError> {
        if self.busy.replace(true) {
            return Err(busy_error());
        }
        let decoder = self.decoder.borrow_mut().take();
        let Some(decoder) = decoder else {
            self.busy.set(false);
            return Ok(None);
        };
        let engine = self.engine.borrow_mut().take();
        let Some(engine) = engine else {
            self.busy.set(false);
            return Err(JsError::new("internal: the engine is missing"));
        };
        Ok(Some((engine, decoder)))
    }

    fn put_back(&self, engine: AnyEngine, decoder: Decoder) {
        *self.engine.borrow_mut() = Some(engine);
        *self.decoder.borrow_mut() = Some(decoder);
        self.busy.set(false);
    }

    /// Feeds the next chunk of the prompt.
    async fn prefill(&self) -> std::result::Result<JsValue, JsError> {
        let Some((mut engine, mut decoder)) = self.take()? else {
            return Ok(JsValue::NULL);
        };
        let result = self.feed_chunk(&mut engine, &mut decoder).await;
        self.put_back(engine, decoder);
        to_js(&result.map_err(js_error)?)
    }

    async fn feed_chunk(
        &self,
        engine: &mut AnyEngine,
        decoder: &mut Decoder,
    ) -> Result<PromptProgress> {
        self.apply_settings(engine, decoder)?;
        let mut chunk = self.prompt_chunk.get();
        let started = Instant::now();
        let before = decoder.prompt_progress().fed;
        let progress = decoder.prefill_async(engine, chunk.0).await?;
        if progress.fed > before {
            chunk.resize(progress.fed - before, started.elapsed());
            self.prompt_chunk.set(chunk);
        }
        Ok(progress)
    }

    /// Picks one token.
    async fn step(&self) -> std::result::Result<JsValue, JsError> {
        let Some((mut engine, mut decoder)) = self.take()? else {
            return Ok(JsValue::NULL);
        };
        // The first step feeds what `prefill` left of the prompt; later ones, a token.
        let applied = self.apply_settings(&mut engine, &mut decoder);
        let alphas = decoder.alphas().to_vec();
        let result = match applied {
            Ok(()) => decoder.next_async(&mut engine).await,
            Err(e) => Err(e),
        };
        self.put_back(engine, decoder);
        match result.map_err(js_error)? {
            Some(event) => to_js(&TokenOut {
                id: event.id,
                text: event.text,
                base_logprob: event.base_logprob,
                arm_logprobs: event.arm_logprobs,
                alphas,
            }),
            None => Ok(JsValue::NULL),
        }
    }

    /// Starts the engine's sequence over with `tokens` fed, held for the next run to
    /// share (see `Session::warm_chat`). Refused while a run is unfinished.
    async fn hold(&self, tokens: &[u32]) -> std::result::Result<(), JsError> {
        if self.decoder.borrow().is_some() {
            return Err(JsError::new("finish the run before reading a new opening"));
        }
        if self.busy.replace(true) {
            return Err(busy_error());
        }
        let Some(mut engine) = self.engine.borrow_mut().take() else {
            self.busy.set(false);
            return Err(JsError::new("internal: the engine is missing"));
        };
        engine.engine_mut().reset();
        let fed = if tokens.is_empty() {
            Ok(())
        } else {
            AsyncEngine::feed(&mut engine, tokens).await
        };
        // Whatever happened, the engine now holds these tokens or none.
        let mut held = self.held_prompt.borrow_mut();
        held.clear();
        if fed.is_ok() {
            held.extend_from_slice(tokens);
        }
        drop(held);
        *self.engine.borrow_mut() = Some(engine);
        self.busy.set(false);
        fed.map_err(js_error)
    }

    fn apply_settings(&self, engine: &mut AnyEngine, decoder: &mut Decoder) -> Result<()> {
        let mut s = self.settings.borrow_mut();
        if s.cancel {
            s.cancel = false;
            decoder.cancel();
        }
        if s.dirty {
            s.dirty = false;
            decoder.set_alphas(AsyncEngine::engine(engine), s.alphas.clone())?;
            decoder.set_sampling(s.sampling.clone())?;
        }
        Ok(())
    }
}

/// A loaded base with its ARMs, and at most one run in progress.
#[wasm_bindgen]
pub struct Session {
    shared: Rc<Shared>,
    facts: BaseFacts,
    n_arms: usize,
    info: SessionInfo,
}

#[wasm_bindgen]
impl Session {
    /// Opens a session on `base` and `arms` (consumed: their bytes are freed as the
    /// engine takes the weights). `options`: `{ preferGpu, context, adapterLabel,
    /// cpuReason }`.
    pub async fn open(
        base: ModelFiles,
        arms: Vec<ModelFiles>,
        options: JsValue,
    ) -> std::result::Result<Session, JsError> {
        install_panic_hook();
        let options: OpenOptions = from_js(options, "open options")?;
        let base_name = base.name.clone();
        let base = base.into_checkpoint().map_err(js_error)?;
        let plans = arms
            .into_iter()
            .map(|a| a.into_arm(&Device::Cpu))
            .collect::<Result<Vec<_>>>()
            .map_err(js_error)?;
        let arm_out = plans
            .iter()
            .map(|(path, plan)| ArmOut {
                name: plan.label(path),
                objective: match plan {
                    ArmPlan::SharedLora(a) | ArmPlan::LoraOn(a, _) | ArmPlan::Policy(a) => {
                        a.info.objective.clone()
                    }
                    ArmPlan::Full(_) => None,
                },
            })
            .collect::<Vec<_>>();
        let context = options
            .context
            .unwrap_or(WEB_DEFAULT_CONTEXT)
            .min(base.config.max_position_embeddings)
            .max(2);
        let (engine, backend) = open_engine(base, plans, context, &options)
            .await
            .map_err(js_error)?;
        let facts = AsyncEngine::engine(&engine).facts().clone();
        let vocab_size = AsyncEngine::engine(&engine).vocab_size();
        let context_len = AsyncEngine::engine(&engine).context_len();
        let n_arms = arm_out.len();
        let info = SessionInfo {
            backend,
            base: base_name,
            arms: arm_out,
            vocab_size,
            context_len,
            has_tokenizer: facts.tokenizer.is_some(),
            tokenizer_note: facts.tokenizer_note.clone(),
            chat_template: facts
                .tokenizer
                .as_ref()
                .is_some_and(|t| t.chat_template().is_some()),
        };
        let settings = Settings {
            alphas: vec![1.0; n_arms],
            sampling: SamplingParams::default(),
            dirty: false,
            cancel: false,
        };
        Ok(Session {
            shared: Rc::new(Shared {
                engine: RefCell::new(Some(engine)),
                decoder: RefCell::new(None),
                busy: Cell::new(false),
                settings: RefCell::new(settings),
                prompt_chunk: Cell::new(PromptChunk::first()),
                held_prompt: RefCell::new(Vec::new()),
            }),
            facts,
            n_arms,
            info,
        })
    }

    /// `{ backend, adapter, reason, base, arms: [{name, objective}], vocabSize,
    /// contextLen, hasTokenizer, tokenizerNote, chatTemplate }`.
    pub fn info(&self) -> std::result::Result<JsValue, JsError> {
        to_js(&self.info)
    }

    /// Starts a run (replacing any unfinished one). `request`: `{ prompt | promptIds,
    /// chat, system, maxNewTokens, alphas, sampling: { temperature, topP, topK, seed,
    /// greedy } }`. Returns `{ promptTokens, reusedTokens }`: the tokens the prompt
    /// shares with the last run's are not read again.
    pub fn start(&self, request: JsValue) -> std::result::Result<JsValue, JsError> {
        let req: StartRequest = from_js(request, "generation request")?;
        if self.shared.busy.get() {
            return Err(busy_error());
        }
        let ids = match (&req.prompt_ids, &req.prompt) {
            (Some(ids), _) => ids.clone(),
            (None, Some(text)) => {
                let tokenizer = self.facts.tokenizer.as_ref().ok_or_else(|| {
                    JsError::new(&format!(
                        "{} has no usable tokenizer{}; give promptIds",
                        self.info.base,
                        self.info
                            .tokenizer_note
                            .as_deref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ))
                })?;
                tokenizer
                    .encode_prompt(text, req.chat, req.system.as_deref())
                    .map_err(js_error)?
            }
            (None, None) => return Err(JsError::new("the request has no prompt")),
        };
        let opts = {
            let mut s = self.shared.settings.borrow_mut();
            if let Some(a) = &req.alphas {
                s.alphas = a.clone();
            }
            if let Some(u) = &req.sampling {
                s.sampling = u.apply(&s.sampling);
            }
            s.dirty = false;
            s.cancel = false;
            GenerateOptions {
                max_new_tokens: req.max_new_tokens.unwrap_or(128),
                alphas: s.alphas.clone(),
                sampling: s.sampling.clone(),
                eos_ids: self.facts.stop_ids.clone(),
                ignore_eos: false,
                stop_strings: Vec::new(),
            }
        };
        let mut engine = self.shared.engine.borrow_mut();
        let engine = engine.as_mut().ok_or_else(busy_error)?;
        let mut held_prompt = self.shared.held_prompt.borrow_mut();
        let held = held_prompt
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        let tokenizer = self.facts.tokenizer.as_ref();
        let decoder = Decoder::after_prefix(engine.engine_mut(), tokenizer, &ids, opts, held)
            .map_err(js_error)?;
        let reused = decoder.prompt_progress().fed;
        held_prompt.clone_from(&ids);
        *self.shared.decoder.borrow_mut() = Some(decoder);
        self.shared.prompt_chunk.set(PromptChunk::first());
        to_js(&serde_json::json!({ "promptTokens": ids.len(), "reusedTokens": reused }))
    }

    /// Reads the chat template's opening with this system turn (or the template's
    /// default one) — the tokens every chat prompt starts with, up to the user's words —
    /// so that the first chat run reads only what the user wrote, as a later run on the
    /// same prompt does. A promise of the tokens now held: 0 for a model without a
    /// tokenizer or chat template. Refused while a run is unfinished.
    #[wasm_bindgen(js_name = warmChat)]
    pub fn warm_chat(&self, system: Option<String>) -> js_sys::Promise {
        let opening = match self.facts.tokenizer.as_ref() {
            Some(t) if t.chat_template().is_some() => t.chat_opening(system.as_deref()),
            _ => Ok(Vec::new()),
        };
        let shared = Rc::clone(&self.shared);
        wasm_bindgen_futures::future_to_promise(async move {
            let opening = opening.map_err(js_error)?;
            shared.hold(&opening).await?;
            Ok(JsValue::from(opening.len() as u32))
        })
    }

    /// Feeds the next chunk of the prompt, sized to take about `PROMPT_CHUNK_TIME`, so
    /// that a long prompt can be stopped and shows its progress: a promise of `{ fed,
    /// total, done }` prompt tokens (`done`: call `next`, which feeds the last
    /// prompt token with its pick). Optional: without it the first `next` feeds the
    /// whole prompt.
    pub fn prefill(&self) -> js_sys::Promise {
        let shared = Rc::clone(&self.shared);
        wasm_bindgen_futures::future_to_promise(async move {
            shared.prefill().await.map_err(JsValue::from)
        })
    }

    /// The next token of the run: a promise of `{ id, text, baseLogprob, armLogprobs,
    /// alphas }`, or of `null` once the run has stopped (or none was started).
    pub fn next(&self) -> js_sys::Promise {
        let shared = Rc::clone(&self.shared);
        wasm_bindgen_futures::future_to_promise(async move {
            shared.step().await.map_err(JsValue::from)
        })
    }

    /// New ARM weights (one per ARM), from the next token on; also the default for
    /// later runs.
    #[wasm_bindgen(js_name = setAlphas)]
    pub fn set_alphas(&self, alphas: Vec<f32>) -> std::result::Result<(), JsError> {
        check_alphas(&alphas, self.n_arms).map_err(js_error)?;
        let mut s = self.shared.settings.borrow_mut();
        s.alphas = alphas;
        s.dirty = true;
        Ok(())
    }

    /// New sampling settings (`{ temperature, topP, topK, seed, greedy }`, absent
    /// fields unchanged), from the next token on.
    #[wasm_bindgen(js_name = setSampling)]
    pub fn set_sampling(&self, update: JsValue) -> std::result::Result<(), JsError> {
        let update: SamplingUpdate = from_js(update, "sampling settings")?;
        let mut s = self.shared.settings.borrow_mut();
        let params = update.apply(&s.sampling);
        params.validate().map_err(|e| JsError::new(&e))?;
        s.sampling = params;
        s.dirty = true;
        Ok(())
    }

    /// Stops the run after the token or prompt chunk in flight (if any); `prefill` then
    /// says `done` and `next` returns `null`.
    pub fn cancel(&self) {
        self.shared.settings.borrow_mut().cancel = true;
    }

    /// Ends the run and returns `{ tokens, text, promptTokens, stop,
    /// firstTokenSeconds, decodeSeconds, tokensPerSecond }` (`null` if none).
    pub fn finish(&self) -> std::result::Result<JsValue, JsError> {
        if self.shared.busy.get() {
            return Err(busy_error());
        }
        let Some(decoder) = self.shared.decoder.borrow_mut().take() else {
            return Ok(JsValue::NULL);
        };
        self.shared.settings.borrow_mut().cancel = false;
        let g = decoder.finish().map_err(js_error)?;
        to_js(&RunSummary {
            tokens_per_second: g.tokens_per_second(),
            tokens: g.tokens,
            text: g.text,
            prompt_tokens: g.prompt_tokens,
            stop: g.stop,
            first_token_seconds: g.prefill_seconds,
            decode_seconds: g.decode_seconds,
        })
    }
}

#[cfg(test)]
#[path = "../tests/web/browser.rs"]
mod browser_tests;
