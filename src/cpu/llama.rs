//! The Llama block (RMSNorm, RoPE, grouped-query attention, SwiGLU) on candle, run as
//! a batch of *rows* that see the same tokens: row `r` is the base weights plus its own
//! optional LoRA delta, with its own KV cache. Base and LoRA ARMs therefore share every
//! weight read — decode is bandwidth bound, so guidance costs little more than the base.
//!
//! The struct tree mirrors HF tensor names (`model.layers.{i}.self_attn.q_proj`), so
//! loading is also the weight map.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor, D};

use super::decode_attention;
use super::fused;
use super::lowrank::{BlockLoraMatMul, LowRank, PartDeltas};
use super::precision::{rms_norm_f32, softmax_f32, Precision};
use super::quant::{Activations, BlockMatMul, BlockMatrix};
use super::row_ops;
use crate::error::{Error, Result};
use crate::model::config::{Activation, LlamaConfig, RopeLayout};
use crate::model::llama::{self, Proj};
use crate::model::lora::{LoraAdapter, LoraPair};
use crate::model::weights::{Weight, WeightSource};

/// How a weight is multiplied: our block kernel for Q4_0/Q4_1/Q8_0 on the CPU (f32 or
/// 16-bit integer activations, weights decoded in registers), candle's `QMatMul` otherwise (dense
/// weights, K-quants, CUDA).
#[derive(Clone)]
enum Kernel {
    Blocks(BlockMatMul),
    /// The block kernel with the rows' LoRA deltas applied inside the same op.
    BlocksLora(BlockLoraMatMul),
    Candle(QMatMul),
}

/// A projection `y = x·Wᵀ (+ b)` whose weight may stay quantized.
#[derive(Clone)]
struct Projection {
    kernel: Kernel,
    bias: Option<Tensor>,
}

impl Projection {
    fn new(
        weight: Weight,
        bias: Option<Tensor>,
        device: &Device,
        activations: Activations,
    ) -> Result<Self> {
        let kernel = match weight {
            Weight::Quantized(q) => match (device, BlockMatrix::from_qtensor_with(&q, activations))
            {
                (Device::Cpu, Some(blocks)) => Kernel::Blocks(BlockMatMul(Arc::new(blocks))),
                _ => Kernel::Candle(QMatMul::from_arc(q)?),
            },
            Weight::Dense(t) => Kernel::Candle(QMatMul::Tensor(t)),
        };
        Ok(Self { kernel, bias })
    }

    /// One projection computing several stacked ones (q/k/v, gate/up) when their
    /// weights can be stacked: same block format, or all dense. `None` otherwise.
    fn fused(
        weights: Vec<Weight>,
        biases: Vec<Option<Tensor>>,
        device: &Device,
        activations: Activations,
    ) -> Result<Option<Self>> {
        let bias = if biases.iter().all(Option::is_some) {
            Some(Tensor::cat(
                &biases.into_iter().flatten().collect::<Vec<_>>(),
                0,
            )?)
        } else if biases.iter().all(Option::is_none) {
            None
        } else {
            return Ok(None);
        };
        let dense: Option<Vec<Tensor>> = weights
            .iter()
            .map(|w| match w {
                Weight::Dense(t) => Some(t.clone()),
                Weight::Quantized(_) => None,
            })
            .collect();
        if let Some(dense) = dense {
            let stacked = Tensor::cat(&dense, 0)?;
            return Ok(Some(Self::new(
                Weight::Dense(stacked),
                bias,
                device,
                activations,
            )?));
        }
        if !device.is_cpu() {
            return Ok(None);
        }
        let blocks: Option<Vec<BlockMatrix>> = weights
            .iter()
            .map(|w| match w {
                Weight::Quantized(q) => BlockMatrix::from_qtensor_with(q, activations),
                Weight::Dense(_) => None,
            })
            .collect();
        // Parts in different layouts (a part that is not whole 16-row groups) stay apart.
        let stacked = blocks.and_then(|b| BlockMatrix::concat_rows(&b.iter().collect::<Vec<_>>()));
        Ok(stacked.map(|m| Self {
            kernel: Kernel::Blocks(BlockMatMul(Arc::new(m))),
            bias,
        }))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.kernel {
            Kernel::Blocks(op) => x.contiguous()?.apply_op1_no_bwd(op)?,
            Kernel::BlocksLora(op) => x.contiguous()?.apply_op1_no_bwd(op)?,
            Kernel::Candle(m) => m.forward(x)?,
        };
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

impl RowDelta {
    fn to_host(&self) -> Result<LowRank> {
        let (rank, _) = self.b_t.dims2()?;
        Ok(LowRank {
            rank,
            a: self.a_t.t()?.contiguous()?.flatten_all()?.to_vec1()?,
            b_t: self.b_t.flatten_all()?.to_vec1()?,
        })
    }
}

/// The weights of one or more projections of the same input.
#[derive(Clone)]
enum Stack {
    /// Stacked into one matrix: one kernel call, outputs side by side.
    Fused(Projection),
    Separate(Vec<Projection>),
}

/// Projections of one input shared by all rows (q/k/v, gate/up, or a single one), each
/// row adding its own LoRA delta per projection (or none).
#[derive(Clone)]
struct RowLinear {
    stack: Stack,
    /// Output width of each projection.
    widths: Vec<usize>,
    /// `deltas[projection][row]`.
    deltas: Vec<Vec<Option<RowDelta>>>,
}

impl RowLinear {
    /// One output per projection, `[rows, seq, width]`.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let outs = match &self.stack {
            Stack::Fused(p) => {
                let y = p.forward(x)?;
                let mut offset = 0;
                let mut outs = Vec::with_capacity(self.widths.len());
                for &w in &self.widths {
                    outs.push(y.narrow(D::Minus1, offset, w)?);
                    offset += w;
                }
                outs
            }
            Stack::Separate(ps) => ps.iter().map(|p| p.forward(x)).collect::<Result<_>>()?,
        };
        outs.into_iter()
            .zip(&self.deltas)
            .map(|(y, deltas)| add_row_deltas(y, x, deltas))
            .collect()
    }

