//! AVX2 + FMA + F16C kernels.

use std::arch::x86_64::*;

use super::tag::{format_of, Q4_0, Q4_1, Q8_0};
use super::{BlockFormat, RowArgs, BLOCK};

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
pub unsafe fn row_dot(args: RowArgs<'_>, res: &mut [f32]) {
    by_format_and_height!(args.format, res.len(), kernel(args, res))
}

/// The row kernel for format `FMT` and `N` activation rows.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel<const FMT: u8, const N: usize>(args: RowArgs<'_>, res: &mut [f32]) {
    let RowArgs {
        row,
        xs,
        sums,
        cols,
        ..
    } = args;
    let format = format_of(FMT);
    // These checks make every pointer below in bounds.
    assert_eq!(args.format, format);
    args.check(N);
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
