//! The kernels against candle's dequantisation and an f64 reference; in the browser too
//! (`wasm-pack test`), where the simd128 kernel runs.

use std::sync::Arc;

use super::tiling::block_sums;
use super::*;
use candle_core::{Device, Tensor};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// Deterministic pseudo-random values in [-1, 1).
fn random(n: usize, seed: u64) -> Vec<f32> {
    crate::test_rng::SplitMix64::new(seed).signed_f32s(n)
}

const FORMATS: [(BlockFormat, GgmlDType); 3] = [
    (BlockFormat::Q4_0, GgmlDType::Q4_0),
    (BlockFormat::Q4_1, GgmlDType::Q4_1),
    (BlockFormat::Q8_0, GgmlDType::Q8_0),
];

/// A random matrix quantised by candle, with candle's dequantisation.
fn quantized(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (BlockMatrix, Vec<Vec<f32>>) {
    let t = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let w = BlockMatrix::from_qtensor(&q).expect("supported qtensor");
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    (w, deq)
}

/// Checks `got` ([m, rows]) against an f64 reference on candle's dequantised weights.
fn check_against_reference(got: &[f32], deq: &[Vec<f32>], x: &[f32], m: usize, what: &str) {
    let (rows, cols) = (deq.len(), deq[0].len());
    for i in 0..m {
        for (j, w) in deq.iter().enumerate() {
            let xi = &x[i * cols..(i + 1) * cols];
            let want: f64 = w.iter().zip(xi).map(|(&w, &x)| w as f64 * x as f64).sum();
            let scale: f64 = w
                .iter()
                .zip(xi)
                .map(|(&w, &x)| (w as f64 * x as f64).abs())
                .sum();
            let g = got[i * rows + j] as f64;
            assert!(
                (g - want).abs() <= 1e-4 * (1.0 + scale),
                "{what}: (i={i}, j={j}) got {g} want {want}"
            );
        }
    }
}

#[test]
fn dequantize_matches_candle() {
    for (format, dtype) in FORMATS {
        let (w, deq) = quantized(dtype, 5, 576, 1);
        assert_eq!(w.format(), format);
        assert_eq!((w.rows(), w.cols()), (5, 576));
        let mut row = vec![0f32; 576];
        for (j, want) in deq.iter().enumerate() {
            w.dequantize_row(j, &mut row);
            for (c, (&g, &e)) in row.iter().zip(want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-6 * (1.0 + e.abs()),
                    "{format:?} ({j}, {c}): {g} vs {e}"
                );
            }
        }
    }
}

#[test]
fn matmul_matches_f64_reference() {
    for (format, dtype) in FORMATS {
        for rows in [1, 7, 64, 300] {
            for cols in [32, 576, 1536] {
                let (w, deq) = quantized(dtype, rows, cols, (rows * cols) as u64);
                for m in [1, 2, 3, 5, 17] {
                    let x = random(m * cols, 7 + m as u64);
                    let mut out = vec![f32::NAN; m * rows];
                    w.matmul(&x, m, &mut out);
                    let what = format!("{format:?} m={m} rows={rows} cols={cols}");
                    check_against_reference(&out, &deq, &x, m, &what);
                }
            }
        }
    }
}

#[test]
fn simd_and_scalar_agree() {
    let kernels = [Kernel::detect(), Kernel::Scalar];
    for (format, dtype) in FORMATS {
        let (w, deq) = quantized(dtype, 70, 576, 3);
        for m in [1, 3, 4, 9] {
            let x = random(m * 576, 11);
            for kernel in kernels {
                let mut out = vec![f32::NAN; m * 70];
                w.matmul_with(kernel, &x, m, &mut out);
                check_against_reference(&out, &deq, &x, m, &format!("{format:?} {kernel:?} m={m}"));
            }
            // Direct row-kernel comparison, independent of the tiling code.
            let sums = block_sums(&x[..576], 576);
            let (mut a, mut b) = ([0f32; 1], [0f32; 1]);
            let args = RowArgs {
                format,
                row: w.row_bytes(5),
                xs: &x[..576],
                sums: &sums,
                cols: 576,
            };
            Kernel::Scalar.row_dot(args, &mut a);
            Kernel::detect().row_dot(args, &mut b);
            assert!(
                (a[0] - b[0]).abs() <= 1e-4 * (1.0 + a[0].abs()),
                "{format:?}: {a:?} vs {b:?}"
            );
        }
    }
}

