//! One Llama-family model on the GPU, batched over rows that share its weights (the base
//! and the LoRA ARMs trained on it), each row with its own KV cache and low-rank delta.
//!
//! Everything is built at load: weights uploaded once (Q4_0/Q4_1/Q8_0 blocks as they
//! are stored, anything else as f32), activations and caches allocated once, and every
//! op of a token's forward pass built with its bind groups. A step only encodes them.
//! The token and its position are read from the two-word `cur` buffer, which the
//! sampler or a copy of the prompt writes, so nothing is rebuilt per token.
//!
//! A prompt goes through a second set of the same ops built over a chunk of positions
//! (each a batch of rows): every matvec reads its weights once for the whole chunk,
//! attention lets each position see the cache and the chunk's earlier positions, and
//! the KV caches are the decode step's own. Only the positions whose logits are wanted
//! go through the head, one at a time in the decode step's buffers.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::gpu::buffers::{storage_f32, storage_zeros};
use crate::gpu::ops::{
    AttentionBuffers, AttentionShape, LoraDown, LoraUp, MatVecEpilogue, MatVecStore, Op, RopeStyle,
    MAX_BATCH_ROWS, MAX_MATVEC_ROWS,
};
use crate::gpu::{gpu_error, GpuContext, Kernels, QuantWeight, WeightFormat};
use crate::model::config::{LlamaConfig, RopeLayout};
use crate::model::llama::{self, Proj};
use crate::model::lora::LoraAdapter;
use crate::model::weights::{Weight, WeightSource};

/// Index of the token id in `cur`.
pub const CUR_ID: usize = 0;
/// Index of the token's position in `cur`.
pub const CUR_POS: usize = 1;
/// Index of a prompt chunk's first position in the chunk buffer; its ids follow.
pub const CHUNK_POS: usize = 0;
/// Index of a prompt chunk's first id in the chunk buffer.
pub const CHUNK_IDS: usize = 1;

pub struct GpuLlama {
    cfg: LlamaConfig,
    rows: usize,
    capacity: usize,
    /// One token's forward through the layers, in order; the residual stream ends in
    /// `step.x`.
    step: Pass,
    /// The final norm and the LM head over `step.x`; the logits land in `logits`.
    head: Vec<Op>,
    /// A prompt chunk's forward through the layers: `chunk.positions` positions at once,
    /// each a batch of `rows` rows, the weights read once for all of them.
    chunk: Pass,
    logits: wgpu::Buffer,
    /// Bytes of weights one token reads (for the bandwidth figure of `bench`).
    weight_bytes: u64,
}

/// The ops of one forward through the layers over `positions` positions (1: a decode
/// step) and the scratch they work in.
struct Pass {
    positions: usize,
    /// Where the embedding reads the ids and attention the first position.
    ids: wgpu::Buffer,
    id_index: usize,
    pos_index: usize,
    s: Scratch,
    ops: Vec<Op>,
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
    /// Attention scores, `[rows, heads, capacity]`.
    scores: wgpu::Buffer,
}

/// A scratch buffer, named for the helpers that build one op per pass.
#[derive(Clone, Copy)]
enum Buf {
    X,
    Xn,
    Qkv,
    Attn,
    Act,
}

impl Scratch {
    fn new(
        ctx: &GpuContext,
        cfg: &LlamaConfig,
        rows: usize,
        max_rank: usize,
        capacity: usize,
    ) -> Self {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        Self {
            x: storage_zeros(ctx, "x", rows * h),
            xn: storage_zeros(ctx, "xn", rows * h),
            qkv: storage_zeros(ctx, "qkv", rows * (q_out + 2 * kv_out)),
            attn: storage_zeros(ctx, "attn", rows * q_out),
            act: storage_zeros(ctx, "act", rows * cfg.intermediate_size),
            // Per row: q/k/v's three stacked ranks, or o's partial sums, one per head.
            lora_t: storage_zeros(ctx, "lora t", rows * cfg.num_heads.max(3) * max_rank),
            scores: storage_zeros(ctx, "attention scores", rows * cfg.num_heads * capacity),
        }
    }

