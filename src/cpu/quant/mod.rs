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
//!
//! With `Activations::Int16` the activations are rounded to 16-bit integers per block
//! first (`int16`): faster where integer dot products are (WebAssembly; AVX-512 VNNI,
//! where the weights are also interleaved in 16-row groups, `interleaved`), within f32
//! noise.
//!
//! One file per instruction set, as candle-core's `quantized/{avx,neon,simd128}`: this
//! module holds the block formats, the matrix type and the choice of kernel; `tiling` cuts
//! one matmul into parallel tasks; `scalar`, `simd128`, `avx2` and `avx512` are the row
//! kernels, `interleaved` and `vnni` the 16-row group kernels; `custom_op` plugs the
//! matmul into candle.

/// `$kernel::<FMT, N>($arg, …)` for the runtime block format `$format` and tile height `$n`
/// (1..=TILE): one monomorphised x86 kernel per pair, so the accumulators are registers
/// and the block decode has no per-block branch.
#[cfg(target_arch = "x86_64")]
macro_rules! by_format_and_height {
    ($format:expr, $n:expr, $kernel:ident($($arg:expr),*)) => {{
        use $crate::cpu::quant::tag::{Q4_0, Q4_1, Q8_0};
        macro_rules! by_n {
            ($fmt:expr) => {
                match $n {
                    1 => $kernel::<$fmt, 1>($($arg),*),
                    2 => $kernel::<$fmt, 2>($($arg),*),
                    3 => $kernel::<$fmt, 3>($($arg),*),
                    4 => $kernel::<$fmt, 4>($($arg),*),
                    n => unreachable!("tile of {n} rows"),
                }
            };
        }
        match $format {
            BlockFormat::Q4_0 => by_n!(Q4_0),
            BlockFormat::Q4_1 => by_n!(Q4_1),
            BlockFormat::Q8_0 => by_n!(Q8_0),
        }
    }};
}

mod custom_op;
mod int16;
mod interleaved;
mod pages;
mod quads;
mod scalar;
mod tiling;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128;
#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};

use pages::WeightBuf;

pub use custom_op::BlockMatMul;

/// Weights per block, in every format here.
const BLOCK: usize = 32;

/// Activation rows handled together per weight row: each decoded block is reused this many
/// times, and `TILE` accumulators plus the decoded block still fit in 16 AVX2 registers.
const TILE: usize = 4;

/// Weight rows an integer-activation row kernel takes at once (`Kernel::int_rows`).
const INT_ROWS: usize = 4;

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

    /// Code bytes per block.
    const fn code_bytes(self) -> usize {
        self.block_bytes() - self.codes_offset()
    }

    /// Whether the dot product has an offset term, i.e. needs `Σx` per block.
    const fn has_offset(self) -> bool {
        !matches!(self, Self::Q8_0)
    }
}

/// What the weights are multiplied with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// The f32 activations themselves: the reference the GPU engine is checked against.
    #[default]
    F32,
    /// The activations rounded to 16-bit integers per 32-block (`x ≈ dx·qx`), the dot
    /// products summed as integers (see `int16`).
    Int16,
}

impl Activations {
    /// The faster choice on this CPU: `Int16` where a kernel has integer dot products
    /// (WebAssembly SIMD, which has no f32 FMA; AVX-512 VNNI over interleaved rows), `F32`
    /// elsewhere.
    pub fn fastest() -> Self {
        if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) || interleaves() {
            Self::Int16
        } else {
            Self::F32
        }
    }
}

/// How a matrix's blocks are ordered in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Row after row, as in the GGUF file.
    Rows,
    /// Groups of 16 rows interleaved block by block (`interleaved`), for the integer
    /// kernel with rows across lanes.
    Groups,
    /// Groups of four rows block by block with f32 scales (`quads`), for the simd128
    /// integer kernel.
    Quads,
}

impl Layout {
    /// The layout the fastest kernel for `activations` reads, for a matrix of `rows` rows:
    /// for integer activations, `Groups` where the VNNI kernel runs and the rows are whole
    /// groups, `Quads` in the wasm build.
    fn for_kernel(activations: Activations, rows: usize) -> Self {
        if activations != Activations::Int16 {
            return Self::Rows;
        }
        if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
            return Self::Quads;
        }
        if interleaves() && rows.is_multiple_of(interleaved::GROUP) {
            Self::Groups
        } else {
            Self::Rows
        }
    }

    /// Row-major file blocks `data` of a `[rows, cols]` matrix in this layout.
    fn lay_out(self, format: BlockFormat, rows: usize, cols: usize, data: &[u8]) -> WeightBuf {
        match self {
            Self::Rows => WeightBuf::copy_of(data),
            Self::Groups => interleaved::interleave(format, rows, cols, data),
            Self::Quads => quads::interleave(format, rows, cols, data),
        }
    }
}

