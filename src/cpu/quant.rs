//! GGUF block-quantised weights (Q4_0, Q4_1, Q8_0) times f32 activations, on the CPU.
//!
//! Why our own kernel: candle 0.11's CPU path for these formats quantises the activations
//! to Q8 and runs a scalar dot product. Here the activations stay f32 (so the CPU and GPU
//! engines compute the same thing), each 32-weight block is dequantised in registers and
//! everything is summed in f32.
//!
//! Every format decodes a block to integer codes `q`, a scale `d` and an offset `o` with
//! `w = d·q + o` (Q4_0: `o = −8d`, Q4_1: `o = m`, Q8_0: `o = 0`), so a block's share of a dot
//! product is `d·Σq·x + o·Σx`. `Σx` per block only depends on the activations, so it is
//! computed once per call and the inner loop is just `Σq·x`.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Shape};

/// Weights per block, in every format here.
const BLOCK: usize = 32;

/// Activation rows handled together per weight row: each decoded block is reused this many
/// times, and `TILE` accumulators plus the decoded block still fit in 16 AVX2 registers.
const TILE: usize = 4;

/// Weight rows per cache block inside a task: with large `m` the rows are revisited once per
/// activation tile, so they should stay in L2 (64 rows × 1536 cols of Q8_0 is ~100 KB).
const ROW_BLOCK: usize = 64;

/// GGUF block formats the kernel runs: 32 weights per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BlockFormat {
    /// The format for a candle/ggml dtype, if the kernel runs it.
    pub fn from_ggml(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes per 32-weight block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18, // f16 d + 16 nibble bytes
            Self::Q4_1 => 20, // f16 d, f16 m + 16 nibble bytes
            Self::Q8_0 => 34, // f16 d + 32 i8
        }
    }

    /// Byte offset of the codes inside a block.
    const fn codes_offset(self) -> usize {
        match self {
            Self::Q4_1 => 4,
            Self::Q4_0 | Self::Q8_0 => 2,
        }
    }

    /// Whether the dot product has an offset term, i.e. needs `Σx` per block.
    const fn has_offset(self) -> bool {
        !matches!(self, Self::Q8_0)
    }
}

/// A row-major matrix `[rows, cols]` of GGUF blocks (each row is cols/32 blocks).
#[derive(Clone, Debug)]
pub struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl BlockMatrix {
    /// Wraps raw block bytes; checks `cols % 32 == 0` and the data length.
    pub fn new(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!(
                "{format:?} matrix: cols {cols} is not a multiple of {BLOCK}"
            ));
        }
        let want = rows * (cols / BLOCK) * format.block_bytes();
        if data.len() != want {
            return Err(format!(
                "{format:?} matrix [{rows}, {cols}]: {} bytes of blocks, expected {want}",
                data.len()
            ));
        }
        Ok(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    /// A 2-D Q4_0/Q4_1/Q8_0 tensor's blocks (candle's CPU storage holds the GGUF block bytes
    /// verbatim); `None` for other dtypes, ranks or devices.
    pub fn from_qtensor(q: &QTensor) -> Option<Self> {
        let format = BlockFormat::from_ggml(q.dtype())?;
        let (rows, cols) = q.shape().dims2().ok()?;
        let data = q.data().ok()?.into_owned();
        Self::new(format, rows, cols, data).ok()
    }

    /// The parts stacked row-wise (fuses q/k/v or gate/up into one matmul); `None` when
    /// `parts` is empty or the formats or column counts differ.
    pub fn concat_rows(parts: &[&BlockMatrix]) -> Option<BlockMatrix> {
        let first = parts.first()?;
        let same = |p: &&BlockMatrix| p.format == first.format && p.cols == first.cols;
        if !parts.iter().all(same) {
            return None;
        }
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        let rows = parts.iter().map(|p| p.rows).sum();
        Self::new(first.format, rows, first.cols, data).ok()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// The bytes of weight row `row`.
    fn row_bytes(&self, row: usize) -> &[u8] {
        let len = self.blocks_per_row() * self.format.block_bytes();
        &self.data[row * len..(row + 1) * len]
    }

    /// Writes row `row` as f32 into `out` (`cols` long).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} of {}", self.rows);
        assert_eq!(out.len(), self.cols, "output length");
        let blocks = self.row_bytes(row).chunks_exact(self.format.block_bytes());
        for (block, out) in blocks.zip(out.chunks_exact_mut(BLOCK)) {
            let mut q = [0f32; BLOCK];
            let (d, o) = scalar::decode(self.format, block, &mut q);
            for (o_k, q_k) in out.iter_mut().zip(q) {
                *o_k = d * q_k + o;
            }
        }
    }

    /// out[i*rows + j] = Σ_c x[i*cols + c] · W[j, c] for i < m (x is [m, cols] row-major).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Kernel::detect(), x, m, out);
    }

    /// `matmul` on a chosen kernel (tests compare the SIMD and scalar paths).
    fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "x must be [m, cols]");
        assert_eq!(out.len(), m * self.rows, "out must be [m, rows]");
        if m == 0 || self.rows == 0 {
            return;
        }
        let sums = if kernel.needs_sums(self.format) {
            block_sums(x, self.cols)
        } else {
            Vec::new()
        };
        let job = Job {
            w: self,
            x,
            sums: &sums,
            m,
            kernel,
        };
        let chunk = rows_per_task(self.rows);
        let out = OutPtr(out.as_mut_ptr());
        // candle's own spinning pool, not rayon: candle's ops already keep its workers hot,
        // and a second pool spinning beside it would steal the same cores.
        candle_core::utils::barrier_pool().execute_chunked(self.rows.div_ceil(chunk), |tasks| {
            for task in tasks {
                let start = task * chunk;
                let end = (start + chunk).min(self.rows);
                // SAFETY: tasks get disjoint row ranges, `out` is [m, rows] and exclusively
                // borrowed for the whole parallel loop (see `Job::run`).
                unsafe { job.run(start..end, &out) };
            }
        });
    }
}