    fn get(&self, b: Buf) -> &wgpu::Buffer {
        match b {
            Buf::X => &self.x,
            Buf::Xn => &self.xn,
            Buf::Qkv => &self.qkv,
            Buf::Attn => &self.attn,
            Buf::Act => &self.act,
        }
    }
}

/// Loads weights onto the device and builds the ops of both passes from them.
struct Builder<'a> {
    kernels: &'a Kernels,
    src: &'a dyn WeightSource,
    cfg: &'a LlamaConfig,
    rows: &'a [Option<&'a LoraAdapter>],
    /// The decode step and the prompt chunk, each op built for both.
    passes: [Pass; 2],
    weight_bytes: u64,
    max_rank: usize,
}

impl GpuLlama {
    /// Loads the model with one batch row per entry of `rows` (`None`: the plain
    /// weights, `Some(adapter)`: with that LoRA). `cur` holds `[id, pos]`; `logits`, if
    /// given, receives the `[rows, vocab]` logits (it may be longer), else the model
    /// owns its own. `chunk` holds a prompt chunk's first position and its
    /// `chunk_positions` ids ([`CHUNK_POS`], [`CHUNK_IDS`]).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        kernels: &Kernels,
        src: &dyn WeightSource,
        cfg: &LlamaConfig,
        rows: &[Option<&LoraAdapter>],
        capacity: usize,
        cur: &wgpu::Buffer,
        logits: Option<wgpu::Buffer>,
        chunk: (&wgpu::Buffer, usize),
    ) -> Result<Self> {
        let m = rows.len();
        if !(1..=MAX_BATCH_ROWS).contains(&m) {
            return Err(Error::Request(format!(
                "the GPU engine batches 1 to {MAX_BATCH_ROWS} rows on one set of weights \
                 (the base and up to {} LoRA ARMs), got {m}",
                MAX_BATCH_ROWS - 1
            )));
        }
        let (chunk_ids, chunk_positions) = chunk;
        if chunk_positions == 0 || m * chunk_positions > MAX_MATVEC_ROWS {
            return Err(gpu_error(format!(
                "a prompt chunk of {chunk_positions} positions × {m} rows: want 1 to \
                 {MAX_MATVEC_ROWS} rows"
            )));
        }
        for adapter in rows.iter().flatten() {
            llama::check_adapter_modules(adapter, cfg)?;
        }
        let ctx = kernels.context();
        let h = cfg.hidden_size;
        let capacity = capacity.min(cfg.max_position_embeddings).max(1);
        let max_rank = rows
            .iter()
            .flatten()
            .map(|a| a.max_rank())
            .max()
            .unwrap_or(1)
            .max(1);
        let pass = |ids: &wgpu::Buffer, id_index, pos_index, positions| Pass {
            positions,
            ids: ids.clone(),
            id_index,
            pos_index,
            s: Scratch::new(ctx, cfg, m * positions, max_rank, capacity),
            ops: Vec::new(),
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
            passes: [
                pass(cur, CUR_ID, CUR_POS, 1),
                pass(chunk_ids, CHUNK_IDS, CHUNK_POS, chunk_positions),
            ],
            weight_bytes: 0,
            max_rank,
        };
        let embed = b.weight(llama::EMBED, cfg.vocab_size, h)?;
        for p in &mut b.passes {
            let op =
                kernels.embedding_positions(&embed, &p.ids, p.id_index, &p.s.x, m, p.positions)?;
            p.ops.push(op);
        }
        for i in 0..cfg.num_layers {
            let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] =
                Proj::ALL.map(|p| Projection::of(i, p, cfg));
            let norm = b.vector(&llama::input_norm(i), h)?;
            let projections = [q_proj, k_proj, v_proj];
            let qkv = b.lora_group(&projections, true)?;
            b.norm_and_lora_down(Buf::X, &norm, Buf::Xn, &qkv)?;
            b.stacked_linear(&projections, Buf::Xn, Buf::Qkv, &qkv)?;
            let o = b.lora_group(std::slice::from_ref(&o_proj), false)?;
            // Both passes write the one cache of each layer.
            let k_cache = storage_zeros(
                ctx,
                "k cache",
                m * cfg.num_kv_heads * capacity * cfg.head_dim,
            );
            let v_cache = storage_zeros(
                ctx,
                "v cache",
                m * cfg.num_kv_heads * capacity * cfg.head_dim,
            );
            for p in &mut b.passes {
                let shape = AttentionShape {
                    rows: m,
                    heads: cfg.num_heads,
                    kv_heads: cfg.num_kv_heads,
                    head_dim: cfg.head_dim,
                    capacity,
                    rope: style,
                    window: cfg.sliding_window(i),
                    positions: p.positions,
                };
                let buffers = AttentionBuffers {
                    qkv: &p.s.qkv,
                    k_cache: &k_cache,
                    v_cache: &v_cache,
                    pos: &p.ids,
                    inv_freq: &inv_freq,
                    out: &p.s.attn,
                    // o_proj's LoRA down half, one partial sum per head, by the attention
                    // workgroups themselves.
                    o_lora: o.down(&p.s.lora_t, m, p.positions),
                };
                let op = kernels.attention_in(shape, &buffers, p.pos_index, &p.s.scores)?;
                p.ops.push(op);
            }
            // The residual add is o_proj's store.
            let o_store = Store::new(MatVecStore::Add, cfg.o_bias);
            b.linear(
                &o_proj,
                Buf::Attn,
                Buf::X,
                Lora::PerHead(&o, cfg.num_heads),
                o_store,
            )?;

            let norm = b.vector(&llama::post_attention_norm(i), h)?;
            let gate_up = b.lora_group(&[gate_proj.clone(), up_proj.clone()], false)?;
            b.norm_and_lora_down(Buf::X, &norm, Buf::Xn, &gate_up)?;
            // up_proj stores act(gate) · up over gate_proj's output, and down_proj adds
            // into the residual stream: the gating, the add and the biases cost no
            // dispatch of their own.
            let write = Store::new(MatVecStore::Write, cfg.mlp_bias);
            b.linear(&gate_proj, Buf::Xn, Buf::Act, Lora::Up(&gate_up, 0), write)?;
            let gate = Store::new(MatVecStore::Gate(cfg.hidden_act), cfg.mlp_bias);
            b.linear(&up_proj, Buf::Xn, Buf::Act, Lora::Up(&gate_up, 1), gate)?;
            let down = b.lora_group(std::slice::from_ref(&down_proj), false)?;
            b.lora_down(&down, Buf::Act)?;
            let add = Store::new(MatVecStore::Add, cfg.mlp_bias);
            b.linear(&down_proj, Buf::Act, Buf::X, Lora::Up(&down, 0), add)?;
        }
        let norm = b.vector(llama::FINAL_NORM, h)?;
        let head_w = if llama::head_tensor(cfg, src) == llama::EMBED {
            b.weight_bytes += weight_size(&embed);
            embed
        } else {
            b.weight(llama::LM_HEAD, cfg.vocab_size, h)?
        };
        let weight_bytes = b.weight_bytes;
        let [step, chunk] = b.passes;
        // Only the decode batch goes through the head: a chunk's positions are copied
        // into `step.x` one at a time, and only those whose logits are wanted.
        let head = vec![
            kernels.rms_norm(&step.s.x, &norm, &step.s.xn, m, h, eps)?,
            kernels.matvec(&head_w, &step.s.xn, &logits, m)?,
        ];
        Ok(Self {
            cfg: cfg.clone(),
            rows: m,
            capacity,
            step,
            head,
            chunk,
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

    /// Positions one prompt chunk holds.
    pub fn chunk_positions(&self) -> usize {
        self.chunk.positions
    }

    /// `[rows, vocab]` logits of the last encoded head.
    pub fn logits(&self) -> &wgpu::Buffer {
        &self.logits
    }

    /// Bytes of weights one token's forward pass reads.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Compute dispatches in one token's forward pass.
    pub fn dispatch_count(&self) -> usize {
        count(&self.step.ops) + self.head_dispatch_count()
    }

    /// Compute dispatches in one prompt chunk's pass through the layers.
    pub fn chunk_dispatch_count(&self) -> usize {
        count(&self.chunk.ops)
    }

    /// Compute dispatches of the final norm and head.
    pub fn head_dispatch_count(&self) -> usize {
        count(&self.head)
    }

    /// Encodes one token's forward pass (token and position from `cur`).
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        for op in self.step.ops.iter().chain(&self.head) {
            op.encode_in(pass);
        }
    }

    /// Encodes a prompt chunk's pass through the layers (first position and ids from the
    /// chunk buffer); the KV caches take every position, no logits are computed.
    pub fn encode_chunk(&self, pass: &mut wgpu::ComputePass<'_>) {
        for op in &self.chunk.ops {
            op.encode_in(pass);
        }
    }

    /// Copies the residual stream of chunk position `j` to where the head reads it.
    pub fn copy_chunk_position(&self, encoder: &mut wgpu::CommandEncoder, j: usize) {
        let bytes = (self.rows * self.cfg.hidden_size * 4) as u64;
        encoder.copy_buffer_to_buffer(&self.chunk.s.x, j as u64 * bytes, &self.step.s.x, 0, bytes);
    }

    /// Encodes the final norm and head over the residual stream in place.
    pub fn encode_head(&self, pass: &mut wgpu::ComputePass<'_>) {
        for op in &self.head {
            op.encode_in(pass);
        }
    }
}

