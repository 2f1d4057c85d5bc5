//! Preference data for ARM training: JSONL files of (prompt, chosen, rejected) pairs in
//! the layouts public preference datasets use, and their tokenization.
//!
//! # Formats
//!
//! One JSON object per line; blank lines are skipped. A bad record is an
//! [`Error::Format`] naming the file and the line (`line 7: missing field "rejected"`),
//! so a problem deep inside a large dataset can be found with an editor.
//!
//! - [`PrefFormat::Trl`]: `{prompt, chosen, rejected}`, each a string or (TRL's
//!   "conversational" style) a list of `{role, content}` messages: the prompt holds the
//!   turns before the answer, chosen/rejected hold the one assistant turn.
//! - [`PrefFormat::HhRlhf`]: Anthropic HH-RLHF, `{chosen, rejected}` full transcripts
//!   (`"\n\nHuman: ...\n\nAssistant: ..."`). The prompt is the longest shared prefix
//!   ending with the last `"\n\nAssistant:"`, turned into user/assistant messages so
//!   the model's chat template applies; the responses are what follows it.
//! - [`PrefFormat::PkuSafeRlhf`]: `{prompt, response_0, response_1, better_response_id,
//!   safer_response_id}`; ids are 0/1 (or false/true) and [`PkuLabel`] picks which
//!   label decides the chosen response.
//! - [`PrefFormat::UltraFeedback`]: UltraFeedback-binarized, `{prompt, chosen, rejected}`
//!   where chosen/rejected are whole conversations: the prompt is every message but the
//!   last, the response is the last message.
//!
//! # Truncation policy
//!
//! Limits are counted in tokens, after the chat template and the end-of-turn token:
//!
//! 1. The prompt keeps its **last** `max_prompt_len` tokens. The end of a prompt (the
//!    question, the generation prompt `<|im_start|>assistant\n`) is what the answer
//!    depends on most; its beginning (a system prompt, old turns) matters least.
//! 2. Each response is then cut on the **right** so that prompt + response ≤ `max_len`.
//!    A cut response loses its end-of-turn token, which is right: it no longer ends
//!    there, and the ARM must not learn that it does.
//! 3. A pair whose chosen or rejected response is empty, or whose two responses are
//!    identical after the cut, carries no preference signal: [`tokenize_pair`] returns
//!    `None` and the caller counts it as skipped.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::tokenizer::{ChatMessage, TextTokenizer};

/// Errors inside one record, before the file and line are attached.
type RecordResult<T> = std::result::Result<T, String>;
type Record = Map<String, Value>;

/// The HH-RLHF turn markers.
const HH_HUMAN: &str = "\n\nHuman:";
const HH_ASSISTANT: &str = "\n\nAssistant:";

/// The names `PrefFormat::from_str` accepts, for error messages.
const FORMAT_NAMES: &str = "trl, hh-rlhf, pku-better, pku-safer, ultrafeedback";

/// Which PKU-SafeRLHF label decides the chosen response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkuLabel {
    /// `better_response_id`: helpfulness.
    Better,
    /// `safer_response_id`: harmlessness.
    Safer,
}

/// The layout of a preference file (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefFormat {
    Trl,
    HhRlhf,
    PkuSafeRlhf(PkuLabel),
    UltraFeedback,
}

impl PrefFormat {
    /// The name `from_str` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Self::Trl => "trl",
            Self::HhRlhf => "hh-rlhf",
            Self::PkuSafeRlhf(PkuLabel::Better) => "pku-better",
            Self::PkuSafeRlhf(PkuLabel::Safer) => "pku-safer",
            Self::UltraFeedback => "ultrafeedback",
        }
    }
}

impl fmt::Display for PrefFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PrefFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "trl" => Self::Trl,
            "hh-rlhf" => Self::HhRlhf,
            "pku-better" => Self::PkuSafeRlhf(PkuLabel::Better),
            "pku-safer" => Self::PkuSafeRlhf(PkuLabel::Safer),
            "ultrafeedback" => Self::UltraFeedback,
            other => {
                return Err(Error::Request(format!(
                    "unknown preference format `{other}`; expected one of {FORMAT_NAMES}"
                )))
            }
        })
    }
}