    /// The projections' outputs side by side in one tensor `[rows, seq, Σ widths]`, where
    /// one kernel computes them all (no row delta left outside it); `None` otherwise.
    fn forward_stacked(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match &self.stack {
            Stack::Fused(p) if self.deltas.iter().flatten().all(Option::is_none) => {
                Ok(Some(p.forward(x)?))
            }
            _ => Ok(None),
        }
    }

    /// The single output of an unfused projection.
    fn forward1(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = self.forward(x)?;
        Ok(outs.remove(0))
    }
}

fn add_row_deltas(y: Tensor, x: &Tensor, deltas: &[Option<RowDelta>]) -> Result<Tensor> {
    if deltas.iter().all(Option::is_none) {
        return Ok(y);
    }
    let rows = deltas
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

/// On the CPU block kernel, applies the rows' LoRA deltas inside the kernel op rather
/// than as separate tensor ops (see `lowrank`).
fn move_deltas_into_block_kernels(mut lin: RowLinear) -> Result<RowLinear> {
    if lin.deltas.iter().flatten().all(Option::is_none) {
        return Ok(lin);
    }
    let host = |deltas: &[Option<RowDelta>]| -> Result<Vec<Option<LowRank>>> {
        deltas
            .iter()
            .map(|d| d.as_ref().map(RowDelta::to_host).transpose())
            .collect()
    };
    match &mut lin.stack {
        Stack::Fused(p) => {
            let Kernel::Blocks(op) = &p.kernel else {
                return Ok(lin);
            };
            let mut offset = 0;
            let mut parts = Vec::with_capacity(lin.widths.len());
            for (&width, deltas) in lin.widths.iter().zip(&lin.deltas) {
                parts.push(PartDeltas {
                    offset,
                    width,
                    rows: host(deltas)?,
                });
                offset += width;
            }
            p.kernel = Kernel::BlocksLora(BlockLoraMatMul {
                weight: op.0.clone(),
                parts: Arc::new(parts),
            });
            lin.deltas
                .iter_mut()
                .for_each(|d| d.iter_mut().for_each(|r| *r = None));
        }
        Stack::Separate(ps) => {
            for ((p, &width), deltas) in ps.iter_mut().zip(&lin.widths).zip(lin.deltas.iter_mut()) {
                let Kernel::Blocks(op) = &p.kernel else {
                    continue;
                };
                let parts = vec![PartDeltas {
                    offset: 0,
                    width,
                    rows: host(deltas)?,
                }];
                p.kernel = Kernel::BlocksLora(BlockLoraMatMul {
                    weight: op.0.clone(),
                    parts: Arc::new(parts),
                });
                deltas.iter_mut().for_each(|r| *r = None);
            }
        }
    }
    Ok(lin)
}

struct Loader<'a> {
    src: &'a dyn WeightSource,
    cfg: &'a LlamaConfig,
    rows: &'a [Option<&'a LoraAdapter>],
    device: &'a Device,
    /// The type of dense weights and activations.
    dtype: DType,
    /// What block-quantised weights are multiplied with.
    activations: Activations,
}

