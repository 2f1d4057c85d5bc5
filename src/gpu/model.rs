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

use crate::error::{Error, Result};
use crate::gpu::buffers::{storage_f32, storage_zeros};
use crate::gpu::ops::{
    need, AttentionBuffers, AttentionShape, LoraDown, LoraUp, MatVecEpilogue, MatVecStore, Op,
    RopeStyle, MAX_BATCH_ROWS,
};
use crate::gpu::{gpu_error, Kernels, QuantWeight, WeightFormat};
use crate::model::config::{LlamaConfig, RopeLayout};
use crate::model::llama::{self, Proj};
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
    /// q, k and v of each row side by side: `[rows, (heads + 2·kv_heads)·head_dim]`.
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    /// The gate projection, then act(gate)·up stored over it (`MatVecStore::Gate`).
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
            llama::check_adapter_modules(adapter, cfg)?;
        }
        let ctx = kernels.context();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let inter = cfg.intermediate_size;
        let capacity = capacity.min(cfg.max_position_embeddings).max(1);
        let max_rank = rows
            .iter()
            .flatten()
            .map(|a| a.max_rank())
            .max()
            .unwrap_or(1)
            .max(1);
        let s = Scratch {
            x: storage_zeros(ctx, "x", m * h),
            xn: storage_zeros(ctx, "xn", m * h),
            qkv: storage_zeros(ctx, "qkv", m * (q_out + 2 * kv_out)),
            attn: storage_zeros(ctx, "attn", m * q_out),
            act: storage_zeros(ctx, "act", m * inter),
            // Per row: q/k/v's three stacked ranks, or o's partial sums, one per head.
            lora_t: storage_zeros(ctx, "lora t", m * cfg.num_heads.max(3) * max_rank),
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
        let embed = b.weight(llama::EMBED, cfg.vocab_size, h)?;
        b.ops.push(kernels.embedding(&embed, cur, CUR_ID, &s.x, m)?);
        for i in 0..cfg.num_layers {
            let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] =
                Proj::ALL.map(|p| Projection::of(i, p, cfg));
            let norm = b.vector(&llama::input_norm(i), h)?;
            let projections = [q_proj, k_proj, v_proj];
            let qkv = b.lora_group(&projections, &s.lora_t, true)?;
            b.norm_and_lora_down(&s.x, &norm, &s.xn, &qkv, &s.lora_t)?;
            b.stacked_linear(&projections, &s.xn, &s.qkv, qkv.up(0, &s.lora_t))?;
            let o = b.lora_group(std::slice::from_ref(&o_proj), &s.lora_t, false)?;
            let k_cache = storage_zeros(ctx, "k cache", m * cfg.num_kv_heads * capacity * hd);
            let v_cache = storage_zeros(ctx, "v cache", m * cfg.num_kv_heads * capacity * hd);
            let shape = AttentionShape {
                rows: m,
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: hd,
                capacity,
                rope: style,
                window: cfg.sliding_window(i),
            };
            let buffers = AttentionBuffers {
                qkv: &s.qkv,
                k_cache: &k_cache,
                v_cache: &v_cache,
                pos: cur,
                inv_freq: &inv_freq,
                out: &s.attn,
                // o_proj's LoRA down half, one partial sum per head, by the attention
                // workgroups themselves.
                o_lora: o.down(&s.lora_t, m),
            };
            b.ops.push(kernels.attention(shape, &buffers, CUR_POS)?);
            // The residual add is o_proj's store.
            let o_lora = o.up_per_head(&s.lora_t, cfg.num_heads);
            let o_store = Store::new(MatVecStore::Add, cfg.o_bias);
            b.linear(&o_proj, &s.attn, &s.x, o_lora, o_store)?;

            let norm = b.vector(&llama::post_attention_norm(i), h)?;
            let gate_up = b.lora_group(&[gate_proj.clone(), up_proj.clone()], &s.lora_t, false)?;
            b.norm_and_lora_down(&s.x, &norm, &s.xn, &gate_up, &s.lora_t)?;
            // up_proj stores act(gate) · up over gate_proj's output, and down_proj adds
            // into the residual stream: the gating, the add and the biases cost no
            // dispatch of their own.
            let gate_lora = gate_up.up(0, &s.lora_t);
            b.linear(
                &gate_proj,
                &s.xn,
                &s.act,
                gate_lora,
                Store::new(MatVecStore::Write, cfg.mlp_bias),
            )?;
            let up_lora = gate_up.up(1, &s.lora_t);
            b.linear(
                &up_proj,
                &s.xn,
                &s.act,
                up_lora,
                Store::new(MatVecStore::Gate(cfg.hidden_act), cfg.mlp_bias),
            )?;
            let down = b.lora_group(std::slice::from_ref(&down_proj), &s.lora_t, false)?;
            b.lora_down(&down, &s.act, &s.lora_t)?;
            let down_lora = down.up(0, &s.lora_t);
            b.linear(
                &down_proj,
                &s.act,
                &s.x,
                down_lora,
                Store::new(MatVecStore::Add, cfg.mlp_bias),
            )?;
        }
        let norm = b.vector(llama::FINAL_NORM, h)?;
        b.ops.push(kernels.rms_norm(&s.x, &norm, &s.xn, m, h, eps)?);
        let head = if llama::head_tensor(cfg, src) == llama::EMBED {
            b.weight_bytes += weight_size(&embed);
            embed
        } else {
            b.weight(llama::LM_HEAD, cfg.vocab_size, h)?
        };
        b.ops.push(kernels.matvec(&head, &s.xn, &logits, m)?);
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

    /// Compute dispatches in one token's forward pass.
    pub fn dispatch_count(&self) -> usize {
        self.ops.iter().map(Op::dispatch_count).sum()
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
        self.stacked_weight(name, &[(name, rows)], cols)
    }

    /// Projections that read one input, stacked into one `[Σ rows, cols]` weight so one
    /// matvec computes them all (their outputs side by side in each batch row). In their
    /// stored format when they share it, else all dequantised to f32.
    fn stacked_weight(
        &mut self,
        label: &str,
        parts: &[(&str, usize)],
        cols: usize,
    ) -> Result<QuantWeight> {
        let mut data = Vec::with_capacity(parts.len());
        for &(name, rows) in parts {
            data.push(self.weight_data(name, rows, cols, false)?);
        }
        if data.iter().any(|(f, _)| *f != data[0].0) {
            data.clear();
            for &(name, rows) in parts {
                data.push(self.weight_data(name, rows, cols, true)?);
            }
        }
        let bytes: Vec<u8> = data.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let rows = parts.iter().map(|p| p.1).sum();
        let ctx = self.kernels.context();
        let w = QuantWeight::upload(ctx, label, data[0].0, rows, cols, &bytes, u64::MAX)
            .map_err(|e| gpu_error(format!("{}: {e}", self.src.path().display())))?;
        // The embedding reads one row per token, not the table.
        if label != llama::EMBED {
            self.weight_bytes += weight_size(&w);
        }
        Ok(w)
    }

    /// A weight's format and bytes as [`Builder::weight`] uploads them, or as f32 with
    /// `dequantise`.
    fn weight_data(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        dequantise: bool,
    ) -> Result<(WeightFormat, Vec<u8>)> {
        let w = self.src.load_shaped(name, &[rows, cols], &Device::Cpu)?;
        Ok(match &w {
            Weight::Quantized(q) => match q.dtype() {
                GgmlDType::Q4_0 if !dequantise => (WeightFormat::Q4_0, q.data()?.into_owned()),
                GgmlDType::Q4_1 if !dequantise => (WeightFormat::Q4_1, q.data()?.into_owned()),
                GgmlDType::Q8_0 if !dequantise => (WeightFormat::Q8_0, q.data()?.into_owned()),
                _ => (WeightFormat::F32, f32_bytes(&q.dequantize(&Device::Cpu)?)?),
            },
            Weight::Dense(t) => (WeightFormat::F32, f32_bytes(t)?),
        })
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

    /// `y = W · x` for every row, plus each ARM row's LoRA delta (`lora`, from the
    /// projection's group) and the module's bias if `store` has one, stored as it says.
    fn linear(
        &mut self,
        proj: &Projection,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        lora: Option<LoraUp<'_>>,
        store: Store,
    ) -> Result<()> {
        let (module, inp, out) = (&proj.module, proj.inp, proj.out);
        let w = self.weight(&format!("{module}.weight"), out, inp)?;
        let bias = match store.bias {
            true => Some(self.vector(&format!("{module}.bias"), out)?),
            false => None,
        };
        let epilogue = MatVecEpilogue {
            lora: lora.as_ref(),
            bias: bias.as_ref(),
            store: store.mode,
        };
        let op = self
            .kernels
            .matvec_with(&w, x, y, self.rows.len(), &epilogue)?;
        self.ops.push(op);
        Ok(())
    }

    /// Projections that read one input as one matvec ([`Builder::stacked_weight`]):
    /// `y` is `[rows, Σ outs]`, each row its projections' outputs side by side, plus
    /// the group's stacked LoRA delta and, where the config has them (Qwen2's q/k/v),
    /// the biases.
    fn stacked_linear(
        &mut self,
        parts: &[Projection],
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        lora: Option<LoraUp<'_>>,
    ) -> Result<()> {
        let names: Vec<String> = parts
            .iter()
            .map(|p| format!("{}.weight", p.module))
            .collect();
        let shapes: Vec<(&str, usize)> = names
            .iter()
            .map(String::as_str)
            .zip(parts.iter().map(|p| p.out))
            .collect();
        let w = self.stacked_weight(&names.join(" + "), &shapes, parts[0].inp)?;
        // The biases stacked as the weights are, added by the matvec's store.
        let bias = if self.cfg.qkv_bias {
            let mut bias = Vec::with_capacity(w.rows);
            for p in parts {
                let name = format!("{}.bias", p.module);
                bias.extend(
                    self.src
                        .load_dense(&name, &[p.out], &Device::Cpu)?
                        .to_vec1::<f32>()?,
                );
            }
            self.weight_bytes += (bias.len() * 4) as u64;
            Some(storage_f32(self.kernels.context(), "bias", &bias))
        } else {
            None
        };
        let epilogue = MatVecEpilogue {
            lora: lora.as_ref(),
            bias: bias.as_ref(),
            store: MatVecStore::Write,
        };
        let op = self
            .kernels
            .matvec_with(&w, x, y, self.rows.len(), &epilogue)?;
        self.ops.push(op);
        Ok(())
    }

    /// Uploads the LoRA factors of projections that read the same input: the rows' A
    /// matrices stacked for one down-projection into `t` (see [`Builder::lora_down`]),
    /// each projection's B for the up half its matvec adds — or, with `stacked_up`, one
    /// B for all of them for their [`Builder::stacked_linear`], block-diagonal over the
    /// slots of `t`. Rows from the first adapted one on take part; a row whose adapter
    /// lacks a projection gets zeros there.
    fn lora_group(
        &mut self,
        projections: &[Projection],
        t: &wgpu::Buffer,
        stacked_up: bool,
    ) -> Result<LoraGroup> {
        let up_count = if stacked_up { 1 } else { projections.len() };
        let adapted = |p: &Projection, row: &Option<&LoraAdapter>| {
            row.is_some_and(|a| a.modules.contains_key(&p.module))
        };
        let Some(first) =
            (0..self.rows.len()).find(|&r| projections.iter().any(|p| adapted(p, &self.rows[r])))
        else {
            return Ok(LoraGroup::none(up_count));
        };
        let arms = self.rows.len() - first;
        let rank = self.max_rank;
        // Only projections some row adapts get a slot in t.
        let slots: Vec<Option<usize>> = projections
            .iter()
            .scan(0, |next, p| {
                let used = self.rows.iter().any(|row| adapted(p, row));
                let slot = used.then_some(*next);
                *next += usize::from(used);
                Some(slot)
            })
            .collect();
        let stacked = slots.iter().flatten().count() * rank;
        let inp = projections[0].inp;
        let mut a_stack = vec![0f32; arms * stacked * inp];
        // Each adapted projection's B as `[arms, out, rank]`.
        let mut b_stacks = Vec::with_capacity(projections.len());
        for (p, slot) in projections.iter().zip(&slots) {
            let Some(slot) = *slot else {
                b_stacks.push(None);
                continue;
            };
            let mut b_stack = vec![0f32; arms * p.out * rank];
            for (a, row) in self.rows[first..].iter().enumerate() {
                let Some((adapter, pair)) =
                    row.and_then(|ad| ad.modules.get(&p.module).map(|pr| (ad, pr)))
                else {
                    continue;
                };
                let r = pair.rank();
                let shape_err = |name: &str, got: &Tensor, want: Vec<usize>| Error::TensorShape {
                    path: adapter.path.clone(),
                    name: format!("{}.{name}", p.module),
                    got: got.dims().to_vec(),
                    want,
                };
                if pair.a.dims() != [r, p.inp] {
                    return Err(shape_err("lora_A.weight", &pair.a, vec![r, p.inp]));
                }
                if pair.b_scaled.dims() != [p.out, r] {
                    return Err(shape_err("lora_B.weight", &pair.b_scaled, vec![p.out, r]));
                }
                for (k, a_row) in pair
                    .a
                    .to_device(&Device::Cpu)?
                    .to_vec2::<f32>()?
                    .iter()
                    .enumerate()
                {
                    let at = (a * stacked + slot * rank + k) * inp;
                    a_stack[at..at + inp].copy_from_slice(a_row);
                }
                let mut b = pair.b_scaled.to_device(&Device::Cpu)?;
                if let (Some(heads), RopeLayout::Interleaved) = (p.qk_heads, self.cfg.rope_layout) {
                    b = llama::permute_for_interleaved_rope(&b, heads, self.cfg.head_dim)?;
                }
                for (i, b_row) in b.to_vec2::<f32>()?.iter().enumerate() {
                    let at = (a * p.out + i) * rank;
                    b_stack[at..at + r].copy_from_slice(b_row);
                }
            }
            b_stacks.push(Some(b_stack));
        }
        let ctx = self.kernels.context();
        let ups = if stacked_up {
            let total: usize = projections.iter().map(|p| p.out).sum();
            let mut all = vec![0f32; arms * total * stacked];
            let mut row0 = 0;
            for ((p, slot), b) in projections.iter().zip(&slots).zip(&b_stacks) {
                if let (Some(slot), Some(b)) = (slot, b) {
                    for a in 0..arms {
                        for i in 0..p.out {
                            let from = (a * p.out + i) * rank;
                            let to = (a * total + row0 + i) * stacked + slot * rank;
                            all[to..to + rank].copy_from_slice(&b[from..from + rank]);
                        }
                    }
                }
                row0 += p.out;
            }
            vec![Some((storage_f32(ctx, "lora B", &all), 0, stacked))]
        } else {
            let slotted = slots.iter().zip(&b_stacks);
            slotted
                .map(|(slot, b)| {
                    Some((
                        storage_f32(ctx, "lora B", b.as_ref()?),
                        (*slot)? * rank,
                        rank,
                    ))
                })
                .collect()
        };
        need(t, arms * stacked, "lora t", "LoRA group")?;
        Ok(LoraGroup {
            first,
            stride: stacked,
            a: Some(storage_f32(self.kernels.context(), "lora A", &a_stack)),
            inp,
            ups,
        })
    }

    /// The group's down-projection of `x` into `t`, if any row adapts it.
    fn lora_down(&mut self, group: &LoraGroup, x: &wgpu::Buffer, t: &wgpu::Buffer) -> Result<()> {
        if let Some(down) = group.down(t, self.rows.len()) {
            self.ops.push(self.kernels.lora_down(&down, x)?);
        }
        Ok(())
    }

    /// `y = rms_norm(x) · weight`, with the group's down-projection of `y` folded into
    /// the same dispatch when any row adapts it.
    fn norm_and_lora_down(
        &mut self,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        y: &wgpu::Buffer,
        group: &LoraGroup,
        t: &wgpu::Buffer,
    ) -> Result<()> {
        let (m, n, eps) = (
            self.rows.len(),
            self.cfg.hidden_size,
            self.cfg.rms_norm_eps as f32,
        );
        let op = match group.down(t, m) {
            Some(down) => self.kernels.rms_norm_lora(x, weight, y, m, n, eps, &down)?,
            None => self.kernels.rms_norm(x, weight, y, m, n, eps)?,
        };
        self.ops.push(op);
        Ok(())
    }
}

