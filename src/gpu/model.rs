//! One Llama-family model on the GPU, batched over rows that share its weights (the base
//! and the LoRA ARMs trained on it), each row with its own KV cache and low-rank delta.
//!
//! Everything is built at load: weights uploaded once (Q4_0/Q4_1/Q8_0 blocks as they
//! are stored, anything else as f32), activations and caches allocated once, and every
//! op of a token's forward pass built with its bind groups. A step only encodes them.
//! The token and its position are read from the two-word `cur` buffer, which the
//! sampler or a copy of the prompt writes, so nothing is rebuilt per token.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::cpu::llama::{check_adapter_modules, permute_for_interleaved_rope};
use crate::error::{Error, Result};
use crate::gpu::buffers::{storage_f32, storage_zeros};
use crate::gpu::ops::{AttentionBuffers, AttentionShape, Op, RopeShape, RopeStyle, MAX_BATCH_ROWS};
use crate::gpu::ops_guide::LoraStack;
use crate::gpu::{gpu_error, Kernels, QuantWeight, WeightFormat};
use crate::model::config::{LlamaConfig, RopeLayout};
use crate::model::lora::LoraAdapter;
use crate::model::weights::{Weight, WeightSource};

/// Index of the token id in `cur`.
pub const CUR_ID: usize = 0;
/// Index of the token's position in `cur`.
pub const CUR_POS: usize = 1;

pub struct GpuLlama {
    cfg: LlamaConfig,
    rows: usize,
    capacity: usize,
    /// One token's forward, in order; the logits land in `logits`.
    ops: Vec<Op>,
    logits: wgpu::Buffer,
    /// Bytes of weights one token reads (for the bandwidth figure of `bench`).
    weight_bytes: u64,
}

/// Activation scratch shared by all layers (they run one after another).
struct Scratch {
    x: wgpu::Buffer,
    xn: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    attn: wgpu::Buffer,
    proj: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    /// silu(gate)·up: its own buffer, as a dispatch may not read and write one buffer.
    act: wgpu::Buffer,
    lora_t: wgpu::Buffer,
}

/// Loads weights onto the device and builds ops for one model.
struct Builder<'a> {
    kernels: &'a Kernels,
    src: &'a dyn WeightSource,
    cfg: &'a LlamaConfig,
    rows: &'a [Option<&'a LoraAdapter>],
    ops: Vec<Op>,
    weight_bytes: u64,
    max_rank: usize,
}

