//! Op constructors: each documents and checks its shapes, takes its pipeline from a
//! cache keyed by everything that changes the compiled text (shader, defines), builds
//! its bind groups and uniforms once, and returns an [`Op`] that only encodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::Result;
use crate::gpu::buffers::{storage_zeros, QuantWeight, WeightFormat};
use crate::gpu::ops_guide::{LoraDown, LoraUp};
use crate::gpu::uniforms::{
    AttentionParams, ElementwiseParams, EmbeddingParams, MatVecParams, RmsNormLoraParams,
    RmsNormParams, Uniform,
};
use crate::gpu::{gpu_error, GpuContext};
use crate::model::config::Activation;

/// Threads per workgroup for row reductions and elementwise ops. 64 is the widest
/// size every WebGPU adapter accepts with room to spare and a power of two for the
/// tree reductions.
pub(super) const WG: u32 = 64;

/// The largest activation batch one matvec takes: the base row plus up to three
/// LoRA ARM rows sharing its weight reads.
pub const MAX_BATCH_ROWS: usize = 4;

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// HF checkpoints: (i, i + d/2).
    HalfSplit,
    /// GGUF / Meta checkpoints: (2i, 2i + 1).
    Interleaved,
}

/// What a matvec does with each value `v = (W · x)[i]` it computes (plus any LoRA
/// delta and bias): the ops that would otherwise follow it, folded into its store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatVecStore {
    /// `y[i] = v`.
    #[default]
    Write,
    /// `y[i] += v`: the residual add.
    Add,
    /// `y[i] = act(y[i]) · v`: the gated MLP (SwiGLU for SiLU, GeGLU for the GELUs),
    /// stored over the gate projection's output.
    Gate(Activation),
}

impl MatVecStore {
    /// The store's and the activation's compile-time constants.
    fn defines(self) -> String {
        let (store, act) = match self {
            Self::Write => (0, Activation::Silu),
            Self::Add => (1, Activation::Silu),
            Self::Gate(act) => (2, act),
        };
        let act = match act {
            Activation::Silu => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
        };
        format!("const STORE: u32 = {store}u;\nconst ACT: u32 = {act}u;\n")
    }
}

/// What matvec folds into each value it stores, beyond `W · x`.
#[derive(Clone, Copy, Default)]
pub struct MatVecEpilogue<'a> {
    /// ARM rows' LoRA delta.
    pub lora: Option<&'a LoraUp<'a>>,
    /// `[W rows]`, added to every batch row (the projection's bias).
    pub bias: Option<&'a wgpu::Buffer>,
    pub store: MatVecStore,
}

/// One compute dispatch.
pub(super) struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    grid: (u32, u32),
}

/// A built op: one or more dispatches, in order (WebGPU makes each dispatch's
/// storage writes visible to the next one).
pub struct Op {
    pub(super) label: &'static str,
    pub(super) dispatches: Vec<Dispatch>,
}

impl Op {
    /// Encodes the op in its own compute pass.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(self.label),
            timestamp_writes: None,
        });
        self.encode_in(&mut pass);
    }

    /// Compute dispatches the op encodes.
    pub fn dispatch_count(&self) -> usize {
        self.dispatches.len()
    }

    /// Encodes the op into an open pass (to chain many ops in one pass).
    pub fn encode_in(&self, pass: &mut wgpu::ComputePass<'_>) {
        for d in &self.dispatches {
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(d.grid.0, d.grid.1, 1);
        }
    }
}

/// The shape of one attention layer's single-query step.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Batch rows (base + ARMs), each with its own cache.
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions the cache holds.
    pub capacity: usize,
    /// How RoPE pairs the dimensions of a head.
    pub rope: RopeStyle,
    /// `Some(w)`: the query at `p` attends only to positions `p − w < t ≤ p`.
    pub window: Option<usize>,
}

