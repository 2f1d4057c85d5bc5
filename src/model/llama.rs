//! The Llama-family layout, in one place: tensor names (HF's), the projections of a
//! layer with their shapes, biases and RoPE heads, the Q/K row order of files that
//! store RoPE interleaved (GGUF), the RoPE tables, the causal mask and the MLP gate.
//! The CPU and GPU engines, training and the writers all build from these, so a name
//! or a row order is spelled once.

use candle_core::{DType, Device, Tensor};

use super::config::{Activation, LlamaConfig};
use super::lora::LoraAdapter;
use super::weights::WeightSource;
use crate::error::{Error, Result};

/// The token embedding table, `[vocab, hidden]`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// The RMSNorm weight before the head.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The output head, absent when it is tied to the embeddings.
pub const LM_HEAD: &str = "lm_head.weight";

/// A layer's linear projections, in HF's module order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// PEFT's short name (`q_proj`), the vocabulary of `target_modules`.
    pub const fn short_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The block the projection belongs to: `self_attn` or `mlp`.
    pub const fn block(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// The module under a layer, e.g. `self_attn.q_proj`.
    pub fn module(self) -> String {
        format!("{}.{}", self.block(), self.short_name())
    }

    /// The projection whose module is `module` (`self_attn.q_proj`).
    pub fn from_module(module: &str) -> Option<Proj> {
        let (block, name) = module.split_once('.')?;
        Self::ALL
            .into_iter()
            .find(|p| p.block() == block && p.short_name() == name)
    }

    /// `(out, in)`: the weight is `[out, in]`.
    pub fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        match self {
            Proj::Q => (cfg.num_heads * hd, h),
            Proj::K | Proj::V => (cfg.num_kv_heads * hd, h),
            Proj::O => (h, cfg.num_heads * hd),
            Proj::Gate | Proj::Up => (inter, h),
            Proj::Down => (h, inter),
        }
    }

    /// Whether the config gives this projection a bias.
    pub fn has_bias(self, cfg: &LlamaConfig) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => cfg.qkv_bias,
            Proj::O => cfg.o_bias,
            Proj::Gate | Proj::Up | Proj::Down => cfg.mlp_bias,
        }
    }

    /// The heads of q and k, whose rows a file with interleaved RoPE stores permuted
    /// (so a LoRA B on them must be permuted alike); `None` for the others.
    pub fn rope_heads(self, cfg: &LlamaConfig) -> Option<usize> {
        match self {
            Proj::Q => Some(cfg.num_heads),
            Proj::K => Some(cfg.num_kv_heads),
            _ => None,
        }
    }
}

/// `model.layers.{layer}`.
pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

/// The module path of a projection, e.g. `model.layers.3.self_attn.q_proj` (add
/// `.weight` or `.bias` for its tensors; LoRA adapters key on the path itself).
pub fn module_path(layer: usize, proj: Proj) -> String {
    format!(
        "{}.{}.{}",
        layer_prefix(layer),
        proj.block(),
        proj.short_name()
    )
}

/// The RMSNorm weight before a layer's attention.
pub fn input_norm(layer: usize) -> String {
    format!("{}.input_layernorm.weight", layer_prefix(layer))
}

/// The RMSNorm weight before a layer's MLP.
pub fn post_attention_norm(layer: usize) -> String {
    format!("{}.post_attention_layernorm.weight", layer_prefix(layer))
}

/// `model.layers.{i}.{module}` → `(i, proj)`; `None` for anything else.
pub fn parse_module_path(path: &str) -> Option<(usize, Proj)> {
    let (layer, module) = path.strip_prefix("model.layers.")?.split_once('.')?;
    Some((layer.parse().ok()?, Proj::from_module(module)?))
}

/// The head's tensor: its own, or the embeddings when the head is tied.
pub fn head_tensor(cfg: &LlamaConfig, src: &dyn WeightSource) -> &'static str {
    if cfg.tie_word_embeddings && !src.contains(LM_HEAD) {
        EMBED
    } else {
        LM_HEAD
    }
}

