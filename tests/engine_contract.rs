//! The engine contract, written once over `&mut dyn Engine` and run for every engine
//! (candle on the CPU, wgpu on the first Vulkan adapter — lavapipe in CI): bad input is
//! refused with a clear error before any work, and a refused call leaves the engine as
//! it was, so a rule cannot hold on one backend and not on the other.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use common::*;
use genarm::cpu::CpuEngine;
use genarm::generate::{generate, Decoder, GenerateOptions, StopReason};
use genarm::gpu::GpuContext;
use genarm::guide::{Sampler, SamplingParams};
use genarm::Engine;

const CONTEXT: usize = 16;

/// A tiny base with one LoRA ARM, written once per test binary run.
fn model_files() -> (PathBuf, Vec<PathBuf>) {
    let cfg = TinyConfig::default();
    let dir = temp_dir("engine-contract");
    let base = dir.join("base.gguf");
    TinyModel::random(&cfg, 71).write_gguf(&base, GgmlDType::F32);
    let arm = dir.join("arm");
    let lora = TinyLora::random(&cfg, 4, 8.0, &genarm::model::lora::TARGETS, 72);
    write_lora_dir(&arm, &lora, "hub/name");
    (base, vec![arm])
}

fn cpu_engine(base: &Path, arms: &[PathBuf]) -> Box<dyn Engine> {
    Box::new(CpuEngine::load(base, arms, Some(CONTEXT), &Device::Cpu).expect("CPU engine loads"))
}

fn gpu_engine(base: &Path, arms: &[PathBuf]) -> Box<dyn Engine> {
    let ctx = GpuContext::new_blocking().unwrap_or_else(|e| {
        panic!("{e}\n(no GPU here? install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1)")
    });
    Box::new(gpu_engine_on(ctx.into(), base, arms, Some(CONTEXT)))
}

fn refused<T: std::fmt::Debug>(r: genarm::Result<T>, needle: &str, what: &str) {
    let err = r.expect_err(what).to_string();
    assert!(err.contains(needle), "{what}: `{err}` lacks `{needle}`");
}

/// Every rule of the contract, then proof that the engine still works unchanged.
fn contract(engine: &mut dyn Engine) {
    let vocab = engine.vocab_size() as u32;
    assert_eq!(engine.context_len(), CONTEXT);
    let before = engine.step(&[1, 2, 3]).expect("a valid step");
    assert_eq!(engine.position(), 3);

    refused(engine.step(&[]), "no tokens", "empty feed");
    refused(
        engine.step(&[4, vocab]),
        &format!("token id {vocab}"),
        "id = vocab",
    );
    refused(
        engine.step(&[u32::MAX]),
        "outside the vocabulary",
        "id = u32::MAX",
    );
    refused(
        engine.step(&[1; CONTEXT]),
        "do not fit the context",
        "context overflow",
    );
    refused(
        engine.teacher_forced(&[1; CONTEXT + 1]),
        "do not fit the context",
        "teacher-forced overflow",
    );
    refused(
        engine.teacher_forced(&[vocab + 7]),
        "outside the vocabulary",
        "teacher-forced id",
    );
    let mut sampler = Sampler::new(SamplingParams::default());
    refused(
        engine.guided_step(&[5], &[], &mut sampler),
        "0 ARM weights given for 1 ARMs",
        "alpha count",
    );
    refused(
        engine.guided_step(&[5], &[f32::NAN], &mut sampler),
        "must be finite",
        "NaN alpha",
    );
    let mut hot = Sampler::new(SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    });
    refused(
        engine.guided_step(&[5], &[1.0], &mut hot),
        "temperature",
        "zero temperature",
    );
    let mut wide = Sampler::new(SamplingParams {
        top_p: 1.5,
        ..SamplingParams::default()
    });
    refused(
        engine.guided_step(&[5], &[1.0], &mut wide),
        "top-p",
        "top-p 1.5",
    );

    // Nothing refused moved the engine: the same prefix gives the same numbers.
    assert_eq!(engine.position(), 3, "a refused call moved the position");
    engine.reset();
    let again = engine
        .step(&[1, 2, 3])
        .expect("a valid step after refusals");
    for (a, b) in before.base.iter().zip(&again.base) {
        assert!((a - b).abs() < 1e-6, "state changed by a refused call");
    }
    let chosen = engine
        .guided_step(&[7], &[1.0], &mut sampler)
        .expect("a valid guided step");
    assert!(chosen.id < vocab);
}

