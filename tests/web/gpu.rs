//! The WebGPU engine in the browser's own WebGPU (headless Chromium; SwiftShader here):
//! the matvec kernel of both kinds in every weight format against a host reference, and
//! the whole engine — every kernel in turn — against the candle engine running in the
//! same page, on the tiny model of `tests/fixtures/web`. A unit-test module of `gpu`,
//! run with the browser tests of `web` (see `tests/web/browser.rs`).

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use wasm_bindgen_test::*;

use crate::cpu::{CpuEngine, Precision};
use crate::engine::Engine;
use crate::generate::{Decoder, GenerateOptions};
use crate::gpu::buffers::{storage_f32, storage_zeros};
use crate::gpu::{GpuContext, GpuEngine, Kernels, MatVecKind, QuantWeight, WeightFormat};
use crate::guide::{Sampler, SamplingParams};
use crate::model::arm_plan::ArmPlan;
use crate::model::lora::LoraAdapter;
use crate::model::weights::Bytes;
use crate::model::Checkpoint;

const BASE: &[u8] = include_bytes!("../fixtures/web/base.gguf");
const ARM_CONFIG: &[u8] = include_bytes!("../fixtures/web/arm/adapter_config.json");
const ARM_WEIGHTS: &[u8] = include_bytes!("../fixtures/web/arm/adapter_model.safetensors");

// wgpu's browser types are not Send; the engine takes an Arc for its native callers.
#[allow(clippy::arc_with_non_send_sync)]
async fn context() -> Arc<GpuContext> {
    Arc::new(
        GpuContext::new()
            .await
            .expect("the browser offers a WebGPU adapter"),
    )
}

/// Copies `buffer` to the host without blocking.
async fn read_f32(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Vec<f32> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test readback"),
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    ctx.queue.submit([encoder.finish()]);
    let bytes = super::engine::map_read(ctx, &staging, None)
        .await
        .expect("readback");
    bytemuck::pod_collect_to_vec(&bytes)
}

/// Seeded values in [-1, 1).
fn random(seed: u64, n: usize) -> Vec<f32> {
    crate::test_rng::SplitMix64::new(seed).signed_f32s(n)
}

