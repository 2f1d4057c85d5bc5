//! 16-bit integer activations: each 32-block of an activation row becomes `x ≈ dx·qx`
//! with `qx` in −32767..=32767, so a block's dot product is an exact integer sum `Σq·qx`
//! scaled once by `d·dx`. The offset term `o·Σx` keeps the exact f32 `Σx`.
//!
//! WebAssembly is where this pays: baseline simd128 has no FMA, but `i32x4.dot_i16x8_s`
//! does eight multiply-adds in one instruction. It takes i16 operands, so the codes get 16
//! bits, not the 8 of llama.cpp's Q8 activations: the same instructions, and a rounding
//! error 256 times smaller (8 bits moved SmolLM2's next-token argmax at 6 of 79 positions;
//! 16 bits is within f32 noise). On x86 the same codes meet `vpdpwssd` (AVX-512 VNNI)
//! over interleaved weights (`vnni`); elsewhere x86 keeps f32 activations.
//!
//! The portable kernel here does the simd128 kernel's float operations in the same order
//! (each block's exact integer sum converted and scaled once, offsets summed apart), so
//! the two give bit-identical results: a CPU without VNNI reproduces the browser's
//! numbers exactly; the VNNI kernel sums the same integer products but fuses its
//! multiply-adds.

use super::super::row_ops::larger;
use super::{BlockFormat, BLOCK, TILE};

/// The largest code: 32 products of `±MAX_CODE` and a Q8_0 weight (|q| ≤ 128), a block's
/// whole integer sum, stay inside i32 (2^27 at most).
const MAX_CODE: f32 = 32767.0;

/// Activation rows `[m, cols]` quantised per 32-block: codes widened to i16 (what the
/// dot instruction takes; widened once here, not once per weight row), and per block
/// the scale `dx` and the exact `Σx`.
pub struct QuantizedActs {
    pub codes: Vec<i16>,
    pub scales: Vec<f32>,
    pub sums: Vec<f32>,
    /// The codes split as `256·high + low` (`split_bytes`; empty until then).
    pub high: Vec<i8>,
    pub low: Vec<u8>,
}

impl QuantizedActs {
    /// Quantises `x` (`[m, cols]`, `cols` a multiple of 32).
    pub fn new(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut acts = Self {
            codes: vec![0; x.len()],
            scales: Vec::with_capacity(blocks),
            sums: Vec::with_capacity(blocks),
            high: Vec::new(),
            low: Vec::new(),
        };
        for (block, codes) in x
            .chunks_exact(BLOCK)
            .zip(acts.codes.chunks_exact_mut(BLOCK))
        {
            let block: &[f32; BLOCK] = block.try_into().expect("whole blocks");
            let (sum, amax) = sum_and_amax(block);
            let dx = amax / MAX_CODE;
            let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            for (c, &v) in codes.iter_mut().zip(block) {
                *c = round_to_code(v * inv);
            }
            acts.sums.push(sum);
            // A NaN or infinity in the block must reach the output, as it would in f32
            // (the rounding above turns it into a finite code).
            acts.scales
                .push(if sum.is_finite() { dx } else { f32::NAN });
        }
        acts
    }

    /// Fills `high` and `low`: each code as `256·high + low` with `high` signed and `low`
    /// unsigned bytes, exactly, for kernels whose dot products take bytes (a Q4 code
    /// times a 16-bit code is two byte dot products, `256·Σq·high + Σq·low`).
    pub fn split_bytes(&mut self) {
        self.high = self.codes.iter().map(|&c| (c >> 8) as i8).collect();
        self.low = self.codes.iter().map(|&c| c as u8).collect();
    }

    /// Activation rows `t0..t0 + n` of a `cols`-wide matrix.
    pub fn tile(&self, t0: usize, n: usize, cols: usize) -> IntTile<'_> {
        let nb = cols / BLOCK;
        let rows = t0 * cols..(t0 + n) * cols;
        IntTile {
            codes: &self.codes[rows.clone()],
            scales: &self.scales[t0 * nb..(t0 + n) * nb],
            sums: &self.sums[t0 * nb..(t0 + n) * nb],
            high: self.high.get(rows.clone()).unwrap_or_default(),
            low: self.low.get(rows).unwrap_or_default(),
        }
    }
}

