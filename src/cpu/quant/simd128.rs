//! WebAssembly 128-bit SIMD (the playground's CPU engine; every current browser runs
//! it). No FMA in baseline simd128, so products and sums are separate instructions;
//! each activation row keeps four-lane partial sums across blocks and reduces once.

use std::arch::wasm32::*;

use super::{scalar, BlockFormat, RowArgs, TILE};

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