/// Buffers of one attention step.
pub struct AttentionBuffers<'a> {
    /// Each row's q `[heads, head_dim]`, k and v `[kv_heads, head_dim]` side by side, as
    /// the stacked q/k/v projection leaves them: `[rows, (heads + 2·kv_heads)·head_dim]`.
    /// q is rotated in place; k is rotated on its way into the cache.
    pub qkv: &'a wgpu::Buffer,
    /// `[rows, kv_heads, capacity, head_dim]` each.
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
    /// `array<u32>`; the position is `pos[pos_index]`.
    pub pos: &'a wgpu::Buffer,
    /// RoPE's `[head_dim / 2]` frequencies.
    pub inv_freq: &'a wgpu::Buffer,
    /// `[rows, heads, head_dim]`.
    pub out: &'a wgpu::Buffer,
    /// The o projection's LoRA down half, if ARM rows adapt o_proj: its `t` receives
    /// `[arms, heads, rank]`, each head's partial sum, for a matvec with `parts = heads`.
    pub o_lora: Option<LoraDown<'a>>,
}

type PipelineKey = (&'static str, String);

/// How a matrix-vector product spreads over invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatVecKind {
    /// A workgroup per weight row, a tree reduction in workgroup memory: coalesced
    /// reads, for GPUs.
    RowPerWorkgroup,
    /// An invocation per weight row, no barriers: for CPU adapters, where barriers
    /// are expensive and SIMD lanes want independent rows.
    RowPerInvocation,
}

impl MatVecKind {
    /// The kind that suits the adapter.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        if info.device_type == wgpu::DeviceType::Cpu {
            Self::RowPerInvocation
        } else {
            Self::RowPerWorkgroup
        }
    }
}

/// Pipeline cache and op factory for one device.
pub struct Kernels {
    ctx: Arc<GpuContext>,
    matvec_kind: MatVecKind,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
}

fn shader_source(name: &str) -> &'static str {
    match name {
        "matvec" | "matvec_lora" => include_str!("shaders/matvec.wgsl"),
        "matvec_rows" | "matvec_rows_lora" => include_str!("shaders/matvec_rows.wgsl"),
        "rms_norm" => include_str!("shaders/rms_norm.wgsl"),
        "rms_norm_lora" => include_str!("shaders/rms_norm_lora.wgsl"),
        "add" => include_str!("shaders/add.wgsl"),
        "embedding" => include_str!("shaders/embedding.wgsl"),
        "rope_kv_write" => include_str!("shaders/rope_kv_write.wgsl"),
        "attention" | "attention_lora" => include_str!("shaders/attention.wgsl"),
        "lora_down" => include_str!("shaders/lora_down.wgsl"),
        "lora_down_rows" => include_str!("shaders/lora_down_rows.wgsl"),
        "logit_stats" => include_str!("shaders/logit_stats.wgsl"),
        "guide_sample" => include_str!("shaders/guide_sample.wgsl"),
        _ => unreachable!("unknown shader {name}"),
    }
}

/// Text prepended to a shader after its uniform struct: the shared weight decoder for
/// shaders that decode weights, matvec's store epilogues (how it stores, and the LoRA
/// delta it adds or not) and attention's (the o projection's LoRA down half or not).
fn prelude(name: &str) -> String {
    let quant = include_str!("shaders/quant.wgsl");
    match name {
        "embedding" => quant.to_string(),
        "matvec" | "matvec_rows" => format!(
            "{quant}\n{}\n{}\nfn lora_delta(r: u32, i: u32) -> f32 {{ return 0.0; }}\n",
            include_str!("shaders/activation.wgsl"),
            include_str!("shaders/matvec_store.wgsl")
        ),
        "attention" => "fn o_lora_down(r: u32, h: u32, tid: u32, ob: u32, live: bool) {}\n".into(),
        "attention_lora" => include_str!("shaders/attention_lora.wgsl").into(),
        "matvec_lora" | "matvec_rows_lora" => format!(
            "{quant}\n{}\n{}\n{}",
            include_str!("shaders/activation.wgsl"),
            include_str!("shaders/matvec_store.wgsl"),
            include_str!("shaders/lora_epilogue.wgsl")
        ),
        _ => String::new(),
    }
}

/// Checks that `buffer` holds at least `n` f32/u32 values.
pub(super) fn need(buffer: &wgpu::Buffer, n: usize, what: &str, op: &str) -> Result<()> {
    let want = (n * 4) as u64;
    if buffer.size() < want {
        return Err(gpu_error(format!(
            "{op}: `{what}` is {} bytes, shape needs {want}",
            buffer.size()
        )));
    }
    Ok(())
}

