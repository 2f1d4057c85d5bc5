//! Every WGSL kernel against a plain CPU reference, on seeded random data at awkward
//! sizes. Natively this needs a Vulkan adapter; without a GPU install lavapipe
//! (`apt-get install mesa-vulkan-drivers libvulkan1`). A missing adapter fails.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::SplitMix64;
use genarm::gpu::buffers::{storage_f32, storage_u32, storage_zeros};
use genarm::gpu::ops::{AttentionBuffers, AttentionShape, Op, RopeStyle, MAX_MATVEC_ROWS};
use genarm::gpu::{
    GpuContext, Kernels, MatVecEpilogue, MatVecKind, MatVecStore, QuantWeight, WeightFormat,
};
use genarm::model::config::Activation;

fn shared_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    Arc::clone(CTX.get_or_init(|| {
        let ctx = GpuContext::new_blocking().unwrap_or_else(|e| {
            panic!("{e}\n(no GPU here? install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1)")
        });
        eprintln!("adapter: {}", ctx.adapter_name());
        Arc::new(ctx)
    }))
}

/// The kernels the engine would pick for this adapter.
fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| Kernels::new(shared_ctx()))
}

/// Kernels with a given matvec kind: both kinds are checked whatever the adapter.
fn kernels_with(kind: MatVecKind) -> &'static Kernels {
    static K: OnceLock<[Kernels; 2]> = OnceLock::new();
    let all = K.get_or_init(|| {
        [
            Kernels::with_matvec(shared_ctx(), MatVecKind::RowPerWorkgroup),
            Kernels::with_matvec(shared_ctx(), MatVecKind::RowPerInvocation),
        ]
    });
    &all[kind as usize]
}

fn ctx() -> &'static GpuContext {
    kernels().context()
}

/// Encodes, submits and waits, then checks no validation error was raised.
fn run(ops: &[&Op]) {
    let ctx = ctx();
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    for op in ops {
        op.encode(&mut encoder);
    }
    ctx.queue.submit([encoder.finish()]);
    if let Some(e) = pollster::block_on(scope.pop()) {
        panic!("validation error: {e}");
    }
}

fn read(b: &wgpu::Buffer, n: usize) -> Vec<f32> {
    let mut v = ctx().read_f32(b).expect("readback");
    v.truncate(n);
    v
}

