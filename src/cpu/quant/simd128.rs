//! WebAssembly 128-bit SIMD (the playground's CPU engine; every current browser runs
//! it). No FMA in baseline simd128, so products and sums are separate instructions;
//! each activation row keeps four-lane partial sums across blocks and reduces once.
//! With integer activations (`int16`), `i32x4.dot_i16x8_s` does eight multiply-adds at once.

use std::arch::wasm32::*;

use super::int16::{IntRowArgs, IntTile};
use super::{scalar, BlockFormat, RowArgs, BLOCK, TILE};

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

/// `int16::row_dot` for one or two weight rows (`w`) and `n ≤ TILE` activation rows,
/// with the integer sums in `i32x4.dot_i16x8_s`: the same lanes, so the same result bit
/// for bit. Two weight rows share each activation load.
pub fn rows_dot_int(
    format: BlockFormat,
    w: &[&[u8]],
    acts: IntTile<'_>,
    cols: usize,
    n: usize,
    res: &mut [[f32; TILE]; 2],
) {
    // Fixed sizes keep the accumulators in registers and unroll the row loops.
    let f = match (w.len(), n) {
        (1, 1) => rows_dot_int_tile::<1, 1>,
        (1, 2) => rows_dot_int_tile::<1, 2>,
        (1, 3) => rows_dot_int_tile::<1, 3>,
        (1, _) => rows_dot_int_tile::<1, TILE>,
        (_, 1) => rows_dot_int_tile::<2, 1>,
        (_, 2) => rows_dot_int_tile::<2, 2>,
        (_, 3) => rows_dot_int_tile::<2, 3>,
        (_, _) => rows_dot_int_tile::<2, TILE>,
    };
    f(format, w, acts, cols, res);
}

fn rows_dot_int_tile<const R: usize, const N: usize>(
    format: BlockFormat,
    w: &[&[u8]],
    acts: IntTile<'_>,
    cols: usize,
    res: &mut [[f32; TILE]; 2],
) {
    // Everything below reads inside the sizes checked here: no bounds checks in the loop
    // (they were a third of its instructions).
    assert!(w.len() == R && N <= TILE);
    for &row in w {
        let args = IntRowArgs {
            format,
            row,
            acts,
            cols,
        };
        args.check(N);
    }
    let nb = cols / BLOCK;
    let (bytes, offset) = (format.block_bytes(), format.codes_offset());
    let rows: [*const u8; R] = std::array::from_fn(|r| w[r].as_ptr());
    let (codes, scales, sums) = (
        acts.codes.as_ptr(),
        acts.scales.as_ptr(),
        acts.sums.as_ptr(),
    );
    let mut lanes = [[f32x4_splat(0.0); N]; R];
    let mut offsets = [[0f32; N]; R];
    for b in 0..nb {
        // SAFETY: `check` asserted each row's length is nb·bytes, codes ≥ N·cols, scales
        // and sums ≥ N·nb; b < nb and i < N keep every read inside those.
        unsafe {
            let mut d = [0f32; R];
            let mut o = [0f32; R];
            let mut q = [[f32x4_splat(0.0); 4]; R];
            for r in 0..R {
                let block = std::slice::from_raw_parts(rows[r].add(b * bytes), bytes);
                (d[r], o[r]) = scalar::scales(format, block);
                q[r] = codes_i16_at(format, rows[r].add(b * bytes + offset));
            }
            for i in 0..N {
                let p = codes.add(i * cols + b * BLOCK);
                let x = [
                    v128_load(p.cast()),
                    v128_load(p.add(8).cast()),
                    v128_load(p.add(16).cast()),
                    v128_load(p.add(24).cast()),
                ];
                let k = i * nb + b;
                let (dx, sum) = (*scales.add(k), *sums.add(k));
                for r in 0..R {
                    let q = &q[r];
                    let dot = i32x4_add(
                        i32x4_add(i32x4_dot_i16x8(q[0], x[0]), i32x4_dot_i16x8(q[1], x[1])),
                        i32x4_add(i32x4_dot_i16x8(q[2], x[2]), i32x4_dot_i16x8(q[3], x[3])),
                    );
                    let scale = f32x4_splat(d[r] * dx);
                    lanes[r][i] =
                        f32x4_add(lanes[r][i], f32x4_mul(f32x4_convert_i32x4(dot), scale));
                    if format.has_offset() {
                        offsets[r][i] += o[r] * sum;
                    }
                }
            }
        }
    }
    for r in 0..R {
        for i in 0..N {
            res[r][i] = hsum(lanes[r][i]) + offsets[r][i];
        }
    }
}