/// Rows per task: several tasks per thread so uneven threads even out, but at least 16
/// rows so the per-task overhead stays small.
fn rows_per_task(rows: usize) -> usize {
    let tasks = 4 * (candle_core::utils::barrier_pool().n_workers() + 1);
    rows.div_ceil(tasks).max(16)
}

/// `Σx` over every 32-block of every activation row: `[m, cols/32]`.
fn block_sums(x: &[f32], cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect()
}

/// The output pointer shared by the tasks of one `matmul`.
struct OutPtr(*mut f32);

// SAFETY: tasks only write disjoint elements through it (their own output columns), and the
// owning `&mut [f32]` outlives the parallel loop.
unsafe impl Send for OutPtr {}
// SAFETY: as above; it is never read through.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// `index` is inside the output slice and no other thread touches that element.
    unsafe fn write(&self, index: usize, value: f32) {
        *self.0.add(index) = value;
    }
}

/// Everything one `matmul` call shares between its tasks.
struct Job<'a> {
    w: &'a BlockMatrix,
    x: &'a [f32],
    /// `Σx` per block, `[m, cols/32]`; empty when the format has no offset term.
    sums: &'a [f32],
    m: usize,
    kernel: Kernel,
}

impl Job<'_> {
    /// Computes output columns `rows` for all `m` activation rows.
    ///
    /// # Safety
    /// `out` points at an `[m, w.rows]` buffer and no other thread writes these columns.
    unsafe fn run(&self, rows: Range<usize>, out: &OutPtr) {
        let (cols, nb, n_rows) = (self.w.cols, self.w.blocks_per_row(), self.w.rows);
        // Row blocks outside, activation tiles inside: a row block's weights stay in cache
        // while every tile passes over them, and a tile of x stays in L1 across the rows.
        for rb in rows.clone().step_by(ROW_BLOCK) {
            let rb_end = (rb + ROW_BLOCK).min(rows.end);
            for t0 in (0..self.m).step_by(TILE) {
                let n = TILE.min(self.m - t0);
                let xs = &self.x[t0 * cols..(t0 + n) * cols];
                let sums = if self.sums.is_empty() {
                    &[][..]
                } else {
                    &self.sums[t0 * nb..(t0 + n) * nb]
                };
                let mut j = rb;
                while j < rb_end {
                    // Two weight rows at a time where the kernel shares x loads between them.
                    let r = if self.kernel.pairs_rows(self.w.format) && j + 1 < rb_end {
                        2
                    } else {
                        1
                    };
                    let w = [self.w.row_bytes(j), self.w.row_bytes(j + r - 1)];
                    let mut res = [[0f32; TILE]; 2];
                    self.kernel
                        .rows_dot(self.w.format, &w[..r], xs, sums, cols, n, &mut res);
                    for (dj, res) in res[..r].iter().enumerate() {
                        for (k, &v) in res[..n].iter().enumerate() {
                            // SAFETY: (t0 + k) < m and j + dj < rows, so the index is inside
                            // [m, rows]; the column belongs to this task only (caller's
                            // contract).
                            out.write((t0 + k) * n_rows + j + dj, v);
                        }
                    }
                    j += r;
                }
            }
        }
    }
}

/// Which inner kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    // With simd128 on wasm32 only the tests run it, as the reference.
    #[cfg_attr(
        all(target_arch = "wasm32", target_feature = "simd128"),
        allow(dead_code)
    )]
    Scalar,
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    Simd128,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The kernel when no SIMD extension is detected at run time. wasm32 has no detection:
/// a module either validates with its SIMD instructions or not at all, so the choice is
/// the build's (`.cargo/config.toml` turns `simd128` on).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
const WITHOUT_DETECTION: Kernel = Kernel::Simd128;
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
const WITHOUT_DETECTION: Kernel = Kernel::Scalar;

