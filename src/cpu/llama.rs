//! The Llama block (RMSNorm, RoPE, grouped-query attention, SwiGLU) on candle, run as
//! a batch of *rows* that see the same tokens: row `r` is the base weights plus its own
//! optional LoRA delta, with its own KV cache. Base and LoRA ARMs therefore share every
//! weight read — decode is bandwidth bound, so guidance costs little more than the base.
//!
//! The struct tree mirrors HF tensor names (`model.layers.{i}.self_attn.q_proj`), so
//! loading is also the weight map.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};

use crate::error::{Error, Result};
use crate::model::config::{LlamaConfig, RopeLayout};
use crate::model::lora::{LoraAdapter, LoraPair};
use crate::model::weights::{Weight, WeightSource};

/// A projection `y = x·Wᵀ (+ b)` whose weight may stay quantized.
#[derive(Clone, Debug)]
struct Projection {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Projection {
    fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        let weight = match weight {
            Weight::Quantized(q) => QMatMul::from_arc(q)?,
            Weight::Dense(t) => QMatMul::Tensor(t),
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// A row's low-rank delta, stored transposed for `x·Aᵀ·Bᵀ`.
#[derive(Clone, Debug)]
struct RowDelta {
    a_t: Tensor,
    b_t: Tensor,
}

/// A projection shared by all rows, each row adding its own LoRA delta (or none).
#[derive(Clone, Debug)]
struct RowLinear {
    base: Projection,
    deltas: Vec<Option<RowDelta>>,
}

impl RowLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        if self.deltas.iter().all(Option::is_none) {
            return Ok(y);
        }
        let rows = self
            .deltas
            .iter()
            .enumerate()
            .map(|(r, delta)| {
                let yr = y.narrow(0, r, 1)?;
                match delta {
                    None => Ok(yr),
                    Some(d) => {
                        let low = x.narrow(0, r, 1)?.broadcast_matmul(&d.a_t)?;
                        yr + low.broadcast_matmul(&d.b_t)?
                    }
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }
}

struct Loader<'a> {
    src: &'a dyn WeightSource,
    cfg: &'a LlamaConfig,
    rows: &'a [Option<&'a LoraAdapter>],
    device: &'a Device,
}

impl Loader<'_> {
    /// Loads `{module}.weight` (and `.bias` if `bias`), shaped `[out, inp]`, with each
    /// row's delta for that module. `qk_heads` is set for q/k projections: in a GGUF with
    /// interleaved RoPE their rows are permuted, and so must the LoRA B rows be.
    fn linear(
        &self,
        module: &str,
        out: usize,
        inp: usize,
        bias: bool,
        qk_heads: Option<usize>,
    ) -> Result<RowLinear> {
        let weight = self
            .src
            .load_shaped(&format!("{module}.weight"), &[out, inp], self.device)?;
        let bias = if bias {
            Some(
                self.src
                    .load_dense(&format!("{module}.bias"), &[out], self.device)?,
            )
        } else {
            None
        };
        let deltas = self
            .rows
            .iter()
            .map(
                |row| match row.and_then(|a| a.modules.get(module).map(|p| (a, p))) {
                    None => Ok(None),
                    Some((adapter, pair)) => self
                        .delta(adapter, module, pair, out, inp, qk_heads)
                        .map(Some),
                },
            )
            .collect::<Result<Vec<_>>>()?;
        Ok(RowLinear {
            base: Projection::new(weight, bias)?,
            deltas,
        })
    }

    fn delta(
        &self,
        adapter: &LoraAdapter,
        module: &str,
        pair: &LoraPair,
        out: usize,
        inp: usize,
        qk_heads: Option<usize>,
    ) -> Result<RowDelta> {
        let r = adapter.config.r;
        let shape_err = |name: &str, got: &Tensor, want: Vec<usize>| Error::TensorShape {
            path: adapter.path.clone(),
            name: format!("{module}.{name}"),
            got: got.dims().to_vec(),
            want,
        };
        if pair.a.dims() != [r, inp] {
            return Err(shape_err("lora_A.weight", &pair.a, vec![r, inp]));
        }
        if pair.b_scaled.dims() != [out, r] {
            return Err(shape_err("lora_B.weight", &pair.b_scaled, vec![out, r]));
        }
        let mut b = pair.b_scaled.to_device(self.device)?;
        if let (Some(heads), RopeLayout::Interleaved) = (qk_heads, self.cfg.rope_layout) {
            b = permute_for_interleaved_rope(&b, heads, self.cfg.head_dim)?;
        }
        Ok(RowDelta {
            a_t: pair.a.to_device(self.device)?.t()?.contiguous()?,
            b_t: b.t()?.contiguous()?,
        })
    }
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

struct Attention {
    q: RowLinear,
    k: RowLinear,
    v: RowLinear,
    o: RowLinear,
}

struct Mlp {
    gate: RowLinear,
    up: RowLinear,
    down: RowLinear,
}

struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

/// Preallocated keys and values of one layer, `[rows, kv_heads, capacity, head_dim]`,
/// written in place as tokens arrive.
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// The token embedding: quantized rows are dequantised on lookup.
enum Embedding {
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.embedding(ids)?,
            Self::Dense(w) => {
                let (rows, seq) = ids.dims2()?;
                w.index_select(&ids.flatten_all()?, 0)?
                    .reshape((rows, seq, w.dim(1)?))?
            }
        })
    }
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Projection,
    /// `[capacity, head_dim/2]` tables; row `p` is position `p`.
    cos: Tensor,
    sin: Tensor,
    caches: Vec<LayerCache>,
    capacity: usize,
    /// Tokens already in the caches (the position of the next token).
    pos: usize,
    rows: usize,
    device: Device,
}

