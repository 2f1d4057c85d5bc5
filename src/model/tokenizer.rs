//! Text tokenizer: a `tokenizers::Tokenizer` plus what generation needs on top of it
//! (BOS/EOS ids, the chat template, incremental detokenisation).
//!
//! Two sources are supported: the `tokenizer.*` metadata of a GGUF file (so a single
//! `.gguf` is enough to run a model: byte-level BPE as in Llama 3, Qwen2 and SmolLM, or
//! SentencePiece BPE as in Llama 2 and Mistral) and a Hugging Face directory or its bytes
//! (`tokenizer.json` + `tokenizer_config.json`, which the browser fetches itself). The GGUF
//! vocabulary and merges are turned into a tokenizer in `gguf`.

mod gguf;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::weights::{read_regular_file, MAX_JSON_FILE_LEN};
use crate::error::{Error, Result};

/// Tokens that end a turn in common chat formats. They are added to the EOS set
/// when they exist in the vocabulary and the chat template emits them, because
/// `eos_token_id` alone often names only the end-of-document token.
const TURN_END_TOKENS: [&str; 2] = ["<|im_end|>", "<|eot_id|>"];
/// Llama-3's end-of-document token, an EOS whenever it exists.
const END_OF_TEXT: &str = "<|end_of_text|>";