/// Guesses the format from the fields of the first record, so common datasets load
/// without a flag. PKU-SafeRLHF records carry both labels; detection picks
/// `better_response_id`, pass `pku-safer` explicitly for the other one.
/// Conversational chosen/rejected lists that hold a user turn are UltraFeedback's
/// whole conversations; lists of assistant turns only are TRL's.
pub fn detect(first_record: &Value) -> Option<PrefFormat> {
    let record = first_record.as_object()?;
    let has = |name: &str| record.contains_key(name);
    if has("response_0") && has("response_1") {
        return Some(PrefFormat::PkuSafeRlhf(PkuLabel::Better));
    }
    let chosen = record.get("chosen")?;
    if !has("rejected") {
        return None;
    }
    match chosen {
        Value::Array(messages) if messages.iter().any(|m| !is_assistant(m)) => {
            Some(PrefFormat::UltraFeedback)
        }
        Value::String(text) if !has("prompt") && text.contains(HH_ASSISTANT) => {
            Some(PrefFormat::HhRlhf)
        }
        _ if has("prompt") => Some(PrefFormat::Trl),
        _ => None,
    }
}

/// Whether a JSON message object has the assistant role.
fn is_assistant(message: &Value) -> bool {
    message.get("role").and_then(Value::as_str) == Some("assistant")
}

/// What the model is asked: raw text, or chat turns for the model's chat template.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

impl Prompt {
    /// The prompt as chat turns: a text prompt is one user message.
    pub fn messages(&self) -> Vec<ChatMessage> {
        match self {
            Self::Text(text) => vec![message("user", text)],
            Self::Chat(messages) => messages.clone(),
        }
    }
}

// By hand because `ChatMessage` does not implement `PartialEq`.
impl PartialEq for Prompt {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Text(a), Self::Text(b)) => a == b,
            (Self::Chat(a), Self::Chat(b)) => same_messages(a, b),
            _ => false,
        }
    }
}

fn same_messages(a: &[ChatMessage], b: &[ChatMessage]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.role == y.role && x.content == y.content)
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.to_owned(),
        content: content.to_owned(),
    }
}

/// One preference: the same prompt answered twice, `chosen` preferred over `rejected`.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub prompt: Prompt,
    pub chosen: String,
    pub rejected: String,
}

/// Reads a JSONL preference file; `format: None` detects it from the first record.
pub fn read_pairs(path: &Path, format: Option<PrefFormat>) -> Result<Vec<PreferencePair>> {
    Ok(read_numbered_pairs(path, format)?
        .into_iter()
        .map(|(_, pair)| pair)
        .collect())
}

/// Like `read_pairs`, each pair with its 1-based line number, for errors found later.
pub fn read_numbered_pairs(
    path: &Path,
    format: Option<PrefFormat>,
) -> Result<Vec<(usize, PreferencePair)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_numbered_pairs(&text, path, format)
}

/// Parses JSONL text; `path` only names the file in errors. `format: None` detects
/// the format from the first record and applies it to every line.
pub fn parse_pairs(
    text: &str,
    path: &Path,
    format: Option<PrefFormat>,
) -> Result<Vec<PreferencePair>> {
    Ok(parse_numbered_pairs(text, path, format)?
        .into_iter()
        .map(|(_, pair)| pair)
        .collect())
}

fn parse_numbered_pairs(
    text: &str,
    path: &Path,
    format: Option<PrefFormat>,
) -> Result<Vec<(usize, PreferencePair)>> {
    let mut format = format;
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at_line =
            |message: String| Error::format(path, format!("line {}: {message}", index + 1));
        let value = parse_json(line).map_err(at_line)?;
        let record_format = match format {
            Some(f) => f,
            None => *format.insert(detect(&value).ok_or_else(|| at_line(undetected(&value)))?),
        };
        pairs.push((
            index + 1,
            parse_record(&value, record_format).map_err(at_line)?,
        ));
    }
    Ok(pairs)
}

