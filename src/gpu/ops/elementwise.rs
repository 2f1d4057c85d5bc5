//! Elementwise ops over flat buffers (the residual add).

use crate::error::Result;
use crate::gpu::uniforms::ElementwiseParams;

use super::{need, to_u32, Kernels, Op, WG};

impl Kernels {
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
}