/// A projection of one layer: its module path and shape.
#[derive(Clone)]
struct Projection {
    module: String,
    inp: usize,
    out: usize,
    /// q/k: heads, whose B rows follow a GGUF's interleaved-RoPE order.
    qk_heads: Option<usize>,
}

impl Projection {
    fn of(layer: usize, proj: Proj, cfg: &LlamaConfig) -> Self {
        let (out, inp) = proj.shape(cfg);
        Self {
            module: llama::module_path(layer, proj),
            inp,
            out,
            qk_heads: proj.rope_heads(cfg),
        }
    }
}

/// One LoRA group on the device: the stacked A matrices of its down-projection and
/// each projection's B stack with its offset in `t`.
struct LoraGroup {
    first: usize,
    /// Stacked rank: `t` values per adapted row.
    stride: usize,
    /// `[arms, stride, inp]`; `None` when no row adapts any projection of the group.
    a: Option<wgpu::Buffer>,
    inp: usize,
    /// Each up half: B `[arms, outputs, rank]`, its offset in `t` and its rank.
    ups: Vec<Option<(wgpu::Buffer, usize, usize)>>,
}

impl LoraGroup {
    fn none(ups: usize) -> Self {
        Self {
            first: 0,
            stride: 0,
            a: None,
            inp: 0,
            ups: (0..ups).map(|_| None).collect(),
        }
    }

