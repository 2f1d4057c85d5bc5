//! Weights in groups of four rows, block by block, with their scales as f32: the layout
//! the simd128 kernel reads (the wasm build's, for integer activations).
//!
//! That kernel puts four weight rows across a vector's lanes. Superblock (quad `q`, block
//! `b`): the four rows' scales `d` as f32, for Q4_1 their mins `m` as f32, then each row's
//! code bytes in turn (16 for Q4, 32 for Q8_0). A quad is one contiguous stream and the
//! next quad follows it, which is what the kernel reads ahead (`simd128::TouchAhead`).
//!
//! The scales are the file's f16s converted exactly, once, at load: WebAssembly has no f16
//! instruction, and converting four in the kernel was ~15 vector operations per field and
//! block, over a quarter of its work while decoding. The f16s are not kept (`block_of`
//! converts back, exactly, for `dequantize_row`), so a block costs 2 bytes more per field
//! than in the file (Q4_1: 24 for 20) and no byte is held twice. Rows past the end of a
//! matrix whose rows are not a multiple of four repeat its last row.

// Only the wasm build lays weights out this way; elsewhere the tests run it.
#![cfg_attr(
    not(all(target_arch = "wasm32", target_feature = "simd128")),
    allow(dead_code)
)]

use half::f16;

use super::int16::{self, IntRowArgs, IntTile};
use super::pages::WeightBuf;
use super::scalar::f16_to_f32;
use super::{row_major, BlockFormat, FileBlock, BLOCK, INT_ROWS, MAX_BLOCK_BYTES, TILE};

/// The f16 fields at the start of a file block: the scale, and Q4_1's min.
pub const fn fields(format: BlockFormat) -> usize {
    format.codes_offset() / 2
}

/// Bytes of the f32 scales (and mins) at the start of a superblock.
pub const fn scale_bytes(format: BlockFormat) -> usize {
    4 * INT_ROWS * fields(format)
}

/// Bytes of one superblock: four rows' block `b`.
pub const fn superblock_bytes(format: BlockFormat) -> usize {
    scale_bytes(format) + INT_ROWS * format.code_bytes()
}

/// Bytes of one quad of a `cols`-wide matrix.
pub const fn quad_bytes(format: BlockFormat, cols: usize) -> usize {
    cols / BLOCK * superblock_bytes(format)
}

/// Bytes of a `[rows, cols]` matrix in this layout.
pub const fn matrix_bytes(format: BlockFormat, rows: usize, cols: usize) -> usize {
    rows.div_ceil(INT_ROWS) * quad_bytes(format, cols)
}

/// Row-major file blocks `data` of a `[rows, cols]` matrix in this layout.
pub fn interleave(format: BlockFormat, rows: usize, cols: usize, data: &[u8]) -> WeightBuf {
    let (nb, bb, off) = (cols / BLOCK, format.block_bytes(), format.codes_offset());
    WeightBuf::filled(matrix_bytes(format, rows, cols), |out| {
        let mut out = out.chunks_exact_mut(superblock_bytes(format));
        for q in 0..rows.div_ceil(INT_ROWS) {
            for b in 0..nb {
                let sb = out.next().expect("output sized for every superblock");
                let block = |r: usize| {
                    let row = (q * INT_ROWS + r).min(rows - 1);
                    &data[(row * nb + b) * bb..][..bb]
                };
                let (scales, codes) = sb.split_at_mut(scale_bytes(format));
                for f in 0..fields(format) {
                    for r in 0..INT_ROWS {
                        let h = u16::from_le_bytes([block(r)[2 * f], block(r)[2 * f + 1]]);
                        let at = 4 * (f * INT_ROWS + r);
                        scales[at..at + 4].copy_from_slice(&f16_to_f32(h).to_le_bytes());
                    }
                }
                for (r, to) in codes.chunks_exact_mut(format.code_bytes()).enumerate() {
                    to.copy_from_slice(&block(r)[off..]);
                }
            }
        }
    })
}

/// Block `b` of row `row` as the file has it (the first `block_bytes` bytes): the f32
/// scales back to f16, exactly, as they came from f16.
pub fn block_of(format: BlockFormat, data: &[u8], cols: usize, row: usize, b: usize) -> FileBlock {
    let (q, r) = (row / INT_ROWS, row % INT_ROWS);
    let sb = &data[q * quad_bytes(format, cols) + b * superblock_bytes(format)..];
    let mut block: FileBlock = [0; MAX_BLOCK_BYTES];
    for f in 0..fields(format) {
        let at = 4 * (f * INT_ROWS + r);
        let v = f32::from_le_bytes(sb[at..at + 4].try_into().expect("four bytes"));
        block[2 * f..2 * f + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    }
    let (off, cb) = (format.codes_offset(), format.code_bytes());
    let at = scale_bytes(format) + r * cb;
    block[off..off + cb].copy_from_slice(&sb[at..at + cb]);
    block
}

/// The layout back in row-major file blocks.
pub fn deinterleave(format: BlockFormat, rows: usize, cols: usize, data: &[u8]) -> WeightBuf {
    row_major(format, rows, cols, |row, b| {
        block_of(format, data, cols, row, b)
    })
}

/// The portable kernel over one quad (`quad_bytes` long): `res[r][i]` = its row `r` times
/// activation row `i < n`, by `int16::row_dot` on each row's file blocks — so exactly the
/// simd128 kernel's result, which does the same float operations in the same order.
pub fn quad_dot(
    format: BlockFormat,
    quad: &[u8],
    acts: IntTile<'_>,
    cols: usize,
    n: usize,
    res: &mut [[f32; TILE]; INT_ROWS],
) {
    let (nb, bb) = (cols / BLOCK, format.block_bytes());
    let mut row = vec![0u8; nb * bb];
    for (r, res) in res.iter_mut().enumerate() {
        for (b, to) in row.chunks_exact_mut(bb).enumerate() {
            to.copy_from_slice(&block_of(format, quad, cols, r, b)[..bb]);
        }
        let args = IntRowArgs {
            format,
            row: &row,
            acts,
            cols,
        };
        int16::row_dot(args, &mut res[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// File blocks whose every byte differs, with finite f16 fields (0x3C.. = 1.0 and up).
    fn blocks(format: BlockFormat, rows: usize, cols: usize) -> Vec<u8> {
        let bb = format.block_bytes();
        (0..rows * cols / BLOCK * bb)
            .map(|i| match i % bb {
                at if at < format.codes_offset() && at % 2 == 1 => 0x3C + (i / bb % 4) as u8,
                _ => (i * 37 % 251) as u8,
            })
            .collect()
    }

    #[test]
    fn every_block_comes_back_and_the_scales_are_their_f16s() {
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            for (rows, cols) in [(4, 32), (6, 64), (9, 96)] {
                let data = blocks(format, rows, cols);
                let quads = interleave(format, rows, cols, &data);
                assert_eq!(quads.len(), matrix_bytes(format, rows, cols));
                let back = deinterleave(format, rows, cols, &quads);
                assert_eq!(&back[..], &data[..], "{format:?} [{rows}, {cols}]");
                // Rows past the end repeat the last, scales included.
                let bb = format.block_bytes();
                for row in rows..rows.next_multiple_of(INT_ROWS) {
                    for b in 0..cols / BLOCK {
                        let last = &data[((rows - 1) * (cols / BLOCK) + b) * bb..][..bb];
                        assert_eq!(&block_of(format, &quads, cols, row, b)[..bb], last);
                    }
                }
            }
        }
    }
}
