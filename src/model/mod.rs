//! Checkpoints in: GGUF files, HF model directories, PEFT LoRA adapters; their configs
//! and tokenizers. Everything here is independent of the engine that runs the model.

pub mod config;
pub mod gguf;
pub mod lora;
pub mod safetensors;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use config::{HfConfig, LlamaConfig};
use gguf::GgufFile;
use safetensors::SafetensorsFiles;
use tokenizer::TextTokenizer;
use weights::WeightSource;

/// The token ids that end generation: the config's EOS ids and the tokenizer's (which
/// adds end-of-turn tokens such as `<|im_end|>`), sorted and deduplicated.
pub fn stop_token_ids(config: &LlamaConfig, tokenizer: Option<&TextTokenizer>) -> Vec<u32> {
    let mut ids = config.eos_token_ids.clone();
    if let Some(t) = tokenizer {
        ids.extend_from_slice(t.eos_ids());
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A full model checkpoint, opened: its weights, config and (if it has one) tokenizer.
pub struct Checkpoint {
    pub path: PathBuf,
    pub source: Box<dyn WeightSource>,
    pub config: LlamaConfig,
    pub tokenizer: Option<TextTokenizer>,
    /// Why `tokenizer` is `None` when the file has one this crate cannot build (e.g. a
    /// SentencePiece GGUF vocabulary): the model still runs on token ids.
    pub tokenizer_note: Option<String>,
}

impl Checkpoint {
    /// Opens a `.gguf` file or an HF model directory (`config.json` + safetensors).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_hf_dir(path)
        } else if path.is_file() {
            Self::open_gguf(path)
        } else {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
    }

    pub fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = file.config()?;
        let (tokenizer, tokenizer_note) = match TextTokenizer::from_gguf(file.metadata(), path) {
            Ok(t) => (t, None),
            Err(e @ Error::Unsupported { .. }) => (None, Some(e.to_string())),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path: path.into(),
            source: Box::new(file),
            config,
            tokenizer,
            tokenizer_note,
        })
    }

    pub fn open_hf_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let bytes = std::fs::read(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let mut config = HfConfig::from_json(&bytes, &cfg_path)?.into_runtime(&cfg_path)?;
        let tokenizer = TextTokenizer::from_hf_dir(dir)?;
        if config.eos_token_ids.is_empty() {
            if let Some(t) = &tokenizer {
                config.eos_token_ids = t.eos_ids().to_vec();
            }
        }
        Ok(Self {
            path: dir.into(),
            source: Box::new(SafetensorsFiles::open(dir)?),
            config,
            tokenizer,
            tokenizer_note: None,
        })
    }
}
