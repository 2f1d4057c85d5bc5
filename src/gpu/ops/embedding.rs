//! The token embedding: a row of a (quantized) table per batch row.

use crate::error::Result;
use crate::gpu::buffers::QuantWeight;
use crate::gpu::uniforms::EmbeddingParams;

use super::{need, to_u32, Kernels, Op, WG};

impl Kernels {
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
        self.embedding_positions(table, ids, id_index, out, rows, 1)
    }

    /// [`Kernels::embedding`] of a prompt chunk: `positions` ids from `ids[id_index]` on,
    /// each embedded into its own batch of `rows` rows (`out` is `[positions · rows,
    /// dim]`).
    pub fn embedding_positions(
        &self,
        table: &QuantWeight,
        ids: &wgpu::Buffer,
        id_index: usize,
        out: &wgpu::Buffer,
        rows: usize,
        positions: usize,
    ) -> Result<Op> {
        need(ids, id_index + positions, "ids", "embedding")?;
        let batch = rows;
        let rows = rows * positions;
        need(out, rows * table.cols, "out", "embedding")?;
        let pipeline =
            self.pipeline::<EmbeddingParams>("embedding", Self::defines(Some(table.format), ""));
        let groups = to_u32(table.cols.div_ceil(32) * positions, "groups")?;
        let mut dispatches = Vec::with_capacity(table.chunks.len());
        for chunk in &table.chunks {
            let params = EmbeddingParams {
                vocab: to_u32(table.rows, "vocab")?,
                dim: to_u32(table.cols, "dim")?,
                rows: to_u32(rows, "rows")?,
                id_index: to_u32(id_index, "id_index")?,
                row_start: to_u32(chunk.row_start, "row_start")?,
                chunk_rows: to_u32(chunk.rows, "chunk rows")?,
                batch: to_u32(batch, "batch")?,
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
}