/// The HF names of every tensor of a model of `cfg`, with its own head or a tied one:
/// what a complete HF checkpoint of it holds.
pub fn tensor_names(cfg: &LlamaConfig, own_head: bool) -> Vec<String> {
    let mut names = vec![EMBED.to_string()];
    for layer in 0..cfg.num_layers {
        names.push(input_norm(layer));
        names.push(post_attention_norm(layer));
        for proj in Proj::ALL {
            let module = module_path(layer, proj);
            names.push(format!("{module}.weight"));
            if proj.has_bias(cfg) {
                names.push(format!("{module}.bias"));
            }
        }
    }
    names.push(FINAL_NORM.into());
    if own_head {
        names.push(LM_HEAD.into());
    }
    names
}

/// Every LoRA module must be one this architecture has: a module the engines never
/// look up (`mlp.q_proj`, layer 99) must not be dropped quietly.
pub fn check_adapter_modules(adapter: &LoraAdapter, cfg: &LlamaConfig) -> Result<()> {
    for module in adapter.modules.keys() {
        let known = parse_module_path(module).is_some_and(|(layer, _)| layer < cfg.num_layers);
        if !known {
            return Err(Error::Incompatible {
                arm: adapter.path.display().to_string(),
                message: format!(
                    "LoRA module `{module}` does not exist in a {}-layer Llama-family model",
                    cfg.num_layers
                ),
            });
        }
    }
    Ok(())
}

/// Reorders rows `[heads·hd, ..]` from HF's half-split order to llama.cpp's interleaved
/// order: new row `h·hd + 2i + s` is old row `h·hd + s·hd/2 + i`.
pub fn permute_for_interleaved_rope(w: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, head_dim / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of `permute_for_interleaved_rope`: GGUF row `h·hd + 2i + s` back to HF
/// row `h·hd + s·hd/2 + i`.
pub fn unpermute_interleaved_rows(w: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// `[capacity, head_dim/2]` cos and sin tables (row `p` is position `p`) in `dtype`.
pub fn rope_tables(
    cfg: &LlamaConfig,
    capacity: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv_freq = cfg.rope_inv_freq();
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(capacity * half);
    let mut sin = Vec::with_capacity(capacity * half);
    for p in 0..capacity {
        for f in &inv_freq {
            // Angles in f64: at positions in the thousands f32 loses the low bits.
            let angle = p as f64 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (capacity, half), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (capacity, half), device)?.to_dtype(dtype)?,
    ))
}

/// Additive mask for `seq` new queries after `past` cached tokens, laid out for the
/// grouped query rows (`n_rep` query heads per KV head, head-major): `[n_rep·seq, past+seq]`.
/// Query `i` (position `past + i`) sees keys `j ≤ past + i`, and with a sliding `window`
/// only `j > past + i − window` (transformers' rule: the last `window` positions).
/// `None` when nothing is masked (a single query within its window).
pub fn causal_mask(
    seq: usize,
    past: usize,
    n_rep: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let total = past + seq;
    let window = window.unwrap_or(usize::MAX);
    if seq == 1 && total <= window {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(n_rep * seq * total);
    for _ in 0..n_rep {
        for i in 0..seq {
            let q = past + i;
            m.extend((0..total).map(|j| {
                if j > q || q - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            }));
        }
    }
    Ok(Some(Tensor::from_vec(m, (n_rep * seq, total), device)?))
}

/// The gate activation of the MLP, elementwise.
pub fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Silu => candle_nn::ops::silu(x),
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_round_trip() {
        for proj in Proj::ALL {
            let path = module_path(12, proj);
            assert_eq!(parse_module_path(&path), Some((12, proj)));
        }
        assert_eq!(Proj::Gate.short_name(), "gate_proj");
        assert_eq!(parse_module_path("model.layers.0.mlp.q_proj"), None);
        assert_eq!(parse_module_path("model.layers.x.mlp.up_proj"), None);
        assert_eq!(parse_module_path("layers.0.mlp.up_proj"), None);
    }

    #[test]
    fn interleaved_rows_round_trip() {
        let (heads, hd, cols) = (3, 8, 5);
        let w = Tensor::arange(0f32, (heads * hd * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let p = permute_for_interleaved_rope(&w, heads, hd).unwrap();
        // Row h·hd + 2i + s of the permuted weight is HF row h·hd + s·hd/2 + i.
        let (h, i, s) = (1, 2, 1);
        let got = p.get(h * hd + 2 * i + s).unwrap().to_vec1::<f32>().unwrap();
        let want = w
            .get(h * hd + s * hd / 2 + i)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want);
        let back = unpermute_interleaved_rows(&p, heads, hd).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