impl Loader<'_> {
    /// Loads `projs` of `layer` (which share their input), fused into one kernel when
    /// possible, with each row's LoRA delta per projection.
    fn linear(&self, layer: usize, projs: &[Proj]) -> Result<RowLinear> {
        let mut weights = Vec::with_capacity(projs.len());
        let mut biases = Vec::with_capacity(projs.len());
        let mut deltas = Vec::with_capacity(projs.len());
        for &proj in projs {
            let path = llama::module_path(layer, proj);
            let (out, inp) = proj.shape(self.cfg);
            weights.push(self.src.load_shaped_as(
                &format!("{path}.weight"),
                &[out, inp],
                self.dtype,
                self.device,
            )?);
            biases.push(if proj.has_bias(self.cfg) {
                let name = format!("{path}.bias");
                let b = self
                    .src
                    .load_shaped_as(&name, &[out], self.dtype, self.device)?;
                Some(b.dense(self.device)?)
            } else {
                None
            });
            deltas.push(
                self.rows
                    .iter()
                    .map(
                        |row| match row.and_then(|a| a.modules.get(&path).map(|p| (a, p))) {
                            None => Ok(None),
                            Some((adapter, pair)) => {
                                self.delta(adapter, &path, proj, pair).map(Some)
                            }
                        },
                    )
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        let stack = if projs.len() > 1 {
            Projection::fused(
                weights.clone(),
                biases.clone(),
                self.device,
                self.activations,
            )?
            .map(Stack::Fused)
        } else {
            None
        };
        let stack = match stack {
            Some(s) => s,
            None => Stack::Separate(
                weights
                    .into_iter()
                    .zip(biases)
                    .map(|(w, b)| Projection::new(w, b, self.device, self.activations))
                    .collect::<Result<_>>()?,
            ),
        };
        let widths: Vec<usize> = projs.iter().map(|p| p.shape(self.cfg).0).collect();
        move_deltas_into_block_kernels(RowLinear {
            stack,
            widths,
            deltas,
        })
    }

    fn delta(
        &self,
        adapter: &LoraAdapter,
        path: &str,
        proj: Proj,
        pair: &LoraPair,
    ) -> Result<RowDelta> {
        let r = pair.rank();
        let (out, inp) = proj.shape(self.cfg);
        let shape_err = |name: &str, got: &Tensor, want: Vec<usize>| Error::TensorShape {
            path: adapter.path.clone(),
            name: format!("{path}.{name}"),
            got: got.dims().to_vec(),
            want,
        };
        if pair.a.dims() != [r, inp] {
            return Err(shape_err("lora_A.weight", &pair.a, vec![r, inp]));
        }
        if pair.b_scaled.dims() != [out, r] {
            return Err(shape_err("lora_B.weight", &pair.b_scaled, vec![out, r]));
        }
        let mut b = pair.b_scaled.to_device(self.device)?.to_dtype(self.dtype)?;
        if let (Some(heads), RopeLayout::Interleaved) =
            (proj.rope_heads(self.cfg), self.cfg.rope_layout)
        {
            b = llama::permute_for_interleaved_rope(&b, heads, self.cfg.head_dim)?;
        }
        Ok(RowDelta {
            a_t: pair
                .a
                .to_device(self.device)?
                .to_dtype(self.dtype)?
                .t()?
                .contiguous()?,
            b_t: b.t()?.contiguous()?,
        })
    }
}

struct Attention {
    /// q, k and v of the normed input.
    qkv: RowLinear,
    o: RowLinear,
}

struct Mlp {
    /// gate and up of the normed input.
    gate_up: RowLinear,
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
    /// Q4_0/Q4_1/Q8_0 on the CPU: rows decoded on lookup; a tied head shares the blocks.
    Blocks(Arc<BlockMatrix>),
    Quantized(Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Blocks(blocks) => {
                let (rows, seq) = ids.dims2()?;
                let hidden = blocks.cols();
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * hidden];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
                    if id as usize >= blocks.rows() {
                        return Err(Error::Request(format!(
                            "token id {id} is outside the embedding's {} rows",
                            blocks.rows()
                        )));
                    }
                    blocks.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(out, (rows, seq, hidden), &Device::Cpu)?
            }
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
    /// One per layer, made on the first token fed (`caches_mut`): by then the source
    /// the weights came from is usually gone, and in the browser, whose memory never
    /// shrinks, the caches then reuse the model file's bytes instead of adding to them.
    caches: Vec<LayerCache>,
    capacity: usize,
    /// Tokens already in the caches (the position of the next token).
    pos: usize,
    rows: usize,
    /// Layers below the first one where some row has a LoRA delta. Rows fed the same
    /// tokens (a base with its LoRA ARMs, always, while decoding) hold the same
    /// activations there, so those layers run one row and copy its keys and values to
    /// every row: ARMs adapted in their top layers only cost those layers.
    shared_layers: usize,
    device: Device,
    /// The activation type (see `Precision`); logits are always returned in f32.
    dtype: DType,
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
        Self::load_with(src, cfg, rows, capacity, device, Precision::Auto)
    }

    /// `load` with the dense weights and activations in the type `precision` picks.
    pub fn load_with(
        src: &dyn WeightSource,
        cfg: &LlamaConfig,
        rows: &[Option<&LoraAdapter>],
        capacity: usize,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::Request("a model needs at least one row".into()));
        }
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let dtype = precision.compute_dtype(src, device);
        let activations = precision.block_activations();
        let ld = Loader {
            src,
            cfg,
            rows,
            device,
            dtype,
            activations,
        };
        for adapter in rows.iter().flatten() {
            llama::check_adapter_modules(adapter, cfg)?;
        }
        let embed = match src.load_shaped_as(llama::EMBED, &[cfg.vocab_size, h], dtype, device)? {
            Weight::Quantized(q) => match (device, BlockMatrix::from_qtensor_with(&q, activations))
            {
                (Device::Cpu, Some(blocks)) => Embedding::Blocks(Arc::new(blocks)),
                _ => Embedding::Quantized(q),
            },
            Weight::Dense(t) => Embedding::Dense(t),
        };
        // The head before the layers: its copies while loading (the tensor read from
        // the file, then laid out for the kernel) are the largest at once, and here they
        // come on top of the embedding alone instead of the whole model.
        let head_name = llama::head_tensor(cfg, src);
        let lm_head = match &embed {
            // A tied head multiplies by the embedding's own blocks: one copy of the
            // largest matrix (a sixth of SmolLM2-135M), not two.
            Embedding::Blocks(blocks) if head_name == llama::EMBED => Projection {
                kernel: Kernel::Blocks(BlockMatMul(blocks.clone())),
                bias: None,
            },
            _ => Projection::new(
                src.load_shaped_as(head_name, &[cfg.vocab_size, h], dtype, device)?,
                None,
                device,
                activations,
            )?,
        };

        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            blocks.push(Block {
                input_norm: src.load_dense(&llama::input_norm(i), &[h], device)?,
                attn: Attention {
                    qkv: ld.linear(i, &[Proj::Q, Proj::K, Proj::V])?,
                    o: ld.linear(i, &[Proj::O])?,
                },
                post_norm: src.load_dense(&llama::post_attention_norm(i), &[h], device)?,
                mlp: Mlp {
                    gate_up: ld.linear(i, &[Proj::Gate, Proj::Up])?,
                    down: ld.linear(i, &[Proj::Down])?,
                },
            });
        }
        let norm = src.load_dense(llama::FINAL_NORM, &[h], device)?;

        let capacity = capacity.min(cfg.max_position_embeddings).max(1);
        let cache_floats = [
            2,
            cfg.num_layers,
            rows.len(),
            cfg.num_kv_heads,
            capacity,
            hd,
        ]
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d));
        check_fits_in_memory(
            cache_floats.and_then(|n| n.checked_mul(dtype.size_in_bytes())),
            capacity,
        )?;
        let (cos, sin) = llama::rope_tables(cfg, capacity, dtype, device)?;
        let adapted = |layer: usize| {
            rows.iter().flatten().any(|a| {
                Proj::ALL
                    .iter()
                    .any(|&p| a.modules.contains_key(&llama::module_path(layer, p)))
            })
        };
        let shared_layers = (0..cfg.num_layers)
            .find(|&l| adapted(l))
            .unwrap_or(cfg.num_layers);
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            caches: Vec::new(),
            capacity,
            pos: 0,
            rows: rows.len(),
            shared_layers,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The type activations, KV caches and dense weights are kept in (see `Precision`).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How many tokens the caches hold at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens already processed.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The KV caches, made (zeroed) on first use: `[rows, kv_heads, capacity, head_dim]`
    /// per layer, keys and values.
    fn caches_mut(&mut self) -> Result<&mut Vec<LayerCache>> {
        if self.caches.is_empty() {
            let shape = (
                self.rows,
                self.cfg.num_kv_heads,
                self.capacity,
                self.cfg.head_dim,
            );
            let (dtype, device) = (self.dtype, &self.device);
            self.caches = (0..self.cfg.num_layers)
                .map(|_| -> Result<LayerCache> {
                    Ok(LayerCache {
                        k: Tensor::zeros(shape, dtype, device)?,
                        v: Tensor::zeros(shape, dtype, device)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
        }
        Ok(&mut self.caches)
    }

    /// Forgets the sequence; the caches are overwritten from position 0.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Feeds `tokens` (the same for every row) after those already seen. Returns logits
    /// `[rows, vocab]` at the last position, or `[rows, len, vocab]` when `all_positions`.
    pub fn forward(&mut self, tokens: &[u32], all_positions: bool) -> Result<Tensor> {
        let rows = vec![tokens.to_vec(); self.rows];
        self.forward_rows(&rows, all_positions)
    }

    /// Like `forward`, with each row's own tokens (all rows the same length, e.g. several
    /// samples decoded in lockstep).
    pub fn forward_rows(&mut self, tokens: &[Vec<u32>], all_positions: bool) -> Result<Tensor> {
        let x = self.final_hidden(tokens, all_positions)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(if all_positions {
            logits
        } else {
            logits.squeeze(1)?
        })
    }

    /// The hidden states after the final norm — what the LM head (or a reward model's
    /// scalar head) reads: `[rows, len, hidden]`, or `[rows, 1, hidden]` at the last
    /// position unless `all_positions`. Advances the position like `forward_rows`.
    pub fn final_hidden_rows(
        &mut self,
        tokens: &[Vec<u32>],
        all_positions: bool,
    ) -> Result<Tensor> {
        Ok(self
            .final_hidden(tokens, all_positions)?
            .to_dtype(DType::F32)?)
    }

    /// Reads `tokens` into the caches and stops there: no final norm, no LM head (a
    /// prompt chunk whose next-token distribution nobody asks for).
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        let rows = vec![tokens.to_vec(); self.rows];
        self.blocks_forward(&rows, self.cfg.num_layers).map(drop)
    }

    /// `final_hidden_rows` in the activation type.
    fn final_hidden(&mut self, tokens: &[Vec<u32>], all_positions: bool) -> Result<Tensor> {
        let x = self.blocks_forward(tokens, self.cfg.num_layers)?;
        let seq = tokens[0].len();
        let x = if all_positions {
            x
        } else {
            x.narrow(1, seq - 1, 1)?.contiguous()?
        };
        rms_norm_f32(&x, &self.norm, self.cfg.rms_norm_eps as f32)
    }

    /// Forgets every token from `position` on (the caches keep the ones before), so
    /// several continuations of one prefix can be fed without recomputing it.
    pub fn rewind(&mut self, position: usize) -> Result<()> {
        if position > self.pos {
            return Err(Error::Request(format!(
                "cannot rewind to position {position}: only {} tokens are cached",
                self.pos
            )));
        }
        self.pos = position;
        Ok(())
    }

    /// Copies row `row`'s cached keys and values at positions `from..position()` into
    /// every row: after k candidates were fed as k rows, the chosen one becomes every
    /// row's history.
    pub fn keep_row(&mut self, row: usize, from: usize) -> Result<()> {
        if row >= self.rows || from > self.pos {
            return Err(Error::Request(format!(
                "row {row} / position {from} outside a {}-row model at position {}",
                self.rows, self.pos
            )));
        }
        let len = self.pos - from;
        if len == 0 || self.rows == 1 {
            return Ok(());
        }
        let rows = self.rows;
        for cache in self.caches_mut()? {
            for t in [&mut cache.k, &mut cache.v] {
                let (_, kv, _, hd) = t.dims4()?;
                let kept = t.narrow(0, row, 1)?.narrow(2, from, len)?;
                let all = kept.broadcast_as((rows, kv, len, hd))?.contiguous()?;
                t.slice_set(&all, 2, from)?;
            }
        }
        Ok(())
    }

    /// Takes over row `row` of `other`'s cache (a model with the same weights and
    /// shapes) as every row's history: a prompt prefilled once on a one-row model
    /// then continues on a k-row one without k copies of the prompt's compute.
    pub fn copy_cache_from(&mut self, other: &Llama, row: usize) -> Result<()> {
        let same_shape = other.cfg.num_layers == self.cfg.num_layers
            && other.cfg.num_kv_heads == self.cfg.num_kv_heads
            && other.cfg.head_dim == self.cfg.head_dim;
        if !same_shape || row >= other.rows || other.pos > self.capacity {
            return Err(Error::Request(
                "the caches to copy belong to a model of another shape or length".into(),
            ));
        }
        let len = other.pos;
        if len > 0 {
            if other.caches.len() != self.cfg.num_layers {
                return Err(Error::Request(
                    "the model to copy from has no caches".into(),
                ));
            }
            let rows = self.rows;
            for (mine, theirs) in self.caches_mut()?.iter_mut().zip(&other.caches) {
                for (dst, src) in [(&mut mine.k, &theirs.k), (&mut mine.v, &theirs.v)] {
                    let (_, kv, _, hd) = dst.dims4()?;
                    let part = src.narrow(0, row, 1)?.narrow(2, 0, len)?;
                    let all = part.broadcast_as((rows, kv, len, hd))?.contiguous()?;
                    dst.slice_set(&all, 2, 0)?;
                }
            }
        }
        self.pos = len;
        Ok(())
    }

    /// Hidden states `[rows, len, hidden]` after the first `layers` blocks for fresh
    /// sequences (the caches restart at position 0). Training runs its frozen lower
    /// layers through this, on the fast kernels.
    pub fn hidden_states(&mut self, tokens: &[Vec<u32>], layers: usize) -> Result<Tensor> {
        self.reset();
        let x = self.blocks_forward(tokens, layers.min(self.cfg.num_layers));
        self.reset();
        x
    }

    /// Embeds per-row tokens and runs blocks `0..layers` over them, advancing the position.
    fn blocks_forward(&mut self, tokens: &[Vec<u32>], layers: usize) -> Result<Tensor> {
        if tokens.len() != self.rows {
            return Err(Error::Request(format!(
                "{} token rows for a model of {} rows",
                tokens.len(),
                self.rows
            )));
        }
        let seq = tokens[0].len();
        if seq == 0 {
            return Err(Error::Request("no tokens to feed".into()));
        }
        if tokens.iter().any(|t| t.len() != seq) {
            return Err(Error::Request("token rows differ in length".into()));
        }
        if self.pos + seq > self.capacity {
            return Err(Error::Request(format!(
                "sequence of {} tokens exceeds the context of {} tokens",
                self.pos + seq,
                self.capacity
            )));
        }
        let flat: Vec<u32> = tokens.concat();
        if let Some(&bad) = flat.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Request(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        // Rows fed the same tokens run the layers no row adapts as one row.
        let same_tokens = self.rows > 1 && tokens.iter().all(|t| t == &tokens[0]);
        let shared = if same_tokens {
            self.shared_layers.min(layers)
        } else {
            0
        };
        let ids = if shared > 0 {
            Tensor::from_vec(tokens[0].clone(), (1, seq), &self.device)?
        } else {
            Tensor::from_vec(flat, (self.rows, seq), &self.device)?
        };
        let mut x = self.embed.forward(&ids)?.to_dtype(self.dtype)?;
        let cos = self.cos.narrow(0, self.pos, seq)?;
        let sin = self.sin.narrow(0, self.pos, seq)?;
        // One position in f32 on the CPU: the fused decode ops (`fused`) take the tables.
        let decode_rope = if seq == 1 && self.device.is_cpu() && self.dtype == DType::F32 {
            Some(fused::Rope {
                cos: cos.flatten_all()?.to_vec1()?,
                sin: sin.flatten_all()?.to_vec1()?,
                layout: self.cfg.rope_layout,
            })
        } else {
            None
        };
        let n_rep = self.cfg.num_heads / self.cfg.num_kv_heads;
        let full_mask = llama::causal_mask(seq, self.pos, n_rep, None, &self.device)?;
        self.caches_mut()?;
        for (layer, (block, cache)) in self
            .blocks
            .iter()
            .zip(self.caches.iter_mut())
            .take(layers)
            .enumerate()
        {
            if layer == shared {
                x = every_row(x, self.rows)?;
            }
            let window = self.cfg.sliding_window(layer);
            let window_mask = match window {
                Some(_) => llama::causal_mask(seq, self.pos, n_rep, window, &self.device)?,
                None => None,
            };
            let mask = if window.is_some() {
                window_mask.as_ref()
            } else {
                full_mask.as_ref()
            };
            let residual = &x;
            let h = rms_norm_f32(&x, &block.input_norm, self.cfg.rms_norm_eps as f32)?;
            let h = attention(
                &block.attn,
                &h,
                cache,
                &self.cfg,
                self.pos,
                (&cos, &sin, decode_rope.as_ref()),
                mask,
            )?;
            x = (residual + h)?;
            let residual = &x;
            let h = rms_norm_f32(&x, &block.post_norm, self.cfg.rms_norm_eps as f32)?;
            let h = mlp(&block.mlp, &h, self.cfg.hidden_act)?;
            x = (residual + h)?;
        }
        self.pos += seq;
        every_row(x, self.rows)
    }
}

/// `t` for every row: a one-row tensor from a shared layer copied to `rows` rows along
/// the first dimension; a tensor that already has them as it is.
fn every_row(t: Tensor, rows: usize) -> Result<Tensor> {
    if t.dim(0)? == rows {
        return Ok(t);
    }
    let mut shape = t.dims().to_vec();
    shape[0] = rows;
    Ok(t.broadcast_as(shape)?.contiguous()?)
}

/// Refuses a KV cache larger than the machine's memory before allocating it (an
/// allocation that fails aborts the process): a `--context` or a config's context
/// length can ask for terabytes.
fn check_fits_in_memory(bytes: Option<usize>, capacity: usize) -> Result<()> {
    let total = host_memory_bytes();
    match (bytes, total) {
        (Some(b), Some(total)) if (b as u64) <= total => Ok(()),
        (Some(_), None) => Ok(()),
        (b, _) => Err(Error::Request(format!(
            "a KV cache of {capacity} positions needs {} of memory, more than this machine has{}; \
             choose a smaller --context",
            b.map_or("more than 2^64 bytes".to_string(), |b| format!(
                "{:.1} GiB",
                b as f64 / (1u64 << 30) as f64
            )),
            total.map_or(String::new(), |t| format!(
                " ({:.1} GiB)",
                t as f64 / (1u64 << 30) as f64
            )),
        ))),
    }
}

/// Physical memory from /proc/meminfo (Linux); `None` where there is none to read.
fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
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

/// The rotary tables at the positions fed (`[seq, head_dim/2]` each), and for a single
/// position in f32 on the CPU the same as host vectors.
type RopeAt<'a> = (&'a Tensor, &'a Tensor, Option<&'a fused::Rope>);

fn attention(
    attn: &Attention,
    x: &Tensor,
    cache: &mut LayerCache,
    cfg: &LlamaConfig,
    pos: usize,
    (cos, sin, decode_rope): RopeAt<'_>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, seq, _) = x.dims3()?;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    if let (Some(rope), None) = (decode_rope, mask) {
        if let Some(out) = attend_fused(attn, x, cache, cfg, pos, rope)? {
            return attn.o.forward1(&out);
        }
    }
    let n_rep = nh / nkv;
    let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
        t.reshape((rows, seq, n, hd))?.transpose(1, 2)?.contiguous()
    };
    let mut qkv = attn.qkv.forward(x)?.into_iter();
    let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
        return Err(Error::Request("attention needs q, k and v".into()));
    };
    let q = heads(q, nh)?;
    let k = heads(k, nkv)?;
    let v = heads(v, nkv)?;
    let q = apply_rope(&q, cos, sin, cfg.rope_layout)?;
    let k = apply_rope(&k, cos, sin, cfg.rope_layout)?;

    // A layer the rows share runs one row; every row's cache still gets its keys and
    // values, so a later call with different rows (candidates) finds a whole history.
    let cache_rows = cache.k.dim(0)?;
    cache.k.slice_set(&every_row(k, cache_rows)?, 2, pos)?;
    cache.v.slice_set(&every_row(v, cache_rows)?, 2, pos)?;
    let total = pos + seq;
    if seq == 1 && mask.is_none() {
        if let Some(out) = attend_from_cache(&q, cache, rows, cfg, total)? {
            return attn.o.forward1(&out);
        }
    }
    let keys = cache.k.narrow(0, 0, rows)?.narrow(2, 0, total)?;
    let values = cache.v.narrow(0, 0, rows)?.narrow(2, 0, total)?;

    // Grouped-query attention without copying K/V: the n_rep query heads that share a
    // KV head are stacked as extra query rows of that head.
    let q = (q.reshape((rows, nkv, n_rep * seq, hd))? * (1.0 / (hd as f64).sqrt()))?;
    let scores = q.matmul(&keys.t()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs = softmax_f32(&scores)?;
    let out = probs.matmul(&values)?;
    let out = out
        .reshape((rows, nh, seq, hd))?
        .transpose(1, 2)?
        .reshape((rows, seq, nh * hd))?;
    attn.o.forward1(&out)
}