/// Parses one line. serde_json's message ends in "at line 1 column N", which would
/// contradict the file's line number, so only the column is kept.
fn parse_json(line: &str) -> RecordResult<Value> {
    serde_json::from_str(line).map_err(|e| {
        let message = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let reason = message.strip_suffix(&suffix).unwrap_or(&message);
        format!("invalid JSON (column {}): {reason}", e.column())
    })
}

/// The error for a first record whose format cannot be guessed.
fn undetected(value: &Value) -> String {
    let fields = match value.as_object() {
        Some(record) => record
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        None => return "expected a JSON object".into(),
    };
    format!(
        "cannot detect the preference format from the fields {{{fields}}}; \
         name it explicitly (one of {FORMAT_NAMES})"
    )
}

fn parse_record(value: &Value, format: PrefFormat) -> RecordResult<PreferencePair> {
    let record = value
        .as_object()
        .ok_or_else(|| "expected a JSON object".to_owned())?;
    match format {
        PrefFormat::Trl => trl(record),
        PrefFormat::HhRlhf => hh_rlhf(record),
        PrefFormat::PkuSafeRlhf(label) => pku(record, label),
        PrefFormat::UltraFeedback => ultrafeedback(record),
    }
}

fn field<'a>(record: &'a Record, name: &str) -> RecordResult<&'a Value> {
    record
        .get(name)
        .ok_or_else(|| format!("missing field {name:?}"))
}

fn string_field(record: &Record, name: &str) -> RecordResult<String> {
    match field(record, name)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!(
            "field {name:?}: expected a string, got {}",
            kind(other)
        )),
    }
}

/// A JSON type name for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A list of `{role, content}` messages.
fn messages(value: &Value, name: &str) -> RecordResult<Vec<ChatMessage>> {
    let Value::Array(items) = value else {
        return Err(format!(
            "field {name:?}: expected a list of {{role, content}} messages, got {}",
            kind(value)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let text = |key: &str| {
                item.get(key).and_then(Value::as_str).ok_or_else(|| {
                    format!("field {name:?}: message {i}: expected a string `{key}`")
                })
            };
            Ok(message(text("role")?, text("content")?))
        })
        .collect()
}

/// TRL: string fields, or conversational messages.
fn trl(record: &Record) -> RecordResult<PreferencePair> {
    let prompt = match field(record, "prompt")? {
        Value::String(text) => Prompt::Text(text.clone()),
        other => Prompt::Chat(messages(other, "prompt")?),
    };
    Ok(PreferencePair {
        prompt,
        chosen: trl_response(record, "chosen")?,
        rejected: trl_response(record, "rejected")?,
    })
}

/// A TRL response: a string, or a list holding the one assistant turn.
fn trl_response(record: &Record, name: &str) -> RecordResult<String> {
    let value = field(record, name)?;
    if let Value::String(text) = value {
        return Ok(text.clone());
    }
    let turns = messages(value, name)?;
    match turns.as_slice() {
        [answer] if answer.role == "assistant" => Ok(answer.content.clone()),
        [other] => Err(format!(
            "field {name:?}: expected an assistant message, got role {:?} \
             (whole conversations are the ultrafeedback format)",
            other.role
        )),
        _ => Err(format!(
            "field {name:?}: expected one assistant message, got {}",
            turns.len()
        )),
    }
}

/// HH-RLHF: split two transcripts at the last shared `"\n\nAssistant:"`.
fn hh_rlhf(record: &Record) -> RecordResult<PreferencePair> {
    let chosen = string_field(record, "chosen")?;
    let rejected = string_field(record, "rejected")?;
    let shared = common_prefix_len(&chosen, &rejected);
    let prompt_end = chosen[..shared]
        .rfind(HH_ASSISTANT)
        .map(|at| at + HH_ASSISTANT.len())
        .ok_or_else(|| {
            format!("chosen and rejected share no prompt ending with {HH_ASSISTANT:?}")
        })?;
    let answer = |text: &str| {
        let rest = &text[prompt_end..];
        rest.strip_prefix(' ').unwrap_or(rest).to_owned()
    };
    Ok(PreferencePair {
        prompt: Prompt::Chat(hh_turns(&chosen[..prompt_end])),
        chosen: answer(&chosen),
        rejected: answer(&rejected),
    })
}

/// Length in bytes of the longest common prefix, on a character boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((at, _), _)| at)
}