impl Kernel {
    /// The best kernel this CPU runs (detected once per process).
    fn detect() -> Self {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if avx512::available() {
                return Kernel::Avx512;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                return Kernel::Avx2;
            }
            WITHOUT_DETECTION
        })
    }

    /// Whether the kernel reads the per-block `Σx` (the others fold the offset into the
    /// decoded weights).
    fn needs_sums(self, format: BlockFormat) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => false,
            _ => format.has_offset(),
        }
    }

    /// Whether `rows_dot` should get two weight rows at once. With AVX-512 that shares each
    /// x load between two rows (~25% faster for Q4_0/Q4_1, also from DRAM). Not for Q8_0:
    /// measured on Zen 4, streaming two Q8_0 rows (34-byte blocks) from memory ran at half the
    /// speed of one, which loses on large matrices (the LM head).
    fn pairs_rows(self, format: BlockFormat) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => format != BlockFormat::Q8_0,
            _ => {
                let _ = format;
                false
            }
        }
    }

    /// `res[r][i] = Σ_c W_r[c] · xs[i*cols + c]` for the weight rows `w` (one or two) and
    /// `i < n ≤ TILE`.
    #[allow(clippy::too_many_arguments)]
    fn rows_dot(
        self,
        format: BlockFormat,
        w: &[&[u8]],
        xs: &[f32],
        sums: &[f32],
        cols: usize,
        n: usize,
        res: &mut [[f32; TILE]; 2],
    ) {
        assert!(w.len() <= 2);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx512` is only chosen when the CPU has AVX-512 F/BW/VL, AVX2,
            // FMA and F16C.
            Kernel::Avx512 => unsafe { avx512::rows_dot(format, w, xs, cols, n, res) },
            _ => {
                for (row, res) in w.iter().zip(res.iter_mut()) {
                    self.row_dot(format, row, xs, sums, cols, &mut res[..n]);
                }
            }
        }
    }

    /// `res[i] = Σ_c W[row, c] · xs[i*cols + c]` for `i < res.len() ≤ TILE`.
    fn row_dot(
        self,
        format: BlockFormat,
        row: &[u8],
        xs: &[f32],
        sums: &[f32],
        cols: usize,
        res: &mut [f32],
    ) {
        match self {
            Kernel::Scalar => scalar::row_dot(format, row, xs, sums, cols, res),
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Kernel::Simd128 => simd128::row_dot(format, row, xs, sums, cols, res),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2` is only chosen when the CPU has AVX2, FMA and F16C.
            Kernel::Avx2 => unsafe { avx2::row_dot(format, row, xs, sums, cols, res) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                let mut out = [[0f32; TILE]; 2];
                // SAFETY: as in `rows_dot`.
                unsafe { avx512::rows_dot(format, &[row], xs, cols, res.len(), &mut out) };
                res.copy_from_slice(&out[0][..res.len()]);
            }
        }
    }
}

/// Checks a row kernel's slice sizes: the bounds the SIMD kernels rely on.
fn check_row_args(
    format: BlockFormat,
    row: &[u8],
    xs: &[f32],
    sums: &[f32],
    cols: usize,
    n: usize,
) {
    let nb = cols / BLOCK;
    assert!(n <= TILE && cols.is_multiple_of(BLOCK));
    assert_eq!(row.len(), nb * format.block_bytes());
    assert!(xs.len() >= n * cols);
    assert!(!format.has_offset() || sums.len() >= n * nb);
}

/// The portable kernel (also the reference for the SIMD ones).
mod scalar {
    use super::{check_row_args, BlockFormat, BLOCK, TILE};

    /// Little-endian f16 at `at`, as f32.
    fn f16_at(bytes: &[u8], at: usize) -> f32 {
        half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
    }

    /// A block's scale and offset `(d, o)`, with `w = d·q + o`.
    pub fn scales(format: BlockFormat, block: &[u8]) -> (f32, f32) {
        let d = f16_at(block, 0);
        let o = match format {
            BlockFormat::Q4_0 => -8.0 * d,
            BlockFormat::Q4_1 => f16_at(block, 2),
            BlockFormat::Q8_0 => 0.0,
        };
        (d, o)
    }

    /// Decodes a block's codes into `q`; returns `(d, o)` with `w = d·q + o`.
    pub fn decode(format: BlockFormat, block: &[u8], q: &mut [f32; BLOCK]) -> (f32, f32) {
        let codes = &block[format.codes_offset()..format.block_bytes()];
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                // Element i is the low nibble of byte i, element i + 16 the high one.
                for (i, &b) in codes.iter().enumerate() {
                    q[i] = f32::from(b & 0x0F);
                    q[i + 16] = f32::from(b >> 4);
                }
            }
            BlockFormat::Q8_0 => {
                for (q_k, &b) in q.iter_mut().zip(codes) {
                    *q_k = f32::from(b as i8);
                }
            }
        }
        scales(format, block)
    }

    /// See `Kernel::row_dot`.
    pub fn row_dot(
        format: BlockFormat,
        row: &[u8],
        xs: &[f32],
        sums: &[f32],
        cols: usize,
        res: &mut [f32],
    ) {
        let n = res.len();
        check_row_args(format, row, xs, sums, cols, n);
        let nb = cols / BLOCK;
        let mut acc = [0f32; TILE];
        let mut q = [0f32; BLOCK];
        for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
            // Decode once, use for every activation row of the tile.
            let (d, o) = decode(format, block, &mut q);
            for (i, acc_i) in acc[..n].iter_mut().enumerate() {
                let x = &xs[i * cols + b * BLOCK..][..BLOCK];
                let dot: f32 = q.iter().zip(x).map(|(q, x)| q * x).sum();
                let offset = if format.has_offset() {
                    o * sums[i * nb + b]
                } else {
                    0.0
                };
                *acc_i += d * dot + offset;
            }
        }
        res.copy_from_slice(&acc[..n]);
    }
}