/// The decode step's attention as three host ops (`fused`): keys and values written
/// into the cache from the fused q/k/v output, then attention with the queries rotated
/// on the way. `None` where q, k and v are not one kernel's output or the cache is not
/// f32: the general path runs.
fn attend_fused(
    attn: &Attention,
    x: &Tensor,
    cache: &LayerCache,
    cfg: &LlamaConfig,
    pos: usize,
    rope: &fused::Rope,
) -> Result<Option<Tensor>> {
    if cache.k.dtype() != DType::F32 {
        return Ok(None);
    }
    let Some(qkv) = attn.qkv.forward_stacked(x)? else {
        return Ok(None);
    };
    let layout = fused::Qkv {
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    };
    let qkv = qkv.contiguous()?;
    let write = |cache: &Tensor, rope| {
        let op = fused::WriteCache {
            qkv: layout,
            position: pos,
            rope,
        };
        cache.inplace_op2(&qkv, &op)
    };
    write(&cache.k, Some(rope))?;
    write(&cache.v, None)?;
    let attend = fused::Attend {
        qkv: layout,
        len: pos + 1,
        rope,
    };
    Ok(Some(qkv.apply_op3_no_bwd(&cache.k, &cache.v, &attend)?))
}

/// One query position per row attending to the cache's first `len` positions, by
/// `decode_attention` when the tensors are f32 on the CPU (`None` otherwise: the general
/// path runs). `q` is `[rows, heads, 1, head_dim]`; returns `[rows, 1, heads·head_dim]`.
fn attend_from_cache(
    q: &Tensor,
    cache: &LayerCache,
    rows: usize,
    cfg: &LlamaConfig,
    len: usize,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 || cache.k.dtype() != DType::F32 {
        return Ok(None);
    }
    let queries = q.flatten_all()?.to_vec1::<f32>()?;
    let (_, kv_heads, capacity, head_dim) = cache.k.dims4()?;
    let shape = decode_attention::Shape {
        rows,
        heads: cfg.num_heads,
        kv_heads,
        head_dim,
        capacity,
        len,
    };
    let (k_storage, k_layout) = cache.k.storage_and_layout();
    let (v_storage, v_layout) = cache.v.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) =
        (&*k_storage, &*v_storage)
    else {
        return Ok(None);
    };
    if !k_layout.is_contiguous() || !v_layout.is_contiguous() {
        return Ok(None);
    }
    let mut out = vec![0f32; shape.query_len()];
    decode_attention::decode_attention(
        &queries,
        &k[k_layout.start_offset()..],
        &v[v_layout.start_offset()..],
        shape,
        &mut out,
    );
    Ok(Some(Tensor::from_vec(
        out,
        (rows, 1, cfg.num_heads * head_dim),
        q.device(),
    )?))
}