fn count(ops: &[Op]) -> usize {
    ops.iter().map(Op::dispatch_count).sum()
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

    /// `y = W · x` for every row of both passes, plus each ARM row's LoRA delta (`lora`,
    /// from the projection's group) and the module's bias if `store` has one, stored as
    /// it says.
    fn linear(
        &mut self,
        proj: &Projection,
        x: Buf,
        y: Buf,
        lora: Lora<'_>,
        store: Store,
    ) -> Result<()> {
        let (module, inp, out) = (&proj.module, proj.inp, proj.out);
        let w = self.weight(&format!("{module}.weight"), out, inp)?;
        let bias = match store.bias {
            true => Some(self.vector(&format!("{module}.bias"), out)?),
            false => None,
        };
        self.push_matvec(&w, x, y, lora, bias.as_ref(), store.mode)
    }

    /// One matvec per pass over its scratch rows.
    fn push_matvec(
        &mut self,
        w: &QuantWeight,
        x: Buf,
        y: Buf,
        lora: Lora<'_>,
        bias: Option<&wgpu::Buffer>,
        store: MatVecStore,
    ) -> Result<()> {
        let m = self.rows.len();
        for p in &mut self.passes {
            let up = lora.up(&p.s.lora_t, m);
            let epilogue = MatVecEpilogue {
                lora: up.as_ref(),
                bias,
                store,
            };
            let rows = m * p.positions;
            let op = self
                .kernels
                .matvec_with(w, p.s.get(x), p.s.get(y), rows, &epilogue)?;
            p.ops.push(op);
        }
        Ok(())
    }

    /// Projections that read one input as one matvec ([`Builder::stacked_weight`]):
    /// `y` is `[rows, Σ outs]`, each row its projections' outputs side by side, plus
    /// the group's stacked LoRA delta and, where the config has them (Qwen2's q/k/v),
    /// the biases.
    fn stacked_linear(
        &mut self,
        parts: &[Projection],
        x: Buf,
        y: Buf,
        lora: &LoraGroup,
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
        self.push_matvec(
            &w,
            x,
            y,
            Lora::Up(lora, 0),
            bias.as_ref(),
            MatVecStore::Write,
        )
    }

    /// Uploads the LoRA factors of projections that read the same input: the rows' A
    /// matrices stacked for one down-projection into `t` (see [`Builder::lora_down`]),
    /// each projection's B for the up half its matvec adds — or, with `stacked_up`, one
    /// B for all of them for their [`Builder::stacked_linear`], block-diagonal over the
    /// slots of `t`. Rows from the first adapted one on take part; a row whose adapter
    /// lacks a projection gets zeros there.
    fn lora_group(&mut self, projections: &[Projection], stacked_up: bool) -> Result<LoraGroup> {
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
        Ok(LoraGroup {
            first,
            stride: stacked,
            a: Some(storage_f32(self.kernels.context(), "lora A", &a_stack)),
            inp,
            ups,
        })
    }

    /// The group's down-projection of `x` into each pass's `t`, if any row adapts it.
    fn lora_down(&mut self, group: &LoraGroup, x: Buf) -> Result<()> {
        let m = self.rows.len();
        for p in &mut self.passes {
            if let Some(down) = group.down(&p.s.lora_t, m, p.positions) {
                p.ops.push(self.kernels.lora_down(&down, p.s.get(x))?);
            }
        }
        Ok(())
    }

    /// `y = rms_norm(x) · weight`, with the group's down-projection of `y` folded into
    /// the same dispatch when any row adapts it.
    fn norm_and_lora_down(
        &mut self,
        x: Buf,
        weight: &wgpu::Buffer,
        y: Buf,
        group: &LoraGroup,
    ) -> Result<()> {
        let (m, n, eps) = (
            self.rows.len(),
            self.cfg.hidden_size,
            self.cfg.rms_norm_eps as f32,
        );
        for p in &mut self.passes {
            let (x, y, rows) = (p.s.get(x), p.s.get(y), m * p.positions);
            let op = match group.down(&p.s.lora_t, m, p.positions) {
                Some(down) => self
                    .kernels
                    .rms_norm_lora(x, weight, y, rows, n, eps, &down)?,
                None => self.kernels.rms_norm(x, weight, y, rows, n, eps)?,
            };
            p.ops.push(op);
        }
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

    /// The down half over batch rows `first..m` of each of `positions` positions, if
    /// the group has one.
    fn down<'a>(&'a self, t: &'a wgpu::Buffer, m: usize, positions: usize) -> Option<LoraDown<'a>> {
        self.a.as_ref().map(|a| LoraDown {
            a,
            t,
            first: self.first,
            arms: m - self.first,
            rank: self.stride,
            inp: self.inp,
            positions,
        })
    }

    /// The up half of a one-projection group whose down half the attention op computed
    /// as one partial sum per head.
    fn up_per_head<'a>(
        &'a self,
        t: &'a wgpu::Buffer,
        m: usize,
        heads: usize,
    ) -> Option<LoraUp<'a>> {
        self.up(0, t, m).map(|up| LoraUp {
            t_stride: self.stride * heads,
            parts: heads,
            ..up
        })
    }

    /// Up half `i` (a projection's, or the stacked one) for batches of `m` rows, if any
    /// row adapts it.
    fn up<'a>(&'a self, i: usize, t: &'a wgpu::Buffer, m: usize) -> Option<LoraUp<'a>> {
        self.ups[i].as_ref().map(|(b, t_offset, rank)| LoraUp {
            b,
            t,
            first: self.first,
            batch: m,
            rank: *rank,
            t_offset: *t_offset,
            t_stride: self.stride,
            parts: 1,
        })
    }
}

/// Which LoRA up half a matvec adds, resolved per pass (each has its own `t`).
#[derive(Clone, Copy)]
enum Lora<'g> {
    /// Up half `i` of the group.
    Up(&'g LoraGroup, usize),
    /// o_proj's, summing the partial down halves of this many attention heads.
    PerHead(&'g LoraGroup, usize),
}

impl<'g> Lora<'g> {
    fn up<'a>(self, t: &'a wgpu::Buffer, m: usize) -> Option<LoraUp<'a>>
    where
        'g: 'a,
    {
        match self {
            Self::Up(group, i) => group.up(i, t, m),
            Self::PerHead(group, heads) => group.up_per_head(t, m, heads),
        }
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
