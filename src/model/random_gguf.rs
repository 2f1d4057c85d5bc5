//! Random-weight GGUF models of any Llama shape (`genarm init-model`), for timing the
//! engines at the sizes people run: llama.cpp reads the same file, so both can be
//! benchmarked on it. The tokenizer and vocabulary come from a reference GGUF.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::weights::open_regular_file;
use crate::error::{Error, Result};
use crate::guide::uniform;

/// A Llama model's dimensions.
#[derive(Clone, Debug)]
pub struct LlamaShape {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    /// The LM head is the embedding (no `output.weight`).
    pub tied: bool,
}

impl LlamaShape {
    fn check(&self) -> Result<()> {
        let fail = |why: String| Err(Error::Request(format!("model shape {self:?}: {why}")));
        if [
            self.layers,
            self.hidden,
            self.ffn,
            self.heads,
            self.kv_heads,
            self.context,
        ]
        .contains(&0)
        {
            return fail("every dimension must be at least 1".into());
        }
        if !self.hidden.is_multiple_of(self.heads) || !self.heads.is_multiple_of(self.kv_heads) {
            return fail("heads must divide hidden, and kv-heads divide heads".into());
        }
        if !(self.hidden / self.heads).is_multiple_of(2) {
            return fail("the head size must be even (RoPE rotates pairs)".into());
        }
        if !self.hidden.is_multiple_of(32) || !self.ffn.is_multiple_of(32) {
            return fail("hidden and ffn must be multiples of 32 (the block size)".into());
        }
        Ok(())
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor's GGUF name and candle shape `[rows, cols]` (`[n]` for norms).
    fn tensors(&self, vocab: usize) -> Vec<(String, Vec<usize>)> {
        let (h, kv) = (self.hidden, self.kv_heads * self.head_dim());
        let mut out = vec![("token_embd.weight".into(), vec![vocab, h])];
        for l in 0..self.layers {
            let blk = |name: &str, dims: Vec<usize>| (format!("blk.{l}.{name}.weight"), dims);
            out.extend([
                blk("attn_norm", vec![h]),
                blk("attn_q", vec![h, h]),
                blk("attn_k", vec![kv, h]),
                blk("attn_v", vec![kv, h]),
                blk("attn_output", vec![h, h]),
                blk("ffn_norm", vec![h]),
                blk("ffn_gate", vec![self.ffn, h]),
                blk("ffn_up", vec![self.ffn, h]),
                blk("ffn_down", vec![h, self.ffn]),
            ]);
        }
        out.push(("output_norm.weight".into(), vec![h]));
        if !self.tied {
            out.push(("output.weight".into(), vec![vocab, h]));
        }
        out
    }
}

/// Writes a model of `shape` with random weights (uniform, standard deviation 0.02; norms
/// of ones) to `out`: matrices in `format`, norms in f32, the tokenizer of `reference`.
/// It is written beside `out` and renamed into place: a failed run leaves no partial file.
pub fn write_random_gguf(
    out: &Path,
    shape: &LlamaShape,
    format: GgmlDType,
    reference: &Path,
    seed: u64,
) -> Result<()> {
    shape.check()?;
    let content = gguf_file::Content::read(&mut open_regular_file(reference)?)
        .map_err(|e| Error::format(reference, format!("GGUF header: {e}")))?;
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) if !tokens.is_empty() => tokens.len(),
        _ => return Err(Error::format(reference, "no tokenizer.ggml.tokens to copy")),
    };
    let u32_value = |n: usize| Value::U32(n as u32);
    metadata.extend([
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String(format!("random llama {}x{}", shape.layers, shape.hidden)),
        ),
        ("llama.context_length".into(), u32_value(shape.context)),
        ("llama.embedding_length".into(), u32_value(shape.hidden)),
        ("llama.block_count".into(), u32_value(shape.layers)),
        ("llama.feed_forward_length".into(), u32_value(shape.ffn)),
        ("llama.attention.head_count".into(), u32_value(shape.heads)),
        (
            "llama.attention.head_count_kv".into(),
            u32_value(shape.kv_heads),
        ),
        (
            "llama.rope.dimension_count".into(),
            u32_value(shape.head_dim()),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.vocab_size".into(), u32_value(vocab)),
    ]);

    // Uniform on ±0.02·√3: standard deviation 0.02, the usual initialisation scale.
    let bound = 0.02 * 3f64.sqrt();
    let mut counter = 0u64;
    let mut tensors = Vec::new();
    for (name, dims) in shape.tensors(vocab) {
        let n: usize = dims.iter().product();
        let tensor = if dims.len() == 1 {
            QTensor::quantize(
                &Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?,
                GgmlDType::F32,
            )?
        } else {
            let values: Vec<f32> = (counter..counter + n as u64)
                .map(|c| ((uniform(seed, c) * 2.0 - 1.0) * bound) as f32)
                .collect();
            counter += n as u64;
            let t = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?;
            QTensor::quantize(&t, format)?
        };
        tensors.push((name, tensor));
    }

    let part = out.with_extension("gguf.part");
    let write = || -> Result<()> {
        let mut file = BufWriter::new(File::create(&part).map_err(|e| Error::io(&part, e))?);
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut file, &meta, &refs)?;
        file.into_inner()
            .map_err(|e| Error::io(&part, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(&part, e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, out).map_err(|e| Error::io(out, e))
}
