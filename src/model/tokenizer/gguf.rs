//! The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata, rebuilt as a
//! `tokenizers::Tokenizer` the way llama.cpp reads it: byte-level BPE (`gpt2`: Llama 3,
//! Qwen2, SmolLM) with the pre-tokenizer `tokenizer.ggml.pre` names, or SentencePiece BPE
//! (`llama`: Llama 2, Mistral) with merges derived from the piece scores.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::TextTokenizer;
use crate::error::{Error, Result};

/// GGUF token types (llama.cpp's `llama_token_type`, SentencePiece's piece types).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama-3's pre-tokenizer split (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer split: like Llama-3's but one digit per piece.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// SentencePiece's stand-in for a space.
const SPM_SPACE: &str = "\u{2581}";

/// See [`TextTokenizer::from_gguf`].
pub(super) fn from_metadata(
    metadata: &HashMap<String, Value>,
    path: &Path,
) -> Result<Option<TextTokenizer>> {
    let meta = Meta { metadata, path };
    let Some(tokens) = meta.get("tokenizer.ggml.tokens") else {
        return Ok(None);
    };
    let tokens = string_array(&meta, "tokenizer.ggml.tokens", tokens)?;
    let model = meta.string("tokenizer.ggml.model")?.unwrap_or("gpt2");
    let inner = match model {
        "gpt2" => byte_level_bpe(&meta, &tokens)?,
        "llama" => sentencepiece_bpe(&meta, &tokens)?,
        other => {
            return Err(Error::unsupported(
                path,
                format!(
                    "tokenizer model `{other}` (tokenizer.ggml.model); the GGUF tokenizers \
                     implemented are byte-level BPE (`gpt2`) and SentencePiece BPE \
                     (`llama`), use the model's tokenizer.json"
                ),
            ))
        }
    };
    let eos_ids = meta
        .u32("tokenizer.ggml.eos_token_id")?
        .into_iter()
        .collect();
    let tokenizer = TextTokenizer {
        inner: Arc::new(inner),
        bos_id: meta.u32("tokenizer.ggml.bos_token_id")?,
        eos_ids,
        pad_id: meta.u32("tokenizer.ggml.padding_token_id")?,
        // llama.cpp's defaults: SentencePiece models start with BOS, BPE ones do not.
        add_bos: meta
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(model == "llama"),
        chat_template: meta.string("tokenizer.chat_template")?.map(str::to_owned),
    };
    Ok(Some(tokenizer.with_turn_end_tokens()))
}

/// GGUF metadata with the file path, for typed lookups whose errors name the key.
struct Meta<'a> {
    metadata: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.metadata.get(key)
    }

    fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::field(PathBuf::from(self.path), key, message)
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.error(key, format!("expected a string, got {:?}", v.value_type()))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.error(key, format!("expected a bool, got {:?}", v.value_type()))),
        }
    }

    fn u32(&self, key: &str) -> Result<Option<u32>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        integer(value)
            .and_then(|i| u32::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| self.error(key, format!("expected a token id, got {value:?}")))
    }

    fn required(&self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| self.error(key, "missing"))
    }
}

/// Any GGUF integer type as i64 (writers differ in which width they use).
fn integer(value: &Value) -> Option<i64> {
    Some(match *value {
        Value::U8(v) => v.into(),
        Value::I8(v) => v.into(),
        Value::U16(v) => v.into(),
        Value::I16(v) => v.into(),
        Value::U32(v) => v.into(),
        Value::I32(v) => v.into(),
        Value::U64(v) => i64::try_from(v).ok()?,
        Value::I64(v) => v,
        _ => return None,
    })
}

fn float_array(meta: &Meta<'_>, key: &str, value: &Value) -> Result<Vec<f32>> {
    let Value::Array(items) = value else {
        return Err(meta.error(key, "expected an array of floats"));
    };
    items
        .iter()
        .map(|item| match item {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            other => Err(meta.error(key, format!("expected floats, found {other:?}"))),
        })
        .collect()
}

fn string_array<'a>(meta: &Meta<'_>, key: &str, value: &'a Value) -> Result<Vec<&'a str>> {
    let Value::Array(items) = value else {
        return Err(meta.error(key, "expected an array of strings"));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.as_str()),
            other => Err(meta.error(key, format!("expected strings, found {other:?}"))),
        })
        .collect()
}

