//! Shared fixtures for the integration tests, by concern:
//! - `fixtures`: tiny random Llama-family models and LoRA adapters (f64, HF layout), the
//!   demo model, small training inputs;
//! - `writers`: the on-disk formats the engine loads (HF safetensors dirs, GGUF, PEFT
//!   LoRA adapters);
//! - `reference`: a plain f64 reference forward pass to judge the engine against;
//! - `assertions`: comparisons whose failures say where and by how much;
//! - `rng`: the one seeded PRNG every fixture and test draws from.
//!
//! Besides genarm itself, only std, candle-core, safetensors, serde_json and half are
//! used, since those are what the main crate already depends on. Errors panic: this is
//! test code.
#![allow(dead_code)]

pub mod assertions;
pub mod fixtures;
pub mod reference;
pub mod rng;
pub mod writers;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

// Flat, as the tests name them (`common::TinyModel`); each test binary uses only part.
#[allow(unused_imports)]
pub use {assertions::*, fixtures::*, reference::*, rng::*, writers::*};

/// A fresh, empty directory under the system temp dir, unique per process and call.
pub fn temp_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("genarm-test-{}-{n}-{name}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("clear stale temp dir");
    }
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

// ---------------------------------------------------------------------------
// The genarm binary
// ---------------------------------------------------------------------------

pub fn genarm(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_genarm"))
        .args(args)
        .output()
        .expect("genarm runs")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "genarm failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON object")
}
