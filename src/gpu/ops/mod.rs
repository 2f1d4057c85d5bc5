//! Op constructors: each documents and checks its shapes, takes its pipeline from a
//! cache keyed by everything that changes the compiled text (shader, defines), builds
//! its bind groups and uniforms once, and returns an [`Op`] that only encodes.
//!
//! This module holds the factory ([`Kernels`]: the shader texts, the pipeline cache, the
//! bind groups) and [`Op`]; each op family adds its constructors in a file of its own.
//! The families only import from here, never from each other, except the LoRA halves
//! that matvec, norm and attention fold in.

mod attention;
mod elementwise;
mod embedding;
mod lora;
mod matvec;
mod norm;
mod sampling;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::Result;
use crate::gpu::buffers::WeightFormat;
use crate::gpu::uniforms::Uniform;
use crate::gpu::{gpu_error, GpuContext};

pub use attention::{AttentionBuffers, AttentionShape, RopeStyle};
pub use lora::{LoraDown, LoraUp};
pub use matvec::{MatVecEpilogue, MatVecStore, MAX_BATCH_ROWS, MAX_MATVEC_ROWS};
pub use sampling::{SampleBuffers, SampleSettings, SampleSettingsBuffers};

/// Threads per workgroup for row reductions and elementwise ops. 64 is the widest
/// size every WebGPU adapter accepts with room to spare and a power of two for the
/// tree reductions.
pub(super) const WG: u32 = 64;

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
        "matvec" | "matvec_lora" => include_str!("../shaders/matvec.wgsl"),
        "matvec_rows" | "matvec_rows_lora" => include_str!("../shaders/matvec_rows.wgsl"),
        "rms_norm" => include_str!("../shaders/rms_norm.wgsl"),
        "rms_norm_lora" => include_str!("../shaders/rms_norm_lora.wgsl"),
        "add" => include_str!("../shaders/add.wgsl"),
        "embedding" => include_str!("../shaders/embedding.wgsl"),
        "rope_kv_write" => include_str!("../shaders/rope_kv_write.wgsl"),
        "attention" | "attention_lora" => include_str!("../shaders/attention.wgsl"),
        "lora_down" => include_str!("../shaders/lora_down.wgsl"),
        "lora_down_rows" => include_str!("../shaders/lora_down_rows.wgsl"),
        "logit_stats" => include_str!("../shaders/logit_stats.wgsl"),
        "guide_sample" => include_str!("../shaders/guide_sample.wgsl"),
        _ => unreachable!("unknown shader {name}"),
    }
}

/// Text prepended to a shader after its uniform struct: the shared weight decoder for
/// shaders that decode weights, matvec's store epilogues (how it stores, and the LoRA
/// delta it adds or not) and attention's (the o projection's LoRA down half or not).
fn prelude(name: &str) -> String {
    let quant = include_str!("../shaders/quant.wgsl");
    match name {
        "embedding" => quant.to_string(),
        "matvec" | "matvec_rows" => format!(
            "{quant}\n{}\n{}\nfn lora_delta(r: u32, i: u32) -> f32 {{ return 0.0; }}\n",
            include_str!("../shaders/activation.wgsl"),
            include_str!("../shaders/matvec_store.wgsl")
        ),
        "attention" => "fn o_lora_down(r: u32, h: u32, tid: u32, ob: u32, live: bool) {}\n".into(),
        "attention_lora" => include_str!("../shaders/attention_lora.wgsl").into(),
        "matvec_lora" | "matvec_rows_lora" => format!(
            "{quant}\n{}\n{}\n{}",
            include_str!("../shaders/activation.wgsl"),
            include_str!("../shaders/matvec_store.wgsl"),
            include_str!("../shaders/lora_epilogue.wgsl")
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
        let common = include_str!("../shaders/common.wgsl");
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
}
