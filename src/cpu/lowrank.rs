//! Shared-weight rows with per-row LoRA deltas in one CPU op: `y_r = W·x_r + B_r·(A_r·x_r)`.
//!
//! The base and its LoRA ARMs are rows of one batch. The block kernel reads `W` once
//! for every row; each row's low-rank correction is a few thousand multiply-adds per
//! token, done here in the same op so it costs no extra tensor operations (which, at
//! one token per step, would cost more in dispatch than in arithmetic).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use super::host_ops::{axpy, contiguous_f32, dot, SharedOut};
use super::quant::BlockMatrix;

/// One row's LoRA delta for one projection, in host memory.
#[derive(Clone, Debug)]
pub struct LowRank {
    pub rank: usize,
    /// `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `Bᵀ`: `[rank, out]`, row-major, already multiplied by the adapter's scale
    /// (transposed so the update is `rank` contiguous axpys over the output).
    pub b_t: Vec<f32>,
}

/// The deltas of one projection inside a (possibly fused) output: columns
/// `offset..offset + width`, one optional delta per row.
#[derive(Clone, Debug)]
pub struct PartDeltas {
    pub offset: usize,
    pub width: usize,
    pub rows: Vec<Option<LowRank>>,
}

/// A block-quantized projection with per-row LoRA deltas: input `[rows, seq, in]`,
/// output `[rows, seq, out]`.
#[derive(Clone)]
pub struct BlockLoraMatMul {
    pub weight: Arc<BlockMatrix>,
    pub parts: Arc<Vec<PartDeltas>>,
}

impl BlockLoraMatMul {
    /// Adds every row's deltas to `y` (`[rows·seq, out]`) for input `x` (`[rows·seq, in]`).
    /// One task per (projection part, position with a delta) on candle's pool: the deltas'
    /// f32 matrices are read from memory once per token, as much as a tenth of the block
    /// weights' bytes at rank 8, and would otherwise leave the other threads idle.
    fn add_deltas(&self, x: &[f32], y: &mut [f32], rows: usize, seq: usize) {
        let (inp, out) = (self.weight.cols(), self.weight.rows());
        let tasks: Vec<(&PartDeltas, &LowRank, usize)> = self
            .parts
            .iter()
            .flat_map(|part| {
                let with_delta = part.rows.iter().take(rows).enumerate();
                with_delta.filter_map(move |(r, d)| d.as_ref().map(|d| (part, d, r)))
            })
            .flat_map(|(part, d, r)| (0..seq).map(move |s| (part, d, r * seq + s)))
            .collect();
        let y_ptr = SharedOut::new(y);
        candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
            let mut low = Vec::new();
            for &(part, d, i) in &tasks[range] {
                let xi = &x[i * inp..(i + 1) * inp];
                low.clear();
                low.extend((0..d.rank).map(|k| dot(&d.a[k * inp..(k + 1) * inp], xi)));
                // SAFETY: the (part, position) slices of `y` are disjoint, so this task is
                // their only writer, and `y` outlives the parallel loop.
                let yi = unsafe { y_ptr.slice(i * out + part.offset, part.width) };
                for (k, &l) in low.iter().enumerate() {
                    axpy(l, &d.b_t[k * part.width..(k + 1) * part.width], yi);
                }
            }
        });
    }
}

impl CustomOp1 for BlockLoraMatMul {
    fn name(&self) -> &'static str {
        "block-lora-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, seq, inp) = layout.shape().dims3()?;
        if inp != self.weight.cols() {
            candle_core::bail!(
                "block-lora-matmul: input width {inp}, weight has {} columns",
                self.weight.cols()
            );
        }
        let x = contiguous_f32(storage, layout, self.name())?;
        let out = self.weight.rows();
        let mut y = vec![0f32; rows * seq * out];
        self.weight.matmul(x, rows * seq, &mut y);
        self.add_deltas(x, &mut y, rows, seq);
        Ok((CpuStorage::F32(y), Shape::from((rows, seq, out))))
    }
}
