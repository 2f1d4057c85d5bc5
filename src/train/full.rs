//! The output of full fine-tuning: a standalone HF model directory that every engine
//! loads as an ARM of its own (`genarm generate --arm DIR`).
//!
//! - `model.safetensors`: every tensor of the model under its HF name, in HF row order
//!   (a GGUF base's Q/K rows un-permuted, quantized weights dequantized), the trained
//!   ones from training and the frozen ones from the base, all in one dtype (F32 or
//!   BF16). The model keeps its own `lm_head.weight` when the base has one or the head
//!   was trained (a tied base's trained head is saved untied: the input embeddings did
//!   not train).
//! - `config.json`: the base's configuration in HF form.
//! - The tokenizer, so that the vocabulary check against the base passes and the
//!   directory stands alone: an HF base's `tokenizer.json`, `tokenizer_config.json` and
//!   `generation_config.json` are copied; a GGUF's embedded tokenizer is exported.
//!
//! With `--keep-layers K` the model is the base cut to its bottom K decoder layers
//! (embedding, layers 0..K, final norm, head): a smaller ARM for the base it came from,
//! the demo-scale analogue of a 7B ARM guiding a 70B base.
//!
//! Each file is written atomically, and `config.json` last, so a directory with a
//! `config.json` holds a whole model. LoRA files a previous run left in the same
//! directory are removed: loaders would take the directory for an adapter.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::arm::load_hf_order;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::llama;
use crate::model::lora::{write_atomic, ADAPTER_CONFIG, ADAPTER_WEIGHTS, SCORE_HEAD_WEIGHTS};
use crate::model::Checkpoint;

pub const MODEL_WEIGHTS: &str = "model.safetensors";
pub const MODEL_CONFIG: &str = "config.json";
/// The tokenizer files an HF base directory may carry, copied as they are.
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// The configuration of `cfg`'s bottom `keep` decoder layers as a model of its own: the
/// same embedding, final norm and head (and so the same vocabulary) over fewer layers.
/// The weights need no copy: a loader given this configuration reads layers 0..keep of
/// the base's weight source and never asks for the rest.
pub fn keep_bottom_layers(cfg: &LlamaConfig, keep: usize) -> Result<LlamaConfig> {
    if keep == 0 || keep > cfg.num_layers {
        return Err(Error::Request(format!(
            "--keep-layers must be in 1..={} (the base's layers), got {keep}",
            cfg.num_layers
        )));
    }
    let mut kept = cfg.clone();
    kept.num_layers = keep;
    kept.sliding_windows.truncate(keep);
    Ok(kept)
}

/// Writes `out` as an HF model: `trained` (HF names) over `base`'s weights, in `dtype`.
pub fn write_model_dir(
    base: &Checkpoint,
    trained: &HashMap<String, Tensor>,
    out: &Path,
    dtype: DType,
) -> Result<()> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        other => {
            return Err(Error::Request(format!(
                "a fully tuned model is saved in F32 or BF16, not {other:?}"
            )))
        }
    };
    let own_head = trained.contains_key(llama::LM_HEAD) || base.source.contains(llama::LM_HEAD);
    let names = llama::tensor_names(&base.config, own_head);
    if let Some(stray) = trained.keys().find(|k| !names.contains(k)) {
        return Err(Error::Request(format!(
            "trained tensor `{stray}` is not part of the base model"
        )));
    }
    let mut tensors = HashMap::with_capacity(names.len());
    for name in names {
        let t = match trained.get(&name) {
            Some(t) => t.to_device(&Device::Cpu)?,
            None => load_hf_order(base.source.as_ref(), &base.config, &name, &Device::Cpu)?,
        };
        tensors.insert(name, t.to_dtype(dtype)?);
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for stale in [ADAPTER_CONFIG, ADAPTER_WEIGHTS, SCORE_HEAD_WEIGHTS] {
        let path = out.join(stale);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&path, e)),
            _ => {}
        }
    }
    crate::outdir::save_safetensors(&tensors, &out.join(MODEL_WEIGHTS))?;
    write_tokenizer(base, out)?;
    let config = base.config.to_hf_json(!own_head, torch_dtype, &base.path)?;
    write_atomic(
        &out.join(MODEL_CONFIG),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// Copies an HF base's tokenizer files, or exports a GGUF's embedded tokenizer; a base
/// without a tokenizer gives a model without one (both run on token ids).
fn write_tokenizer(base: &Checkpoint, out: &Path) -> Result<()> {
    if base.path.is_dir() {
        for name in TOKENIZER_FILES {
            let from = base.path.join(name);
            if from.is_file() {
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                write_atomic(&out.join(name), &bytes)?;
            }
        }
        return Ok(());
    }
    if let Some(tok) = &base.tokenizer {
        let (tokenizer_json, tokenizer_config) = tok.to_hf_files()?;
        write_atomic(&out.join("tokenizer.json"), &tokenizer_json)?;
        write_atomic(&out.join("tokenizer_config.json"), &tokenizer_config)?;
    }
    Ok(())
}