pub(super) fn to_u32(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| gpu_error(format!("{what} = {n} does not fit in u32")))
}

impl Kernels {
    /// Kernels with the matvec kind that suits the adapter.
    pub fn new(ctx: Arc<GpuContext>) -> Self {
        let kind = MatVecKind::for_adapter(&ctx.adapter_info);
        Self::with_matvec(ctx, kind)
    }

    /// Kernels with a chosen matvec kind (tests check both on one adapter).
    pub fn with_matvec(ctx: Arc<GpuContext>, matvec_kind: MatVecKind) -> Self {
        Self {
            ctx,
            matvec_kind,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// How matvec (and the LoRA down-projection) spread over invocations here.
    pub fn matvec_kind(&self) -> MatVecKind {
        self.matvec_kind
    }

    /// The pipeline for `name` compiled with `defines` (WGSL `const` lines, and any
    /// other text that varies per pipeline, such as matvec's bias binding).
    pub(super) fn pipeline<P: Uniform>(
        &self,
        name: &'static str,
        defines: String,
    ) -> wgpu::ComputePipeline {
        let key = (name, defines);
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&key) {
            return p.clone();
        }
        let common = include_str!("shaders/common.wgsl");
        let text = format!(
            "{}\n{}\n{common}\n{}\n{}",
            key.1,
            P::WGSL,
            prelude(name),
            shader_source(name)
        );
        let module = self
            .ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(text.into()),
            });
        let pipeline = self
            .ctx
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        cache.insert(key, pipeline.clone());
        pipeline
    }

    /// A dispatch of `workgroups` workgroups binding `params` at 0 and `buffers` at 1...
    pub(super) fn dispatch<P: Uniform>(
        &self,
        pipeline: wgpu::ComputePipeline,
        params: &P,
        buffers: &[&wgpu::Buffer],
        workgroups: u32,
    ) -> Dispatch {
        let device = &self.ctx.device;
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        entries.extend(buffers.iter().zip(1..).map(|(b, i)| wgpu::BindGroupEntry {
            binding: i,
            resource: b.as_entire_binding(),
        }));
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Dispatch {
            pipeline,
            bind_group,
            grid: self.ctx.grid(workgroups),
        }
    }

    pub(super) fn defines(fmt: Option<WeightFormat>, extra: &str) -> String {
        let fmt = fmt.map_or(String::new(), |f| {
            format!("const FMT: u32 = {}u;\n", f.shader_id())
        });
        format!("const WG: u32 = {WG}u;\n{fmt}{extra}")
    }

    /// `y[r, :] = W · x[r, :]` for `r < m`: `W` is `[rows, cols]`, `x` is `[m, cols]`,
    /// `y` is `[m, rows]`; 1 ≤ m ≤ [`MAX_BATCH_ROWS`]. One dispatch per weight chunk.
    pub fn matvec(
        &self,
        w: &QuantWeight,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
    ) -> Result<Op> {
        self.matvec_with(w, x, y, m, &MatVecEpilogue::default())
    }

    /// [`Kernels::matvec`] plus the LoRA delta of rows `up.first..m`, added as each
    /// value is stored: `y[r, i] += Σ_k B[r - first, i, k] · t[r - first, offset + k]`.
    pub fn matvec_lora(
        &self,
        w: &QuantWeight,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
        up: &LoraUp<'_>,
    ) -> Result<Op> {
        let epilogue = MatVecEpilogue {
            lora: Some(up),
            ..Default::default()
        };
        self.matvec_with(w, x, y, m, &epilogue)
    }

    /// [`Kernels::matvec`], with the LoRA delta of [`Kernels::matvec_lora`] and the
    /// bias `[W rows]` if the epilogue has them, stored as it says.
    pub fn matvec_with(
        &self,
        w: &QuantWeight,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
        epilogue: &MatVecEpilogue<'_>,
    ) -> Result<Op> {
        let up = epilogue.lora;
        if !(1..=MAX_BATCH_ROWS).contains(&m) {
            return Err(gpu_error(format!(
                "matvec: batch of {m} rows, want 1..={MAX_BATCH_ROWS}"
            )));
        }
        need(x, m * w.cols, "x", "matvec")?;
        need(y, m * w.rows, "y", "matvec")?;
        if let Some(up) = up {
            if up.first >= m
                || up.rank == 0
                || up.parts == 0
                || up.t_offset + up.parts * up.rank > up.t_stride
            {
                return Err(gpu_error(format!(
                    "matvec: LoRA rows {}..{m}, rank {} × {} parts at {} of {}",
                    up.first, up.rank, up.parts, up.t_offset, up.t_stride
                )));
            }
            let arms = m - up.first;
            need(up.b, arms * w.rows * up.rank, "lora b", "matvec")?;
            need(up.t, arms * up.t_stride, "lora t", "matvec")?;
        }
        if let Some(bias) = epilogue.bias {
            need(bias, w.rows, "bias", "matvec")?;
        }
        let (shader, per_group) = match (self.matvec_kind, up.is_some()) {
            (MatVecKind::RowPerWorkgroup, false) => ("matvec", 1),
            (MatVecKind::RowPerWorkgroup, true) => ("matvec_lora", 1),
            (MatVecKind::RowPerInvocation, false) => ("matvec_rows", WG),
            (MatVecKind::RowPerInvocation, true) => ("matvec_rows_lora", WG),
        };
        // The bias binding follows the others (3 for the product, 2 for LoRA's).
        let bias_binding = 4 + 2 * u32::from(up.is_some());
        let pipeline = self.pipeline::<MatVecParams>(
            shader,
            Self::defines(
                Some(w.format),
                &format!(
                    "const M: u32 = {m}u;\n{}{}",
                    epilogue.store.defines(),
                    bias_source(epilogue.bias.map(|_| bias_binding))
                ),
            ),
        );
        let mut dispatches = Vec::with_capacity(w.chunks.len());
        for chunk in &w.chunks {
            let mut params = MatVecParams {
                rows: to_u32(chunk.rows, "rows")?,
                cols: to_u32(w.cols, "cols")?,
                row_offset: to_u32(chunk.row_start, "row offset")?,
                y_stride: to_u32(w.rows, "rows")?,
                ..Default::default()
            };
            let mut buffers = vec![&chunk.buffer, x, y];
            if let Some(up) = up {
                params.lora_first = to_u32(up.first, "lora first")?;
                params.lora_rank = to_u32(up.rank, "lora rank")?;
                params.lora_t_offset = to_u32(up.t_offset, "lora t offset")?;
                params.lora_t_stride = to_u32(up.t_stride, "lora t stride")?;
                params.lora_parts = to_u32(up.parts, "lora parts")?;
                buffers.extend([up.b, up.t]);
            }
            buffers.extend(epilogue.bias);
            dispatches.push(self.dispatch(
                pipeline.clone(),
                &params,
                &buffers,
                params.rows.div_ceil(per_group),
            ));
        }
        Ok(Op {
            label: "matvec",
            dispatches,
        })
    }

    /// `y = rms_norm(x) · weight` per row: `x`, `y` are `[rows, n]`, `weight` is `[n]`.
    pub fn rms_norm(
        &self,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<Op> {
        self.rms_norm_with(x, weight, y, rows, n, eps, None)
    }

    /// [`Kernels::rms_norm`] and, in the same dispatch, the LoRA down-projections of the
    /// normed rows (`down.t[a, :] = A_a · y[first + a, :]`), for the projections that
    /// read the norm's output.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_lora(
        &self,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rows: usize,
        n: usize,
        eps: f32,
        down: &LoraDown<'_>,
    ) -> Result<Op> {
        self.rms_norm_with(x, weight, y, rows, n, eps, Some(down))
    }

    #[allow(clippy::too_many_arguments)]
    fn rms_norm_with(
        &self,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rows: usize,
        n: usize,
        eps: f32,
        down: Option<&LoraDown<'_>>,
    ) -> Result<Op> {
        need(x, rows * n, "x", "rms_norm")?;
        need(weight, n, "weight", "rms_norm")?;
        need(y, rows * n, "y", "rms_norm")?;
        let (rows_u32, n_u32) = (to_u32(rows, "rows")?, to_u32(n, "n")?);
        let Some(down) = down else {
            let params = RmsNormParams {
                rows: rows_u32,
                n: n_u32,
                eps,
                _pad: 0,
            };
            let pipeline = self.pipeline::<RmsNormParams>("rms_norm", Self::defines(None, ""));
            let d = self.dispatch(pipeline, &params, &[x, weight, y], rows_u32);
            return Ok(Op {
                label: "rms_norm",
                dispatches: vec![d],
            });
        };
        if down.arms == 0 || down.rank == 0 || down.first + down.arms > rows || down.inp != n {
            return Err(gpu_error(format!(
                "rms_norm_lora: LoRA rows {}..{} of {rows}, rank {}, width {} (norm {n})",
                down.first,
                down.first + down.arms,
                down.rank,
                down.inp
            )));
        }
        need(down.a, down.arms * down.rank * n, "a", "rms_norm_lora")?;
        need(down.t, down.arms * down.rank, "t", "rms_norm_lora")?;
        let params = RmsNormLoraParams {
            rows: rows_u32,
            n: n_u32,
            eps,
            first: to_u32(down.first, "first")?,
            arms: to_u32(down.arms, "arms")?,
            rank: to_u32(down.rank, "rank")?,
            ..Default::default()
        };
        let pipeline = self.pipeline::<RmsNormLoraParams>("rms_norm_lora", Self::defines(None, ""));
        let d = self.dispatch(
            pipeline,
            &params,
            &[x, weight, y, down.a, down.t],
            params.rows + params.arms * params.rank,
        );
        Ok(Op {
            label: "rms_norm_lora",
            dispatches: vec![d],
        })
    }
    /// `dst += src`, both `[n]` (the residual add).
    pub fn add_assign(&self, dst: &wgpu::Buffer, src: &wgpu::Buffer, n: usize) -> Result<Op> {
        need(dst, n, "dst", "add")?;
        need(src, n, "src", "add")?;
        self.elementwise("add", &[dst, src], n)
    }

    fn elementwise(&self, name: &'static str, buffers: &[&wgpu::Buffer], n: usize) -> Result<Op> {
        let params = ElementwiseParams {
            n: to_u32(n, "n")?,
            ..Default::default()
        };
        let pipeline = self.pipeline::<ElementwiseParams>(name, Self::defines(None, ""));
        let d = self.dispatch(pipeline, &params, buffers, params.n.div_ceil(WG));
        Ok(Op {
            label: name,
            dispatches: vec![d],
        })
    }

    /// `out[r, :] = table[ids[id_index], :]` for `r < rows`: `table` is `[vocab, dim]`
    /// (F32 or any block format, dim divisible by 32 when quantized), `out` is
    /// `[rows, dim]`. An id outside the vocabulary yields zeros.
    pub fn embedding(
        &self,
        table: &QuantWeight,
        ids: &wgpu::Buffer,
        id_index: usize,
        out: &wgpu::Buffer,
        rows: usize,
    ) -> Result<Op> {
        need(ids, id_index + 1, "ids", "embedding")?;
        need(out, rows * table.cols, "out", "embedding")?;
        let pipeline =
            self.pipeline::<EmbeddingParams>("embedding", Self::defines(Some(table.format), ""));
        let groups = to_u32(table.cols.div_ceil(32), "groups")?;
        let mut dispatches = Vec::with_capacity(table.chunks.len());
        for chunk in &table.chunks {
            let params = EmbeddingParams {
                vocab: to_u32(table.rows, "vocab")?,
                dim: to_u32(table.cols, "dim")?,
                rows: to_u32(rows, "rows")?,
                id_index: to_u32(id_index, "id_index")?,
                row_start: to_u32(chunk.row_start, "row_start")?,
                chunk_rows: to_u32(chunk.rows, "chunk rows")?,
                ..Default::default()
            };
            dispatches.push(self.dispatch(
                pipeline.clone(),
                &params,
                &[&chunk.buffer, ids, out],
                groups.div_ceil(WG),
            ));
        }
        Ok(Op {
            label: "embedding",
            dispatches,
        })
    }

    /// Rotates q and k by RoPE at `pos[pos_index]` and writes k/v there into the caches
    /// (one dispatch), then attends one query per (row, head) over positions `0..=pos`
    /// (the last `window` of them with a sliding window) and, with `o_lora`, computes each head's part of the o projection's down half.
    /// Owns a `[rows, heads, capacity]` scratch buffer for the scores. The caller keeps
    /// `pos < capacity`.
    pub fn attention(
        &self,
        shape: AttentionShape,
        b: &AttentionBuffers<'_>,
        pos_index: usize,
    ) -> Result<Op> {
        let AttentionShape {
            rows,
            heads,
            kv_heads,
            head_dim,
            capacity,
            rope,
            window,
        } = shape;
        if kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || capacity == 0
            || !head_dim.is_multiple_of(2)
            || window == Some(0)
        {
            return Err(gpu_error(format!("attention: bad shape {shape:?}")));
        }
        need(
            b.qkv,
            rows * (heads + 2 * kv_heads) * head_dim,
            "qkv",
            "attention",
        )?;
        need(b.out, rows * heads * head_dim, "out", "attention")?;
        let cache = rows * kv_heads * capacity * head_dim;
        need(b.k_cache, cache, "k_cache", "attention")?;
        need(b.v_cache, cache, "v_cache", "attention")?;
        need(b.pos, pos_index + 1, "pos", "attention")?;
        need(b.inv_freq, head_dim / 2, "inv_freq", "attention")?;
        let mut params = AttentionParams {
            rows: to_u32(rows, "rows")?,
            heads: to_u32(heads, "heads")?,
            kv_heads: to_u32(kv_heads, "kv_heads")?,
            head_dim: to_u32(head_dim, "head_dim")?,
            capacity: to_u32(capacity, "capacity")?,
            pos_index: to_u32(pos_index, "pos_index")?,
            scale: 1.0 / (head_dim as f32).sqrt(),
            // A window covering the whole cache changes nothing.
            window: to_u32(window.unwrap_or(0).min(capacity), "window")?,
            ..Default::default()
        };
        if let Some(d) = &b.o_lora {
            if d.rank == 0 || d.arms == 0 || d.first + d.arms != rows || d.inp != heads * head_dim {
                return Err(gpu_error(format!(
                    "attention: o LoRA rows {}..{} of {rows}, rank {}, {} inputs for {heads} \
                     heads of {head_dim}",
                    d.first,
                    d.first + d.arms,
                    d.rank,
                    d.inp
                )));
            }
            need(d.a, d.arms * d.rank * d.inp, "lora a", "attention")?;
            need(d.t, d.arms * heads * d.rank, "lora t", "attention")?;
            params.lora_first = to_u32(d.first, "lora first")?;
            params.lora_rank = to_u32(d.rank, "lora rank")?;
        }
        let scores = storage_zeros(&self.ctx, "attention scores", rows * heads * capacity);
        let interleaved = rope == RopeStyle::Interleaved;
        let pairs = to_u32((heads + kv_heads) * rows * head_dim / 2, "rope pairs")?;
        let write = self.dispatch(
            self.pipeline::<AttentionParams>(
                "rope_kv_write",
                Self::defines(None, &format!("const INTERLEAVED: bool = {interleaved};\n")),
            ),
            &params,
            &[b.qkv, b.k_cache, b.v_cache, b.pos, b.inv_freq],
            pairs.div_ceil(WG),
        );
        let mut buffers = vec![b.qkv, b.k_cache, b.v_cache, b.pos, &scores, b.out];
        let shader = match &b.o_lora {
            Some(d) => {
                buffers.extend([d.a, d.t]);
                "attention_lora"
            }
            None => "attention",
        };
        let attend = self.dispatch(
            self.pipeline::<AttentionParams>(shader, Self::defines(None, "")),
            &params,
            &buffers,
            params.rows * params.heads,
        );
        Ok(Op {
            label: "attention",
            dispatches: vec![write, attend],
        })
    }
}

/// matvec's `bias_at(i)`: the bias buffer's value, read through `binding`, or 0.
fn bias_source(binding: Option<u32>) -> String {
    match binding {
        Some(b) => format!(
            "@group(0) @binding({b}) var<storage, read> bias: array<f32>;\n\
             fn bias_at(i: u32) -> f32 {{ return bias[i]; }}\n"
        ),
        None => "fn bias_at(i: u32) -> f32 { return 0.0; }\n".into(),
    }
}
