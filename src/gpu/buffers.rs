//! GPU buffers for activations and weights, and the row chunking of big weights.

use wgpu::util::DeviceExt;

use crate::error::Result;
use crate::gpu::{gpu_error, GpuContext};

/// Storage usage for everything ops read or write; COPY_* so tests and the engine can
/// upload and read back without special buffers.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// A storage buffer holding `data`.
pub fn storage_f32(ctx: &GpuContext, label: &str, data: &[f32]) -> wgpu::Buffer {
    storage_bytes(ctx, label, bytemuck::cast_slice(data))
}

/// A storage buffer holding `data`.
pub fn storage_u32(ctx: &GpuContext, label: &str, data: &[u32]) -> wgpu::Buffer {
    storage_bytes(ctx, label, bytemuck::cast_slice(data))
}

/// A zeroed storage buffer of `n` f32.
pub fn storage_zeros(ctx: &GpuContext, label: &str, n: usize) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (n.max(1) * 4) as u64,
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

/// A storage buffer holding `bytes`, zero-padded to a whole number of u32 words
/// (quantized rows are 18/20/34-byte blocks, so a chunk rarely ends on a word).
pub fn storage_bytes(ctx: &GpuContext, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    let padded = bytes.len().div_ceil(4).max(1) * 4;
    if padded == bytes.len() {
        return ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage: STORAGE,
            });
    }
    // Mapped at creation, so the padded copy lives in the mapping, not in a second
    // host allocation. A fresh mapped_at_creation buffer always yields its range.
    let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: padded as u64,
        usage: STORAGE,
        mapped_at_creation: true,
    });
    if let Ok(mut view) = buffer.slice(..).get_mapped_range_mut() {
        view.slice(..bytes.len()).copy_from_slice(bytes);
    }
    buffer.unmap();
    buffer
}

/// Weight storage formats the matvec and embedding kernels decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    /// f16 d + 16 nibble bytes per 32 weights; w = d·(q − 8).
    Q4_0,
    /// f16 d, f16 m + 16 nibble bytes per 32 weights; w = d·q + m.
    Q4_1,
    /// f16 d + 32 i8 per 32 weights; w = d·q.
    Q8_0,
}

impl WeightFormat {
    /// Bytes of one row of `cols` weights.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::F32 => cols * 4,
            Self::Q4_0 => cols / 32 * 18,
            Self::Q4_1 => cols / 32 * 20,
            Self::Q8_0 => cols / 32 * 34,
        }
    }

    /// The value of the shader define `FMT` (see `shaders/quant.wgsl`).
    pub fn shader_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::Q4_0 => 1,
            Self::Q4_1 => 2,
            Self::Q8_0 => 3,
        }
    }

    fn is_quantized(self) -> bool {
        self != Self::F32
    }
}

/// One GPU buffer holding rows `row_start..row_start + rows` of a weight.
pub struct WeightChunk {
    pub buffer: wgpu::Buffer,
    pub row_start: usize,
    pub rows: usize,
}

/// A `[rows, cols]` weight in GGUF row layout, split into row chunks that each fit
/// one storage binding (the 49152×576 LM head does not fit everywhere).
pub struct QuantWeight {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub chunks: Vec<WeightChunk>,
}

impl QuantWeight {
    /// Uploads `bytes` (`rows` rows of `format.row_bytes(cols)` bytes) in chunks no
    /// bigger than `max_chunk_bytes` nor the device's binding limit. Tests pass a small
    /// `max_chunk_bytes` to force splitting.
    pub fn upload(
        ctx: &GpuContext,
        label: &str,
        format: WeightFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_chunk_bytes: u64,
    ) -> Result<Self> {
        if format.is_quantized() && !cols.is_multiple_of(32) {
            return Err(gpu_error(format!(
                "{label}: {format:?} needs cols divisible by 32, got {cols}"
            )));
        }
        let row_bytes = format.row_bytes(cols);
        if rows == 0 || cols == 0 || bytes.len() != rows * row_bytes {
            return Err(gpu_error(format!(
                "{label}: {} bytes for a [{rows}, {cols}] {format:?} weight, want {}",
                bytes.len(),
                rows * row_bytes
            )));
        }
        // Leave room for the padding word a chunk may need.
        let limit = max_chunk_bytes
            .min(ctx.max_binding_bytes())
            .saturating_sub(4);
        let rows_per_chunk = (limit / row_bytes as u64) as usize;
        if rows_per_chunk == 0 {
            return Err(gpu_error(format!(
                "{label}: one row ({row_bytes} bytes) exceeds the binding limit ({limit} bytes)"
            )));
        }
        let chunks = (0..rows)
            .step_by(rows_per_chunk)
            .map(|row_start| {
                let n = rows_per_chunk.min(rows - row_start);
                let part = &bytes[row_start * row_bytes..(row_start + n) * row_bytes];
                WeightChunk {
                    buffer: storage_bytes(ctx, label, part),
                    row_start,
                    rows: n,
                }
            })
            .collect();
        Ok(Self {
            format,
            rows,
            cols,
            chunks,
        })
    }
}