/// One chat turn, as chat templates expect it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A tokenizer with the special ids and chat template generation needs.
///
/// Cloning is cheap: the underlying tokenizer is shared.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Tokenizer>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    /// Whether `encode(.., add_special_tokens: true)` prepends BOS.
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    // The derived form would print the whole vocabulary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl TextTokenizer {
    /// Builds the tokenizer described by GGUF metadata; `path` only names the file in
    /// errors. `Ok(None)` when the file carries no tokenizer (`tokenizer.ggml.tokens`).
    pub fn from_gguf(metadata: &HashMap<String, Value>, path: &Path) -> Result<Option<Self>> {
        gguf::from_metadata(metadata, path)
    }

    /// Loads `tokenizer.json` (and, when present, `tokenizer_config.json`,
    /// `config.json` and `generation_config.json`) from a Hugging Face model directory.
    /// `Ok(None)` when the directory has no `tokenizer.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let Some(tokenizer_json) = read_optional(&dir.join("tokenizer.json"))? else {
            return Ok(None);
        };
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional(&config_path)?;
        let mut tokenizer = Self::parse(&tokenizer_json, config.as_deref(), dir, &config_path)?;

        // The model config and generation config may name more EOS ids (Llama-3
        // instruct lists `<|eot_id|>` only there) and the BOS id.
        for name in ["config.json", "generation_config.json"] {
            let file = dir.join(name);
            let Some(bytes) = read_optional(&file)? else {
                continue;
            };
            let json: Json = serde_json::from_slice(&bytes)
                .map_err(|e| Error::format(&file, format!("invalid JSON: {e}")))?;
            for id in json_ids(&file, "eos_token_id", json.get("eos_token_id"))? {
                if !tokenizer.eos_ids.contains(&id) {
                    tokenizer.eos_ids.push(id);
                }
            }
            if tokenizer.bos_id.is_none() {
                tokenizer.bos_id = json_ids(&file, "bos_token_id", json.get("bos_token_id"))?
                    .first()
                    .copied();
            }
        }
        Ok(Some(tokenizer))
    }

    /// Builds the tokenizer from the bytes of `tokenizer.json` and, optionally,
    /// `tokenizer_config.json` (chat template, BOS/EOS tokens, `add_bos_token`).
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>) -> Result<Self> {
        Self::parse(
            tokenizer_json,
            tokenizer_config_json,
            Path::new("."),
            Path::new("tokenizer_config.json"),
        )
    }

    /// This tokenizer as the files of an HF model directory: `tokenizer.json` and a
    /// `tokenizer_config.json` with what `from_bytes` reads back (chat template, BOS,
    /// first EOS, padding token, `add_bos_token`). A GGUF's embedded tokenizer is
    /// exported this way; the turn-end EOS ids follow again from the chat template.
    pub fn to_hf_files(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let tokenizer_json = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
        let token = |id: Option<u32>| id.and_then(|id| self.token_str(id));
        let config = serde_json::json!({
            "chat_template": self.chat_template,
            "add_bos_token": self.add_bos,
            "bos_token": token(self.bos_id),
            "eos_token": token(self.eos_ids.first().copied()),
            "pad_token": token(self.pad_id),
        });
        Ok((
            tokenizer_json.into_bytes(),
            serde_json::to_vec_pretty(&config)?,
        ))
    }

    /// `from_bytes` with the paths to name in errors.
    fn parse(
        tokenizer_json: &[u8],
        config_json: Option<&[u8]>,
        dir: &Path,
        config_path: &Path,
    ) -> Result<Self> {
        let inner = build_tokenizer(tokenizer_json, &dir.join("tokenizer.json"))?;
        let mut tokenizer = Self {
            inner: Arc::new(inner),
            bos_id: None,
            eos_ids: Vec::new(),
            pad_id: None,
            add_bos: false,
            chat_template: None,
        };
        if let Some(bytes) = config_json {
            let config: Json = serde_json::from_slice(bytes)
                .map_err(|e| Error::format(config_path, format!("invalid JSON: {e}")))?;
            tokenizer.apply_config(&config, config_path)?;
        }
        Ok(tokenizer.with_turn_end_tokens())
    }

    /// Takes the chat template, special tokens and `add_bos_token` from a parsed
    /// `tokenizer_config.json`.
    fn apply_config(&mut self, config: &Json, path: &Path) -> Result<()> {
        self.chat_template = match config.get("chat_template") {
            None | Some(Json::Null) => None,
            Some(Json::String(t)) => Some(t.clone()),
            // Several named templates: the "default" one is the chat template.
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_owned),
            Some(_) => {
                return Err(Error::field(
                    path,
                    "chat_template",
                    "expected a string or a list of {name, template}",
                ))
            }
        };
        if let Some(v) = config.get("add_bos_token") {
            self.add_bos = v
                .as_bool()
                .ok_or_else(|| Error::field(path, "add_bos_token", "expected true or false"))?;
        }
        if let Some(bos) = self.special_token_id(config, "bos_token", path)? {
            self.bos_id = Some(bos);
        }
        if let Some(eos) = self.special_token_id(config, "eos_token", path)? {
            self.eos_ids.push(eos);
        }
        if let Some(pad) = self.special_token_id(config, "pad_token", path)? {
            self.pad_id = Some(pad);
        }
        Ok(())
    }

    /// The id of a `tokenizer_config.json` special token, given either as a string or
    /// as an object with `content`. Unknown tokens are ignored: configs sometimes
    /// name tokens the vocabulary lacks, and that must not stop the model loading.
    fn special_token_id(&self, config: &Json, field: &str, path: &Path) -> Result<Option<u32>> {
        let content = match config.get(field) {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => s.as_str(),
            Some(v) => v.get("content").and_then(Json::as_str).ok_or_else(|| {
                Error::field(path, field, "expected a string or an object with `content`")
            })?,
        };
        Ok(self.inner.token_to_id(content))
    }

    /// Adds the turn-end tokens of the chat format to the EOS set (see `TURN_END_TOKENS`).
    fn with_turn_end_tokens(mut self) -> Self {
        let template = self.chat_template.as_deref().unwrap_or("");
        let mut extra: Vec<u32> = TURN_END_TOKENS
            .iter()
            .filter(|t| template.contains(*t))
            .filter_map(|t| self.inner.token_to_id(t))
            .collect();
        extra.extend(self.inner.token_to_id(END_OF_TEXT));
        for id in extra {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
        self
    }

    /// Tokenizes `text`. Special tokens written in the text (`<|im_start|>`) become
    /// their single ids. With `add_special_tokens`, the tokenizer's own post-processor
    /// runs and BOS is prepended when the configuration asks for it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens && self.add_bos {
            if let Some(bos) = self.bos_id {
                // A tokenizer.json post-processor may already have added it.
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Turns ids back into text; `skip_special_tokens` drops control tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The vocabulary string of `id` (byte-level form, e.g. `Ġthe`), used to check
    /// that two models share a vocabulary.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every id that ends generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of a prompt: in `chat` mode one user turn (after an optional system
    /// turn) rendered by the chat template with the generation prompt, else the plain text
    /// with the tokenizer's own special tokens (BOS where the model wants one).
    pub fn encode_prompt(&self, text: &str, chat: bool, system: Option<&str>) -> Result<Vec<u32>> {
        if !chat {
            return self.encode(text, true);
        }
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.into(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: text.into(),
        });
        let rendered = self.apply_chat_template(&messages, true)?;
        self.encode(&rendered, false)
    }

    /// The tokens every chat prompt with this system turn starts with: the template's
    /// opening up to where the user's words go (the system turn, the user header). An
    /// engine can read them before the user has typed anything. Found as what two
    /// prompts with different user words share, so a template that merges the header
    /// into the first word just yields a shorter opening.
    pub fn chat_opening(&self, system: Option<&str>) -> Result<Vec<u32>> {
        let a = self.encode_prompt("a", true, system)?;
        let b = self.encode_prompt("b", true, system)?;
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        Ok(a[..shared].to_vec())
    }

    /// Renders the model's chat template like `transformers`' `apply_chat_template`
    /// (trim_blocks, lstrip_blocks, Python string methods, `raise_exception`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template(
                "model has no chat template (tokenizer.chat_template / chat_template in \
                 tokenizer_config.json); pass a raw prompt instead"
                    .into(),
            )
        })?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        let token = |id: Option<u32>| id.and_then(|id| self.token_str(id)).unwrap_or_default();
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => token(self.bos_id),
            eos_token => token(self.eos_ids.first().copied()),
        };
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        let mut out = CappedOutput::default();
        let rendered = env
            .template_from_str(template)
            .and_then(|t| t.render_captured_to(context, &mut out).map(drop));
        match rendered {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| Error::Template("rendered text is not valid UTF-8".into())),
            Err(_) if out.overflowed => Err(Error::Template(format!(
                "the rendered prompt exceeds {CHAT_TEMPLATE_MAX_OUTPUT} bytes; the template \
                 loops or repeats text without bound"
            ))),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::Template(format!(
                "the template ran more than {CHAT_TEMPLATE_FUEL} steps without finishing; it \
                 loops without bound"
            ))),
            Err(e) => Err(Error::Template(render_error(&e))),
        }
    }
}