impl GpuLlama {
    /// Loads the model with one batch row per entry of `rows` (`None`: the plain
    /// weights, `Some(adapter)`: with that LoRA). `cur` holds `[id, pos]`; `logits`, if
    /// given, receives the `[rows, vocab]` logits (it may be longer), else the model
    /// owns its own.
    pub fn load(
        kernels: &Kernels,
        src: &dyn WeightSource,
        cfg: &LlamaConfig,
        rows: &[Option<&LoraAdapter>],
        capacity: usize,
        cur: &wgpu::Buffer,
        logits: Option<wgpu::Buffer>,
    ) -> Result<Self> {
        let m = rows.len();
        if !(1..=MAX_BATCH_ROWS).contains(&m) {
            return Err(Error::Request(format!(
                "the GPU engine batches 1 to {MAX_BATCH_ROWS} rows on one set of weights \
                 (the base and up to {} LoRA ARMs), got {m}",
                MAX_BATCH_ROWS - 1
            )));
        }
        for adapter in rows.iter().flatten() {
            check_adapter_modules(adapter, cfg)?;
        }
        let ctx = kernels.context();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let inter = cfg.intermediate_size;
        let capacity = capacity.min(cfg.max_position_embeddings).max(1);
        let max_rank = rows.iter().flatten().map(|a| a.config.r).max().unwrap_or(1);
        let widest = h.max(q_out).max(inter);
        let s = Scratch {
            x: storage_zeros(ctx, "x", m * h),
            xn: storage_zeros(ctx, "xn", m * h),
            q: storage_zeros(ctx, "q", m * q_out),
            k: storage_zeros(ctx, "k", m * kv_out),
            v: storage_zeros(ctx, "v", m * kv_out),
            attn: storage_zeros(ctx, "attn", m * q_out),
            proj: storage_zeros(ctx, "proj", m * widest),
            gate: storage_zeros(ctx, "gate", m * inter),
            up: storage_zeros(ctx, "up", m * inter),
            act: storage_zeros(ctx, "act", m * inter),
            lora_t: storage_zeros(ctx, "lora t", m * max_rank),
        };
        let logits = match logits {
            Some(b) => b,
            None => storage_zeros(ctx, "logits", m * cfg.vocab_size),
        };
        let inv_freq: Vec<f32> = cfg.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = storage_f32(ctx, "rope inv_freq", &inv_freq);
        let style = match cfg.rope_layout {
            RopeLayout::HalfSplit => RopeStyle::HalfSplit,
            RopeLayout::Interleaved => RopeStyle::Interleaved,
        };
        let eps = cfg.rms_norm_eps as f32;

        let mut b = Builder {
            kernels,
            src,
            cfg,
            rows,
            ops: Vec::new(),
            weight_bytes: 0,
            max_rank,
        };
        let embed = b.weight("model.embed_tokens.weight", cfg.vocab_size, h)?;
        b.ops.push(kernels.embedding(&embed, cur, CUR_ID, &s.x, m)?);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let norm = b.vector(&format!("{p}.input_layernorm.weight"), h)?;
            b.ops.push(kernels.rms_norm(&s.x, &norm, &s.xn, m, h, eps)?);
            let attn = format!("{p}.self_attn");
            let qk = |heads| Some(heads);
            b.linear(
                &format!("{attn}.q_proj"),
                h,
                q_out,
                qk(cfg.num_heads),
                &s.xn,
                &s.q,
                &s.lora_t,
            )?;
            b.linear(
                &format!("{attn}.k_proj"),
                h,
                kv_out,
                qk(cfg.num_kv_heads),
                &s.xn,
                &s.k,
                &s.lora_t,
            )?;
            b.linear(
                &format!("{attn}.v_proj"),
                h,
                kv_out,
                None,
                &s.xn,
                &s.v,
                &s.lora_t,
            )?;
            for (buf, heads) in [(&s.q, cfg.num_heads), (&s.k, cfg.num_kv_heads)] {
                let shape = RopeShape {
                    vectors: m * heads,
                    head_dim: hd,
                    style,
                };
                b.ops
                    .push(kernels.rope(shape, buf, &inv_freq, cur, CUR_POS)?);
            }
            let k_cache = storage_zeros(ctx, "k cache", m * cfg.num_kv_heads * capacity * hd);
            let v_cache = storage_zeros(ctx, "v cache", m * cfg.num_kv_heads * capacity * hd);
            let shape = AttentionShape {
                rows: m,
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: hd,
                capacity,
            };
            let buffers = AttentionBuffers {
                q: &s.q,
                k_new: &s.k,
                v_new: &s.v,
                k_cache: &k_cache,
                v_cache: &v_cache,
                pos: cur,
                out: &s.attn,
            };
            b.ops.push(kernels.attention(shape, &buffers, CUR_POS)?);
            b.linear(
                &format!("{attn}.o_proj"),
                q_out,
                h,
                None,
                &s.attn,
                &s.proj,
                &s.lora_t,
            )?;
            b.ops.push(kernels.add_assign(&s.x, &s.proj, m * h)?);

            let norm = b.vector(&format!("{p}.post_attention_layernorm.weight"), h)?;
            b.ops.push(kernels.rms_norm(&s.x, &norm, &s.xn, m, h, eps)?);
            let mlp = format!("{p}.mlp");
            b.linear(
                &format!("{mlp}.gate_proj"),
                h,
                inter,
                None,
                &s.xn,
                &s.gate,
                &s.lora_t,
            )?;
            b.linear(
                &format!("{mlp}.up_proj"),
                h,
                inter,
                None,
                &s.xn,
                &s.up,
                &s.lora_t,
            )?;
            b.ops
                .push(kernels.silu_mul(&s.gate, &s.up, &s.act, m * inter)?);
            b.linear(
                &format!("{mlp}.down_proj"),
                inter,
                h,
                None,
                &s.act,
                &s.proj,
                &s.lora_t,
            )?;
            b.ops.push(kernels.add_assign(&s.x, &s.proj, m * h)?);
        }
        let norm = b.vector("model.norm.weight", h)?;
        b.ops.push(kernels.rms_norm(&s.x, &norm, &s.xn, m, h, eps)?);
        let head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            b.weight_bytes += weight_size(&embed);
            embed
        } else {
            b.weight("lm_head.weight", cfg.vocab_size, h)?
        };
        b.ops.push(kernels.matvec(&head, &s.xn, &logits, m)?);
        // The embedding reads one row per token, not the table.
        let weight_bytes = b.weight_bytes;
        Ok(Self {
            cfg: cfg.clone(),
            rows: m,
            capacity,
            ops: b.ops,
            logits,
            weight_bytes,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// `[rows, vocab]` logits of the last encoded token.
    pub fn logits(&self) -> &wgpu::Buffer {
        &self.logits
    }

    /// Bytes of weights one token's forward pass reads.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Encodes one token's forward pass (token and position from `cur`).
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        for op in &self.ops {
            op.encode_in(pass);
        }
    }
}

fn weight_size(w: &QuantWeight) -> u64 {
    (w.format.row_bytes(w.cols) * w.rows) as u64
}