#[wasm_bindgen_test]
async fn matvec_of_both_kinds_in_every_format() {
    let ctx = context().await;
    let (rows, cols) = (67, 96);
    for (k, format) in [
        WeightFormat::F32,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q8_0,
    ]
    .into_iter()
    .enumerate()
    {
        let w = random(k as u64, rows * cols);
        let dtype = match format {
            WeightFormat::F32 => GgmlDType::F32,
            WeightFormat::Q4_0 => GgmlDType::Q4_0,
            WeightFormat::Q4_1 => GgmlDType::Q4_1,
            WeightFormat::Q8_0 => GgmlDType::Q8_0,
        };
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let bytes = q.data().unwrap();
        // A small chunk limit splits the weight over several bindings.
        let weight =
            QuantWeight::upload(&ctx, "w", format, rows, cols, &bytes, 2048).expect("upload");
        for m in [1, 3] {
            let x = random(100 + m as u64, m * cols);
            let xb = storage_f32(&ctx, "x", &x);
            for kind in [MatVecKind::RowPerWorkgroup, MatVecKind::RowPerInvocation] {
                let kernels = Kernels::with_matvec(Arc::clone(&ctx), kind);
                let yb = storage_zeros(&ctx, "y", m * rows);
                let op = kernels.matvec(&weight, &xb, &yb, m).unwrap();
                let mut encoder = ctx.device.create_command_encoder(&Default::default());
                op.encode(&mut encoder);
                ctx.queue.submit([encoder.finish()]);
                let got = read_f32(&ctx, &yb).await;
                for r in 0..m {
                    for i in 0..rows {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for c in 0..cols {
                            let p = f64::from(deq[i][c]) * f64::from(x[r * cols + c]);
                            want += p;
                            mag += p.abs();
                        }
                        let g = f64::from(got[r * rows + i]);
                        // As natively (tests/gpu_kernels.rs): f32 sums of 96 products.
                        assert!(
                            (g - want).abs() <= 1e-5 * mag + 1e-6,
                            "{kind:?} {format:?} m={m} row {r} out {i}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

fn checkpoint() -> Checkpoint {
    Checkpoint::from_gguf_bytes(BASE.to_vec(), Path::new("base.gguf")).expect("fixture loads")
}

fn arm_plan() -> (std::path::PathBuf, ArmPlan) {
    let adapter = LoraAdapter::from_bytes(
        Path::new("arm"),
        ARM_CONFIG,
        None,
        Bytes::Owned(ARM_WEIGHTS.to_vec()),
        &Device::Cpu,
    )
    .expect("fixture ARM loads");
    ("arm".into(), ArmPlan::SharedLora(adapter))
}

/// The WebGPU engine and its reference, the candle engine in f32 (the wasm build's
/// default integer activations would be another computation), on the fixture with its ARM.
fn both_engines(ctx: Arc<GpuContext>) -> (GpuEngine, CpuEngine) {
    let gpu = GpuEngine::new(ctx, checkpoint(), vec![arm_plan()], Some(64)).unwrap();
    let cpu = CpuEngine::from_parts_with(
        checkpoint(),
        vec![arm_plan()],
        Some(64),
        &Device::Cpu,
        Precision::F32,
    )
    .unwrap();
    (gpu, cpu)
}

#[wasm_bindgen_test]
async fn the_engine_matches_the_candle_engine_in_the_page() {
    let ctx = context().await;
    let (mut gpu, mut cpu) = both_engines(ctx);
    let tokens = [3u32, 17, 42, 0, 59, 8, 8, 23, 1, 60, 31, 5];

    // Every position's log-probs, base and ARM. WGSL lets exp, log and sqrt be a few
    // ulps off (SwiftShader uses such fast forms) where candle is correctly rounded;
    // over two layers that is ~1e-4 of a log-prob, an order below any decode error.
    let got = gpu.teacher_forced_async(&tokens).await.unwrap();
    let want = cpu.teacher_forced(&tokens).unwrap();
    let mut worst = 0f32;
    for (gm, wm) in got.iter().zip(&want) {
        for (g, w) in gm.iter().zip(wm) {
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    web_sys_log(&format!("worst |Δ log p| against candle: {worst:.2e}"));
    assert!(worst < 1e-3, "worst log-prob difference {worst}");

    // Greedy guided decoding, token by token, as the worker drives it.
    for alpha in [0.0f32, 1.5, -1.0] {
        let opts = GenerateOptions {
            max_new_tokens: 24,
            alphas: vec![alpha],
            sampling: SamplingParams {
                greedy: true,
                ..Default::default()
            },
            ignore_eos: true,
            ..Default::default()
        };
        let want = crate::generate(&mut cpu, None, &tokens[..4], &opts, &mut |_| true)
            .unwrap()
            .tokens;
        let mut decoder = Decoder::new(&mut gpu, None, &tokens[..4], opts).unwrap();
        let mut got = Vec::new();
        while let Some(event) = decoder.next_async(&mut gpu).await.unwrap() {
            got.push(event.id);
        }
        assert_eq!(got, want, "greedy tokens at alpha {alpha}");
    }

    // Seeded sampling on the device: reproducible, and only tokens the top-k keeps.
    let params = SamplingParams {
        temperature: 1.2,
        top_k: Some(5),
        seed: 9,
        ..Default::default()
    };
    cpu.reset();
    let lp = cpu.step(&tokens[..4]).unwrap();
    let scores = crate::guide::combine(&lp.base, &[&lp.arms[0]], &[0.5]);
    let kept: Vec<u32> = Sampler::new(params.clone())
        .probabilities(&scores)
        .iter()
        .map(|p| p.0)
        .collect();
    let mut draws = Vec::new();
    for _ in 0..2 {
        let mut sampler = Sampler::new(params.clone());
        let mut run = Vec::new();
        for _ in 0..40 {
            gpu.reset();
            let chosen = gpu
                .guided_step_async(&tokens[..4], &[0.5], &mut sampler)
                .await
                .unwrap();
            assert!(
                kept.contains(&chosen.id),
                "{} is outside the top 5",
                chosen.id
            );
            run.push(chosen.id);
        }
        draws.push(run);
    }
    assert_eq!(draws[0], draws[1], "same seed, same draws");
}

/// The chunked prompt prefill in the page: a prompt over two chunks and a bit (the last
/// one padded), teacher-forced and stepped, against candle at every position; then a
/// feed that ends mid-chunk continued by a step across the next chunk boundary.
#[wasm_bindgen_test]
async fn prompt_chunks_match_the_candle_engine_in_the_page() {
    let ctx = context().await;
    let (mut gpu, mut cpu) = both_engines(ctx);
    let n = gpu.chunk_positions();
    let vocab = gpu.vocab_size() as u64;
    let mut rng = crate::test_rng::SplitMix64::new(81);
    let tokens: Vec<u32> = (0..2 * n + 3)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let got = gpu.teacher_forced_async(&tokens).await.unwrap();
    let want = cpu.teacher_forced(&tokens).unwrap();
    // The tolerance of the test above: WGSL's exp, log and sqrt may be a few ulps off.
    let worst = |got: &[f32], want: &[f32]| {
        got.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let mut max = 0f32;
    for (gm, wm) in got.iter().zip(&want) {
        assert_eq!(gm.len(), tokens.len());
        for (g, w) in gm.iter().zip(wm) {
            max = max.max(worst(g, w));
        }
    }
    web_sys_log(&format!(
        "chunks of {n}: worst teacher-forced |Δ log p| against candle {max:.2e}"
    ));
    assert!(max < 1e-3, "teacher-forced log-prob difference {max}");
    let last = tokens.len() - 1;
    for len in [n, tokens.len()] {
        gpu.reset();
        let lp = gpu.step_async(&tokens[..len]).await.unwrap();
        let d = worst(&lp.base, &want[0][len - 1]).max(worst(&lp.arms[0], &want[1][len - 1]));
        assert!(d < 1e-3, "a {len}-token step differs by {d}");
    }
    gpu.reset();
    gpu.feed_async(&tokens[..3]).await.unwrap();
    let lp = gpu.step_async(&tokens[3..]).await.unwrap();
    let d = worst(&lp.base, &want[0][last]).max(worst(&lp.arms[0], &want[1][last]));
    assert!(d < 1e-3, "a feed continued by a step differs by {d}");
}

fn web_sys_log(message: &str) {
    wasm_bindgen_test::console_log!("{message}");
}