/// How many minijinja instructions one chat-template render may run. Real templates
/// take a few hundred per message; a template with nested loops over large ranges
/// would otherwise run for hours.
const CHAT_TEMPLATE_FUEL: u64 = 2_000_000;
/// The largest rendered prompt accepted: far beyond any context window, so only a
/// runaway template reaches it.
const CHAT_TEMPLATE_MAX_OUTPUT: usize = 1 << 20;

/// The render's output, which refuses to grow past `CHAT_TEMPLATE_MAX_OUTPUT`.
#[derive(Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > CHAT_TEMPLATE_MAX_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `raise_exception(msg)` chat templates call to reject a conversation.
fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        message,
    ))
}

/// A minijinja error with its causes, on one line.
fn render_error(e: &minijinja::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// Checks that two tokenizers give every shared id the same string; the error names
/// the first id that differs.
pub fn same_vocabulary(a: &TextTokenizer, b: &TextTokenizer) -> std::result::Result<(), String> {
    let shared = a.vocab_size().min(b.vocab_size());
    for id in 0..shared as u32 {
        let (ta, tb) = (a.token_str(id), b.token_str(id));
        if ta != tb {
            return Err(format!(
                "token {id} differs: {:?} vs {:?}",
                ta.as_deref().unwrap_or("<none>"),
                tb.as_deref().unwrap_or("<none>")
            ));
        }
    }
    Ok(())
}

/// Incremental detokeniser for streaming. Decoding tokens one by one would split
/// multi-byte characters and lose spaces that depend on neighbours, so it decodes the
/// text since the last emission and hands out only what has grown and is complete
/// (does not end in U+FFFD, the mark of a character whose bytes are still coming).
#[derive(Clone, Debug)]
pub struct TokenOutputStream {
    tokenizer: TextTokenizer,
    tokens: Vec<u32>,
    /// Start of the tokens whose text has not been fully handed out.
    prev_index: usize,
    /// End of the tokens whose text has been handed out.
    current_index: usize,
}

impl TokenOutputStream {
    pub fn new(tokenizer: TextTokenizer) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prev_index: 0,
            current_index: 0,
        }
    }

    /// Adds a generated token; returns the new text, if any is complete yet.
    pub fn next_token(&mut self, id: u32) -> Result<Option<String>> {
        let emitted = self.decode(self.prev_index..self.current_index)?;
        self.tokens.push(id);
        let text = self.decode(self.prev_index..self.tokens.len())?;
        if text.len() <= emitted.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new) = text.get(emitted.len()..) else {
            return Ok(None);
        };
        let new = new.to_owned();
        self.prev_index = self.current_index;
        self.current_index = self.tokens.len();
        Ok(Some(new))
    }

    /// The text not handed out yet (call once generation ends).
    pub fn flush(&mut self) -> Result<Option<String>> {
        let emitted = self.decode(self.prev_index..self.current_index)?;
        let text = self.decode(self.prev_index..self.tokens.len())?;
        self.prev_index = self.tokens.len();
        self.current_index = self.tokens.len();
        Ok(text
            .get(emitted.len()..)
            .filter(|rest| !rest.is_empty())
            .map(str::to_owned))
    }

    /// All tokens seen so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    fn decode(&self, range: std::ops::Range<usize>) -> Result<String> {
        match self.tokens.get(range) {
            Some(ids) if !ids.is_empty() => self.tokenizer.decode(ids, true),
            _ => Ok(String::new()),
        }
    }
}

