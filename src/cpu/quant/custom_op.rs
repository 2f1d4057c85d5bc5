//! The block matmul as a candle op, so model code applies it like any other layer.

use std::sync::Arc;

use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Shape};

use super::super::host_ops::contiguous_f32;
use super::BlockMatrix;

/// The kernel as a candle op: input f32 `[.., cols]` (any leading dims, contiguous) →
/// `[.., rows]`.
#[derive(Clone)]
pub struct BlockMatMul(pub Arc<BlockMatrix>);

impl CustomOp1 for BlockMatMul {
    fn name(&self) -> &'static str {
        "block-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let x = contiguous_f32(storage, layout, "block matmul")?;
        let dims = layout.shape().dims();
        let Some((&cols, lead)) = dims.split_last() else {
            candle_core::bail!("block matmul: the input must have at least one dimension");
        };
        if cols != w.cols() {
            candle_core::bail!(
                "block matmul: input {dims:?} against weights [{}, {}]",
                w.rows(),
                w.cols()
            );
        }
        let m: usize = lead.iter().product();
        let mut out = vec![0f32; m * w.rows()];
        w.matmul(x, m, &mut out);
        let mut out_dims = lead.to_vec();
        out_dims.push(w.rows());
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        candle_core::bail!("{}: the block kernel is CPU-only", self.name())
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        candle_core::bail!("{}: the block kernel is CPU-only", self.name())
    }
}
