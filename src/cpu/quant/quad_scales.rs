//! Each block's f16 scale (and Q4_1 min) as f32, four weight rows side by side, for the
//! simd128 kernel, which puts four rows across a vector's lanes. Converting four f16s
//! exactly is ~15 vector operations per block and field there (WebAssembly has no f16
//! instruction), over a quarter of the kernel's work while decoding: one activation row
//! meets a block of four weight rows with only 16 dot instructions. Converted once at
//! load, a block's scales are one vector load.
//!
//! The f16s stay in the blocks (the other kernels and `dequantize_row` read them); this
//! copy costs 4 bytes per block and field (Q4_1: 8 on its 20).

// Only the wasm build's simd128 kernel reads them; elsewhere the tests build them.
#![cfg_attr(
    not(all(target_arch = "wasm32", target_feature = "simd128")),
    allow(dead_code)
)]

use std::sync::Arc;

use super::scalar::f16_to_f32;
use super::{BlockFormat, BLOCK, INT_ROWS};

/// The f16 fields at the start of a block: the scale, and Q4_1's min.
pub const fn fields(format: BlockFormat) -> usize {
    format.codes_offset() / 2
}

/// The f32 entries of one quad (four rows) over a row of `cols` columns.
pub const fn quad_len(format: BlockFormat, cols: usize) -> usize {
    cols / BLOCK * fields(format) * INT_ROWS
}

/// For row-major blocks `data` of a `[rows, cols]` matrix: entry
/// `((q·nb + b)·fields + f)·4 + r` is field `f` of block `b` of row `4q + r`, the last
/// row standing in for rows past the end (the kernel repeats it there too).
pub fn build(format: BlockFormat, rows: usize, cols: usize, data: &[u8]) -> Arc<[f32]> {
    let (nb, bb) = (cols / BLOCK, format.block_bytes());
    let mut out = Vec::with_capacity(rows.div_ceil(INT_ROWS) * quad_len(format, cols));
    for q in 0..rows.div_ceil(INT_ROWS) {
        for b in 0..nb {
            for f in 0..fields(format) {
                for r in 0..INT_ROWS {
                    let row = (q * INT_ROWS + r).min(rows - 1);
                    let at = (row * nb + b) * bb + 2 * f;
                    out.push(f16_to_f32(u16::from_le_bytes([data[at], data[at + 1]])));
                }
            }
        }
    }
    out.into()
}

/// The entries of the quad that starts at row `row` (a multiple of four).
pub fn quad(all: &[f32], format: BlockFormat, cols: usize, row: usize) -> &[f32] {
    debug_assert_eq!(row % INT_ROWS, 0);
    let len = quad_len(format, cols);
    &all[row / INT_ROWS * len..][..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_block_and_field_is_its_f16_as_f32() {
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (rows, cols) = (6, 64);
            let bb = format.block_bytes();
            // Every block's header bytes distinct, so a misplaced field shows.
            let data: Vec<u8> = (0..rows * 2 * bb).map(|i| (i * 37 % 251) as u8).collect();
            let all = build(format, rows, cols, &data);
            assert_eq!(all.len(), 2 * quad_len(format, cols));
            for row in 0..8 {
                let quad = quad(&all, format, cols, row / 4 * 4);
                let source = row.min(rows - 1);
                for b in 0..2 {
                    for f in 0..fields(format) {
                        let at = (source * 2 + b) * bb + 2 * f;
                        let want = f16_to_f32(u16::from_le_bytes([data[at], data[at + 1]]));
                        let got = quad[(b * fields(format) + f) * 4 + row % 4];
                        assert_eq!(got.to_bits(), want.to_bits(), "{format:?} row {row}");
                    }
                }
            }
        }
    }
}