/// An HH-RLHF prompt as chat turns. The final empty `Assistant:` turn is dropped: the
/// chat template's generation prompt stands for it. Text before the first marker
/// (rare) is kept as a user turn rather than lost.
fn hh_turns(prompt: &str) -> Vec<ChatMessage> {
    let mut turns = Vec::new();
    let mut role = "user";
    let mut rest = prompt;
    loop {
        let next = [(HH_HUMAN, "user"), (HH_ASSISTANT, "assistant")]
            .into_iter()
            .filter_map(|(marker, r)| rest.find(marker).map(|at| (at, marker.len(), r)))
            .min_by_key(|&(at, _, _)| at);
        let (content, following) = match next {
            Some((at, len, r)) => (&rest[..at], Some((at + len, r))),
            None => (rest, None),
        };
        let content = content.trim();
        if !content.is_empty() {
            turns.push(message(role, content));
        }
        let Some((skip, next_role)) = following else {
            return turns;
        };
        rest = &rest[skip..];
        role = next_role;
    }
}

/// PKU-SafeRLHF: two responses and a 0/1 label.
fn pku(record: &Record, label: PkuLabel) -> RecordResult<PreferencePair> {
    let prompt = string_field(record, "prompt")?;
    let responses = [
        string_field(record, "response_0")?,
        string_field(record, "response_1")?,
    ];
    let label_field = match label {
        PkuLabel::Better => "better_response_id",
        PkuLabel::Safer => "safer_response_id",
    };
    let chosen = response_id(field(record, label_field)?, label_field)?;
    let [r0, r1] = responses;
    let (chosen, rejected) = if chosen == 0 { (r0, r1) } else { (r1, r0) };
    Ok(PreferencePair {
        prompt: Prompt::Text(prompt),
        chosen,
        rejected,
    })
}

/// A response id: 0 or 1, written as a number or a bool (some exports use bools).
fn response_id(value: &Value, name: &str) -> RecordResult<usize> {
    match value {
        Value::Bool(b) => Ok(usize::from(*b)),
        Value::Number(n) => match n.as_u64() {
            Some(id @ (0 | 1)) => Ok(id as usize),
            _ => Err(format!("field {name:?}: expected 0 or 1, got {n}")),
        },
        other => Err(format!(
            "field {name:?}: expected 0 or 1, got {}",
            kind(other)
        )),
    }
}

/// UltraFeedback-binarized: two whole conversations that differ in the last turn.
fn ultrafeedback(record: &Record) -> RecordResult<PreferencePair> {
    let chosen = messages(field(record, "chosen")?, "chosen")?;
    let rejected = messages(field(record, "rejected")?, "rejected")?;
    let (chosen_prompt, chosen_answer) = split_answer(&chosen, "chosen")?;
    let (rejected_prompt, rejected_answer) = split_answer(&rejected, "rejected")?;
    if !same_messages(chosen_prompt, rejected_prompt) {
        return Err("chosen and rejected differ before their last message".into());
    }
    // A conversation of the answer alone: the prompt is only in `prompt`.
    let prompt = if chosen_prompt.is_empty() {
        Prompt::Text(string_field(record, "prompt")?)
    } else {
        Prompt::Chat(chosen_prompt.to_vec())
    };
    Ok(PreferencePair {
        prompt,
        chosen: chosen_answer.to_owned(),
        rejected: rejected_answer.to_owned(),
    })
}