/// WebAssembly 128-bit SIMD (the playground's CPU engine; every current browser runs
/// it). No FMA in baseline simd128, so products and sums are separate instructions;
/// each activation row keeps four-lane partial sums across blocks and reduces once.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    use std::arch::wasm32::*;

    use super::{check_row_args, scalar, BlockFormat, BLOCK, TILE};

    /// 16 bytes from `bytes` as a vector.
    fn load16(bytes: &[u8]) -> v128 {
        let bytes: &[u8; 16] = bytes[..16].try_into().expect("16 bytes");
        // SAFETY: the array has 16 readable bytes; wasm loads need no alignment.
        unsafe { v128_load(bytes.as_ptr().cast()) }
    }

    /// Four f32 from `x` as a vector.
    fn load4(x: &[f32]) -> v128 {
        let x: &[f32; 4] = x[..4].try_into().expect("4 floats");
        // SAFETY: as in `load16`.
        unsafe { v128_load(x.as_ptr().cast()) }
    }

    /// Sixteen unsigned bytes as four f32x4 (in element order).
    fn u8_to_f32(v: v128) -> [v128; 4] {
        let (lo, hi) = (u16x8_extend_low_u8x16(v), u16x8_extend_high_u8x16(v));
        [
            f32x4_convert_u32x4(u32x4_extend_low_u16x8(lo)),
            f32x4_convert_u32x4(u32x4_extend_high_u16x8(lo)),
            f32x4_convert_u32x4(u32x4_extend_low_u16x8(hi)),
            f32x4_convert_u32x4(u32x4_extend_high_u16x8(hi)),
        ]
    }

    /// Sixteen signed bytes as four f32x4 (in element order).
    fn i8_to_f32(v: v128) -> [v128; 4] {
        let (lo, hi) = (i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v));
        [
            f32x4_convert_i32x4(i32x4_extend_low_i16x8(lo)),
            f32x4_convert_i32x4(i32x4_extend_high_i16x8(lo)),
            f32x4_convert_i32x4(i32x4_extend_low_i16x8(hi)),
            f32x4_convert_i32x4(i32x4_extend_high_i16x8(hi)),
        ]
    }

    /// A block's 32 integer codes as eight f32x4, element order.
    fn codes(format: BlockFormat, block: &[u8]) -> [v128; 8] {
        let codes = &block[format.codes_offset()..format.block_bytes()];
        let (a, b) = match format {
            // Element i is the low nibble of byte i, element i + 16 the high one.
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let bytes = load16(codes);
                let low = v128_and(bytes, u8x16_splat(0x0F));
                (u8_to_f32(low), u8_to_f32(u8x16_shr(bytes, 4)))
            }
            BlockFormat::Q8_0 => (
                i8_to_f32(load16(&codes[..16])),
                i8_to_f32(load16(&codes[16..])),
            ),
        };
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    }

    fn hsum(v: v128) -> f32 {
        f32x4_extract_lane::<0>(v)
            + f32x4_extract_lane::<1>(v)
            + f32x4_extract_lane::<2>(v)
            + f32x4_extract_lane::<3>(v)
    }

    /// See `Kernel::row_dot`.
    pub fn row_dot(
        format: BlockFormat,
        row: &[u8],
        xs: &[f32],
        sums: &[f32],
        cols: usize,
        res: &mut [f32],
    ) {
        let n = res.len();
        check_row_args(format, row, xs, sums, cols, n);
        let nb = cols / BLOCK;
        let mut lanes = [f32x4_splat(0.0); TILE];
        let mut offsets = [0f32; TILE];
        for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
            let (d, o) = scalar::scales(format, block);
            let q = codes(format, block);
            let d = f32x4_splat(d);
            for i in 0..n {
                let x = &xs[i * cols + b * BLOCK..][..BLOCK];
                // Two chains so consecutive adds do not wait on each other.
                let (mut even, mut odd) = (f32x4_splat(0.0), f32x4_splat(0.0));
                for k in (0..8).step_by(2) {
                    even = f32x4_add(even, f32x4_mul(q[k], load4(&x[4 * k..])));
                    odd = f32x4_add(odd, f32x4_mul(q[k + 1], load4(&x[4 * k + 4..])));
                }
                lanes[i] = f32x4_add(lanes[i], f32x4_mul(d, f32x4_add(even, odd)));
                if format.has_offset() {
                    offsets[i] += o * sums[i * nb + b];
                }
            }
        }
        for (i, r) in res.iter_mut().enumerate() {
            *r = hsum(lanes[i]) + offsets[i];
        }
    }
}

