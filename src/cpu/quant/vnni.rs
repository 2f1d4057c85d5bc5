//! AVX-512 VNNI kernel over interleaved weights (`interleaved`) and 16-bit activation
//! codes (`int16`): lane `r` of every vector is row `r` of a 16-row group.
//!
//! Per chunk of 32 code bytes (two elements of each of the 16 rows) one widening load
//! gives 16-bit lanes, and one `vpdpwssd` per activation row adds both products to each
//! row's 32-bit sum, with the activation pair broadcast from memory. A Q4 chunk's high
//! nibbles are masked, not shifted (`0xF0` keeps them times 16, which stays exact and far
//! inside i32): one shift per block instead of one per chunk, and the masks do not
//! compete with the dot instructions for the one port that runs both on Intel cores.
//! Each block's integer sums are then converted once and scaled by `d·dx` with an FMA.

use std::arch::x86_64::*;

use super::interleaved::{scale_bytes, superblock_bytes, GroupArgs, GROUP};
use super::tag::{format_of, Q4_0, Q4_1, Q8_0};
use super::{BlockFormat, BLOCK, TILE};

const PREFETCH: usize = 2048;

/// Whether this CPU runs the kernel here.
pub fn available() -> bool {
    super::avx512::available() && is_x86_feature_detected!("avx512vnni")
}

/// See `interleaved::group_dot`, which this matches bit for bit.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C (`available()`).
pub unsafe fn group_dot(args: GroupArgs<'_>, n: usize, res: &mut [[f32; GROUP]; TILE]) {
    by_format_and_height!(args.format, n, kernel(args, res))
}

/// The kernel for format `FMT` and `N` activation rows.
///
/// # Safety
/// As `group_dot`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn kernel<const FMT: u8, const N: usize>(
    args: GroupArgs<'_>,
    res: &mut [[f32; GROUP]; TILE],
) {
    let GroupArgs {
        group, acts, cols, ..
    } = args;
    let format = format_of(FMT);
    // These checks make every pointer below in bounds.
    assert_eq!(args.format, format);
    args.check(N);
    let (nb, sbb) = (cols / BLOCK, superblock_bytes(format));
    let (low, high) = (_mm512_set1_epi16(0x0F), _mm512_set1_epi16(0xF0));
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        let sb = group.as_ptr().add(b * sbb);
        for line in (0..sbb).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(sb.wrapping_add(PREFETCH + line) as *const i8);
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(sb as *const __m256i));
        let chunks = sb.add(scale_bytes(format));
        // The activation pair of row i at element `e` (even), as one 32-bit lane.
        let pair = |i: usize, e: usize| {
            let at = acts.codes.as_ptr().add(i * cols + b * BLOCK + e) as *const i32;
            _mm512_set1_epi32(at.read_unaligned())
        };
        // Four sums per activation row (low/high nibbles or Q8_0 chunk halves, each split
        // by chunk parity): the dot instruction's latency is ~5 cycles, so four short
        // chains keep it issuing every cycle.
        let mut dots = [[_mm512_setzero_si512(); 4]; N];
        if FMT == Q8_0 {
            for k in 0..16 {
                let chunk = chunks.add(32 * k) as *const __m256i;
                let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(chunk));
                for (i, dots) in dots.iter_mut().enumerate() {
                    dots[k % 4] = dpwssd(dots[k % 4], w, pair(i, 2 * k));
                }
            }
        } else {
            for k in 0..8 {
                let chunk = chunks.add(32 * k) as *const __m256i;
                let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(chunk));
                let (lo, hi) = (_mm512_and_si512(v, low), _mm512_and_si512(v, high));
                for (i, dots) in dots.iter_mut().enumerate() {
                    dots[k % 2] = dpwssd(dots[k % 2], lo, pair(i, 2 * k));
                    dots[2 + k % 2] = dpwssd(dots[2 + k % 2], hi, pair(i, 2 * k + 16));
                }
            }
            for dots in &mut dots {
                let hi = _mm512_add_epi32(dots[2], dots[3]);
                dots[2] = _mm512_srai_epi32::<4>(hi);
                dots[3] = _mm512_setzero_si512();
            }
        }
        let m = if FMT == Q4_1 {
            _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(2 * GROUP) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        for (i, (acc, dots)) in acc.iter_mut().zip(dots).enumerate() {
            let k = i * nb + b;
            let (dx, sum) = (*acts.scales.get_unchecked(k), *acts.sums.get_unchecked(k));
            let sum01 = _mm512_add_epi32(dots[0], dots[1]);
            let dot =
                _mm512_cvtepi32_ps(_mm512_add_epi32(sum01, _mm512_add_epi32(dots[2], dots[3])));
            *acc = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(dx)), *acc);
            *acc = match FMT {
                Q4_0 => _mm512_fmadd_ps(d, _mm512_set1_ps(-8.0 * sum), *acc),
                Q4_1 => _mm512_fmadd_ps(m, _mm512_set1_ps(sum), *acc),
                _ => *acc,
            };
        }
    }
    for (res, acc) in res.iter_mut().zip(acc) {
        _mm512_storeu_ps(res.as_mut_ptr(), acc);
    }
}

/// `acc + vpdpwssd(a, b)`, as the one instruction: LLVM otherwise splits it into
/// `vpmaddwd` + `vpaddd` to shorten the accumulator chain, which doubles the work on the
/// two vector ports this kernel is bound by.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    std::arch::asm!(
        "vpdpwssd {acc}, {a}, {b}",
        acc = inout(zmm_reg) acc,
        a = in(zmm_reg) a,
        b = in(zmm_reg) b,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}