/// A conversation's turns before the final assistant message, and that message's text.
fn split_answer<'a>(
    conversation: &'a [ChatMessage],
    name: &str,
) -> RecordResult<(&'a [ChatMessage], &'a str)> {
    match conversation.split_last() {
        Some((last, prompt)) if last.role == "assistant" => Ok((prompt, &last.content)),
        Some((last, _)) => Err(format!(
            "field {name:?}: the last message should be the assistant's, got role {:?}",
            last.role
        )),
        None => Err(format!("field {name:?}: empty conversation")),
    }
}

/// A pair as token ids. `chosen` and `rejected` continue `prompt`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// Token budgets (see the truncation policy in the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct LengthLimits {
    /// Most prompt tokens kept (its end).
    pub max_prompt_len: usize,
    /// Most tokens of prompt + one response.
    pub max_len: usize,
}

/// Tokenizes a pair and applies the length limits. `chat` renders the prompt with the
/// model's chat template and ends each response with the end-of-turn token (the
/// tokenizer's first EOS id), so the ARM learns where answers end. `Ok(None)`: the
/// pair carries no preference after truncation (an empty response, or chosen ==
/// rejected), and should be skipped.
pub fn tokenize_pair(
    pair: &PreferencePair,
    tok: &TextTokenizer,
    chat: bool,
    limits: LengthLimits,
) -> Result<Option<TokenizedPair>> {
    if limits.max_prompt_len >= limits.max_len {
        return Err(Error::Request(format!(
            "max_prompt_len ({}) must be below max_len ({}) to leave room for a response",
            limits.max_prompt_len, limits.max_len
        )));
    }
    let mut prompt = encode_prompt(&pair.prompt, tok, chat)?;
    if prompt.is_empty() {
        // The first response token is scored given the tokens before it.
        return Err(Error::Request(
            "the prompt is empty (no tokens): an ARM scores each response token given the \
             tokens before it, so a pair needs a prompt (or --chat, whose template adds some)"
                .into(),
        ));
    }
    keep_last(&mut prompt, limits.max_prompt_len);
    let budget = limits.max_len - prompt.len();
    let end_of_turn = if chat { Some(end_of_turn(tok)?) } else { None };
    let chosen = encode_response(&pair.chosen, tok, end_of_turn, budget)?;
    let rejected = encode_response(&pair.rejected, tok, end_of_turn, budget)?;
    if chosen.is_empty() || rejected.is_empty() || chosen == rejected {
        return Ok(None);
    }
    Ok(Some(TokenizedPair {
        prompt,
        chosen,
        rejected,
    }))
}

/// The prompt's ids. In chat mode the template supplies BOS and the generation
/// prompt, so no special tokens are added; raw text gets the tokenizer's own.
fn encode_prompt(prompt: &Prompt, tok: &TextTokenizer, chat: bool) -> Result<Vec<u32>> {
    match (prompt, chat) {
        (Prompt::Text(text), false) => tok.encode(text, true),
        (Prompt::Chat(_), false) => Err(Error::Request(
            "a chat prompt needs chat mode (the model's chat template) to be tokenized".into(),
        )),
        (prompt, true) => {
            let text = tok.apply_chat_template(&prompt.messages(), true)?;
            tok.encode(&text, false)
        }
    }
}

/// The end-of-turn id that closes chat responses: the first EOS id, which is the
/// template's turn end (`<|im_end|>`) for chat models.
fn end_of_turn(tok: &TextTokenizer) -> Result<u32> {
    tok.eos_ids().first().copied().ok_or_else(|| {
        Error::Tokenizer(
            "chat mode needs an EOS (end-of-turn) token; the tokenizer has none".into(),
        )
    })
}

/// A response's ids (no special tokens), closed by `end_of_turn`, cut to `budget`.
fn encode_response(
    text: &str,
    tok: &TextTokenizer,
    end_of_turn: Option<u32>,
    budget: usize,
) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, false)?;
    ids.extend(end_of_turn);
    ids.truncate(budget);
    Ok(ids)
}

/// Keeps the last `n` ids.
fn keep_last(ids: &mut Vec<u32>, n: usize) {
    let excess = ids.len().saturating_sub(n);
    ids.drain(..excess);
}
