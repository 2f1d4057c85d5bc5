//! Weights interleaved in groups of 16 rows, for integer dot products with the rows
//! across SIMD lanes (the AVX-512 VNNI kernel in `vnni`; the portable kernel here is its
//! reference, bit for bit).
//!
//! A row-major kernel sums each row's products across lanes and reduces them at the end.
//! Here lane `r` of every vector belongs to row `r` of the group: one dot instruction adds
//! two or four products to each of 16 rows, the per-block scales are one vector load of the
//! 16 rows' f16s, and there is no horizontal sum at all. This is the layout llama.cpp repacks Q4_0
//! into for its x86 and Arm GEMV kernels, here for Q4_0, Q4_1 and Q8_0 with 16-bit
//! activation codes (`int16`).
//!
//! Group `g`, block `b` is a superblock of the 16 rows' block `b`, in this order: their 16
//! f16 scales `d`, for Q4_1 their 16 f16 mins `m`, then the code bytes in chunks of `w`
//! bytes per row (`chunk_width`), row after row: chunk `k` holds code bytes `w·k ..
//! w·k + w` of each row, so a row's consecutive elements share one 32-bit lane, as the
//! dot instructions group them. Q8_0 (`w = 2`, 32-byte chunks): elements `2k, 2k + 1`,
//! which widen to the two 16-bit halves `vpdpwssd` pairs. Q4 (`w = 4`, 64-byte chunks):
//! elements `4k .. 4k + 4` in the low nibbles and `4k + 16 .. 4k + 20` in the high ones,
//! four bytes per lane after masking, as `vpdpbusd` takes them. Superblocks follow each
//! other block by block, group by group, so a group is one contiguous stream.

// Only x86 with AVX-512 VNNI lays weights out this way; elsewhere the tests run it.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::int16::IntTile;
use super::pages::WeightBuf;
use super::scalar::f16_to_f32;
use super::{row_major, BlockFormat, FileBlock, BLOCK, MAX_BLOCK_BYTES, TILE};

/// Weight rows per group: one 512-bit vector of i32 or f32 lanes.
pub const GROUP: usize = 16;

/// Bytes of scales (and mins) at the start of a superblock.
pub const fn scale_bytes(format: BlockFormat) -> usize {
    GROUP * format.codes_offset()
}

/// Code bytes of one row per chunk (see the module comment).
pub const fn chunk_width(format: BlockFormat) -> usize {
    match format {
        BlockFormat::Q8_0 => 2,
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => 4,
    }
}

/// Bytes of one superblock: 16 rows' block.
pub const fn superblock_bytes(format: BlockFormat) -> usize {
    GROUP * format.block_bytes()
}

/// Row-major blocks (`rows` a multiple of 16) in the interleaved layout.
pub fn interleave(format: BlockFormat, rows: usize, cols: usize, data: &[u8]) -> WeightBuf {
    debug_assert_eq!(rows % GROUP, 0);
    let (nb, bb) = (cols / BLOCK, format.block_bytes());
    let (off, codes, w) = (
        format.codes_offset(),
        format.code_bytes(),
        chunk_width(format),
    );
    WeightBuf::filled(data.len(), |out| {
        let mut at = 0;
        for g in 0..rows / GROUP {
            for b in 0..nb {
                let block = |r: usize| {
                    let start = ((g * GROUP + r) * nb + b) * bb;
                    &data[start..start + bb]
                };
                // Each 16-bit field of the block header (scale, min), then each chunk's
                // code bytes, for all 16 rows in turn.
                let fields = (0..off).step_by(2).map(|f| (f, 2));
                let chunks = (off..off + codes).step_by(w).map(|c| (c, w));
                for (start, width) in fields.chain(chunks) {
                    for r in 0..GROUP {
                        out[at..at + width].copy_from_slice(&block(r)[start..start + width]);
                        at += width;
                    }
                }
            }
        }
    })
}