/// AVX2 + FMA + F16C kernels.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{check_row_args, BlockFormat, BLOCK};

    // Const-generic format tags: the block decode is picked at compile time per kernel.
    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    /// Blocks whose offsets are collected before the offset dot product (a stack buffer).
    const OFFSET_GROUP: usize = 64;

    /// Whether this CPU runs the kernels here.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// See `Kernel::row_dot`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    pub unsafe fn row_dot(
        format: BlockFormat,
        row: &[u8],
        xs: &[f32],
        sums: &[f32],
        cols: usize,
        res: &mut [f32],
    ) {
        // One monomorphised kernel per (format, tile height) so the accumulators are
        // registers and the decode has no per-block branches.
        macro_rules! by_n {
            ($fmt:expr) => {
                match res.len() {
                    1 => kernel::<$fmt, 1>(row, xs, sums, cols, res),
                    2 => kernel::<$fmt, 2>(row, xs, sums, cols, res),
                    3 => kernel::<$fmt, 3>(row, xs, sums, cols, res),
                    4 => kernel::<$fmt, 4>(row, xs, sums, cols, res),
                    n => unreachable!("tile of {n} rows"),
                }
            };
        }
        match format {
            BlockFormat::Q4_0 => by_n!(Q4_0),
            BlockFormat::Q4_1 => by_n!(Q4_1),
            BlockFormat::Q8_0 => by_n!(Q8_0),
        }
    }

    const fn format_of(fmt: u8) -> BlockFormat {
        match fmt {
            Q4_0 => BlockFormat::Q4_0,
            Q4_1 => BlockFormat::Q4_1,
            _ => BlockFormat::Q8_0,
        }
    }

    /// The row kernel for format `FMT` and `N` activation rows.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel<const FMT: u8, const N: usize>(
        row: &[u8],
        xs: &[f32],
        sums: &[f32],
        cols: usize,
        res: &mut [f32],
    ) {
        let format = format_of(FMT);
        // These checks make every pointer below in bounds.
        check_row_args(format, row, xs, sums, cols, N);
        assert_eq!(res.len(), N);
        let (nb, bb) = (cols / BLOCK, format.block_bytes());
        // Vector accumulators across blocks: one horizontal sum per row, not per block.
        let mut acc = [_mm256_setzero_ps(); N];
        // The offset term Σ_b o_b·Σx_b is a dot product over blocks: collect o_b for a group
        // of blocks and do it 8 blocks at a time, rather than a scalar FMA per block and row.
        let mut offsets = [_mm256_setzero_ps(); N];
        let mut o = [0f32; OFFSET_GROUP];
        for g0 in (0..nb).step_by(OFFSET_GROUP) {
            let g = OFFSET_GROUP.min(nb - g0);
            for (b, o_b) in (g0..g0 + g).zip(&mut o) {
                let block = row.as_ptr().add(b * bb);
                let scales = load_scales(block);
                let d = _mm256_broadcastss_ps(scales);
                let codes = block.add(format.codes_offset());
                let w = if FMT == Q8_0 {
                    i8_codes(codes)
                } else {
                    nibble_codes(codes)
                };
                *o_b = match FMT {
                    Q4_0 => -8.0 * _mm_cvtss_f32(scales),
                    Q4_1 => _mm_cvtss_f32(_mm_movehdup_ps(scales)),
                    _ => 0.0,
                };
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let dot = block_dot(&w, xs.as_ptr().add(i * cols + b * BLOCK));
                    *acc_i = _mm256_fmadd_ps(d, dot, *acc_i);
                }
            }
            if FMT != Q8_0 {
                for (i, off_i) in offsets.iter_mut().enumerate() {
                    let s = sums.as_ptr().add(i * nb + g0);
                    *off_i = dot_acc(o.as_ptr(), s, g, *off_i);
                }
            }
        }
        for ((r, a), o) in res.iter_mut().zip(acc).zip(offsets) {
            *r = hsum(_mm256_add_ps(a, o));
        }
    }

    /// `acc + Σ_k a[k]·b[k]` for `k < n`, lane-wise (masked loads for the tail).
    ///
    /// # Safety
    /// `a` and `b` are valid for `n` reads.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_acc(a: *const f32, b: *const f32, n: usize, mut acc: __m256) -> __m256 {
        let mut k = 0;
        while k + 8 <= n {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(k)), _mm256_loadu_ps(b.add(k)), acc);
            k += 8;
        }
        if k < n {
            // Lanes below n − k are on; masked-off lanes are neither read nor faulted on.
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((n - k) as i32), lanes);
            let va = _mm256_maskload_ps(a.add(k), mask);
            let vb = _mm256_maskload_ps(b.add(k), mask);
            acc = _mm256_fmadd_ps(va, vb, acc);
        }
        acc
    }

    /// The block's leading f16s as f32: lane 0 is d, lane 1 is Q4_1's m (for other formats
    /// it is the first code bytes, unused).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_scales(block: *const u8) -> __m128 {
        let bits = (block as *const i32).read_unaligned();
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits))
    }

    /// 16 nibble bytes → the 32 codes as f32, in element order (low nibbles are elements
    /// 0..16, high nibbles 16..32).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibble_codes(codes: *const u8) -> [__m256; 4] {
        let raw = _mm_loadu_si128(codes as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(raw, mask);
        // A 16-bit shift is fine: the mask drops the bits shifted in from the next byte.
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        [
            u8x8_to_f32(lo),
            u8x8_to_f32(_mm_unpackhi_epi64(lo, lo)),
            u8x8_to_f32(hi),
            u8x8_to_f32(_mm_unpackhi_epi64(hi, hi)),
        ]
    }

    /// The low 8 bytes of `v` as unsigned integers, in f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn u8x8_to_f32(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// 32 i8 codes as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8_codes(codes: *const u8) -> [__m256; 4] {
        let p = codes as *const __m128i;
        [
            i8x8_to_f32(_mm_loadl_epi64(p)),
            i8x8_to_f32(_mm_loadl_epi64(codes.add(8) as *const __m128i)),
            i8x8_to_f32(_mm_loadl_epi64(codes.add(16) as *const __m128i)),
            i8x8_to_f32(_mm_loadl_epi64(codes.add(24) as *const __m128i)),
        ]
    }

    /// The low 8 bytes of `v` as signed integers, in f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8x8_to_f32(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    /// Σ w·x over one block, left in 8 lanes. One chain (4 ops): it is not loop-carried, so
    /// its latency overlaps with the next blocks; only the caller's `acc` FMA is carried.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_dot(w: &[__m256; 4], x: *const f32) -> __m256 {
        let p = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
        let p = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), p);
        let p = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), p);
        _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), p)
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// AVX-512 (F/BW/VL) kernels: a 32-weight block is two 16-lane vectors.
///
/// Unlike the AVX2 kernels these fold the scale and offset into the decoded weights
/// (`w = d·q + o`, once per block, shared by the tile's activation rows), so each activation
/// row costs two FMAs per block and no `Σx` is needed. Two weight rows go through together so
/// every x vector loaded feeds two FMAs.
///
/// The AVX-512 intrinsics and `target_feature`s are stable since Rust 1.89 (the crate's
/// `rust-version`).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{avx2, BlockFormat, BLOCK, TILE};

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    /// Whether this CPU runs the kernels here.
    pub fn available() -> bool {
        avx2::available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    }

    /// See `Kernel::rows_dot` (`w` is one or two weight rows).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL, AVX2, FMA and F16C.
    pub unsafe fn rows_dot(
        format: BlockFormat,
        w: &[&[u8]],
        xs: &[f32],
        cols: usize,
        n: usize,
        res: &mut [[f32; TILE]; 2],
    ) {
        // One monomorphised kernel per (format, weight rows, tile height): the accumulators
        // are registers and the decode has no per-block branches.
        macro_rules! by_n {
            ($fmt:expr, $w:expr) => {
                match n {
                    1 => kernel::<$fmt, 1, _>($w, xs, cols, res),
                    2 => kernel::<$fmt, 2, _>($w, xs, cols, res),
                    3 => kernel::<$fmt, 3, _>($w, xs, cols, res),
                    4 => kernel::<$fmt, 4, _>($w, xs, cols, res),
                    n => unreachable!("tile of {n} rows"),
                }
            };
        }
        macro_rules! by_rows {
            ($fmt:expr) => {
                match *w {
                    [a] => by_n!($fmt, [a]),
                    [a, b] => by_n!($fmt, [a, b]),
                    _ => unreachable!("{} weight rows", w.len()),
                }
            };
        }
        match format {
            BlockFormat::Q4_0 => by_rows!(Q4_0),
            BlockFormat::Q4_1 => by_rows!(Q4_1),
            BlockFormat::Q8_0 => by_rows!(Q8_0),
        }
    }

    const fn format_of(fmt: u8) -> BlockFormat {
        match fmt {
            Q4_0 => BlockFormat::Q4_0,
            Q4_1 => BlockFormat::Q4_1,
            _ => BlockFormat::Q8_0,
        }
    }

    /// The kernel for format `FMT`, `N` activation rows and `R` weight rows.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn kernel<const FMT: u8, const N: usize, const R: usize>(
        w: [&[u8]; R],
        xs: &[f32],
        cols: usize,
        res: &mut [[f32; TILE]; 2],
    ) {
        let format = format_of(FMT);
        let (nb, bb) = (cols / BLOCK, format.block_bytes());
        // These checks make every pointer below in bounds.
        assert!(N <= TILE && R <= 2 && cols.is_multiple_of(BLOCK));
        assert!(xs.len() >= N * cols);
        for row in w {
            assert_eq!(row.len(), nb * bb);
        }
        // Two accumulators per (weight row, activation row), one per block half, so the
        // loop-carried FMA chains are short; one horizontal sum each at the end.
        let mut acc = [[[_mm512_setzero_ps(); 2]; N]; R];
        for b in 0..nb {
            let mut dw = [[_mm512_setzero_ps(); 2]; R];
            for (dw, row) in dw.iter_mut().zip(w) {
                *dw = decode::<FMT>(row.as_ptr().add(b * bb));
            }
            for i in 0..N {
                let x = xs.as_ptr().add(i * cols + b * BLOCK);
                let x0 = _mm512_loadu_ps(x);
                let x1 = _mm512_loadu_ps(x.add(16));
                for (acc_r, dw) in acc.iter_mut().zip(&dw) {
                    let a = &mut acc_r[i];
                    a[0] = _mm512_fmadd_ps(dw[0], x0, a[0]);
                    a[1] = _mm512_fmadd_ps(dw[1], x1, a[1]);
                }
            }
        }
        for (res, acc) in res.iter_mut().zip(acc) {
            for (r, a) in res.iter_mut().zip(acc) {
                *r = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
        }
    }

    /// One block's 32 weights `d·q + o` as f32, in element order.
    ///
    /// # Safety
    /// `block` points at a whole block of format `FMT`; the CPU has the kernel's features.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn decode<const FMT: u8>(block: *const u8) -> [__m512; 2] {
        let format = format_of(FMT);
        // Lane 0: d; lane 1: Q4_1's m (other formats: code bytes, unused).
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
        let d = _mm512_broadcastss_ps(scales);
        let codes = block.add(format.codes_offset());
        if FMT == Q8_0 {
            let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(codes as *const __m128i));
            let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(codes.add(16) as *const __m128i));
            return [
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)),
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)),
            ];
        }
        // Byte k holds element k (low nibble) and element k + 16 (high nibble).
        let raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes as *const __m128i));
        let lo = _mm512_and_si512(raw, _mm512_set1_epi32(0x0F));
        let hi = _mm512_srli_epi32::<4>(raw);
        if FMT == Q4_0 {
            // (q − 8)·d, as ggml dequantises: exact integers, one rounding.
            let eight = _mm512_set1_epi32(8);
            let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight));
            let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight));
            [_mm512_mul_ps(d, lo), _mm512_mul_ps(d, hi)]
        } else {
            let m = _mm512_broadcastss_ps(_mm_movehdup_ps(scales));
            [
                _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lo), m),
                _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(hi), m),
            ]
        }
    }
}

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
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("block matmul: the input must be f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("block matmul: the input must be contiguous");
        };
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
        w.matmul(&data[start..end], m, &mut out);
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