/// `Tokenizer::from_bytes` made safe against malformed files. tokenizers 0.22 panics
/// instead of returning an error on some of them: its decoder deserializer calls
/// `expect("Helper")` on a JSON syntax error inside `decoder`, and its normalizer
/// deserializer `expect`s a valid `Precompiled` charsmap. Checking the JSON syntax
/// first turns the common case into a clean error with line and column; the
/// `catch_unwind` is the last resort for the panics a well-formed file can still
/// reach (the panic message is printed by the hook, then reported here as an error).
fn build_tokenizer(json: &[u8], path: &Path) -> Result<Tokenizer> {
    serde_json::from_slice::<serde::de::IgnoredAny>(json)
        .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    let built = std::panic::catch_unwind(|| Tokenizer::from_bytes(json)).map_err(|_| {
        Error::format(
            path,
            "the tokenizers library panicked while reading this file; it is malformed",
        )
    })?;
    built.map_err(|e| Error::format(path, e.to_string()))
}

/// Reads a file that may legitimately be absent.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match read_regular_file(path, MAX_JSON_FILE_LEN) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Token ids given as one number or a list (`eos_token_id` in `config.json`).
fn json_ids(path: &Path, field: &str, value: Option<&Json>) -> Result<Vec<u32>> {
    let bad = || Error::field(path, field, "expected a token id or a list of token ids");
    let as_id = |v: &Json| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(bad)
    };
    match value {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(list)) => list.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}
