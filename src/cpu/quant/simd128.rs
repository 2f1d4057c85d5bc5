//! WebAssembly 128-bit SIMD (the playground's CPU engine; every current browser runs
//! it). No FMA in baseline simd128, so products and sums are separate instructions;
//! each activation row keeps four-lane partial sums across blocks and reduces once.
//! With integer activations (`int16`), `i32x4.dot_i16x8_s` does eight multiply-adds at once.

use std::arch::wasm32::*;

use super::int16::IntTile;
use super::{quads, scalar, BlockFormat, RowArgs, BLOCK, INT_ROWS, TILE};

/// Four f32 from `x` as a vector.
fn load4(x: &[f32]) -> v128 {
    let x: &[f32; 4] = x[..4].try_into().expect("4 floats");
    // SAFETY: the array has 4 readable floats; wasm loads need no alignment.
    unsafe { v128_load(x.as_ptr().cast()) }
}

/// A block's 32 integer codes as eight f32x4, element order (the i16 codes widened).
fn codes(format: BlockFormat, block: &[u8]) -> [v128; 8] {
    let codes = &block[format.codes_offset()..format.block_bytes()];
    // SAFETY: `codes` holds the block's 16 (Q4) or 32 (Q8_0) code bytes.
    let q = unsafe { codes_i16_at(format, codes.as_ptr()) };
    let widen = |v: v128| {
        [
            f32x4_convert_i32x4(i32x4_extend_low_i16x8(v)),
            f32x4_convert_i32x4(i32x4_extend_high_i16x8(v)),
        ]
    };
    let [a, b, c, d] = q.map(widen);
    [a[0], a[1], b[0], b[1], c[0], c[1], d[0], d[1]]
}

fn hsum(v: v128) -> f32 {
    f32x4_extract_lane::<0>(v)
        + f32x4_extract_lane::<1>(v)
        + f32x4_extract_lane::<2>(v)
        + f32x4_extract_lane::<3>(v)
}

/// See `Kernel::row_dot`.
pub fn row_dot(args: RowArgs<'_>, res: &mut [f32]) {
    let (format, n) = (args.format, res.len());
    args.check(n);
    let mut lanes = [f32x4_splat(0.0); TILE];
    let mut offsets = [0f32; TILE];
    for (b, block) in args.blocks() {
        let (d, o) = scalar::scales(format, block);
        let q = codes(format, block);
        let d = f32x4_splat(d);
        for i in 0..n {
            let x = args.x_block(i, b);
            // Two chains so consecutive adds do not wait on each other.
            let (mut even, mut odd) = (f32x4_splat(0.0), f32x4_splat(0.0));
            for k in (0..8).step_by(2) {
                even = f32x4_add(even, f32x4_mul(q[k], load4(&x[4 * k..])));
                odd = f32x4_add(odd, f32x4_mul(q[k + 1], load4(&x[4 * k + 4..])));
            }
            lanes[i] = f32x4_add(lanes[i], f32x4_mul(d, f32x4_add(even, odd)));
            if format.has_offset() {
                offsets[i] += o * args.block_sum(i, b);
            }
        }
    }
    for (i, r) in res.iter_mut().enumerate() {
        *r = hsum(lanes[i]) + offsets[i];
    }
}

/// A block's 32 integer codes (starting at `codes`) as four i16x8, element order.
///
/// # Safety
/// `codes` points at the block's 16 (Q4) or 32 (Q8_0) code bytes.
unsafe fn codes_i16_at(format: BlockFormat, codes: *const u8) -> [v128; 4] {
    match format {
        // Element i is the low nibble of byte i, element i + 16 the high one.
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let bytes = v128_load(codes.cast());
            let low = v128_and(bytes, u8x16_splat(0x0F));
            let high = u8x16_shr(bytes, 4);
            [
                u16x8_extend_low_u8x16(low),
                u16x8_extend_high_u8x16(low),
                u16x8_extend_low_u8x16(high),
                u16x8_extend_high_u8x16(high),
            ]
        }
        BlockFormat::Q8_0 => {
            let (a, b) = (v128_load(codes.cast()), v128_load(codes.add(16).cast()));
            [
                i16x8_extend_low_i8x16(a),
                i16x8_extend_high_i8x16(a),
                i16x8_extend_low_i8x16(b),
                i16x8_extend_high_i8x16(b),
            ]
        }
    }
}