#[test]
fn simd_kernel_is_used_where_available() {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    assert_eq!(Kernel::detect(), Kernel::Simd128);
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        assert_eq!(Kernel::detect(), Kernel::Avx512);
    } else if avx2::available() {
        assert_eq!(Kernel::detect(), Kernel::Avx2);
    }
}

/// Every kernel this CPU runs, scalar first.
fn kernels() -> Vec<Kernel> {
    #[allow(unused_mut)]
    let mut k = vec![Kernel::Scalar];
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    k.push(Kernel::Simd128);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            k.push(Kernel::Avx2);
        }
        if avx512::available() {
            k.push(Kernel::Avx512);
        }
    }
    k
}

#[test]
fn every_kernel_matches_scalar_and_reference_on_awkward_sizes() {
    // Odd row counts (a lone last row after the pairs), row counts crossing ROW_BLOCK,
    // one-block rows, and m leaving every partial tile (m % TILE = 1, 2, 3).
    for (format, dtype) in FORMATS {
        for (rows, cols) in [(1, 32), (2, 32), (3, 96), (17, 64), (65, 160), (131, 576)] {
            let (w, deq) = quantized(dtype, rows, cols, (rows + 3 * cols) as u64);
            for m in [1, 2, 3, 4, 5, 6, 7, 9] {
                let x = random(m * cols, 100 + m as u64);
                let mut want = vec![f32::NAN; m * rows];
                w.matmul_with(Kernel::Scalar, &x, m, &mut want);
                for kernel in kernels() {
                    let mut out = vec![f32::NAN; m * rows];
                    w.matmul_with(kernel, &x, m, &mut out);
                    let what = format!("{format:?} {kernel:?} m={m} [{rows}, {cols}]");
                    check_against_reference(&out, &deq, &x, m, &what);
                    for (k, (&g, &e)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{what} at {k}: {g} vs scalar {e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rows_dot_one_and_two_rows_agree_with_row_dot() {
    let cols = 224;
    for (format, dtype) in FORMATS {
        let (w, _) = quantized(dtype, 4, cols, 77);
        for n in 1..=TILE {
            let x = random(n * cols, 78 + n as u64);
            let sums = block_sums(&x, cols);
            for kernel in kernels() {
                for pair in [&[1][..], &[2, 3][..]] {
                    let rows: Vec<&[u8]> = pair.iter().map(|&j| w.row_bytes(j)).collect();
                    let mut got = [[f32::NAN; TILE]; 2];
                    kernel.rows_dot(format, &rows, &x, &sums, cols, n, &mut got);
                    for (r, &j) in pair.iter().enumerate() {
                        let mut want = [0f32; TILE];
                        let row = w.row_bytes(j);
                        let args = RowArgs {
                            format,
                            row,
                            xs: &x,
                            sums: &sums,
                            cols,
                        };
                        Kernel::Scalar.row_dot(args, &mut want[..n]);
                        for (g, e) in got[r][..n].iter().zip(&want[..n]) {
                            assert!(
                                (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                "{format:?} {kernel:?} n={n} row {j}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn large_matrix_crosses_row_blocks_and_offset_groups() {
    // Enough rows that a task spans several ROW_BLOCKs, and 65 blocks per row so the
    // offset dot product crosses an OFFSET_GROUP boundary with a 1-block tail.
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let (rows, cols, m) = (1100, 2080, 5);
        let (w, deq) = quantized(dtype, rows, cols, 31);
        let x = random(m * cols, 32);
        let mut out = vec![f32::NAN; m * rows];
        w.matmul(&x, m, &mut out);
        check_against_reference(&out, &deq, &x, m, &format!("{dtype:?} large"));
    }
}

#[test]
fn concat_rows_equals_separate_matmuls() {
    let (q, _) = quantized(GgmlDType::Q4_1, 64, 576, 21);
    let (k, _) = quantized(GgmlDType::Q4_1, 32, 576, 22);
    let (v, _) = quantized(GgmlDType::Q4_1, 17, 576, 23);
    let qkv = BlockMatrix::concat_rows(&[&q, &k, &v]).unwrap();
    assert_eq!(qkv.rows(), 113);
    let m = 3;
    let x = random(m * 576, 5);
    let mut fused = vec![0f32; m * 113];
    qkv.matmul(&x, m, &mut fused);
    let mut start = 0;
    for part in [&q, &k, &v] {
        let mut out = vec![0f32; m * part.rows()];
        part.matmul(&x, m, &mut out);
        for i in 0..m {
            let f = &fused[i * 113 + start..][..part.rows()];
            assert_eq!(f, &out[i * part.rows()..][..part.rows()], "row {i}");
        }
        start += part.rows();
    }
    let (other, _) = quantized(GgmlDType::Q8_0, 4, 576, 1);
    assert!(BlockMatrix::concat_rows(&[&q, &other]).is_none());
    assert!(BlockMatrix::concat_rows(&[]).is_none());
}

#[test]
fn custom_op_on_3d_input() {
    let (w, _) = quantized(GgmlDType::Q8_0, 40, 64, 8);
    let w = Arc::new(w);
    let data = random(2 * 3 * 64, 9);
    let x = Tensor::from_vec(data.clone(), (2, 3, 64), &Device::Cpu).unwrap();
    let y = x.apply_op1(BlockMatMul(w.clone())).unwrap();
    assert_eq!(y.dims(), &[2, 3, 40]);
    let mut want = vec![0f32; 6 * 40];
    w.matmul(&data, 6, &mut want);
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    // A non-contiguous input is refused rather than misread.
    let xt = Tensor::from_vec(random(64 * 2, 1), (64, 2), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert!(xt.apply_op1(BlockMatMul(w)).is_err());
}

#[test]
fn new_checks_sizes() {
    assert!(BlockMatrix::new(BlockFormat::Q4_0, 2, 33, vec![]).is_err());
    assert!(BlockMatrix::new(BlockFormat::Q4_0, 2, 32, vec![0; 35]).is_err());
    assert!(BlockMatrix::new(BlockFormat::Q4_0, 2, 32, vec![0; 36]).is_ok());
    assert_eq!(BlockFormat::from_ggml(GgmlDType::F32), None);
}

/// The bound on what integer activations change in row `j` of `W·x_i`: each activation is
/// off by at most half its block's step `dx`, so a block's dot product by at most
/// `Σ|w|·dx/2`.
fn int16_error_bound(w: &[f32], x: &[f32]) -> f64 {
    w.chunks(BLOCK)
        .zip(x.chunks(BLOCK))
        .map(|(w, x)| {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let l1: f64 = w.iter().map(|&v| (v as f64).abs()).sum();
            l1 * amax / 32767.0 / 2.0
        })
        .sum()
}

/// `w` with integer activations in the interleaved layout, whatever this CPU's kernel
/// (the portable group kernel where it has no VNNI).
fn grouped(w: BlockMatrix) -> BlockMatrix {
    let mut w = w.with_layout(Layout::Groups);
    w.activations = Activations::Int16;
    w
}

/// `w` with integer activations in each layout that fits it: row-major, in quads, and
/// interleaved when its rows are whole groups.
fn int16_layouts(w: BlockMatrix) -> Vec<BlockMatrix> {
    let mut layouts: Vec<BlockMatrix> = [Layout::Rows, Layout::Quads]
        .into_iter()
        .map(|layout| {
            let mut w = w.clone().with_layout(layout);
            w.activations = Activations::Int16;
            w
        })
        .collect();
    if w.rows.is_multiple_of(interleaved::GROUP) {
        layouts.push(grouped(w));
    }
    layouts
}

#[test]
fn int16_activations_stay_within_the_rounding_bound_of_the_f64_reference() {
    for (format, dtype) in FORMATS {
        for (rows, cols) in [(1, 32), (3, 96), (65, 576), (131, 1536), (32, 1536)] {
            let (w, deq) = quantized(dtype, rows, cols, (rows + 5 * cols) as u64);
            for (w, m) in int16_layouts(w)
                .iter()
                .flat_map(|w| [1, 2, 3, 4, 5, 9].map(|m| (w, m)))
            {
                // Activations with a wide range inside a block, as real hidden states have.
                let x: Vec<f32> = random(m * cols, 40 + m as u64)
                    .iter()
                    .enumerate()
                    .map(|(k, v)| if k % 29 == 0 { 8.0 * v } else { *v })
                    .collect();
                let mut out = vec![f32::NAN; m * rows];
                w.matmul(&x, m, &mut out);
                for i in 0..m {
                    let xi = &x[i * cols..(i + 1) * cols];
                    for (j, wj) in deq.iter().enumerate() {
                        let want: f64 = wj.iter().zip(xi).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let bound = int16_error_bound(wj, xi) + 1e-4 * (1.0 + want.abs());
                        let got = out[i * rows + j] as f64;
                        assert!(
                            (got - want).abs() <= bound,
                            "{format:?} {:?} m={m} [{rows}, {cols}] ({i}, {j}): {got} vs {want}, bound {bound}",
                            w.layout
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn int16_kernels_agree_bit_for_bit() {
    // The portable kernel is the simd128 one lane for lane, so the native engine gives
    // the browser's numbers exactly (`tests/web_fixture.rs` relies on it).
    for (format, dtype) in FORMATS {
        // An odd row count: pairs of weight rows and a lone last one.
        let (w, _) = quantized(dtype, 71, 576, 13);
        let w = w.with_activations(Activations::Int16);
        for m in [1, 2, 3, 4, 9] {
            let x = random(m * 576, 14 + m as u64);
            let mut want = vec![f32::NAN; m * 71];
            w.matmul_with(Kernel::Scalar, &x, m, &mut want);
            for kernel in kernels() {
                let mut got = vec![f32::NAN; m * 71];
                w.matmul_with(kernel, &x, m, &mut got);
                let (got, want): (Vec<u32>, Vec<u32>) = (
                    got.iter().map(|v| v.to_bits()).collect(),
                    want.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(got, want, "{format:?} {kernel:?} m={m}");
            }
        }
    }
}

#[test]
fn int16_activations_carry_nan_and_zero_blocks() {
    for (format, dtype) in FORMATS {
        let (w, _) = quantized(dtype, 16, 96, 2);
        for w in int16_layouts(w) {
            // An all-zero block quantises to zero codes (no division by a zero step).
            let mut x = random(96, 3);
            x[32..64].fill(0.0);
            let mut out = [f32::NAN; 16];
            w.matmul(&x, 1, &mut out);
            assert!(out.iter().all(|v| v.is_finite()), "{format:?}: {out:?}");
            // A NaN activation makes every output NaN, as in f32, not a silent zero code.
            x[40] = f32::NAN;
            w.matmul(&x, 1, &mut out);
            assert!(out.iter().all(|v| v.is_nan()), "{format:?}: {out:?}");
        }
    }
}

#[test]
fn concat_rows_keeps_the_activations() {
    let (a, _) = quantized(GgmlDType::Q4_0, 8, 64, 1);
    let (b, _) = quantized(GgmlDType::Q4_0, 8, 64, 2);
    let (a, b) = (
        a.with_activations(Activations::Int16),
        b.with_activations(Activations::Int16),
    );
    let ab = BlockMatrix::concat_rows(&[&a, &b]).unwrap();
    assert_eq!(ab.activations(), Activations::Int16);
}

#[test]
fn f16_conversion_is_exact_for_every_value() {
    for bits in 0..=u16::MAX {
        let want = half::f16::from_bits(bits).to_f32();
        let got = scalar::f16_to_f32(bits);
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#06x}: {got}");
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{bits:#06x}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn interleaving_keeps_every_weight() {
    for (format, dtype) in FORMATS {
        let (rows_major, _) = quantized(dtype, 48, 576, 21);
        let g = rows_major.clone().with_layout(Layout::Groups);
        assert_ne!(
            g.data[..],
            rows_major.data[..],
            "{format:?}: same bytes after interleaving"
        );
        let (mut a, mut b) = (vec![0f32; 576], vec![0f32; 576]);
        for row in 0..48 {
            rows_major.dequantize_row(row, &mut a);
            g.dequantize_row(row, &mut b);
            assert_eq!(a, b, "{format:?} row {row}");
        }
        assert_eq!(
            g.with_layout(Layout::Rows).data[..],
            rows_major.data[..],
            "{format:?}"
        );
    }
}

#[test]
fn interleaved_kernels_agree_bit_for_bit_and_with_the_row_kernel() {
    // The SIMD group kernel (where this CPU has it) against the portable one, exactly;
    // both against the row-major integer kernel within rounding (same codes, other order).
    for (format, dtype) in FORMATS {
        let (w, deq) = quantized(dtype, 64, 576, 31);
        let rows = w.clone().with_layout(Layout::Rows);
        let (mut rows, g) = (rows, grouped(w));
        rows.activations = Activations::Int16;
        for m in [1, 2, 3, 4, 5, 9] {
            let x = random(m * 576, 32 + m as u64);
            let mut want = vec![f32::NAN; m * 64];
            g.matmul_with(Kernel::Scalar, &x, m, &mut want);
            let mut got = vec![f32::NAN; m * 64];
            g.matmul(&x, m, &mut got);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{format:?} m={m}");
            let mut by_rows = vec![f32::NAN; m * 64];
            rows.matmul(&x, m, &mut by_rows);
            check_against_reference(&got, &deq, &x, m, &format!("{format:?} m={m} groups"));
            for (a, b) in got.iter().zip(&by_rows) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{format:?} m={m}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn interleaved_parts_concatenate_by_groups() {
    let (a, _) = quantized(GgmlDType::Q4_1, 32, 64, 51);
    let (b, _) = quantized(GgmlDType::Q4_1, 16, 64, 52);
    let (ga, gb) = (grouped(a.clone()), grouped(b.clone()));
    let ab = BlockMatrix::concat_rows(&[&ga, &gb]).unwrap();
    assert_eq!(ab.layout, Layout::Groups);
    let x = random(2 * 64, 53);
    let mut got = vec![0f32; 2 * 48];
    ab.matmul(&x, 2, &mut got);
    let (mut wa, mut wb) = (vec![0f32; 2 * 32], vec![0f32; 2 * 16]);
    ga.matmul(&x, 2, &mut wa);
    gb.matmul(&x, 2, &mut wb);
    for i in 0..2 {
        assert_eq!(&got[i * 48..i * 48 + 32], &wa[i * 32..(i + 1) * 32]);
        assert_eq!(&got[i * 48 + 32..(i + 1) * 48], &wb[i * 16..(i + 1) * 16]);
    }
    // Parts in different layouts are not mixed.
    assert!(BlockMatrix::concat_rows(&[&ga, &b]).is_none());
}

#[test]
fn integer_activations_pick_the_layout_of_this_cpus_kernel() {
    let (w, _) = quantized(GgmlDType::Q4_0, 32, 64, 61);
    let int = w.clone().with_activations(Activations::Int16);
    let wasm = cfg!(all(target_arch = "wasm32", target_feature = "simd128"));
    let want = match (wasm, interleaves()) {
        (true, _) => Layout::Quads,
        (false, true) => Layout::Groups,
        (false, false) => Layout::Rows,
    };
    assert_eq!(int.layout, want);
    // Back to f32: the row-major bytes the f32 kernels read.
    assert_eq!(int.with_activations(Activations::F32).data[..], w.data[..]);
    // A row count that is not whole groups is row-major, or in quads (the last padded).
    let (odd, _) = quantized(GgmlDType::Q4_0, 33, 64, 62);
    let want = if wasm { Layout::Quads } else { Layout::Rows };
    assert_eq!(odd.with_activations(Activations::Int16).layout, want);
}

#[test]
fn the_quads_layout_gives_the_row_major_results_bit_for_bit() {
    // Quads hold the same codes and the f16 scales as exact f32s, and the kernels over
    // them do `int16::row_dot`'s operations: the results are the row-major ones exactly,
    // padded last quad included. Each layout on each kernel this CPU has for it.
    for (format, dtype) in FORMATS {
        let (w, deq) = quantized(dtype, 71, 576, 81);
        let [rows, quads, ..] = &int16_layouts(w)[..] else {
            panic!("two layouts")
        };
        assert_eq!(quads.layout, Layout::Quads);
        let mut row = vec![0f32; 576];
        for r in [0, 35, 70] {
            quads.dequantize_row(r, &mut row);
            assert_eq!(row, deq[r], "{format:?} row {r}");
        }
        for m in [1, 3, 5] {
            let x = random(m * 576, 82 + m as u64);
            let mut want = vec![f32::NAN; m * 71];
            rows.matmul_with(Kernel::Scalar, &x, m, &mut want);
            for kernel in kernels() {
                let mut got = vec![f32::NAN; m * 71];
                quads.matmul_with(kernel, &x, m, &mut got);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{format:?} {kernel:?} m={m}");
            }
        }
    }
}

#[test]
fn quads_concatenate_only_without_a_padded_quad() {
    let (a, _) = quantized(GgmlDType::Q4_1, 8, 64, 91);
    let (b, _) = quantized(GgmlDType::Q4_1, 6, 64, 92);
    let quads = |w: &BlockMatrix| {
        let mut w = w.clone().with_layout(Layout::Quads);
        w.activations = Activations::Int16;
        w
    };
    let (qa, qb) = (quads(&a), quads(&b));
    let ab = BlockMatrix::concat_rows(&[&qa, &qb]).unwrap();
    assert_eq!(ab.layout, Layout::Quads);
    let x = random(64, 93);
    let mut got = vec![0f32; 14];
    ab.matmul(&x, 1, &mut got);
    let (mut wa, mut wb) = (vec![0f32; 8], vec![0f32; 6]);
    qa.matmul(&x, 1, &mut wa);
    qb.matmul(&x, 1, &mut wb);
    assert_eq!(&got[..8], &wa[..]);
    assert_eq!(&got[8..], &wb[..]);
    // b's last quad is padded: nothing may follow it.
    assert!(BlockMatrix::concat_rows(&[&qb, &qa]).is_none());
}

#[test]
fn qtensors_load_straight_into_the_kernels_layout() {
    for (format, dtype) in FORMATS {
        let t = Tensor::from_vec(random(48 * 64, 71), (48, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        for activations in [Activations::F32, Activations::Int16] {
            let direct = BlockMatrix::from_qtensor_with(&q, activations).unwrap();
            let via = BlockMatrix::from_qtensor(&q)
                .unwrap()
                .with_activations(activations);
            assert_eq!(direct.layout, via.layout, "{format:?} {activations:?}");
            assert_eq!(direct.activations(), activations);
            assert_eq!(direct.data[..], via.data[..], "{format:?} {activations:?}");
        }
    }
}

#[test]
fn weight_buffers_hold_their_bytes_at_every_size() {
    // From the allocator (below 64 KiB), mapped below one huge page, exactly one, and
    // past it (mapped, aligned and advised).
    for len in [
        0,
        1,
        63,
        4096,
        (64 << 10) - 1,
        64 << 10,
        100_001,
        2 << 20,
        (2 << 20) + 17,
    ] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let buf = pages::WeightBuf::copy_of(&bytes);
        assert_eq!(buf.len(), len);
        assert_eq!(buf[..], bytes[..], "{len} bytes");
        assert_eq!(buf.clone()[..], bytes[..], "clone of {len} bytes");
        assert!(pages::WeightBuf::zeroed(len).iter().all(|&b| b == 0));
        if cfg!(target_os = "linux") && len >= 2 << 20 {
            // Huge pages back only whole aligned ones.
            assert_eq!(buf.as_ptr() as usize % (2 << 20), 0, "{len} bytes");
        }
    }
}

#[test]
fn activation_codes_round_to_nearest_ties_to_even() {
    let mut values = vec![
        0.5,
        1.5,
        2.5,
        -0.5,
        -2.5,
        0.499_999_97,
        32_766.5,
        -32_767.0,
        32_767.0,
    ];
    values.extend(random(10_000, 81).iter().map(|v| v * 32_767.0));
    for v in values {
        assert_eq!(int16::round_to_code(v), v.round_ties_even() as i16, "{v}");
    }
    assert_eq!(int16::round_to_code(f32::NAN), 0);
}
