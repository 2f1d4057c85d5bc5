//! AVX-512 VNNI kernel over interleaved weights (`interleaved`) and 16-bit activation
//! codes (`int16`): lane `r` of every vector is row `r` of a 16-row group.
//!
//! Q8_0: per chunk of 32 code bytes (two elements of each of the 16 rows) one widening
//! load gives 16-bit lanes, and one `vpdpwssd` per activation row adds both products to
//! each row's 32-bit sum, with the activation pair broadcast from memory. Q4: per chunk
//! of 64 bytes (eight elements of each row) two masks give the low and high nibbles as
//! bytes, and `vpdpbusd` (four byte products per lane) takes each twice, against the
//! activation codes' high and low bytes, so the 16-bit codes cost no widening of the
//! weights: `Σq·x = 256·Σq·high + Σq·low`, exactly. Each block's integer sums are then
//! converted once and scaled by `d·dx` with an FMA.

use std::arch::x86_64::*;

use super::interleaved::{scale_bytes, superblock_bytes, GroupArgs, GROUP};
use super::tag::{format_of, Q4_0, Q4_1, Q8_0};
use super::{BlockFormat, BLOCK, TILE};

/// Bytes ahead of the superblock being read that each superblock's lines are prefetched
/// (a few superblocks): measured ~10–20% more bandwidth from DRAM on one thread than with
/// the hardware prefetchers alone, about the same from 512 to 1536.
const PREFETCH: usize = 1024;

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
    assert!(FMT == Q8_0 || acts.high.len().min(acts.low.len()) >= N * cols);
    let (high, low) = (acts.high.as_ptr() as *const u8, acts.low.as_ptr());
    let (nb, sbb) = (cols / BLOCK, superblock_bytes(format));
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        let sb = group.as_ptr().add(b * sbb);
        // Past the group's end this touches nothing: prefetches do not fault.
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
        // Four activation bytes of row i from element `e` on, as one 32-bit lane.
        let quad = |bytes: *const u8, i: usize, e: usize| {
            let at = bytes.add(i * cols + b * BLOCK + e) as *const i32;
            _mm512_set1_epi32(at.read_unaligned())
        };
        // Four sums per activation row (Q8_0: by chunk; Q4: high and low activation bytes
        // of the low and high nibbles): the dot instructions' latency is ~5 cycles, so
        // four short chains keep them issuing every cycle.
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
            // Each 64-byte chunk: four elements of each row in its low nibbles, four
            // more in its high ones; each meets the activations' high bytes (signed) and
            // low bytes (unsigned) in one `vpdpbusd` each (`Σq·x = 256·Σq·high + Σq·low`).
            let nibble = _mm512_set1_epi8(0x0F);
            for k in 0..4 {
                let v = _mm512_loadu_si512(chunks.add(64 * k) as *const __m512i);
                let lo = _mm512_and_si512(v, nibble);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                for (i, dots) in dots.iter_mut().enumerate() {
                    let (e_lo, e_hi) = (4 * k, 4 * k + 16);
                    dots[0] = dpbusd(dots[0], lo, quad(high, i, e_lo));
                    dots[1] = dpbusd(dots[1], quad(low, i, e_lo), lo);
                    dots[2] = dpbusd(dots[2], hi, quad(high, i, e_hi));
                    dots[3] = dpbusd(dots[3], quad(low, i, e_hi), hi);
                }
            }
        }
        // The offset term's factor per row, `o` with `w = d·q + o`: `−8d` for Q4_0 (exact,
        // so `o·Σx` rounds as `d·(−8Σx)` would), Q4_1's `m`.
        let o = match FMT {
            Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
            Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(2 * GROUP) as *const __m256i)),
            _ => _mm512_setzero_ps(),
        };
        for (i, (acc, dots)) in acc.iter_mut().zip(dots).enumerate() {
            let k = i * nb + b;
            let (dx, sum) = (*acts.scales.get_unchecked(k), *acts.sums.get_unchecked(k));
            let dot = if FMT == Q8_0 {
                let (a, b) = (
                    _mm512_add_epi32(dots[0], dots[1]),
                    _mm512_add_epi32(dots[2], dots[3]),
                );
                _mm512_add_epi32(a, b)
            } else {
                // `256·Σq·high + Σq·low`.
                let high = _mm512_slli_epi32::<8>(_mm512_add_epi32(dots[0], dots[2]));
                _mm512_add_epi32(high, _mm512_add_epi32(dots[1], dots[3]))
            };
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(dx));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
            if FMT != Q8_0 {
                *acc = _mm512_fmadd_ps(o, _mm512_set1_ps(sum), *acc);
            }
        }
    }
    for (res, acc) in res.iter_mut().zip(acc) {
        _mm512_storeu_ps(res.as_mut_ptr(), acc);
    }
}

/// `fn $name(acc, a, b) = acc + $insn(a, b)` as that one instruction: LLVM otherwise
/// splits the VNNI dot products (`vpdpwssd` into `vpmaddwd` + `vpaddd`) to shorten the
/// accumulator chain, which doubles the work on the two vector ports this kernel is bound by.
macro_rules! vnni_dot {
    ($(#[$doc:meta])* $name:ident = $insn:literal) => {
        $(#[$doc])*
        #[inline]
        #[target_feature(enable = "avx512f,avx512vnni")]
        unsafe fn $name(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
            let mut acc = acc;
            std::arch::asm!(
                concat!($insn, " {acc}, {a}, {b}"),
                acc = inout(zmm_reg) acc,
                a = in(zmm_reg) a,
                b = in(zmm_reg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
            acc
        }
    };
}

vnni_dot!(
    /// Pairs of signed 16-bit products added to each 32-bit lane.
    dpwssd = "vpdpwssd"
);
vnni_dot!(
    /// Four products of unsigned bytes of `a` and signed bytes of `b` added to each
    /// 32-bit lane.
    dpbusd = "vpdpbusd"
);