/// Whether integer activations get the interleaved layout here (the AVX-512 VNNI kernel).
fn interleaves() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(vnni::available)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The most bytes in one block (Q8_0).
const MAX_BLOCK_BYTES: usize = 34;

/// One block as the file has it, in its first `block_bytes` bytes.
type FileBlock = [u8; MAX_BLOCK_BYTES];

/// A `[rows, cols]` matrix in row-major file blocks, block `b` of row `row` from
/// `block_of(row, b)`: an interleaved layout back in the file's order.
fn row_major(
    format: BlockFormat,
    rows: usize,
    cols: usize,
    block_of: impl Fn(usize, usize) -> FileBlock,
) -> WeightBuf {
    let bb = format.block_bytes();
    WeightBuf::filled(rows * (cols / BLOCK) * bb, |out| {
        let mut out = out.chunks_exact_mut(bb);
        for row in 0..rows {
            for b in 0..cols / BLOCK {
                let to = out.next().expect("output sized as the matrix");
                to.copy_from_slice(&block_of(row, b)[..bb]);
            }
        }
    })
}

/// Checks a `[rows, cols]` matrix of `format` blocks: `cols % 32 == 0` and `len` bytes.
fn check_size(format: BlockFormat, rows: usize, cols: usize, len: usize) -> Result<(), String> {
    if !cols.is_multiple_of(BLOCK) {
        return Err(format!(
            "{format:?} matrix: cols {cols} is not a multiple of {BLOCK}"
        ));
    }
    let want = rows * (cols / BLOCK) * format.block_bytes();
    if len != want {
        return Err(format!(
            "{format:?} matrix [{rows}, {cols}]: {len} bytes of blocks, expected {want}"
        ));
    }
    Ok(())
}

/// Format tags for the x86 kernels, which monomorphise one kernel per format so the block
/// decode has no per-block branch (stable Rust takes no enum as a const parameter).
#[cfg(target_arch = "x86_64")]
mod tag {
    use super::BlockFormat;

    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;

    /// The format `tag` stands for.
    pub const fn format_of(tag: u8) -> BlockFormat {
        match tag {
            Q4_0 => BlockFormat::Q4_0,
            Q4_1 => BlockFormat::Q4_1,
            _ => BlockFormat::Q8_0,
        }
    }
}

/// A row-major matrix `[rows, cols]` of GGUF blocks (each row is cols/32 blocks).
#[derive(Clone, Debug)]
pub struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: WeightBuf,
    activations: Activations,
    layout: Layout,
}

impl BlockMatrix {
    /// Wraps raw block bytes; checks `cols % 32 == 0` and the data length.
    pub fn new(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, String> {
        check_size(format, rows, cols, data.len())?;
        let data = WeightBuf::copy_of(&data);
        let (activations, layout) = (Activations::F32, Layout::Rows);
        Ok(Self::assemble(
            format,
            rows,
            cols,
            data,
            activations,
            layout,
        ))
    }

    /// The matrix of checked parts.
    fn assemble(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: WeightBuf,
        activations: Activations,
        layout: Layout,
    ) -> Self {
        Self {
            format,
            rows,
            cols,
            data,
            activations,
            layout,
        }
    }

    /// The same weights multiplied with `activations` from now on, in the layout the
    /// fastest kernel for them reads.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        let layout = Layout::for_kernel(activations, self.rows);
        self.with_layout(layout)
    }

    /// The same weights in `layout` (`Groups` needs a multiple of 16 rows).
    fn with_layout(mut self, layout: Layout) -> Self {
        if layout == self.layout {
            return self;
        }
        let (format, rows, cols) = (self.format, self.rows, self.cols);
        let by_rows = match self.layout {
            Layout::Rows => None,
            Layout::Groups => Some(interleaved::deinterleave(format, rows, cols, &self.data)),
            Layout::Quads => Some(quads::deinterleave(format, rows, cols, &self.data)),
        };
        let by_rows = by_rows.as_deref().unwrap_or(&self.data);
        self.data = layout.lay_out(format, rows, cols, by_rows);
        self.layout = layout;
        self
    }

    /// A 2-D Q4_0/Q4_1/Q8_0 tensor's blocks (candle's CPU storage holds the GGUF block bytes
    /// verbatim); `None` for other dtypes, ranks or devices.
    pub fn from_qtensor(q: &QTensor) -> Option<Self> {
        Self::from_qtensor_with(q, Activations::F32)
    }