/// `int16::row_dot` for the four weight rows of `quad` (`quads` layout) and `n ≤ TILE`
/// activation rows, the four rows across a vector's lanes: the per-block float work (the
/// rows' scales, `d·dx`, the offsets) is one vector operation for all four, and no row
/// needs a horizontal sum; a block's four scales (and mins) are one vector load each. The
/// same float operations in the same order as `int16::row_dot`, so the same result bit
/// for bit. `ahead`: the next quad's bytes (`TouchAhead`), or empty.
pub fn quad_dot(
    format: BlockFormat,
    quad: &[u8],
    ahead: &[u8],
    acts: IntTile<'_>,
    cols: usize,
    n: usize,
    res: &mut [[f32; TILE]; INT_ROWS],
) {
    // A fixed height keeps the accumulators in registers and unrolls the row loops.
    let f = match n {
        1 => quad_dot_tile::<1>,
        2 => quad_dot_tile::<2>,
        3 => quad_dot_tile::<3>,
        _ => quad_dot_tile::<TILE>,
    };
    f(format, quad, ahead, acts, cols, res);
}

fn quad_dot_tile<const N: usize>(
    format: BlockFormat,
    quad: &[u8],
    ahead: &[u8],
    acts: IntTile<'_>,
    cols: usize,
    res: &mut [[f32; TILE]; INT_ROWS],
) {
    // Everything below reads inside the sizes checked here: no bounds checks in the loop
    // (they were a third of its instructions).
    let nb = cols / BLOCK;
    assert!(N <= TILE && cols.is_multiple_of(BLOCK));
    assert_eq!(quad.len(), quads::quad_bytes(format, cols), "one quad");
    assert!(acts.codes.len() >= N * cols);
    assert!(acts.scales.len() >= N * nb && acts.sums.len() >= N * nb);
    let (sb_bytes, scale_bytes) = (quads::superblock_bytes(format), quads::scale_bytes(format));
    let code_bytes = format.code_bytes();
    let (codes, act_scales, sums) = (
        acts.codes.as_ptr(),
        acts.scales.as_ptr(),
        acts.sums.as_ptr(),
    );
    // Lane r: weight row r. The scaled integer sums and the offsets apart, as in `int16`.
    let mut scaled = [f32x4_splat(0.0); N];
    let mut offsets = [f32x4_splat(0.0); N];
    let ahead = TouchAhead::new(ahead, nb);
    for b in 0..nb {
        ahead.touch(b);
        // SAFETY: the asserts above: the quad is nb superblocks, codes ≥ N·cols, scales
        // and sums ≥ N·nb; b < nb and i < N keep every read inside those.
        unsafe {
            // The four rows' scale (and min) of block b, lane r for row r, then their codes.
            let sb = quad.as_ptr().add(b * sb_bytes);
            let d = v128_load(sb.cast());
            let o = match format {
                BlockFormat::Q4_0 => f32x4_mul(f32x4_splat(-8.0), d),
                BlockFormat::Q4_1 => v128_load(sb.add(4 * INT_ROWS).cast()),
                BlockFormat::Q8_0 => f32x4_splat(0.0),
            };
            let row_codes = |r: usize| sb.add(scale_bytes + r * code_bytes);
            // Rows in pairs: each pair's four-lane dot products folded into one vector
            // right away keeps few vectors live.
            let mut pairs = [[i32x4_splat(0); N]; 2];
            for (p, pair) in pairs.iter_mut().enumerate() {
                let qa = codes_i16_at(format, row_codes(2 * p));
                let qb = codes_i16_at(format, row_codes(2 * p + 1));
                for (i, pair) in pair.iter_mut().enumerate() {
                    let x = block_codes_of(codes.add(i * cols + b * BLOCK));
                    *pair = fold_pair(dot_block(&qa, &x), dot_block(&qb, &x));
                }
            }
            for i in 0..N {
                let total = fold_pairs(pairs[0][i], pairs[1][i]);
                let k = i * nb + b;
                let scale = f32x4_mul(d, f32x4_splat(*act_scales.add(k)));
                scaled[i] = f32x4_add(scaled[i], f32x4_mul(f32x4_convert_i32x4(total), scale));
                if format.has_offset() {
                    offsets[i] = f32x4_add(offsets[i], f32x4_mul(o, f32x4_splat(*sums.add(k))));
                }
            }
        }
    }
    for i in 0..N {
        let v = f32x4_add(scaled[i], offsets[i]);
        let lanes = [
            f32x4_extract_lane::<0>(v),
            f32x4_extract_lane::<1>(v),
            f32x4_extract_lane::<2>(v),
            f32x4_extract_lane::<3>(v),
        ];
        for (res, lane) in res.iter_mut().zip(lanes) {
            res[i] = lane;
        }
    }
}