/// Asserts |got − want| ≤ tol(i) everywhere; returns the max error. Prints index,
/// got and want of the first few failures.
fn check(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = Vec::new();
    let mut max = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        max = max.max(err);
        // `is_nan` too: a NaN must fail, and comparisons with NaN are false.
        if err > tol(i) || err.is_nan() {
            bad.push(format!(
                "  [{i}] got {g} want {w} (err {err}, tol {})",
                tol(i)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} mismatches\n{}",
        bad.len(),
        bad[..bad.len().min(8)].join("\n")
    );
    eprintln!("{what}: max err {max:e}");
    max
}

/// Quantizes to `format` with candle; returns (GGUF bytes, exact dequantized weights).
fn quantize(w: &[f32], rows: usize, cols: usize, format: WeightFormat) -> (Vec<u8>, Vec<f32>) {
    let dtype = match format {
        WeightFormat::F32 => return (bytemuck::cast_slice(w).to_vec(), w.to_vec()),
        WeightFormat::Q4_0 => GgmlDType::Q4_0,
        WeightFormat::Q4_1 => GgmlDType::Q4_1,
        WeightFormat::Q8_0 => GgmlDType::Q8_0,
    };
    let t = Tensor::from_vec(w.to_vec(), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap();
    let deq = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (q.data().unwrap().to_vec(), deq)
}

/// Runs matvec for a batch of m = 1..=4 rows and for prompt chunks of several batches
/// (6, 21: reduced in tiles of 2 and 1; 32, the most) against an f64 reference; the
/// workgroup kind reduces them a tile at a time. Tolerance: f32 accumulation
/// of `cols` products errs by at most ~cols·2⁻²⁴·Σ|w·x| in the worst case and
/// ~√cols·2⁻²⁴·Σ|w·x| typically (the kernel's tree reduction is pairwise); 1e-5·Σ|w·x|
/// (≈ 170 ulps of the absolute sum) covers the typical case at cols ≤ 1536 with margin
/// yet catches any decode error, which moves results by whole quantization steps.
fn matvec_case(format: WeightFormat, rows: usize, cols: usize, chunk_limit: u64, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let w = rng.signed_f32s(rows * cols);
    let (bytes, deq) = quantize(&w, rows, cols, format);
    let weight = QuantWeight::upload(ctx(), "w", format, rows, cols, &bytes, chunk_limit).unwrap();
    if chunk_limit < u64::MAX {
        assert!(weight.chunks.len() > 1, "chunking was not forced");
    }
    for m in [1, 2, 3, 4, 6, 21, MAX_MATVEC_ROWS] {
        let x = rng.signed_f32s(m * cols);
        let xb = storage_f32(ctx(), "x", &x);
        let yb = storage_zeros(ctx(), "y", m * rows);
        let mut want = vec![0f32; m * rows];
        let mut mag = vec![0f32; m * rows];
        for r in 0..m {
            for i in 0..rows {
                let (mut s, mut a) = (0f64, 0f64);
                for c in 0..cols {
                    let p = f64::from(deq[i * cols + c]) * f64::from(x[r * cols + c]);
                    s += p;
                    a += p.abs();
                }
                want[r * rows + i] = s as f32;
                mag[r * rows + i] = a as f32;
            }
        }
        for kind in [MatVecKind::RowPerWorkgroup, MatVecKind::RowPerInvocation] {
            let op = kernels_with(kind).matvec(&weight, &xb, &yb, m).unwrap();
            run(&[&op]);
            let got = read(&yb, m * rows);
            let what = format!(
                "matvec {kind:?} {format:?} {rows}x{cols} m={m} chunks={}",
                weight.chunks.len()
            );
            check(&what, &got, &want, |i| 1e-5 * mag[i] + 1e-6);
        }
    }
}

#[test]
fn matvec_all_formats_awkward_sizes() {
    let formats = [
        WeightFormat::F32,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q8_0,
    ];
    for (k, format) in formats.into_iter().enumerate() {
        for (j, (rows, cols)) in [(7, 64), (300, 576), (1537, 1536), (5, 96)]
            .into_iter()
            .enumerate()
        {
            matvec_case(format, rows, cols, u64::MAX, (10 * k + j) as u64);
        }
    }
}

#[test]
fn matvec_forced_chunking() {
    // 96 columns = 3 blocks: rows of 54/60/102 bytes, so rows and chunks start at
    // unaligned byte offsets and chunk buffers need padding.
    for (k, format) in [
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q8_0,
        WeightFormat::F32,
    ]
    .into_iter()
    .enumerate()
    {
        matvec_case(format, 301, 96, 1000, 100 + k as u64);
    }
    // The SmolLM2 LM head shape, split in ~4 MiB chunks.
    matvec_case(WeightFormat::Q8_0, 49152, 576, 4 << 20, 200);
}

/// The LoRA delta of [`matvec_lora_ref`]: rows `r` with `r % batch ≥ first` add
/// `Σ_k B[arm, i, k] · t(slot, k)`, `arm = r % batch − first`, `slot = r − first` (one
/// batch per position of a prompt chunk; for one position slot = arm).
struct LoraRef<'a> {
    first: usize,
    batch: usize,
    rank: usize,
    /// `[arms, rows, rank]`.
    b: &'a [f32],
    t: &'a dyn Fn(usize, usize) -> f64,
}

/// `y = W · x` (+ the LoRA delta) for `m` batch rows in f64, and per output the
/// magnitude Σ|terms| its tolerance scales with.
fn matvec_lora_ref(
    w: &[f32],
    x: &[f32],
    rows: usize,
    cols: usize,
    m: usize,
    lora: &LoraRef<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let (mut want, mut mag) = (vec![0f32; m * rows], vec![0f32; m * rows]);
    for r in 0..m {
        for i in 0..rows {
            let mut terms: Vec<f64> = (0..cols)
                .map(|c| f64::from(w[i * cols + c]) * f64::from(x[r * cols + c]))
                .collect();
            if r % lora.batch >= lora.first {
                let (arm, slot) = (r % lora.batch - lora.first, r - lora.first);
                terms.extend((0..lora.rank).map(|k| {
                    f64::from(lora.b[(arm * rows + i) * lora.rank + k]) * (lora.t)(slot, k)
                }));
            }
            want[r * rows + i] = terms.iter().sum::<f64>() as f32;
            mag[r * rows + i] = terms.iter().map(|t| t.abs()).sum::<f64>() as f32;
        }
    }
    (want, mag)
}

/// The LoRA path of an ARM row: one `lora_down` for two projections sharing an input
/// (stacked ranks), then each projection's matvec adding its up half as it stores; for
/// one position and for a prompt chunk of three (the batch repeated per position, each
/// adapted row with its own t slot). Rows of the base (`r % batch < first`) must come
/// out exactly as plain matvec leaves them.
/// Tolerance as matvec's, with the delta's own magnitude Σ|B·A·x| added.
#[test]
fn lora_down_and_matvec_epilogue() {
    let (batch, first, rank, cols) = (4, 1, 4, 96);
    let arms = batch - first;
    let outs = [37, 301];
    let stacked = outs.len() * rank;
    let mut rng = SplitMix64::new(300);
    let a = rng.signed_f32s(arms * stacked * cols);
    let ab = storage_f32(ctx(), "lora a", &a);
    for positions in [1, 3] {
        let m = batch * positions;
        let slots = m - first;
        let x = rng.signed_f32s(m * cols);
        let xb = storage_f32(ctx(), "x", &x);
        let t_want: Vec<f64> = (0..slots * stacked)
            .map(|sk| {
                let r = first + sk / stacked;
                if r % batch < first {
                    return 0.0; // a base row's slot: never written
                }
                let ak = (r % batch - first) * stacked + sk % stacked;
                (0..cols)
                    .map(|c| f64::from(a[ak * cols + c]) * f64::from(x[r * cols + c]))
                    .sum()
            })
            .collect();
        for kind in [MatVecKind::RowPerWorkgroup, MatVecKind::RowPerInvocation] {
            let k = kernels_with(kind);
            let tb = storage_zeros(ctx(), "lora t", slots * stacked);
            let down = genarm::gpu::ops::LoraDown {
                a: &ab,
                t: &tb,
                first,
                arms,
                rank: stacked,
                inp: cols,
                positions,
            };
            let down_op = k.lora_down(&down, &xb).unwrap();
            run(&[&down_op]);
            let t_got = read(&tb, slots * stacked);
            let t_want32: Vec<f32> = t_want.iter().map(|&v| v as f32).collect();
            let what = format!("lora_down {kind:?} {positions} positions");
            check(&what, &t_got, &t_want32, |_| 1e-4);
            for (slot, &rows) in outs.iter().enumerate() {
                let w = rng.signed_f32s(rows * cols);
                let b = rng.signed_f32s(arms * rows * rank);
                let (bytes, deq) = quantize(&w, rows, cols, WeightFormat::Q4_1);
                // The larger projection is split in chunks: the epilogue indexes B by the
                // global output row.
                let limit = if rows > 100 { 2000 } else { u64::MAX };
                let weight =
                    QuantWeight::upload(ctx(), "w", WeightFormat::Q4_1, rows, cols, &bytes, limit)
                        .unwrap();
                let bb = storage_f32(ctx(), "lora b", &b);
                let yb = storage_zeros(ctx(), "y", m * rows);
                let up = genarm::gpu::ops::LoraUp {
                    b: &bb,
                    t: &tb,
                    first,
                    batch,
                    rank,
                    t_offset: slot * rank,
                    t_stride: stacked,
                    parts: 1,
                };
                let op = k.matvec_lora(&weight, &xb, &yb, m, &up).unwrap();
                run(&[&op]);
                let got = read(&yb, m * rows);
                let lora = LoraRef {
                    first,
                    batch,
                    rank,
                    b: &b,
                    t: &|s, k| t_want[s * stacked + slot * rank + k],
                };
                let (want, mag) = matvec_lora_ref(&deq, &x, rows, cols, m, &lora);
                let what = format!(
                    "matvec_lora {kind:?} {rows}x{cols} slot {slot}, {positions} positions"
                );
                check(&what, &got, &want, |i| 1e-5 * mag[i] + 1e-5);
                // The base rows have no delta: bit-identical to plain matvec.
                let plain = storage_zeros(ctx(), "y plain", m * rows);
                run(&[&k.matvec(&weight, &xb, &plain, m).unwrap()]);
                let plain = read(&plain, m * rows);
                for r in (0..m).filter(|r| r % batch < first) {
                    let row = r * rows..(r + 1) * rows;
                    assert_eq!(plain[row.clone()], got[row], "{what}: base row {r}");
                }
            }
        }
    }
}

#[test]
fn rms_norm_rows() {
    // Tolerance: sum of squares in f32 (≤ 1e-6 relative at these sizes), one sqrt and
    // a division (correctly rounded or within 2.5 ulp on Vulkan): 1e-5 relative.
    let mut rng = SplitMix64::new(1);
    for (rows, n) in [(1, 64), (3, 576), (4, 1537)] {
        let x = rng.signed_f32s(rows * n);
        let wt = rng.signed_f32s(n);
        let (xb, wb, yb) = (
            storage_f32(ctx(), "x", &x),
            storage_f32(ctx(), "w", &wt),
            storage_zeros(ctx(), "y", rows * n),
        );
        let op = kernels().rms_norm(&xb, &wb, &yb, rows, n, 1e-5).unwrap();
        run(&[&op]);
        let got = read(&yb, rows * n);
        let mut want = vec![0f32; rows * n];
        for r in 0..rows {
            let row = &x[r * n..(r + 1) * n];
            let ms = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / n as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for c in 0..n {
                want[r * n + c] = (f64::from(row[c]) * inv * f64::from(wt[c])) as f32;
            }
        }
        check(&format!("rms_norm {rows}x{n}"), &got, &want, |i| {
            1e-5 * want[i].abs() + 1e-6
        });
    }
}

/// The norm with the LoRA down-projections of its output in the same dispatch: y as
/// plain rms_norm leaves it (bit for bit), t against an f64 A · rms_norm(x).
/// Tolerance: rms_norm's 1e-5 relative on each term, over Σ|A·y|.
#[test]
fn rms_norm_with_lora_down() {
    let (rows, n, first, rank) = (3, 576, 1, 24);
    let arms = rows - first;
    let mut rng = SplitMix64::new(7);
    let x = rng.signed_f32s(rows * n);
    let wt = rng.signed_f32s(n);
    let a = rng.signed_f32s(arms * rank * n);
    let (xb, wb, ab) = (
        storage_f32(ctx(), "x", &x),
        storage_f32(ctx(), "w", &wt),
        storage_f32(ctx(), "a", &a),
    );
    let (yb, tb, plain) = (
        storage_zeros(ctx(), "y", rows * n),
        storage_zeros(ctx(), "t", arms * rank),
        storage_zeros(ctx(), "y plain", rows * n),
    );
    let down = genarm::gpu::ops::LoraDown {
        a: &ab,
        t: &tb,
        first,
        arms,
        rank,
        inp: n,
        positions: 1,
    };
    let op = kernels()
        .rms_norm_lora(&xb, &wb, &yb, rows, n, 1e-5, &down)
        .unwrap();
    run(&[
        &op,
        &kernels().rms_norm(&xb, &wb, &plain, rows, n, 1e-5).unwrap(),
    ]);
    assert_eq!(read(&yb, rows * n), read(&plain, rows * n), "normed rows");
    let mut want = vec![0f32; arms * rank];
    let mut mag = vec![0f32; arms * rank];
    for (ak, (w, m)) in want.iter_mut().zip(&mut mag).enumerate() {
        let row = &x[(first + ak / rank) * n..][..n];
        let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        let terms =
            (0..n).map(|c| f64::from(a[ak * n + c]) * f64::from(row[c]) * inv * f64::from(wt[c]));
        let (s, abs) = terms.fold((0.0, 0.0), |(s, abs), v| (s + v, abs + v.abs()));
        *w = s as f32;
        *m = abs as f32;
    }
    check("rms_norm_lora t", &read(&tb, arms * rank), &want, |i| {
        1e-5 * mag[i] + 1e-6
    });
}

/// The stores matvec folds in: `Add` (the residual add) and `Gate(act)` (the gated MLP
/// over the gate projection's output, for each activation), with and without a bias
/// (m = 2, 4: with), both kinds, a chunked weight, m = 1..=4. Tolerance: matvec's,
/// scaled by |act(g)| for the gate, plus the final add's or product's rounding and
/// Vulkan's exp (≤ 3 + 2|g| ulp, |g| ≤ 12 here: 1e-5 relative).
#[test]
fn matvec_store_add_and_gate_with_bias() {
    let (rows, cols) = (301, 96);
    let mut rng = SplitMix64::new(500);
    let (bytes, deq) = quantize(
        &rng.signed_f32s(rows * cols),
        rows,
        cols,
        WeightFormat::Q4_1,
    );
    let weight =
        QuantWeight::upload(ctx(), "w", WeightFormat::Q4_1, rows, cols, &bytes, 1000).unwrap();
    assert!(weight.chunks.len() > 1, "chunking was not forced");
    let bias = rng.signed_f32s(rows);
    let bias_buf = storage_f32(ctx(), "bias", &bias);
    let stores = [
        MatVecStore::Add,
        MatVecStore::Gate(Activation::Silu),
        MatVecStore::Gate(Activation::Gelu),
        MatVecStore::Gate(Activation::GeluTanh),
    ];
    for m in 1..=4 {
        let with_bias = m % 2 == 0;
        let x = rng.signed_f32s(m * cols);
        let y0: Vec<f32> = rng.signed_f32s(m * rows).iter().map(|v| v * 12.0).collect();
        let xb = storage_f32(ctx(), "x", &x);
        let (mut wx, mut mag) = (vec![0f64; m * rows], vec![0f64; m * rows]);
        for r in 0..m {
            for i in 0..rows {
                for c in 0..cols {
                    let p = f64::from(deq[i * cols + c]) * f64::from(x[r * cols + c]);
                    wx[r * rows + i] += p;
                    mag[r * rows + i] += p.abs();
                }
                if with_bias {
                    wx[r * rows + i] += f64::from(bias[i]);
                    mag[r * rows + i] += f64::from(bias[i]).abs();
                }
            }
        }
        for kind in [MatVecKind::RowPerWorkgroup, MatVecKind::RowPerInvocation] {
            for store in stores {
                let yb = storage_f32(ctx(), "y", &y0);
                let epilogue = MatVecEpilogue {
                    bias: with_bias.then_some(&bias_buf),
                    store,
                    ..Default::default()
                };
                let op = kernels_with(kind)
                    .matvec_with(&weight, &xb, &yb, m, &epilogue)
                    .unwrap();
                run(&[&op]);
                let (want, tol): (Vec<f32>, Vec<f32>) = (0..m * rows)
                    .map(|i| {
                        let g = f64::from(y0[i]);
                        let (v, scale) = match store {
                            MatVecStore::Gate(act) => {
                                (act.apply_f64(g) * wx[i], act.apply_f64(g).abs())
                            }
                            _ => (g + wx[i], 1.0),
                        };
                        let tol = 1e-5 * mag[i] * scale + 1e-5 * v.abs() + 1e-6;
                        (v as f32, tol as f32)
                    })
                    .unzip();
                let what = format!("matvec {store:?} bias={with_bias} {kind:?} m={m}");
                check(&what, &read(&yb, m * rows), &want, |i| tol[i]);
            }
        }
    }
}

/// Each gate activation alone, against `Activation::apply_f64` on a dense grid of
/// g ∈ [−12, 12] (an identity weight and x = 1, so the store writes act(g) · 1).
/// Budget: 2 ulp of the result (f32 rounding of the series or of 1 − erfc/2 and of
/// the product) plus 2e-7·|g| absolute (the erf approximation's error near 1, times
/// g/2) plus Vulkan's exp for SiLU and tanh-GELU (≤ 3 + 2|u| ulp).
#[test]
fn gate_activations_match_f64() {
    let n = 2048;
    let mut eye = vec![0f32; n * n];
    for i in 0..n {
        eye[i * n + i] = 1.0;
    }
    let weight = QuantWeight::upload(
        ctx(),
        "eye",
        WeightFormat::F32,
        n,
        n,
        bytemuck::cast_slice(&eye),
        u64::MAX,
    )
    .unwrap();
    let xb = storage_f32(ctx(), "ones", &vec![1.0; n]);
    let g: Vec<f32> = (0..n)
        .map(|i| -12.0 + 24.0 * i as f32 / (n - 1) as f32)
        .collect();
    for act in [Activation::Silu, Activation::Gelu, Activation::GeluTanh] {
        let yb = storage_f32(ctx(), "gate", &g);
        let epilogue = MatVecEpilogue {
            store: MatVecStore::Gate(act),
            ..Default::default()
        };
        run(&[&kernels()
            .matvec_with(&weight, &xb, &yb, 1, &epilogue)
            .unwrap()]);
        let want: Vec<f32> = g
            .iter()
            .map(|&v| act.apply_f64(f64::from(v)) as f32)
            .collect();
        let got = read(&yb, n);
        let max = check(&format!("{act:?}"), &got, &want, |i| {
            let (gi, w) = (g[i].abs(), want[i].abs());
            let exp_ulps = if act == Activation::Gelu {
                0.0
            } else {
                3.0 + 2.0 * gi
            };
            (2.0 + exp_ulps) * 1.2e-7 * w + 2e-7 * gi.max(1.0) + 1e-30
        });
        // The error in units of the result's last place, where the result is not lost
        // to the f64 reference's own cancellation (1 + erf(x) for very negative x).
        let ulps = got
            .iter()
            .zip(&want)
            .filter(|(_, w)| w.abs() > 1e-6)
            .map(|(g, w)| (g - w).abs() / (f32::EPSILON * w.abs()))
            .fold(0f32, f32::max);
        let near = (0..n).filter(|&i| g[i].abs() <= 3.0);
        let max_near = near.map(|i| (got[i] - want[i]).abs()).fold(0f32, f32::max);
        eprintln!(
            "{act:?}: max |Δ| {max:e} over g in [-12, 12], {max_near:e} for |g| ≤ 3, \
             {ulps:.1} ulp of the result at most"
        );
    }
}

#[test]
fn add_assign_is_exact() {
    let n = 1537;
    let mut rng = SplitMix64::new(3);
    let (a, b) = (rng.signed_f32s(n), rng.signed_f32s(n));
    let (ab, bb) = (storage_f32(ctx(), "a", &a), storage_f32(ctx(), "b", &b));
    // One correctly rounded f32 addition on both sides, so exact.
    run(&[&kernels().add_assign(&ab, &bb, n).unwrap()]);
    let want: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a + b).collect();
    check("add 1537", &read(&ab, n), &want, |_| 0.0);
}