#[cfg(test)]
mod tests {
    // In the browser too (`wasm-pack test`), where the simd128 kernel runs.
    use super::*;
    use candle_core::{Device, Tensor};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Deterministic pseudo-random values in [-1, 1) (xorshift).
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    const FORMATS: [(BlockFormat, GgmlDType); 3] = [
        (BlockFormat::Q4_0, GgmlDType::Q4_0),
        (BlockFormat::Q4_1, GgmlDType::Q4_1),
        (BlockFormat::Q8_0, GgmlDType::Q8_0),
    ];

    /// A random matrix quantised by candle, with candle's dequantisation.
    fn quantized(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (BlockMatrix, Vec<Vec<f32>>) {
        let t = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let w = BlockMatrix::from_qtensor(&q).expect("supported qtensor");
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        (w, deq)
    }

    /// Checks `got` ([m, rows]) against an f64 reference on candle's dequantised weights.
    fn check_against_reference(got: &[f32], deq: &[Vec<f32>], x: &[f32], m: usize, what: &str) {
        let (rows, cols) = (deq.len(), deq[0].len());
        for i in 0..m {
            for (j, w) in deq.iter().enumerate() {
                let xi = &x[i * cols..(i + 1) * cols];
                let want: f64 = w.iter().zip(xi).map(|(&w, &x)| w as f64 * x as f64).sum();
                let scale: f64 = w
                    .iter()
                    .zip(xi)
                    .map(|(&w, &x)| (w as f64 * x as f64).abs())
                    .sum();
                let g = got[i * rows + j] as f64;
                assert!(
                    (g - want).abs() <= 1e-4 * (1.0 + scale),
                    "{what}: (i={i}, j={j}) got {g} want {want}"
                );
            }
        }
    }

    #[test]
    fn dequantize_matches_candle() {
        for (format, dtype) in FORMATS {
            let (w, deq) = quantized(dtype, 5, 576, 1);
            assert_eq!(w.format(), format);
            assert_eq!((w.rows(), w.cols()), (5, 576));
            let mut row = vec![0f32; 576];
            for (j, want) in deq.iter().enumerate() {
                w.dequantize_row(j, &mut row);
                for (c, (&g, &e)) in row.iter().zip(want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-6 * (1.0 + e.abs()),
                        "{format:?} ({j}, {c}): {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_matches_f64_reference() {
        for (format, dtype) in FORMATS {
            for rows in [1, 7, 64, 300] {
                for cols in [32, 576, 1536] {
                    let (w, deq) = quantized(dtype, rows, cols, (rows * cols) as u64);
                    for m in [1, 2, 3, 5, 17] {
                        let x = random(m * cols, 7 + m as u64);
                        let mut out = vec![f32::NAN; m * rows];
                        w.matmul(&x, m, &mut out);
                        let what = format!("{format:?} m={m} rows={rows} cols={cols}");
                        check_against_reference(&out, &deq, &x, m, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_agree() {
        let kernels = [Kernel::detect(), Kernel::Scalar];
        for (format, dtype) in FORMATS {
            let (w, deq) = quantized(dtype, 70, 576, 3);
            for m in [1, 3, 4, 9] {
                let x = random(m * 576, 11);
                for kernel in kernels {
                    let mut out = vec![f32::NAN; m * 70];
                    w.matmul_with(kernel, &x, m, &mut out);
                    check_against_reference(
                        &out,
                        &deq,
                        &x,
                        m,
                        &format!("{format:?} {kernel:?} m={m}"),
                    );
                }
                // Direct row-kernel comparison, independent of the tiling code.
                let sums = block_sums(&x[..576], 576);
                let (mut a, mut b) = ([0f32; 1], [0f32; 1]);
                Kernel::Scalar.row_dot(format, w.row_bytes(5), &x[..576], &sums, 576, &mut a);
                Kernel::detect().row_dot(format, w.row_bytes(5), &x[..576], &sums, 576, &mut b);
                assert!(
                    (a[0] - b[0]).abs() <= 1e-4 * (1.0 + a[0].abs()),
                    "{format:?}: {a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn simd_kernel_is_used_where_available() {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        assert_eq!(Kernel::detect(), Kernel::Simd128);
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            assert_eq!(Kernel::detect(), Kernel::Avx512);
        } else if avx2::available() {
            assert_eq!(Kernel::detect(), Kernel::Avx2);
        }
    }

    /// Every kernel this CPU runs, scalar first.
    fn kernels() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut k = vec![Kernel::Scalar];
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        k.push(Kernel::Simd128);
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                k.push(Kernel::Avx2);
            }
            if avx512::available() {
                k.push(Kernel::Avx512);
            }
        }
        k
    }

    #[test]
    fn every_kernel_matches_scalar_and_reference_on_awkward_sizes() {
        // Odd row counts (a lone last row after the pairs), row counts crossing ROW_BLOCK,
        // one-block rows, and m leaving every partial tile (m % TILE = 1, 2, 3).
        for (format, dtype) in FORMATS {
            for (rows, cols) in [(1, 32), (2, 32), (3, 96), (17, 64), (65, 160), (131, 576)] {
                let (w, deq) = quantized(dtype, rows, cols, (rows + 3 * cols) as u64);
                for m in [1, 2, 3, 4, 5, 6, 7, 9] {
                    let x = random(m * cols, 100 + m as u64);
                    let mut want = vec![f32::NAN; m * rows];
                    w.matmul_with(Kernel::Scalar, &x, m, &mut want);
                    for kernel in kernels() {
                        let mut out = vec![f32::NAN; m * rows];
                        w.matmul_with(kernel, &x, m, &mut out);
                        let what = format!("{format:?} {kernel:?} m={m} [{rows}, {cols}]");
                        check_against_reference(&out, &deq, &x, m, &what);
                        for (k, (&g, &e)) in out.iter().zip(&want).enumerate() {
                            assert!(
                                (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                "{what} at {k}: {g} vs scalar {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_dot_one_and_two_rows_agree_with_row_dot() {
        let cols = 224;
        for (format, dtype) in FORMATS {
            let (w, _) = quantized(dtype, 4, cols, 77);
            for n in 1..=TILE {
                let x = random(n * cols, 78 + n as u64);
                let sums = block_sums(&x, cols);
                for kernel in kernels() {
                    for pair in [&[1][..], &[2, 3][..]] {
                        let rows: Vec<&[u8]> = pair.iter().map(|&j| w.row_bytes(j)).collect();
                        let mut got = [[f32::NAN; TILE]; 2];
                        kernel.rows_dot(format, &rows, &x, &sums, cols, n, &mut got);
                        for (r, &j) in pair.iter().enumerate() {
                            let mut want = [0f32; TILE];
                            let row = w.row_bytes(j);
                            Kernel::Scalar.row_dot(format, row, &x, &sums, cols, &mut want[..n]);
                            for (g, e) in got[r][..n].iter().zip(&want[..n]) {
                                assert!(
                                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                    "{format:?} {kernel:?} n={n} row {j}: {g} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn large_matrix_crosses_row_blocks_and_offset_groups() {
        // Enough rows that a task spans several ROW_BLOCKs, and 65 blocks per row so the
        // offset dot product crosses an OFFSET_GROUP boundary with a 1-block tail.
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols, m) = (1100, 2080, 5);
            let (w, deq) = quantized(dtype, rows, cols, 31);
            let x = random(m * cols, 32);
            let mut out = vec![f32::NAN; m * rows];
            w.matmul(&x, m, &mut out);
            check_against_reference(&out, &deq, &x, m, &format!("{dtype:?} large"));
        }
    }

    #[test]
    fn concat_rows_equals_separate_matmuls() {
        let (q, _) = quantized(GgmlDType::Q4_1, 64, 576, 21);
        let (k, _) = quantized(GgmlDType::Q4_1, 32, 576, 22);
        let (v, _) = quantized(GgmlDType::Q4_1, 17, 576, 23);
        let qkv = BlockMatrix::concat_rows(&[&q, &k, &v]).unwrap();
        assert_eq!(qkv.rows(), 113);
        let m = 3;
        let x = random(m * 576, 5);
        let mut fused = vec![0f32; m * 113];
        qkv.matmul(&x, m, &mut fused);
        let mut start = 0;
        for part in [&q, &k, &v] {
            let mut out = vec![0f32; m * part.rows()];
            part.matmul(&x, m, &mut out);
            for i in 0..m {
                let f = &fused[i * 113 + start..][..part.rows()];
                assert_eq!(f, &out[i * part.rows()..][..part.rows()], "row {i}");
            }
            start += part.rows();
        }
        let (other, _) = quantized(GgmlDType::Q8_0, 4, 576, 1);
        assert!(BlockMatrix::concat_rows(&[&q, &other]).is_none());
        assert!(BlockMatrix::concat_rows(&[]).is_none());
    }

    #[test]
    fn custom_op_on_3d_input() {
        let (w, _) = quantized(GgmlDType::Q8_0, 40, 64, 8);
        let w = Arc::new(w);
        let data = random(2 * 3 * 64, 9);
        let x = Tensor::from_vec(data.clone(), (2, 3, 64), &Device::Cpu).unwrap();
        let y = x.apply_op1(BlockMatMul(w.clone())).unwrap();
        assert_eq!(y.dims(), &[2, 3, 40]);
        let mut want = vec![0f32; 6 * 40];
        w.matmul(&data, 6, &mut want);
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // A non-contiguous input is refused rather than misread.
        let xt = Tensor::from_vec(random(64 * 2, 1), (64, 2), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(xt.apply_op1(BlockMatMul(w)).is_err());
    }

    #[test]
    fn new_checks_sizes() {
        assert!(BlockMatrix::new(BlockFormat::Q4_0, 2, 33, vec![]).is_err());
        assert!(BlockMatrix::new(BlockFormat::Q4_0, 2, 32, vec![0; 35]).is_err());
        assert!(BlockMatrix::new(BlockFormat::Q4_0, 2, 32, vec![0; 36]).is_ok());
        assert_eq!(BlockFormat::from_ggml(GgmlDType::F32), None);
    }
}
