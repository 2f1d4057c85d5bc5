//! AVX-512 (F/BW/VL) kernels: a 32-weight block is two 16-lane vectors.
//!
//! Unlike the AVX2 kernels these fold the scale and offset into the decoded weights
//! (`w = d·q + o`, once per block, shared by the tile's activation rows), so each activation
//! row costs two FMAs per block and no `Σx` is needed. Two weight rows go through together so
//! every x vector loaded feeds two FMAs.
//!
//! The AVX-512 intrinsics and `target_feature`s are stable since Rust 1.89 (the crate's
//! `rust-version`).

use std::arch::x86_64::*;

use super::tag::{format_of, Q4_0, Q4_1, Q8_0};
use super::{avx2, BlockFormat, BLOCK, TILE};

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