impl Llama {
    /// Loads the model with one row per entry of `rows`: `None` is the plain weights,
    /// `Some(adapter)` adds that LoRA. `capacity` is the KV-cache length (clamped to the
    /// model's context).
    pub fn load(
        src: &dyn WeightSource,
        cfg: &LlamaConfig,
        rows: &[Option<&LoraAdapter>],
        capacity: usize,
        device: &Device,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::Request("a model needs at least one row".into()));
        }
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let ld = Loader {
            src,
            cfg,
            rows,
            device,
        };
        for adapter in rows.iter().flatten() {
            check_adapter_modules(adapter, cfg)?;
        }
        let embed =
            match src.load_shaped("model.embed_tokens.weight", &[cfg.vocab_size, h], device)? {
                Weight::Quantized(q) => Embedding::Quantized(q),
                Weight::Dense(t) => Embedding::Dense(t),
            };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention {
                q: ld.linear(
                    &format!("{p}.self_attn.q_proj"),
                    cfg.num_heads * hd,
                    h,
                    cfg.attention_bias,
                    Some(cfg.num_heads),
                )?,
                k: ld.linear(
                    &format!("{p}.self_attn.k_proj"),
                    cfg.num_kv_heads * hd,
                    h,
                    cfg.attention_bias,
                    Some(cfg.num_kv_heads),
                )?,
                v: ld.linear(
                    &format!("{p}.self_attn.v_proj"),
                    cfg.num_kv_heads * hd,
                    h,
                    cfg.attention_bias,
                    None,
                )?,
                o: ld.linear(
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    cfg.num_heads * hd,
                    false,
                    None,
                )?,
            };
            let mlp = Mlp {
                gate: ld.linear(
                    &format!("{p}.mlp.gate_proj"),
                    cfg.intermediate_size,
                    h,
                    false,
                    None,
                )?,
                up: ld.linear(
                    &format!("{p}.mlp.up_proj"),
                    cfg.intermediate_size,
                    h,
                    false,
                    None,
                )?,
                down: ld.linear(
                    &format!("{p}.mlp.down_proj"),
                    h,
                    cfg.intermediate_size,
                    false,
                    None,
                )?,
            };
            blocks.push(Block {
                input_norm: src.load_dense(&format!("{p}.input_layernorm.weight"), &[h], device)?,
                attn,
                post_norm: src.load_dense(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    device,
                )?,
                mlp,
            });
        }
        let norm = src.load_dense("model.norm.weight", &[h], device)?;
        let head_name = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = Projection::new(
            src.load_shaped(head_name, &[cfg.vocab_size, h], device)?,
            None,
        )?;

        let capacity = capacity.min(cfg.max_position_embeddings).max(1);
        let (cos, sin) = rope_tables(cfg, capacity, device)?;
        let caches = (0..cfg.num_layers)
            .map(|_| -> Result<LayerCache> {
                let shape = (rows.len(), cfg.num_kv_heads, capacity, hd);
                Ok(LayerCache {
                    k: Tensor::zeros(shape, DType::F32, device)?,
                    v: Tensor::zeros(shape, DType::F32, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            caches,
            capacity,
            pos: 0,
            rows: rows.len(),
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// How many tokens the caches hold at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens already processed.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Forgets the sequence; the caches are overwritten from position 0.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Feeds `tokens` (the same for every row) after those already seen. Returns logits
    /// `[rows, vocab]` at the last position, or `[rows, len, vocab]` when `all_positions`.
    pub fn forward(&mut self, tokens: &[u32], all_positions: bool) -> Result<Tensor> {
        let seq = tokens.len();
        if seq == 0 {
            return Err(Error::Request("no tokens to feed".into()));
        }
        if self.pos + seq > self.capacity {
            return Err(Error::Request(format!(
                "sequence of {} tokens exceeds the context of {} tokens",
                self.pos + seq,
                self.capacity
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Request(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        let ids = Tensor::new(tokens, &self.device)?
            .unsqueeze(0)?
            .repeat((self.rows, 1))?;
        let mut x = self.embed.forward(&ids)?;
        let cos = self.cos.narrow(0, self.pos, seq)?;
        let sin = self.sin.narrow(0, self.pos, seq)?;
        let mask = causal_mask(
            seq,
            self.pos,
            self.cfg.num_heads / self.cfg.num_kv_heads,
            &self.device,
        )?;
        for (block, cache) in self.blocks.iter().zip(self.caches.iter_mut()) {
            let residual = &x;
            let h = candle_nn::ops::rms_norm(&x, &block.input_norm, self.cfg.rms_norm_eps as f32)?;
            let h = attention(
                &block.attn,
                &h,
                cache,
                &self.cfg,
                self.pos,
                &cos,
                &sin,
                mask.as_ref(),
            )?;
            x = (residual + h)?;
            let residual = &x;
            let h = candle_nn::ops::rms_norm(&x, &block.post_norm, self.cfg.rms_norm_eps as f32)?;
            let h = mlp(&block.mlp, &h)?;
            x = (residual + h)?;
        }
        self.pos += seq;
        let x = if all_positions {
            x
        } else {
            x.narrow(1, seq - 1, 1)?.contiguous()?
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let logits = self.lm_head.forward(&x)?;
        Ok(if all_positions {
            logits
        } else {
            logits.squeeze(1)?
        })
    }
}

/// Every LoRA module must be one this architecture has.
fn check_adapter_modules(adapter: &LoraAdapter, cfg: &LlamaConfig) -> Result<()> {
    for module in adapter.modules.keys() {
        let layer_ok = module
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, _)| l.parse::<usize>().ok())
            .is_some_and(|l| l < cfg.num_layers);
        if !layer_ok {
            return Err(Error::Incompatible {
                arm: adapter.path.display().to_string(),
                message: format!(
                    "LoRA module `{module}` does not exist in a {}-layer model",
                    cfg.num_layers
                ),
            });
        }
    }
    Ok(())
}

fn rope_tables(cfg: &LlamaConfig, capacity: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq = cfg.rope_inv_freq();
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(capacity * half);
    let mut sin = Vec::with_capacity(capacity * half);
    for p in 0..capacity {
        for f in &inv_freq {
            // Angles in f64: at positions in the thousands f32 loses the low bits.
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (capacity, half), device)?,
        Tensor::from_vec(sin, (capacity, half), device)?,
    ))
}

/// Additive mask for `seq` new queries after `past` cached tokens, laid out for the
/// grouped query rows (`n_rep` query heads per KV head, head-major): `[n_rep·seq, past+seq]`.
/// `None` for a single query, which may attend to everything.
fn causal_mask(seq: usize, past: usize, n_rep: usize, device: &Device) -> Result<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let total = past + seq;
    let mut m = Vec::with_capacity(n_rep * seq * total);
    for _ in 0..n_rep {
        for i in 0..seq {
            m.extend((0..total).map(|j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }));
        }
    }
    Ok(Some(Tensor::from_vec(m, (n_rep * seq, total), device)?))
}

fn apply_rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    layout: RopeLayout,
) -> candle_core::Result<Tensor> {
    match layout {
        RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(x, cos, sin),
        RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
    }
}

#[allow(clippy::too_many_arguments)]
fn attention(
    attn: &Attention,
    x: &Tensor,
    cache: &mut LayerCache,
    cfg: &LlamaConfig,
    pos: usize,
    cos: &Tensor,
    sin: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, seq, _) = x.dims3()?;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let n_rep = nh / nkv;
    let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
        t.reshape((rows, seq, n, hd))?.transpose(1, 2)?.contiguous()
    };
    let q = heads(attn.q.forward(x)?, nh)?;
    let k = heads(attn.k.forward(x)?, nkv)?;
    let v = heads(attn.v.forward(x)?, nkv)?;
    let q = apply_rope(&q, cos, sin, cfg.rope_layout)?;
    let k = apply_rope(&k, cos, sin, cfg.rope_layout)?;

    cache.k.slice_set(&k, 2, pos)?;
    cache.v.slice_set(&v, 2, pos)?;
    let total = pos + seq;
    let keys = cache.k.narrow(2, 0, total)?;
    let values = cache.v.narrow(2, 0, total)?;

    // Grouped-query attention without copying K/V: the n_rep query heads that share a
    // KV head are stacked as extra query rows of that head.
    let q = (q.reshape((rows, nkv, n_rep * seq, hd))? * (1.0 / (hd as f64).sqrt()))?;
    let scores = q.matmul(&keys.t()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&values)?;
    let out = out
        .reshape((rows, nh, seq, hd))?
        .transpose(1, 2)?
        .reshape((rows, seq, nh * hd))?;
    attn.o.forward(&out)
}

fn mlp(mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
    let gate = candle_nn::ops::silu(&mlp.gate.forward(x)?)?;
    let up = mlp.up.forward(x)?;
    mlp.down.forward(&(gate * up)?)
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}