fn mlp(mlp: &Mlp, x: &Tensor, act: Activation) -> Result<Tensor> {
    if act == Activation::Silu && row_ops::on_host_f32(x) {
        if let Some(gate_up) = mlp.gate_up.forward_stacked(x)? {
            let h = gate_up.contiguous()?.apply_op1_no_bwd(&fused::SwiGlu)?;
            return mlp.down.forward1(&h);
        }
    }
    let mut gate_up = mlp.gate_up.forward(x)?.into_iter();
    let (Some(gate), Some(up)) = (gate_up.next(), gate_up.next()) else {
        return Err(Error::Request("the MLP needs gate and up".into()));
    };
    let h = if act == Activation::Silu && row_ops::on_host_f32(&gate) && row_ops::on_host_f32(&up) {
        gate.contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &row_ops::SiluTimes)?
    } else {
        (llama::activate(&gate, act)? * up)?
    };
    mlp.down.forward1(&h)
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    if row_ops::on_host_f32(logits) {
        return Ok(logits
            .contiguous()?
            .apply_op1_no_bwd(&row_ops::LOG_SOFTMAX)?);
    }
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}

/// Log-softmax over the first `vocab` logits of the last dimension: an ARM whose
/// vocabulary extends the base's is cut to the base's tokens before normalising, the
/// official GenARM rule.
pub fn log_softmax_over(logits: &Tensor, vocab: usize) -> Result<Tensor> {
    log_softmax(&logits.narrow(D::Minus1, 0, vocab)?)
}