/// The byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`) of a GGUF file.
fn byte_level_bpe(meta: &Meta<'_>, tokens: &[&str]) -> Result<Tokenizer> {
    const MERGES: &str = "tokenizer.ggml.merges";
    let merges: Merges = string_array(meta, MERGES, meta.required(MERGES)?)?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| meta.error(MERGES, format!("merge {merge:?} is not `a b`")))
        })
        .collect::<Result<_>>()?;
    // Ids are positions; a duplicated string keeps its first id.
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry((*token).to_owned()).or_insert(id as u32);
    }
    let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("gpt2");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        // Llama-3 tokenizes whole vocabulary words directly, as its tokenizer.json does.
        .ignore_merges(matches!(pre, "llama-bpe" | "llama3"))
        .build()
        .map_err(|e| meta.error(MERGES, format!("cannot build BPE: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(byte_level_pre_tokenizer(meta, pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.add_special_tokens(&special_tokens(meta, tokens)?);
    Ok(tokenizer)
}

/// The SentencePiece BPE tokenizer (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral)
/// of a GGUF file, built as `transformers` converts a SentencePiece model: spaces become
/// `▁` (plus one in front unless `tokenizer.ggml.add_space_prefix` is false), pieces merge
/// in order of score, and characters outside the vocabulary fall back to `<0xXX>` bytes.
fn sentencepiece_bpe(meta: &Meta<'_>, tokens: &[&str]) -> Result<Tokenizer> {
    const SCORES: &str = "tokenizer.ggml.scores";
    let scores = float_array(meta, SCORES, meta.required(SCORES)?)?;
    if scores.len() != tokens.len() {
        return Err(meta.error(
            SCORES,
            format!("{} scores for {} tokens", scores.len(), tokens.len()),
        ));
    }
    let types = token_types(meta, tokens.len())?;
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry((*token).to_owned()).or_insert(id as u32);
    }
    let unk_id = match meta.u32("tokenizer.ggml.unknown_token_id")? {
        Some(id) => Some(id),
        None => types
            .as_ref()
            .and_then(|t| t.iter().position(|&k| k == TOKEN_TYPE_UNKNOWN))
            .map(|i| i as u32),
    };
    let merges = merges_by_score(tokens, &scores, &vocab);
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk_id.and_then(|id| tokens.get(id as usize)) {
        bpe = bpe.unk_token((*unk).to_owned());
    }
    let bpe = bpe
        .build()
        .map_err(|e| meta.error(SCORES, format!("cannot build BPE: {e}")))?;

    let replace = |from: &str, to: &str| Replace::new(from, to).expect("a plain-string pattern");
    let mut normalizers = vec![replace(" ", SPM_SPACE).into()];
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPM_SPACE, " ").into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true)
    {
        normalizers.insert(0, Prepend::new(SPM_SPACE.to_owned()).into());
        // The space the prefix added is not part of the text.
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    tokenizer.add_special_tokens(&special_tokens(meta, tokens)?);
    Ok(tokenizer)
}

/// BPE merges equivalent to SentencePiece's rule (repeatedly join the adjacent pair
/// whose union is the highest-scoring piece): every split of every piece into two
/// pieces, ordered by the joined piece's score, then by ids.
fn merges_by_score(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Merges {
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((scores[id], id as u32, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].to_owned(), tokens[r as usize].to_owned()))
        .collect()
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`. Unknown names fall back
/// to GPT-2's, which is right for most byte-level BPE models.
fn byte_level_pre_tokenizer(meta: &Meta<'_>, pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level =
        |use_regex| -> PreTokenizerWrapper { ByteLevel::new(false, true, use_regex).into() };
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| meta.error("tokenizer.ggml.pre", format!("bad split regex: {e}")))?;
        Ok(Sequence::new(vec![split.into(), byte_level(false)]).into())
    };
    Ok(match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
        "llama-bpe" | "llama3" => split_then_bytes(LLAMA3_SPLIT)?,
        "qwen2" => split_then_bytes(QWEN2_SPLIT)?,
        _ => byte_level(true),
    })
}

/// `tokenizer.ggml.token_type`, one integer per token, if present.
fn token_types(meta: &Meta<'_>, n_tokens: usize) -> Result<Option<Vec<i64>>> {
    const TYPES: &str = "tokenizer.ggml.token_type";
    let Some(types) = meta.get(TYPES) else {
        return Ok(None);
    };
    let Value::Array(types) = types else {
        return Err(meta.error(TYPES, "expected an array of integers"));
    };
    if types.len() != n_tokens {
        return Err(meta.error(
            TYPES,
            format!("{} entries for {n_tokens} tokens", types.len()),
        ));
    }
    types
        .iter()
        .map(|kind| {
            integer(kind)
                .ok_or_else(|| meta.error(TYPES, format!("expected integers, found {kind:?}")))
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// Control (3) and user-defined (4) tokens, matched whole before BPE. Only control
/// tokens are special, i.e. dropped by `decode(.., skip_special_tokens: true)`.
fn special_tokens(meta: &Meta<'_>, tokens: &[&str]) -> Result<Vec<AddedToken>> {
    let types = token_types(meta, tokens.len())?.unwrap_or_default();
    Ok(tokens
        .iter()
        .zip(types)
        .filter(|(token, kind)| {
            !token.is_empty() && (*kind == TOKEN_TYPE_CONTROL || *kind == TOKEN_TYPE_USER_DEFINED)
        })
        .map(|(token, kind)| AddedToken::from(*token, kind == TOKEN_TYPE_CONTROL).normalized(false))
        .collect())
}