/// `(Σx, max |x|)` of a block, summed in eight lanes (a fixed order every build
/// shares, which the compiler can vectorise). The maximum is `row_ops::larger`, a
/// comparison, not `f32::max`: WebAssembly has no instruction with its NaN rule, so that
/// is a call to `fmaxf` per element there (3% of a prompt's time). Both skip NaN.
#[inline]
fn sum_and_amax(block: &[f32; BLOCK]) -> (f32, f32) {
    let (mut sums, mut amax) = ([0f32; 8], [0f32; 8]);
    for chunk in block.chunks_exact(8) {
        for k in 0..8 {
            sums[k] += chunk[k];
            amax[k] = larger(amax[k], chunk[k].abs());
        }
    }
    let sum =
        ((sums[0] + sums[4]) + (sums[2] + sums[6])) + ((sums[1] + sums[5]) + (sums[3] + sums[7]));
    (sum, amax.into_iter().fold(0f32, larger))
}

/// `v` (|v| ≤ 32767, or not finite) rounded to the nearest integer, ties to even, with no
/// branch, library call or saturating cast (x86-64's baseline and WebAssembly's scalar
/// code have no rounding instruction): adding 1.5·2^23 leaves no fraction bits, and the
/// sum's low mantissa bits are then `1.5·2^23`'s plus the integer. Not finite gives 0
/// (the block's NaN scale carries it to the output).
#[inline]
pub(super) fn round_to_code(v: f32) -> i16 {
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2^23
    let code = ((v + SHIFTER).to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    if v.is_finite() {
        code as i16
    } else {
        0
    }
}

/// Up to `TILE` quantised activation rows.
#[derive(Clone, Copy)]
pub struct IntTile<'a> {
    pub codes: &'a [i16],
    pub scales: &'a [f32],
    pub sums: &'a [f32],
    /// The codes' bytes (`QuantizedActs::split_bytes`), or empty; read by the x86 kernel.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub high: &'a [i8],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub low: &'a [u8],
}

/// What an integer-activation row kernel reads: one weight row of `format` blocks and a tile of
/// quantised activation rows.
#[derive(Clone, Copy)]
pub struct IntRowArgs<'a> {
    pub format: BlockFormat,
    pub row: &'a [u8],
    pub acts: IntTile<'a>,
    pub cols: usize,
}

impl IntRowArgs<'_> {
    /// Checks the slice sizes for `n` activation rows (the simd128 kernel checks its quad
    /// and tile itself).
    pub fn check(&self, n: usize) {
        let nb = self.cols / BLOCK;
        assert!(n <= TILE && self.cols.is_multiple_of(BLOCK));
        assert_eq!(self.row.len(), nb * self.format.block_bytes());
        assert!(self.acts.codes.len() >= n * self.cols);
        assert!(self.acts.scales.len() >= n * nb && self.acts.sums.len() >= n * nb);
    }

    /// The weight row's blocks with their indices.
    pub fn blocks(&self) -> impl Iterator<Item = (usize, &[u8])> {
        self.row.chunks_exact(self.format.block_bytes()).enumerate()
    }

    /// The 32 codes of activation row `i` that block `b` multiplies.
    #[inline]
    pub fn codes(&self, i: usize, b: usize) -> &[i16] {
        &self.acts.codes[i * self.cols + b * BLOCK..][..BLOCK]
    }

    /// `(dx, Σx)` of activation row `i`, block `b`.
    #[inline]
    pub fn scale_and_sum(&self, i: usize, b: usize) -> (f32, f32) {
        let k = i * (self.cols / BLOCK) + b;
        (self.acts.scales[k], self.acts.sums[k])
    }
}

/// `res[i] = Σ_c W[row, c] · x_i[c]` with `x` quantised, for `i < res.len() ≤ TILE`.
///
/// Per block the integer sum `Σq·qx` is exact (any order gives it), converted once and
/// scaled by `d·dx`; the offsets `o·Σx` are summed apart and added at the end. The simd128
/// kernel does these float operations in this order, four weight rows to a vector.
pub fn row_dot(args: IntRowArgs<'_>, res: &mut [f32]) {
    let (format, n) = (args.format, res.len());
    args.check(n);
    let mut scaled = [0f32; TILE];
    let mut offsets = [0f32; TILE];
    for (b, block) in args.blocks() {
        let (d, o) = super::scalar::scales(format, block);
        let q: [i16; BLOCK] = super::scalar::block_codes(format, block);
        for i in 0..n {
            let dot: i32 = q
                .iter()
                .zip(args.codes(i, b))
                .map(|(&q, &x)| i32::from(q) * i32::from(x))
                .sum();
            let (dx, sum) = args.scale_and_sum(i, b);
            scaled[i] += dot as f32 * (d * dx);
            if format.has_offset() {
                offsets[i] += o * sum;
            }
        }
    }
    for (i, r) in res.iter_mut().enumerate() {
        *r = scaled[i] + offsets[i];
    }
}