#[test]
fn embedding_lookup() {
    // Exact: the kernel decodes the same f16 scales and codes candle does and writes
    // d·q (+ m) in f32, the same operations, so the tolerance is 0.
    let (vocab, dim, rows) = (300, 576, 3);
    let mut rng = SplitMix64::new(4);
    let table = rng.signed_f32s(vocab * dim);
    for (format, limit) in [
        (WeightFormat::Q8_0, u64::MAX),
        (WeightFormat::F32, u64::MAX),
        (WeightFormat::Q8_0, 20_000), // chunked: ~32 rows per chunk
    ] {
        let (bytes, deq) = quantize(&table, vocab, dim, format);
        let w = QuantWeight::upload(ctx(), "emb", format, vocab, dim, &bytes, limit).unwrap();
        let ids = storage_u32(ctx(), "ids", &[0, 0]);
        let out = storage_zeros(ctx(), "out", rows * dim);
        let op = kernels().embedding(&w, &ids, 1, &out, rows).unwrap();
        for id in [7u32, 299, 0, 300, 1 << 30] {
            ctx().queue.write_buffer(&ids, 4, bytemuck::bytes_of(&id));
            run(&[&op]);
            let want: Vec<f32> = (0..rows)
                .flat_map(|_| {
                    let id = id as usize;
                    if id < vocab {
                        deq[id * dim..(id + 1) * dim].to_vec()
                    } else {
                        vec![0.0; dim]
                    }
                })
                .collect();
            let what = format!("embedding {format:?} id={id} chunks={}", w.chunks.len());
            check(&what, &read(&out, rows * dim), &want, |_| 0.0);
        }
    }
}

