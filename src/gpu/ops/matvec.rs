//! Matrix-vector products over (quantized) weights, with the store epilogues that fold
//! the following residual add, gated activation, bias and LoRA up half into them.

use crate::error::Result;
use crate::gpu::buffers::QuantWeight;
use crate::gpu::gpu_error;
use crate::gpu::uniforms::MatVecParams;
use crate::model::config::Activation;

use super::{need, to_u32, Kernels, LoraUp, MatVecKind, Op, WG};

/// The largest activation batch one matvec takes: the base row plus up to three
/// LoRA ARM rows sharing its weight reads.
pub const MAX_BATCH_ROWS: usize = 4;

/// The most activation rows one matvec takes: a prompt chunk's batches, one per
/// position, read the weights once. Each invocation keeps this many accumulators.
pub const MAX_MATVEC_ROWS: usize = 32;

/// Rows the workgroup matvec reduces at a time: workgroup memory for the partials is
/// `WG · tile` floats, so it stays within WebGPU's 16 KiB guarantee for any batch.
fn reduce_tile(m: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|&d| m.is_multiple_of(d))
        .unwrap_or(1)
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

impl Kernels {
    /// `y[r, :] = W · x[r, :]` for `r < m`: `W` is `[rows, cols]`, `x` is `[m, cols]`,
    /// `y` is `[m, rows]`; 1 ≤ m ≤ [`MAX_MATVEC_ROWS`] (a batch, or a prompt chunk's
    /// batches of every position). One dispatch per weight chunk.
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
    /// value is stored: `y[r, i] += Σ_k B[r - first, i, k] · t[r - first, offset + k]`
    /// (over a prompt chunk, B of batch row `r % up.batch`).
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
        if !(1..=MAX_MATVEC_ROWS).contains(&m) {
            return Err(gpu_error(format!(
                "matvec: batch of {m} rows, want 1..={MAX_MATVEC_ROWS}"
            )));
        }
        need(x, m * w.cols, "x", "matvec")?;
        need(y, m * w.rows, "y", "matvec")?;
        if let Some(up) = up {
            if up.first >= up.batch
                || !m.is_multiple_of(up.batch)
                || up.rank == 0
                || up.parts == 0
                || up.t_offset + up.parts * up.rank > up.t_stride
            {
                return Err(gpu_error(format!(
                    "matvec: LoRA rows {}..{} of each {m}-row batch, rank {} × {} parts at {} \
                     of {}",
                    up.first, up.batch, up.rank, up.parts, up.t_offset, up.t_stride
                )));
            }
            let arms = up.batch - up.first;
            need(up.b, arms * w.rows * up.rank, "lora b", "matvec")?;
            need(up.t, (m - up.first) * up.t_stride, "lora t", "matvec")?;
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
                    "const M: u32 = {m}u;\nconst RT: u32 = {}u;\n{}{}",
                    reduce_tile(m),
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
                params.batch = to_u32(up.batch, "lora batch")?;
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