    /// The down half over batch rows `first..m`, if the group has one.
    fn down<'a>(&'a self, t: &'a wgpu::Buffer, m: usize) -> Option<LoraDown<'a>> {
        self.a.as_ref().map(|a| LoraDown {
            a,
            t,
            first: self.first,
            arms: m - self.first,
            rank: self.stride,
            inp: self.inp,
        })
    }

    /// The up half of a one-projection group whose down half the attention op computed
    /// as one partial sum per head.
    fn up_per_head<'a>(&'a self, t: &'a wgpu::Buffer, heads: usize) -> Option<LoraUp<'a>> {
        self.up(0, t).map(|up| LoraUp {
            t_stride: self.stride * heads,
            parts: heads,
            ..up
        })
    }

    /// Up half `i` (a projection's, or the stacked one), if any row adapts it.
    fn up<'a>(&'a self, i: usize, t: &'a wgpu::Buffer) -> Option<LoraUp<'a>> {
        self.ups[i].as_ref().map(|(b, t_offset, rank)| LoraUp {
            b,
            t,
            first: self.first,
            rank: *rank,
            t_offset: *t_offset,
            t_stride: self.stride,
            parts: 1,
        })
    }
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}

/// How a [`Builder::linear`] stores, and whether its module has a bias to add.
#[derive(Clone, Copy)]
struct Store {
    mode: MatVecStore,
    bias: bool,
}

impl Store {
    fn new(mode: MatVecStore, bias: bool) -> Self {
        Self { mode, bias }
    }
}