/// RoPE of `x` (`[vectors, hd]`) at position `pos` in f64, and per value the
/// magnitude |x0| + |x1| of its pair (for the tolerance).
fn rope_ref(x: &[f32], hd: usize, inv_freq: &[f32], pos: u32, style: RopeStyle) -> [Vec<f32>; 2] {
    let (mut out, mut mag) = (x.to_vec(), vec![0f32; x.len()]);
    for v in 0..x.len() / hd {
        for (i, &freq) in inv_freq.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::HalfSplit => (v * hd + i, v * hd + i + hd / 2),
                RopeStyle::Interleaved => (v * hd + 2 * i, v * hd + 2 * i + 1),
            };
            // The angle as the kernel forms it, in f32; its sin/cos in f64.
            let (s, c) = f64::from(pos as f32 * freq).sin_cos();
            let (x0, x1) = (f64::from(x[a]), f64::from(x[b]));
            out[a] = (x0 * c - x1 * s) as f32;
            out[b] = (x0 * s + x1 * c) as f32;
            mag[a] = (x0.abs() + x1.abs()) as f32;
            mag[b] = mag[a];
        }
    }
    [out, mag]
}

/// RoPE of q and k, the cache writes and one-query attention, both RoPE styles, at
/// positions 0, 1 and 37 of one op built once (the position changes through its
/// buffer only). RoPE tolerance: Vulkan only bounds sin/cos to 2⁻¹¹ absolute on
/// [−π, π]; lavapipe and real GPUs do far better, but the bound we may rely on is
/// ~5e-4 per factor, so 1e-3·(|x0| + |x1|). Attention is checked on the rotated q and
/// keys the GPU produced: scores are 64-term f32 dots (≤ ~1e-6 relative), exp within a
/// few ulp, and the output a convex combination of v (|v| ≤ 1): 2e-5 absolute.
#[test]
fn rope_and_attention_gqa_over_positions() {
    attention_over_positions(None);
}