    /// `from_qtensor(q).with_activations(activations)`, copying the bytes once (straight
    /// into the layout the kernel reads).
    pub fn from_qtensor_with(q: &QTensor, activations: Activations) -> Option<Self> {
        let format = BlockFormat::from_ggml(q.dtype())?;
        let (rows, cols) = q.shape().dims2().ok()?;
        let bytes = q.data().ok()?;
        check_size(format, rows, cols, bytes.len()).ok()?;
        let layout = Layout::for_kernel(activations, rows);
        let data = layout.lay_out(format, rows, cols, &bytes);
        Some(Self::assemble(
            format,
            rows,
            cols,
            data,
            activations,
            layout,
        ))
    }

    /// The parts stacked row-wise (fuses q/k/v or gate/up into one matmul); `None` when
    /// `parts` is empty or the formats or column counts differ.
    pub fn concat_rows(parts: &[&BlockMatrix]) -> Option<BlockMatrix> {
        let first = parts.first()?;
        let same = |p: &&BlockMatrix| p.format == first.format && p.cols == first.cols;
        if !parts.iter().all(same) {
            return None;
        }
        // Interleaved parts are whole groups, so their bytes concatenate as rows do; quads
        // too where no padded quad (a part's last, when its rows are not a multiple of
        // four) would have rows after it.
        let layout = first.layout;
        if parts.iter().any(|p| p.layout != layout) {
            return None;
        }
        let (_, before_last) = parts.split_last()?;
        if layout == Layout::Quads && before_last.iter().any(|p| !p.rows.is_multiple_of(INT_ROWS)) {
            return None;
        }
        let len = parts.iter().map(|p| p.data.len()).sum();
        let data = WeightBuf::filled(len, |out| {
            let mut at = 0;
            for p in parts {
                out[at..at + p.data.len()].copy_from_slice(&p.data);
                at += p.data.len();
            }
        });
        let rows = parts.iter().map(|p| p.rows).sum();
        let (format, cols, activations) = (first.format, first.cols, first.activations);
        Some(Self::assemble(
            format,
            rows,
            cols,
            data,
            activations,
            layout,
        ))
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

    pub fn activations(&self) -> Activations {
        self.activations
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// The bytes of weight row `row` (`Layout::Rows`).
    fn row_bytes(&self, row: usize) -> &[u8] {
        debug_assert_eq!(self.layout, Layout::Rows);
        let len = self.blocks_per_row() * self.format.block_bytes();
        &self.data[row * len..(row + 1) * len]
    }

    /// The bytes of the quad of rows `4q..4q + 4` (`Layout::Quads`); empty past the end.
    fn quad_bytes(&self, q: usize) -> &[u8] {
        debug_assert_eq!(self.layout, Layout::Quads);
        let len = quads::quad_bytes(self.format, self.cols);
        self.data.get(q * len..(q + 1) * len).unwrap_or_default()
    }

    /// The bytes of the 16-row group `g` (`Layout::Groups`).
    fn group_bytes(&self, g: usize) -> &[u8] {
        debug_assert_eq!(self.layout, Layout::Groups);
        let len = self.blocks_per_row() * interleaved::superblock_bytes(self.format);
        &self.data[g * len..(g + 1) * len]
    }

    /// Writes row `row` as f32 into `out` (`cols` long).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} of {}", self.rows);
        assert_eq!(out.len(), self.cols, "output length");
        let format = self.format;
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let mut q = [0f32; BLOCK];
            let (d, o) = match self.layout {
                Layout::Rows => {
                    let bb = format.block_bytes();
                    let block = &self.row_bytes(row)[b * bb..(b + 1) * bb];
                    scalar::decode(format, block, &mut q)
                }
                Layout::Groups => {
                    let block = interleaved::block_of(format, &self.data, self.cols, row, b);
                    scalar::decode(format, &block[..format.block_bytes()], &mut q)
                }
                Layout::Quads => {
                    let block = quads::block_of(format, &self.data, self.cols, row, b);
                    scalar::decode(format, &block[..format.block_bytes()], &mut q)
                }
            };
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
        tiling::matmul(self, kernel, x, m, out);
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
                for (&row, res) in w.iter().zip(res.iter_mut()) {
                    let args = RowArgs {
                        format,
                        row,
                        xs,
                        sums,
                        cols,
                    };
                    self.row_dot(args, &mut res[..n]);
                }
            }
        }
    }

    /// `res[i] = Σ_c W[row, c] · xs[i*cols + c]` for `i < res.len() ≤ TILE`.
    fn row_dot(self, args: RowArgs<'_>, res: &mut [f32]) {
        match self {
            Kernel::Scalar => scalar::row_dot(args, res),
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Kernel::Simd128 => simd128::row_dot(args, res),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2` is only chosen when the CPU has AVX2, FMA and F16C.
            Kernel::Avx2 => unsafe { avx2::row_dot(args, res) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                let RowArgs {
                    format,
                    row,
                    xs,
                    cols,
                    ..
                } = args;
                let mut out = [[0f32; TILE]; 2];
                // SAFETY: as in `rows_dot`.
                unsafe { avx512::rows_dot(format, &[row], xs, cols, res.len(), &mut out) };
                res.copy_from_slice(&out[0][..res.len()]);
            }
        }
    }
}

impl Kernel {
    /// `res[i][r] = Σ_c W[16g + r, c] · x_i[c]` for the interleaved 16-row group in `args`
    /// (`Layout::Groups`) and `i < n`, with the activations as 16-bit integers.
    fn group_dot(
        self,
        args: interleaved::GroupArgs<'_>,
        n: usize,
        res: &mut [[f32; interleaved::GROUP]; TILE],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx512 && interleaves() {
            // SAFETY: `interleaves()` checked for AVX-512 VNNI and the features
            // `Kernel::Avx512` needs.
            return unsafe { vnni::group_dot(args, n, res) };
        }
        interleaved::group_dot(args, n, res)
    }

    /// `res[r][i] = Σ_c W_r[c] · x_i[c]` for the quad of weight rows `quad`
    /// (`Layout::Quads`) and `i < n`, with the activations as 16-bit integers; `ahead`: the
    /// next quad's bytes (or empty), which the simd128 kernel reads into cache meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn quad_dot(
        self,
        format: BlockFormat,
        quad: &[u8],
        ahead: &[u8],
        acts: int16::IntTile<'_>,
        cols: usize,
        n: usize,
        res: &mut [[f32; TILE]; INT_ROWS],
    ) {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        if self == Kernel::Simd128 {
            return simd128::quad_dot(format, quad, ahead, acts, cols, n, res);
        }
        let _ = ahead;
        quads::quad_dot(format, quad, acts, cols, n, res)
    }

    /// `res[r][i] = Σ_c W_r[c] · x_i[c]` for the row-major weight rows `w` and `i < n`,
    /// with the activations as 16-bit integers.
    fn rows_dot_int(
        self,
        format: BlockFormat,
        w: &[&[u8]],
        acts: int16::IntTile<'_>,
        cols: usize,
        n: usize,
        res: &mut [[f32; TILE]; INT_ROWS],
    ) {
        // x86 runs f32 activations by default, or its interleaved VNNI kernel; the
        // portable kernel otherwise.
        for (&row, res) in w.iter().zip(res.iter_mut()) {
            let args = int16::IntRowArgs {
                format,
                row,
                acts,
                cols,
            };
            int16::row_dot(args, &mut res[..n]);
        }
    }
}

/// What a row kernel reads: one weight row of `format` blocks, the tile's activation rows
/// `xs` (`[n, cols]`, `n ≤ TILE`) and their per-block `Σx` (`[n, cols/32]`; unused, and
/// may be empty, when the format has no offset term).
#[derive(Clone, Copy)]
struct RowArgs<'a> {
    format: BlockFormat,
    row: &'a [u8],
    xs: &'a [f32],
    sums: &'a [f32],
    cols: usize,
}

impl RowArgs<'_> {
    /// Checks the slice sizes for `n` activation rows: the bounds the SIMD kernels rely on.
    fn check(&self, n: usize) {
        let nb = self.cols / BLOCK;
        assert!(n <= TILE && self.cols.is_multiple_of(BLOCK));
        assert_eq!(self.row.len(), nb * self.format.block_bytes());
        assert!(self.xs.len() >= n * self.cols);
        assert!(!self.format.has_offset() || self.sums.len() >= n * nb);
    }

    /// The weight row's blocks with their indices.
    fn blocks(&self) -> impl Iterator<Item = (usize, &[u8])> {
        self.row.chunks_exact(self.format.block_bytes()).enumerate()
    }

    /// The 32 activations of activation row `i` that block `b` multiplies.
    #[inline]
    fn x_block(&self, i: usize, b: usize) -> &[f32] {
        &self.xs[i * self.cols + b * BLOCK..][..BLOCK]
    }

    /// `Σx` over those activations.
    #[inline]
    fn block_sum(&self, i: usize, b: usize) -> f32 {
        self.sums[i * (self.cols / BLOCK) + b]
    }
}
