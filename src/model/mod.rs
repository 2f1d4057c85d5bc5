//! Checkpoints in: GGUF files, HF model directories, PEFT LoRA adapters; their configs
//! and tokenizers. Everything here is independent of the engine that runs the model.

pub mod arm_plan;
pub mod config;
pub mod gguf;
pub mod gguf_header;
pub mod hf_config;
pub mod llama;
pub mod lora;
pub mod random_gguf;
pub mod safetensors;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use config::LlamaConfig;
use gguf::GgufFile;
use hf_config::HfConfig;
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

/// What callers need of the base besides its weights, the same for every engine: its
/// tokenizer (with its chat template), why it has none, and the ids that end a turn.
#[derive(Clone)]
pub struct BaseFacts {
    pub tokenizer: Option<TextTokenizer>,
    /// Why `tokenizer` is `None` when the file has one this crate cannot build.
    pub tokenizer_note: Option<String>,
    /// See [`stop_token_ids`].
    pub stop_ids: Vec<u32>,
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
    /// The facts an engine built on this checkpoint as its base carries.
    pub fn base_facts(&self) -> BaseFacts {
        BaseFacts {
            tokenizer: self.tokenizer.clone(),
            tokenizer_note: self.tokenizer_note.clone(),
            stop_ids: stop_token_ids(&self.config, self.tokenizer.as_ref()),
        }
    }

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
        Self::from_gguf_file(GgufFile::open(path)?, path)
    }

    /// A GGUF checkpoint from its bytes (the browser has no files); `name` stands in
    /// for the path in errors.
    pub fn from_gguf_bytes(bytes: Vec<u8>, name: &Path) -> Result<Self> {
        let file = GgufFile::from_bytes(weights::Bytes::Owned(bytes), name)?;
        Self::from_gguf_file(file, name)
    }

    fn from_gguf_file(file: GgufFile, path: &Path) -> Result<Self> {
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

    /// An HF model directory from its files' bytes (the browser has no files), keyed by
    /// file name: `config.json`, every `*.safetensors` shard (a sharded model's index
    /// is not needed: each shard's header lists its tensors), and optionally
    /// `tokenizer.json` with `tokenizer_config.json`. Other files are ignored; `dir`
    /// stands in for the directory in errors.
    pub fn from_hf_files(dir: &Path, files: Vec<(String, Vec<u8>)>) -> Result<Self> {
        let mut config_json = None;
        let mut tokenizer_json = None;
        let mut tokenizer_config_json = None;
        let mut shards = Vec::new();
        for (name, bytes) in files {
            match name.as_str() {
                "config.json" => config_json = Some(bytes),
                "tokenizer.json" => tokenizer_json = Some(bytes),
                "tokenizer_config.json" => tokenizer_config_json = Some(bytes),
                n if n.ends_with(".safetensors") => {
                    shards.push((dir.join(n), weights::Bytes::Owned(bytes)))
                }
                _ => {}
            }
        }
        let cfg_path = dir.join("config.json");
        let config_json = config_json.ok_or_else(|| Error::format(dir, "no config.json"))?;
        if shards.is_empty() {
            return Err(Error::format(dir, "no *.safetensors weights"));
        }
        shards.sort_by(|a, b| a.0.cmp(&b.0));
        let config = HfConfig::from_json(&config_json, &cfg_path)?.into_runtime(&cfg_path)?;
        let tokenizer = tokenizer_json
            .map(|t| TextTokenizer::from_bytes(&t, tokenizer_config_json.as_deref()))
            .transpose()?;
        let source = SafetensorsFiles::from_shards(dir, shards)?;
        Self::hf(dir, config, tokenizer, source)
    }

    pub fn open_hf_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let bytes = weights::read_regular_file(&cfg_path, weights::MAX_JSON_FILE_LEN)?;
        let config = HfConfig::from_json(&bytes, &cfg_path)?.into_runtime(&cfg_path)?;
        let tokenizer = TextTokenizer::from_hf_dir(dir)?;
        let source = SafetensorsFiles::open(dir)?;
        Self::hf(dir, config, tokenizer, source)
    }

    /// An HF checkpoint from its parts: stop ids from the tokenizer when the config
    /// names none, and as many layers as the config says.
    fn hf(
        dir: &Path,
        mut config: LlamaConfig,
        tokenizer: Option<TextTokenizer>,
        source: SafetensorsFiles,
    ) -> Result<Self> {
        if config.eos_token_ids.is_empty() {
            if let Some(t) = &tokenizer {
                config.eos_token_ids = t.eos_ids().to_vec();
            }
        }
        source.check_layer_count(config.num_layers)?;
        Ok(Self {
            path: dir.into(),
            source: Box::new(source),
            config,
            tokenizer,
            tokenizer_note: None,
        })
    }
}