/// [`rope_and_attention_gqa_over_positions`] with a sliding window of 5: the query at p
/// sees keys p − 5 < t ≤ p only (checked before, at and well past the window's
/// length), the cache still filled at every position.
#[test]
fn sliding_window_attention_over_positions() {
    attention_over_positions(Some(5));
}

fn attention_over_positions(window: Option<usize>) {
    let (rows, heads, kvh, hd, cap) = (2, 9, 3, 64, 40);
    let nq = rows * heads * hd;
    let nkv = rows * kvh * hd;
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32))
        .collect();
    let mut rng = SplitMix64::new(5);
    for rope in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
        let shape = AttentionShape {
            rows,
            heads,
            kv_heads: kvh,
            head_dim: hd,
            capacity: cap,
            rope,
            window,
            positions: 1,
        };
        // Each row's q, k and v side by side, as the stacked q/k/v matvec stores them.
        let row_len = (heads + 2 * kvh) * hd;
        let qkv = storage_zeros(ctx(), "qkv", rows * row_len);
        let kc = storage_zeros(ctx(), "k_cache", rows * kvh * cap * hd);
        let vc = storage_zeros(ctx(), "v_cache", rows * kvh * cap * hd);
        let pos = storage_u32(ctx(), "pos", &[0, 0, 0]);
        let fb = storage_f32(ctx(), "inv_freq", &inv_freq);
        let out = storage_zeros(ctx(), "out", nq);
        let bufs = AttentionBuffers {
            qkv: &qkv,
            k_cache: &kc,
            v_cache: &vc,
            pos: &pos,
            inv_freq: &fb,
            out: &out,
            o_lora: None,
        };
        let op = kernels().attention(shape, &bufs, 2).unwrap();
        // Host copies of the caches, [rows][kv_heads][t][hd]: keys rotated in f64 (with
        // their pair magnitudes), values as written.
        let mut keys = vec![0f32; rows * kvh * cap * hd];
        let (mut key_mag, mut vals) = (keys.clone(), keys.clone());
        for p in 0..=37usize {
            // Larger q so the softmax is peaked, not uniform.
            let qv: Vec<f32> = rng.signed_f32s(nq).iter().map(|v| v * 4.0).collect();
            let kv = rng.signed_f32s(nkv);
            let vv = rng.signed_f32s(nkv);
            let packed: Vec<f32> = (0..rows)
                .flat_map(|r| {
                    let (q, k) = (
                        &qv[r * heads * hd..][..heads * hd],
                        &kv[r * kvh * hd..][..kvh * hd],
                    );
                    q.iter()
                        .chain(k)
                        .chain(&vv[r * kvh * hd..][..kvh * hd])
                        .copied()
                })
                .collect();
            ctx()
                .queue
                .write_buffer(&qkv, 0, bytemuck::cast_slice(&packed));
            ctx()
                .queue
                .write_buffer(&pos, 8, bytemuck::bytes_of(&(p as u32)));
            run(&[&op]);
            let [k_rot, k_mag] = rope_ref(&kv, hd, &inv_freq, p as u32, rope);
            for v in 0..rows * kvh {
                let (at, from) = ((v * cap + p) * hd, v * hd);
                keys[at..at + hd].copy_from_slice(&k_rot[from..from + hd]);
                key_mag[at..at + hd].copy_from_slice(&k_mag[from..from + hd]);
                vals[at..at + hd].copy_from_slice(&vv[from..from + hd]);
            }
            if ![0, 1, 4, 5, 6, 37].contains(&p) {
                continue;
            }
            let what = format!("{rope:?} window={window:?} pos={p}");
            let qkv_now = read(&qkv, rows * row_len);
            let (q_rot, unrotated): (Vec<f32>, Vec<f32>) = (
                qkv_now
                    .chunks(row_len)
                    .flat_map(|row| row[..heads * hd].to_vec())
                    .collect(),
                qkv_now
                    .chunks(row_len)
                    .flat_map(|row| row[heads * hd..].to_vec())
                    .collect(),
            );
            // k and v stay as written there; only the cache holds k rotated.
            let kv_written: Vec<f32> = (0..rows)
                .flat_map(|r| {
                    kv[r * kvh * hd..][..kvh * hd]
                        .iter()
                        .chain(&vv[r * kvh * hd..][..kvh * hd])
                        .copied()
                })
                .collect();
            assert_eq!(unrotated, kv_written, "{what}: k/v in qkv");
            let [q_want, q_mag] = rope_ref(&qv, hd, &inv_freq, p as u32, rope);
            check(&format!("rope q {what}"), &q_rot, &q_want, |i| {
                1e-3 * q_mag[i] + 1e-7
            });
            let k_gpu = read(&kc, keys.len());
            check(&format!("rope k_cache {what}"), &k_gpu, &keys, |i| {
                1e-3 * key_mag[i] + 1e-7
            });
            check(
                &format!("v_cache {what}"),
                &read(&vc, vals.len()),
                &vals,
                |_| 0.0,
            );
            let mut want = vec![0f32; nq];
            for r in 0..rows {
                for h in 0..heads {
                    let g = h / (heads / kvh);
                    let qh = &q_rot[(r * heads + h) * hd..][..hd];
                    let base = (r * kvh + g) * cap * hd;
                    // The keys the query sees: the last `window` positions, or all.
                    let first = p + 1 - window.unwrap_or(p + 1).min(p + 1);
                    let s: Vec<f64> = (first..=p)
                        .map(|t| {
                            let k = &k_gpu[base + t * hd..][..hd];
                            qh.iter()
                                .zip(k)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let acc: f64 = (first..=p)
                            .map(|t| e[t - first] * f64::from(vals[base + t * hd + d]))
                            .sum();
                        want[(r * heads + h) * hd + d] = (acc / z) as f32;
                    }
                }
            }
            check(&format!("attention {what}"), &read(&out, nq), &want, |_| {
                2e-5
            });
        }
    }
}

