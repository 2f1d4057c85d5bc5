//! GGUF (v2/v3) checkpoints: metadata → `LlamaConfig`, tensors by HF name, quantized
//! blocks kept quantized. The whole tensor table is checked against the file length at
//! open, so a truncated download fails there with the tensor it cuts, not mid-forward.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use super::config::{Activation, Arch, Llama3RopeScaling, LlamaConfig, RopeLayout, RopeScaling};
use super::gguf_header::check_header;
use super::llama::{self, Proj};
use super::weights::{count_layers, missing, Bytes, Weight, WeightSource};
use crate::error::{Error, Result};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_bytes(Bytes::open(path)?, path)
    }

    /// Whether the file's first layer has a bias on `proj` (GGUF keys say nothing of
    /// biases: the tensors do).
    fn has_bias(&self, proj: Proj) -> bool {
        self.contains(&format!("{}.bias", llama::module_path(0, proj)))
    }

    /// Parses a GGUF held in memory; `path` only names it in errors.
    pub fn from_bytes(bytes: Bytes, path: &Path) -> Result<Self> {
        // candle's reader trusts fields a damaged file can set (alignment 0, dims whose
        // product wraps, unknown type ids): it only sees a header that passed this walk.
        let header = check_header(&bytes, path)?;
        let content = Content::read(&mut Cursor::new(&bytes[..]))
            .map_err(|e| Error::format(path, format!("malformed or truncated GGUF header: {e}")))?;
        if content.tensor_data_offset != header.tensor_data_offset {
            return Err(Error::format(
                path,
                "GGUF header: tensor data offset disagrees with candle's reader",
            ));
        }
        check_tensor_table(&content, bytes.len() as u64, path)?;
        Ok(Self {
            path: path.into(),
            bytes,
            content,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn architecture(&self) -> Result<String> {
        Ok(self.string("general.architecture")?.to_string())
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::field(&self.path, key, "missing"))
    }

    fn string(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(Error::field(
                &self.path,
                key,
                format!("expected a string, found {:?}", v.value_type()),
            )),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(|n| n as usize).ok_or_else(|| {
            Error::field(
                &self.path,
                key,
                format!("expected a non-negative integer, found {v:?}"),
            )
        })
    }

    fn float(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            v => Err(Error::field(
                &self.path,
                key,
                format!("expected a float, found {:?}", v.value_type()),
            )),
        }
    }

    fn optional<T>(&self, key: &str, read: impl Fn(&Self, &str) -> Result<T>) -> Result<Option<T>> {
        if self.content.metadata.contains_key(key) {
            read(self, key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `rope_freqs.weight` as f64 divisors, if the file has one.
    fn rope_freq_factors(&self) -> Result<Option<Vec<f64>>> {
        const NAME: &str = "rope_freqs.weight";
        if !self.content.tensor_infos.contains_key(NAME) {
            return Ok(None);
        }
        let t = self
            .qtensor(NAME, &Device::Cpu)?
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| Error::format(&self.path, format!("tensor `{NAME}`: {e}")))?;
        Ok(Some(t.into_iter().map(f64::from).collect()))
    }

    /// Where tensor `gname` (in the table) lies in the file; `check_tensor_table` has
    /// checked at open that it lies inside.
    fn byte_range(&self, gname: &str) -> std::ops::Range<usize> {
        let info = &self.content.tensor_infos[gname];
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let len =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        start..start + len
    }

    /// Tensor `gname` (in the table) read from the file's bytes with one copy.
    fn qtensor(&self, gname: &str, device: &Device) -> Result<QTensor> {
        let info = &self.content.tensor_infos[gname];
        let bytes = &self.bytes[self.byte_range(gname)];
        qtensor_in_place(info.ggml_dtype, bytes, info.shape.dims(), device)
            .map_err(|e| Error::format(&self.path, format!("tensor `{gname}`: {e}")))
    }

    /// Every `{arch}.*` key must be one genarm reads or one that cannot change the
    /// math; an unknown one (experts, partial rotary, logit soft-capping…) is refused
    /// rather than ignored.
    fn check_arch_keys(&self, arch_name: &str, head_dim: usize) -> Result<()> {
        const READ: &[&str] = &[
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "vocab_size",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.value_length",
            "attention.layer_norm_rms_epsilon",
            "attention.sliding_window",
            "rope.freq_base",
            "rope.dimension_count",
            "rope.scaling.type",
            "rope.scaling.factor",
            "rope.scaling.original_context_length",
            "rope.scaling.finetuned",
            "expert_count",
            "expert_used_count",
        ];
        let prefix = format!("{arch_name}.");
        for key in self.content.metadata.keys() {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            if !READ.contains(&rest) {
                return Err(Error::unsupported(
                    &self.path,
                    format!("GGUF key `{key}`: genarm does not implement it and it may change the model's outputs"),
                ));
            }
        }
        let key = |k: &str| format!("{prefix}{k}");
        for (k, want) in [
            ("attention.value_length", head_dim),
            ("rope.dimension_count", head_dim),
        ] {
            if let Some(got) = self.optional(&key(k), Self::usize)? {
                if got != want {
                    return Err(Error::unsupported(
                        &self.path,
                        format!(
                            "{} = {got} (genarm needs it equal to the head dimension {want})",
                            key(k)
                        ),
                    ));
                }
            }
        }
        if self
            .optional(&key("expert_count"), Self::usize)?
            .unwrap_or(0)
            > 0
        {
            return Err(Error::unsupported(
                &self.path,
                format!("{} > 0 (mixture-of-experts models)", key("expert_count")),
            ));
        }
        Ok(())
    }

    /// The runtime config from `{arch}.*` metadata keys.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch_name = self.architecture()?;
        let arch = Arch::parse(&arch_name)
            .ok_or_else(|| Error::unsupported(&self.path, format!("architecture `{arch_name}`")))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = self.usize(&key("embedding_length"))?;
        let num_heads = self.usize(&key("attention.head_count"))?;
        let num_kv_heads = self
            .optional(&key("attention.head_count_kv"), Self::usize)?
            .unwrap_or(num_heads);
        let head_dim = match self.optional(&key("attention.key_length"), Self::usize)? {
            Some(d) => d,
            None => hidden_size / num_heads.max(1),
        };
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| missing(&self.path, "token_embd.weight"))?;
        let vocab_size = match self.optional(&key("vocab_size"), Self::usize)? {
            Some(v) => v,
            None => embd.shape.dims()[0],
        };
        let scaling_key = key("rope.scaling.type");
        let scaling = if self.content.metadata.contains_key(&scaling_key) {
            Some(self.string(&scaling_key)?)
        } else {
            None
        };
        let rope_scaling = match scaling {
            Some("llama3") => Some(RopeScaling::Llama3(Llama3RopeScaling {
                factor: self.float(&key("rope.scaling.factor"))?,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: self
                    .usize(&key("rope.scaling.original_context_length"))?,
            })),
            Some("linear") => Some(RopeScaling::Linear {
                factor: self.float(&key("rope.scaling.factor"))?,
            }),
            Some("none") | None => None,
            Some(other) => {
                return Err(Error::unsupported(
                    &self.path,
                    format!("{scaling_key} `{other}` (genarm implements none, linear, llama3)"),
                ))
            }
        };
        // llama.cpp's converter stores Llama 3.1's scaling as per-frequency divisors.
        let rope_scaling = match (self.rope_freq_factors()?, rope_scaling) {
            (None, s) => s,
            (Some(f), None) => Some(RopeScaling::FreqFactors(f)),
            (Some(_), Some(_)) => {
                return Err(Error::unsupported(
                    &self.path,
                    format!("both {scaling_key} and a rope_freqs.weight tensor"),
                ))
            }
        };
        self.check_arch_keys(&arch_name, head_dim)?;
        let sliding_window = self.optional(&key("attention.sliding_window"), Self::usize)?;
        let num_layers = self.usize(&key("block_count"))?;
        let eos = self.optional("tokenizer.ggml.eos_token_id", Self::usize)?;
        let cfg = LlamaConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: self.usize(&key("feed_forward_length"))?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: self
                .optional(&key("rope.freq_base"), Self::float)?
                .unwrap_or(10_000.0),
            rope_scaling,
            // llama.cpp permutes Q/K rows of "llama"-arch checkpoints for its adjacent-pair
            // RoPE; Qwen2 GGUFs keep HF's row order and use the half-split ("neox") form.
            rope_layout: match arch {
                Arch::Llama | Arch::Mistral => RopeLayout::Interleaved,
                Arch::Qwen2 => RopeLayout::HalfSplit,
            },
            rms_norm_eps: self.float(&key("attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: self.usize(&key("context_length"))?,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias: self.has_bias(Proj::Q),
            o_bias: self.has_bias(Proj::O),
            mlp_bias: self.has_bias(Proj::Up),
            hidden_act: Activation::Silu,
            sliding_windows: match sliding_window {
                Some(w) => vec![Some(w); num_layers],
                None => Vec::new(),
            },
            bos_token_id: self
                .optional("tokenizer.ggml.bos_token_id", Self::usize)?
                .map(|x| x as u32),
            eos_token_ids: eos.map(|x| vec![x as u32]).unwrap_or_default(),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }
}

/// Every tensor's bytes must lie inside the file (`check_header` has bounded each
/// size); the embedding must be a matrix (the config reads the vocabulary from it);
/// and `{arch}.block_count` may not exceed the `blk.N` layers the file has, since the
/// loader sizes per-layer state from it before it reaches a missing tensor.
fn check_tensor_table(content: &Content, file_len: u64, path: &Path) -> Result<()> {
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let block = info.ggml_dtype.block_size();
        let size = (!dims.is_empty() && dims.iter().all(|&d| d > 0))
            .then(|| dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)))
            .flatten()
            .filter(|elems| elems % block == 0)
            .and_then(|elems| (elems / block).checked_mul(info.ggml_dtype.type_size()));
        let Some(size) = size else {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}`: shape {dims:?} is not a whole number of {:?} blocks",
                    info.ggml_dtype
                ),
            ));
        };
        let start = content.tensor_data_offset.saturating_add(info.offset);
        let end = start.saturating_add(size as u64);
        if end > file_len {
            return Err(Error::format(
                path,
                format!(
                    "truncated: tensor `{name}` needs bytes {start}..{end} but the file has {file_len}"
                ),
            ));
        }
    }
    if let Some(embd) = content.tensor_infos.get("token_embd.weight") {
        if embd.shape.rank() != 2 {
            return Err(Error::format(
                path,
                format!(
                    "tensor `token_embd.weight` has shape {:?}, expected [vocab, hidden]",
                    embd.shape.dims()
                ),
            ));
        }
    }
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(a)) => a.as_str(),
        _ => return Ok(()),
    };
    let key = format!("{arch}.block_count");
    let declared = match content.metadata.get(&key) {
        Some(Value::U8(x)) => Some(*x as u64),
        Some(Value::U16(x)) => Some(*x as u64),
        Some(Value::U32(x)) => Some(*x as u64),
        Some(Value::U64(x)) => Some(*x),
        Some(Value::I32(x)) => u64::try_from(*x).ok(),
        Some(Value::I64(x)) => u64::try_from(*x).ok(),
        // Other types are refused by name when the config is read.
        _ => None,
    };
    if let Some(declared) = declared {
        let layers = count_layers(content.tensor_infos.keys().map(String::as_str), "blk.");
        if declared > layers as u64 {
            return Err(Error::format(
                path,
                format!("{key} = {declared} but the file has tensors for {layers} layers"),
            ));
        }
    }
    Ok(())
}

/// HF tensor name → GGUF tensor name for the Llama family.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        llama::EMBED => return Some("token_embd.weight".into()),
        llama::FINAL_NORM => return Some("output_norm.weight".into()),
        llama::LM_HEAD => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

impl WeightSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }

    fn layer_count(&self) -> usize {
        count_layers(self.content.tensor_infos.keys().map(String::as_str), "blk.")
    }

    fn load(&self, name: &str, device: &Device) -> Result<Weight> {
        let gname = gguf_name(name)
            .filter(|n| self.content.tensor_infos.contains_key(n))
            .ok_or_else(|| missing(&self.path, name))?;
        let qt = self.qtensor(&gname, device)?;
        // The engine holds its own copy now: the file's pages can go.
        self.bytes.release(self.byte_range(&gname));
        Ok(match qt.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Weight::Dense(qt.dequantize(device)?)
            }
            _ => Weight::Quantized(Arc::new(qt)),
        })
    }
}

/// A tensor from its bytes in the file with one copy. (candle's own reader copies them
/// into a buffer first and then into the tensor: a third copy of the largest matrix at
/// once while loading, the peak of a loaded model's resident memory.) candle reads the
/// blocks through a pointer of their type, so bytes at an address no block type may
/// sit at (a GGUF whose alignment field is odd) are copied to an aligned buffer first.
fn qtensor_in_place(
    dtype: GgmlDType,
    bytes: &[u8],
    dims: &[usize],
    device: &Device,
) -> candle_core::Result<QTensor> {
    // The strictest alignment of candle's block types (f32 fields).
    const ALIGN: usize = std::mem::align_of::<f32>();
    if (bytes.as_ptr() as usize).is_multiple_of(ALIGN) {
        return qtensor_from_ggml(dtype, bytes, dims.to_vec(), device);
    }
    let mut aligned = vec![0f32; bytes.len().div_ceil(std::mem::size_of::<f32>())];
    let view: &mut [u8] = bytemuck::cast_slice_mut(&mut aligned);
    view[..bytes.len()].copy_from_slice(bytes);
    qtensor_from_ggml(dtype, &view[..bytes.len()], dims.to_vec(), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_read_in_place_equal_those_from_an_odd_address() {
        // Two Q8_0 blocks and four f32: read where they lie (aligned), and from one byte
        // further on, where candle may not read them through a pointer.
        let mut q8 = Vec::new();
        for b in 0..2u8 {
            q8.extend(half::f16::from_f32(0.5 + b as f32).to_le_bytes());
            q8.extend((0..32).map(|i| (i * 7 + b) as i8 as u8));
        }
        let f32s: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        for (dtype, bytes, dims) in [
            (GgmlDType::Q8_0, &q8, vec![2, 32]),
            (GgmlDType::F32, &f32s, vec![4]),
        ] {
            let mut shifted = vec![0u32; bytes.len() / 4 + 2];
            let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut shifted);
            buf[..bytes.len()].copy_from_slice(bytes);
            let aligned =
                qtensor_in_place(dtype, &buf[..bytes.len()], &dims, &Device::Cpu).unwrap();
            buf.copy_within(..bytes.len(), 1);
            let odd = qtensor_in_place(dtype, &buf[1..=bytes.len()], &dims, &Device::Cpu).unwrap();
            let values = |q: &QTensor| {
                q.dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(values(&aligned), values(&odd), "{dtype:?}");
            assert_eq!(odd.shape().dims(), &dims[..]);
        }
    }

    #[test]
    fn maps_hf_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight").as_deref(),
            Some("blk.12.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_proj.bias").as_deref(),
            Some("blk.0.attn_k.bias")
        );
        assert_eq!(gguf_name("model.layers.0.mlp.experts.weight"), None);
    }
}