impl Builder<'_> {
    /// Uploads a `[rows, cols]` weight: Q4_0/Q4_1/Q8_0 blocks as stored, anything else
    /// (F16, BF16, K-quants) dequantised to f32, which the f32 kernels read exactly.
    fn weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<QuantWeight> {
        let w = self.src.load_shaped(name, &[rows, cols], &Device::Cpu)?;
        let (format, bytes) = match &w {
            Weight::Quantized(q) => match q.dtype() {
                GgmlDType::Q4_0 => (WeightFormat::Q4_0, q.data()?.into_owned()),
                GgmlDType::Q4_1 => (WeightFormat::Q4_1, q.data()?.into_owned()),
                GgmlDType::Q8_0 => (WeightFormat::Q8_0, q.data()?.into_owned()),
                _ => (WeightFormat::F32, f32_bytes(&q.dequantize(&Device::Cpu)?)?),
            },
            Weight::Dense(t) => (WeightFormat::F32, f32_bytes(t)?),
        };
        drop(w);
        let label = name.to_string();
        let qw = QuantWeight::upload(
            self.kernels.context(),
            &label,
            format,
            rows,
            cols,
            &bytes,
            u64::MAX,
        )
        .map_err(|e| gpu_error(format!("{}: {e}", self.src.path().display())))?;
        if name != "model.embed_tokens.weight" {
            self.weight_bytes += weight_size(&qw);
        }
        Ok(qw)
    }

    /// A 1-D f32 weight (norms, biases).
    fn vector(&mut self, name: &str, n: usize) -> Result<wgpu::Buffer> {
        let t = self.src.load_dense(name, &[n], &Device::Cpu)?;
        self.weight_bytes += (n * 4) as u64;
        Ok(storage_f32(
            self.kernels.context(),
            name,
            &t.to_vec1::<f32>()?,
        ))
    }

    /// `y = W · x` for every row, plus the projection's bias, plus each row's LoRA delta.
    /// `qk_heads` marks q/k, whose LoRA B rows follow a GGUF's interleaved-RoPE order.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        module: &str,
        inp: usize,
        out: usize,
        qk_heads: Option<usize>,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        lora_t: &wgpu::Buffer,
    ) -> Result<()> {
        let m = self.rows.len();
        let w = self.weight(&format!("{module}.weight"), out, inp)?;
        self.ops.push(self.kernels.matvec(&w, x, y, m)?);
        if self.cfg.attention_bias && module.contains(".self_attn.") && !module.ends_with("o_proj")
        {
            let bias = self
                .src
                .load_dense(&format!("{module}.bias"), &[out], &Device::Cpu)?
                .to_vec1::<f32>()?;
            // One copy per row, so the residual-add kernel applies it to every row.
            let per_row: Vec<f32> = bias.iter().copied().cycle().take(m * out).collect();
            let bias = storage_f32(self.kernels.context(), "bias", &per_row);
            self.ops.push(self.kernels.add_assign(y, &bias, m * out)?);
        }
        if let Some(op) = self.lora(module, inp, out, qk_heads, x, y, lora_t)? {
            self.ops.push(op);
        }
        Ok(())
    }

    /// The LoRA op of `module` over the rows whose adapter has it, if any does.
    #[allow(clippy::too_many_arguments)]
    fn lora(
        &self,
        module: &str,
        inp: usize,
        out: usize,
        qk_heads: Option<usize>,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        lora_t: &wgpu::Buffer,
    ) -> Result<Option<Op>> {
        let pairs: Vec<_> = self
            .rows
            .iter()
            .map(|row| row.and_then(|a| a.modules.get(module).map(|p| (a, p))))
            .collect();
        let Some(first) = pairs.iter().position(Option::is_some) else {
            return Ok(None);
        };
        let arms = pairs.len() - first;
        let rank = self.max_rank;
        let mut a_stack = vec![0f32; arms * rank * inp];
        let mut b_stack = vec![0f32; arms * out * rank];
        for (slot, pair) in pairs[first..].iter().enumerate() {
            let Some((adapter, pair)) = pair else {
                continue;
            };
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
            let mut b = pair.b_scaled.to_device(&Device::Cpu)?;
            if let (Some(heads), RopeLayout::Interleaved) = (qk_heads, self.cfg.rope_layout) {
                b = permute_for_interleaved_rope(&b, heads, self.cfg.head_dim)?;
            }
            let a = pair.a.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
            for (k, row) in a.iter().enumerate() {
                let at = (slot * rank + k) * inp;
                a_stack[at..at + inp].copy_from_slice(row);
            }
            for (i, row) in b.to_vec2::<f32>()?.iter().enumerate() {
                let at = (slot * out + i) * rank;
                b_stack[at..at + r].copy_from_slice(row);
            }
        }
        let ctx = self.kernels.context();
        let a = storage_f32(ctx, "lora A", &a_stack);
        let b = storage_f32(ctx, "lora B", &b_stack);
        let stack = LoraStack {
            a: &a,
            b: &b,
            t: lora_t,
            first,
            arms,
            rank,
            inp,
            out,
        };
        self.kernels.lora(&stack, x, y).map(Some)
    }
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}