/// The decoding loop with the prompt fed ahead in chunks (the page's progress and
/// Stop) picks the same tokens as with the prompt fed whole, reports its progress, and
/// counts the chunks against the context.
fn prompt_in_chunks(engine: &mut dyn Engine) {
    let prompt: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 40).collect();
    let opts = GenerateOptions {
        // More than fit: the run ends on a full context, which counts the chunks.
        max_new_tokens: CONTEXT,
        alphas: vec![0.7],
        sampling: SamplingParams {
            temperature: 0.9,
            seed: 5,
            ..SamplingParams::default()
        },
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let whole = generate(engine, None, &prompt, &opts, &mut |_| true).unwrap();
    assert_eq!(whole.stop, StopReason::ContextFull);
    assert_eq!(whole.tokens.len(), CONTEXT - prompt.len() + 1);
    for chunk in [1, 2, 5, 64] {
        let mut decoder = Decoder::new(engine, None, &prompt, opts.clone()).unwrap();
        let mut seen = vec![decoder.prompt_progress().fed];
        loop {
            let progress = decoder.prefill(engine, chunk).unwrap();
            assert_eq!(progress.total, prompt.len());
            assert_eq!(engine.position(), progress.fed, "chunk {chunk}");
            seen.push(progress.fed);
            if progress.done {
                break;
            }
        }
        assert_eq!(
            seen.last(),
            Some(&(prompt.len() - 1)),
            "chunk {chunk}: the last prompt token is left for the pick"
        );
        assert!(
            seen.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= chunk),
            "chunk {chunk}: {seen:?}"
        );
        let mut tokens = Vec::new();
        while let Some(event) = decoder.next(engine).unwrap() {
            tokens.push(event.id);
        }
        // A full context ends the run exactly where the whole-prompt run ended.
        let run = decoder.finish().unwrap();
        assert_eq!(run.stop, StopReason::ContextFull, "chunk {chunk}");
        assert_eq!(tokens, whole.tokens, "chunk {chunk}");
    }

    // Stop during the prompt: the prompt phase says done and no token follows.
    let mut decoder = Decoder::new(engine, None, &prompt, opts.clone()).unwrap();
    decoder.prefill(engine, 3).unwrap();
    decoder.cancel();
    let progress = decoder.prefill(engine, 3).unwrap();
    assert!(progress.done);
    assert_eq!(progress.fed, 3, "nothing fed after Stop");
    assert!(decoder.next(engine).unwrap().is_none());
    assert_eq!(decoder.finish().unwrap().stop, StopReason::Cancelled);

    // A one-token prompt has nothing to feed ahead.
    let mut decoder = Decoder::new(engine, None, &prompt[..1], opts).unwrap();
    let progress = decoder.prefill(engine, 4).unwrap();
    assert_eq!((progress.fed, progress.done), (0, true));
    assert!(decoder.next(engine).unwrap().is_some());
    assert_eq!(
        decoder.prompt_progress().fed,
        1,
        "after the first pick the prompt is in"
    );
}

/// A second run on the same prompt keeps what the engine holds of it (`rewind`) and
/// picks what a fresh run picks.
fn second_run_keeps_the_prompt(engine: &mut dyn Engine) {
    let prompt: Vec<u32> = (0..7).map(|i| (i * 5 + 2) % 40).collect();
    engine.reset();
    let first = engine.step(&prompt).unwrap();
    engine.step(&[9]).unwrap();
    engine.step(&[11]).unwrap();
    refused(
        engine.rewind(10),
        "cannot rewind to position 10",
        "rewind past the fed tokens",
    );
    assert_eq!(engine.position(), 9, "a refused rewind moved the position");
    engine.rewind(6).unwrap();
    assert_eq!(engine.position(), 6);
    let again = engine.step(&prompt[6..]).unwrap();
    for (a, b) in first.base.iter().zip(&again.base) {
        assert!((a - b).abs() < 1e-5, "the kept prefix changed: {a} vs {b}");
    }

    let opts = |alpha: f32| GenerateOptions {
        max_new_tokens: 5,
        alphas: vec![alpha],
        sampling: SamplingParams {
            seed: 3,
            ..SamplingParams::default()
        },
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let run = |engine: &mut dyn Engine, mut decoder: Decoder| {
        let mut tokens = Vec::new();
        while let Some(event) = decoder.next(engine).unwrap() {
            tokens.push(event.id);
        }
        tokens
    };
    let fresh = Decoder::new(engine, None, &prompt, opts(0.0)).unwrap();
    let want = run(engine, fresh);
    // The guided run, then the base alone on the prompt it left in the engine.
    let guided = Decoder::new(engine, None, &prompt, opts(1.5)).unwrap();
    run(engine, guided);
    let kept = Decoder::after_prefix(engine, None, &prompt, opts(0.0), prompt.len()).unwrap();
    assert_eq!(
        kept.prompt_progress().fed,
        prompt.len() - 1,
        "all but the last token kept"
    );
    assert_eq!(
        run(engine, kept),
        want,
        "the kept prompt picks what a fresh run picks"
    );
    // More than the engine holds is clamped to what it has fed.
    engine.reset();
    engine.step(&prompt[..2]).unwrap();
    let clamped = Decoder::after_prefix(engine, None, &prompt, opts(0.0), prompt.len()).unwrap();
    assert_eq!(clamped.prompt_progress().fed, 2);
    assert_eq!(run(engine, clamped), want);
}

#[test]
fn cpu_engine_keeps_a_prompt_for_the_next_run() {
    let (base, arms) = model_files();
    second_run_keeps_the_prompt(cpu_engine(&base, &arms).as_mut());
}

#[test]
fn gpu_engine_keeps_a_prompt_for_the_next_run() {
    let (base, arms) = model_files();
    second_run_keeps_the_prompt(gpu_engine(&base, &arms).as_mut());
}

#[test]
fn cpu_engine_feeds_a_prompt_in_chunks() {
    let (base, arms) = model_files();
    prompt_in_chunks(cpu_engine(&base, &arms).as_mut());
}

#[test]
fn gpu_engine_feeds_a_prompt_in_chunks() {
    let (base, arms) = model_files();
    prompt_in_chunks(gpu_engine(&base, &arms).as_mut());
}

#[test]
fn cpu_engine_keeps_the_contract() {
    let (base, arms) = model_files();
    contract(cpu_engine(&base, &arms).as_mut());
}

#[test]
fn gpu_engine_keeps_the_contract() {
    let (base, arms) = model_files();
    contract(gpu_engine(&base, &arms).as_mut());
}