/// Reads the next call's weights into cache while this one works. A decode streams every
/// weight from memory once per token, in short pieces (a quad is 1,728 bytes at the demo
/// model's width) that the hardware prefetcher follows poorly, and WebAssembly has no
/// prefetch instruction. So each block step loads a byte of every 48 of the next quad's
/// bytes, spread evenly over the steps: plain loads whose cache misses overlap this
/// call's work instead of stalling the next one (the demo's decode with both ARMs, one
/// thread: 29.3–29.8 → 35.5–36.4 tokens/s in `./build.sh bench-web`, on row-major
/// weights before the `quads` layout).
struct TouchAhead<'a> {
    bytes: &'a [u8],
    /// Bytes per block step: `bytes.len() / blocks`, so the touches stay in `bytes`.
    step: usize,
}

/// Touches per step at most 48 bytes apart: no 64-byte cache line of the range skipped.
const TOUCH_GAP: usize = 48;

impl<'a> TouchAhead<'a> {
    fn new(bytes: &'a [u8], blocks: usize) -> Self {
        let step = bytes.len() / blocks.max(1);
        Self { bytes, step }
    }

    /// The touches of block step `b` (`b` < blocks).
    #[inline(always)]
    fn touch(&self, b: usize) {
        let start = b * self.step;
        for at in (start..start + self.step).step_by(TOUCH_GAP) {
            // SAFETY: a reference's pointer is valid to read. Volatile so the load, whose
            // value nothing uses, is not optimised away. (The index is checked; for
            // b < blocks it is always inside.)
            unsafe { std::ptr::read_volatile(&self.bytes[at]) };
        }
    }
}

/// A block's 32 activation codes (at `p`) as four i16x8.
///
/// # Safety
/// `p` points at 32 readable i16.
#[inline(always)]
unsafe fn block_codes_of(p: *const i16) -> [v128; 4] {
    [
        v128_load(p.cast()),
        v128_load(p.add(8).cast()),
        v128_load(p.add(16).cast()),
        v128_load(p.add(24).cast()),
    ]
}

/// `Σ q·x` over a block as four i32 lanes (exact; their sum is the block's dot product).
#[inline(always)]
fn dot_block(q: &[v128; 4], x: &[v128; 4]) -> v128 {
    i32x4_add(
        i32x4_add(i32x4_dot_i16x8(q[0], x[0]), i32x4_dot_i16x8(q[1], x[1])),
        i32x4_add(i32x4_dot_i16x8(q[2], x[2]), i32x4_dot_i16x8(q[3], x[3])),
    )
}

/// Rows a and b's four-lane sums folded to two lanes each: `[a0+a2, b0+b2, a1+a3, b1+b3]`.
#[inline(always)]
fn fold_pair(a: v128, b: v128) -> v128 {
    i32x4_add(
        i32x4_shuffle::<0, 4, 1, 5>(a, b),
        i32x4_shuffle::<2, 6, 3, 7>(a, b),
    )
}

/// Two folded pairs (rows 0–1, rows 2–3) to one total per row, lane r for row r.
#[inline(always)]
fn fold_pairs(p01: v128, p23: v128) -> v128 {
    i32x4_add(
        i32x4_shuffle::<0, 1, 4, 5>(p01, p23),
        i32x4_shuffle::<2, 3, 6, 7>(p01, p23),
    )
}