/// Block `b` of row `row` in the row-major layout (the first `block_bytes` bytes).
pub fn block_of(format: BlockFormat, data: &[u8], cols: usize, row: usize, b: usize) -> FileBlock {
    let (g, r) = (row / GROUP, row % GROUP);
    let (off, codes) = (format.codes_offset(), format.code_bytes());
    let sb = &data[(g * (cols / BLOCK) + b) * superblock_bytes(format)..];
    let mut block: FileBlock = [0; MAX_BLOCK_BYTES];
    for field in (0..off).step_by(2) {
        let at = field * GROUP + 2 * r;
        block[field..field + 2].copy_from_slice(&sb[at..at + 2]);
    }
    let w = chunk_width(format);
    for k in (0..codes).step_by(w) {
        let at = scale_bytes(format) + k * GROUP + w * r;
        block[off + k..off + k + w].copy_from_slice(&sb[at..at + w]);
    }
    block
}

/// The interleaved layout back in row-major order.
pub fn deinterleave(format: BlockFormat, rows: usize, cols: usize, data: &[u8]) -> WeightBuf {
    row_major(format, rows, cols, |row, b| {
        block_of(format, data, cols, row, b)
    })
}

/// What a group kernel reads: one interleaved 16-row group of `format` blocks and a tile of
/// quantised activation rows.
#[derive(Clone, Copy)]
pub struct GroupArgs<'a> {
    pub format: BlockFormat,
    pub group: &'a [u8],
    pub acts: IntTile<'a>,
    pub cols: usize,
}

impl GroupArgs<'_> {
    /// Checks the slice sizes for `n` activation rows: the bounds the SIMD kernel relies on.
    pub fn check(&self, n: usize) {
        let nb = self.cols / BLOCK;
        assert!(n <= TILE && self.cols.is_multiple_of(BLOCK));
        assert_eq!(self.group.len(), nb * superblock_bytes(self.format));
        assert!(self.acts.codes.len() >= n * self.cols);
        assert!(self.acts.scales.len() >= n * nb && self.acts.sums.len() >= n * nb);
    }
}

/// The portable group kernel: `res[i][r] = Σ_c W[g·16 + r, c] · x_i[c]` for the group's
/// rows `r` and activation rows `i < n ≤ TILE`. Each block adds `Σq·qx` (an exact
/// integer) times `d·dx`, then its offset term, each with one rounding (a fused
/// multiply-add): exactly what the SIMD kernel's lanes do.
pub fn group_dot(args: GroupArgs<'_>, n: usize, res: &mut [[f32; GROUP]; TILE]) {
    args.check(n);
    let GroupArgs {
        format,
        group,
        acts,
        cols,
    } = args;
    let nb = cols / BLOCK;
    let mut acc = [[0f32; GROUP]; TILE];
    for b in 0..nb {
        let sb = &group[b * superblock_bytes(format)..];
        let f16 = |at: usize| f16_to_f32(u16::from_le_bytes([sb[at], sb[at + 1]]));
        for r in 0..GROUP {
            let d = f16(2 * r);
            let m = if format == BlockFormat::Q4_1 {
                f16(2 * GROUP + 2 * r)
            } else {
                0.0
            };
            let block = block_of(format, group, cols, r, b);
            let q: [i16; BLOCK] = super::scalar::block_codes(format, &block);
            for (i, acc) in acc[..n].iter_mut().enumerate() {
                let x = &acts.codes[i * cols + b * BLOCK..][..BLOCK];
                let dot: i32 = q
                    .iter()
                    .zip(x)
                    .map(|(&q, &x)| i32::from(q) * i32::from(x))
                    .sum();
                let (dx, sum) = (acts.scales[i * nb + b], acts.sums[i * nb + b]);
                let mut a = (dot as f32).mul_add(d * dx, acc[r]);
                a = match format {
                    BlockFormat::Q4_0 => d.mul_add(-8.0 * sum, a),
                    BlockFormat::Q4_1 => m.mul_add(sum, a),
                    BlockFormat::Q8_0 => a,
                };
                acc[r] = a;
            }
        }
    }
    res[..n].copy_from_slice(&acc[..n]);
}