/// The o projection's LoRA through the attention op: each head's part of the down half
/// (A · out over that head's columns) for the adapted rows, then a matvec adding
/// B · Σ_heads parts as it stores (both kinds). Checked in f64 against the attention
/// output the GPU produced; the base row takes no delta. Tolerances as
/// lora_down_and_matvec_epilogue's.
#[test]
fn attention_o_lora_parts_and_their_sum_in_matvec() {
    let (rows, first, heads, kvh, hd, cap, rank) = (3, 1, 4, 2, 32, 8, 4);
    let (arms, q_len, row_len) = (rows - first, heads * hd, (heads + 2 * kvh) * hd);
    let mut rng = SplitMix64::new(600);
    let qkv = storage_f32(ctx(), "qkv", &rng.signed_f32s(rows * row_len));
    let kc = storage_zeros(ctx(), "k_cache", rows * kvh * cap * hd);
    let vc = storage_zeros(ctx(), "v_cache", rows * kvh * cap * hd);
    let pos = storage_u32(ctx(), "pos", &[0, 3]);
    let fb = storage_f32(ctx(), "inv_freq", &rng.signed_f32s(hd / 2));
    let out = storage_zeros(ctx(), "out", rows * q_len);
    let a = rng.signed_f32s(arms * rank * q_len);
    let ab = storage_f32(ctx(), "lora a", &a);
    let parts = storage_zeros(ctx(), "lora parts", arms * heads * rank);
    let shape = AttentionShape {
        rows,
        heads,
        kv_heads: kvh,
        head_dim: hd,
        capacity: cap,
        rope: RopeStyle::HalfSplit,
        window: None,
        positions: 1,
    };
    let bufs = AttentionBuffers {
        qkv: &qkv,
        k_cache: &kc,
        v_cache: &vc,
        pos: &pos,
        inv_freq: &fb,
        out: &out,
        o_lora: Some(genarm::gpu::ops::LoraDown {
            a: &ab,
            t: &parts,
            first,
            arms,
            rank,
            inp: q_len,
            positions: 1,
        }),
    };
    run(&[&kernels().attention(shape, &bufs, 1).unwrap()]);
    let o = read(&out, rows * q_len);
    let got = read(&parts, arms * heads * rank);
    let (mut want, mut mag) = (vec![0f32; got.len()], vec![0f32; got.len()]);
    for arm in 0..arms {
        for h in 0..heads {
            for k in 0..rank {
                let (mut s, mut m) = (0f64, 0f64);
                for d in 0..hd {
                    let c = h * hd + d;
                    let p = f64::from(a[(arm * rank + k) * q_len + c])
                        * f64::from(o[(first + arm) * q_len + c]);
                    s += p;
                    m += p.abs();
                }
                want[(arm * heads + h) * rank + k] = s as f32;
                mag[(arm * heads + h) * rank + k] = m as f32;
            }
        }
    }
    check("attention o LoRA parts", &got, &want, |i| {
        1e-5 * mag[i] + 1e-6
    });

    let out_rows = 37;
    let (bytes, deq) = quantize(
        &rng.signed_f32s(out_rows * q_len),
        out_rows,
        q_len,
        WeightFormat::Q4_1,
    );
    let weight = QuantWeight::upload(
        ctx(),
        "w",
        WeightFormat::Q4_1,
        out_rows,
        q_len,
        &bytes,
        u64::MAX,
    )
    .unwrap();
    let b = rng.signed_f32s(arms * out_rows * rank);
    let bb = storage_f32(ctx(), "lora b", &b);
    let up = genarm::gpu::ops::LoraUp {
        b: &bb,
        t: &parts,
        first,
        batch: rows,
        rank,
        t_offset: 0,
        t_stride: heads * rank,
        parts: heads,
    };
    let lora = LoraRef {
        first,
        batch: rows,
        rank,
        b: &b,
        t: &|arm, k| {
            (0..heads)
                .map(|h| f64::from(got[(arm * heads + h) * rank + k]))
                .sum()
        },
    };
    let (want, mag) = matvec_lora_ref(&deq, &o, out_rows, q_len, rows, &lora);
    for kind in [MatVecKind::RowPerWorkgroup, MatVecKind::RowPerInvocation] {
        let y = storage_zeros(ctx(), "y", rows * out_rows);
        run(&[&kernels_with(kind)
            .matvec_lora(&weight, &out, &y, rows, &up)
            .unwrap()]);
        let what = format!("matvec_lora summing head parts {kind:?}");
        check(&what, &read(&y, rows * out_rows), &want, |i| {
            1e-5 * mag[i] + 1e-5
        });
    }
}
