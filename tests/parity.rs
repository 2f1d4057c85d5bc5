//! Parity with the libraries the checkpoints come from: every case in
//! `tests/fixtures/parity/manifest.json` (tiny random models saved by transformers,
//! PEFT adapters, llama.cpp conversions, and files genarm must refuse) is loaded on the
//! candle engine and on the WebGPU engine, and the teacher-forced log-probs are
//! compared with the float64 ones transformers/PEFT computed
//! (`tests/parity/make_fixtures.py` writes the fixtures; CI only reads them).
//!
//! The WebGPU engine may refuse a feature it does not compute yet, with an error that
//! names it "on the webgpu backend"; such a row is printed as `refused`, not failed.
//! A case marked `known_failure` in the manifest is reported loudly but does not fail
//! the test: it is a finding waiting for a fix, not a tolerance to loosen.
#![cfg(not(target_arch = "wasm32"))]

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use genarm::cpu::{CpuEngine, Precision};
use genarm::gpu::{GpuContext, GpuEngine};
use genarm::model::arm_plan::plan_arm;
use genarm::model::Checkpoint;
use genarm::Engine;
use serde::Deserialize;

/// What the WebGPU engine says when it refuses a feature it does not compute yet.
const WEBGPU_REFUSAL: &str = "on the webgpu backend";

#[derive(Deserialize)]
struct Manifest {
    versions: serde_json::Value,
    tokens: Vec<u32>,
    cases: Vec<Case>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Hf,
    Gguf,
    Lora,
    /// A full-weight ARM (its own checkpoint) beside the base.
    Arm,
    Refuse,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: Kind,
    /// The base model, relative to the case's folder.
    model: String,
    /// The ARM (a PEFT adapter folder or a full checkpoint), relative to the case's
    /// folder.
    adapter: Option<String>,
    /// Max |Δ| of any log-prob, absolute.
    tolerance: Option<f64>,
    /// For `refuse`: a substring the load error must contain.
    expect_error: Option<String>,
    /// Why genarm disagrees today; the case is reported but does not fail.
    known_failure: Option<String>,
    /// The engines `known_failure` is about ("cpu", "webgpu"); absent: all.
    known_failure_engines: Option<Vec<String>>,
    #[serde(default)]
    note: String,
}

#[derive(Deserialize)]
struct Reference {
    tokens: Vec<u32>,
    /// `[model][position][vocab]`: the base, then the ARM.
    log_probs: Vec<Vec<Vec<f64>>>,
}

#[derive(Clone, Copy, Debug)]
enum EngineKind {
    Cpu,
    Webgpu,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Cpu => "cpu",
            Self::Webgpu => "webgpu",
        })
    }
}

/// What one engine did with one case.
enum Outcome {
    /// Loaded and computed: the largest |Δ| over every model, position and token.
    Compared { max_delta: f64, within: bool },
    /// A refusal case, refused with the expected message.
    RefusedAsExpected(String),
    /// The WebGPU engine refused a feature by name (acceptable for now).
    BackendRefused(String),
    /// Anything else: a load error, a wrong refusal, a panic, a shape mismatch.
    Broken(String),
}

impl Case {
    fn known_failure_on(&self, engine: EngineKind) -> Option<&str> {
        let applies = self
            .known_failure_engines
            .as_ref()
            .is_none_or(|engines| engines.iter().any(|e| *e == engine.to_string()));
        self.known_failure.as_deref().filter(|_| applies)
    }
}

impl Outcome {
    fn passed(&self) -> bool {
        match self {
            Self::Compared { within, .. } => *within,
            Self::RefusedAsExpected(_) | Self::BackendRefused(_) => true,
            Self::Broken(_) => false,
        }
    }

    fn cell(&self) -> (String, String) {
        match self {
            Self::Compared { max_delta, within } => (
                format!("{max_delta:.2e}"),
                if *within { "ok" } else { "OVER TOLERANCE" }.into(),
            ),
            Self::RefusedAsExpected(e) => ("-".into(), format!("refused as expected: {e}")),
            Self::BackendRefused(e) => ("-".into(), format!("refused: {e}")),
            Self::Broken(e) => ("-".into(), format!("BROKEN: {e}")),
        }
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The WebGPU device, or why there is none (then the WebGPU rows are skipped).
fn gpu_context() -> Result<Arc<GpuContext>, String> {
    GpuContext::new_blocking()
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn load(
    engine: EngineKind,
    ctx: Option<&Arc<GpuContext>>,
    base: &Path,
    arms: &[PathBuf],
) -> genarm::Result<Box<dyn Engine>> {
    match engine {
        // f32 activations: the Python references compute in f32 (or f64).
        EngineKind::Cpu => Ok(Box::new(CpuEngine::load_with(
            base,
            arms,
            None,
            &Device::Cpu,
            Precision::F32,
        )?)),
        EngineKind::Webgpu => {
            let ctx = ctx.expect("WebGPU rows run only with a device");
            let plans = arms
                .iter()
                .map(|p| plan_arm(p, base, &Device::Cpu))
                .collect::<genarm::Result<Vec<_>>>()?;
            let ckpt = Checkpoint::open(base)?;
            Ok(Box::new(GpuEngine::new(
                Arc::clone(ctx),
                ckpt,
                plans,
                None,
            )?))
        }
    }
}

/// Largest |got − want| over every model, position and token; an error if the shapes
/// differ (a wrong vocabulary cut would show here).
fn max_abs_delta(got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f64>>]) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{} models, reference has {}",
            got.len(),
            want.len()
        ));
    }
    let mut max = 0.0f64;
    for (m, (g_m, w_m)) in got.iter().zip(want).enumerate() {
        if g_m.len() != w_m.len() {
            return Err(format!(
                "model {m}: {} positions, want {}",
                g_m.len(),
                w_m.len()
            ));
        }
        for (pos, (g, w)) in g_m.iter().zip(w_m).enumerate() {
            if g.len() != w.len() {
                return Err(format!(
                    "model {m} position {pos}: {} log-probs, want {}",
                    g.len(),
                    w.len()
                ));
            }
            for (&x, &y) in g.iter().zip(w) {
                let d = (x as f64 - y).abs();
                // NaN must not pass as "no difference".
                max = if d.is_nan() {
                    f64::INFINITY
                } else {
                    max.max(d)
                };
            }
        }
    }
    Ok(max)
}

fn run_case(case: &Case, engine: EngineKind, ctx: Option<&Arc<GpuContext>>) -> Outcome {
    let dir = fixtures().join(&case.name);
    let base = dir.join(&case.model);
    let arms: Vec<PathBuf> = case.adapter.iter().map(|a| dir.join(a)).collect();
    let loaded = load(engine, ctx, &base, &arms);
    if case.kind == Kind::Refuse {
        let needle = case
            .expect_error
            .as_deref()
            .expect("a refuse case names its expected error");
        return match loaded {
            Ok(_) => Outcome::Broken(format!("loaded, but should refuse with `{needle}`")),
            Err(e) => {
                // The case's own path must not be what matches the needle.
                let message = e.to_string().replace(&dir.display().to_string(), "<case>");
                if message.contains(needle) {
                    Outcome::RefusedAsExpected(message)
                } else {
                    Outcome::Broken(format!("refused without `{needle}`: {message}"))
                }
            }
        };
    }
    let mut model = match loaded {
        Ok(m) => m,
        Err(e)
            if matches!(engine, EngineKind::Webgpu) && e.to_string().contains(WEBGPU_REFUSAL) =>
        {
            return Outcome::BackendRefused(e.to_string())
        }
        Err(e) => return Outcome::Broken(format!("load failed: {e}")),
    };
    let reference: Reference = read_json(&dir.join("reference.json"));
    let got = match model.teacher_forced(&reference.tokens) {
        Ok(g) => g,
        Err(e) => return Outcome::Broken(format!("teacher_forced failed: {e}")),
    };
    let tolerance = case.tolerance.expect("a compared case has a tolerance");
    match max_abs_delta(&got, &reference.log_probs) {
        Ok(max_delta) => Outcome::Compared {
            max_delta,
            within: max_delta <= tolerance,
        },
        Err(e) => Outcome::Broken(e),
    }
}

/// `run_case`, with a panic turned into a failed row: genarm must never panic on a
/// checkpoint, and one panic must not hide the other rows.
fn run_case_guarded(case: &Case, engine: EngineKind, ctx: Option<&Arc<GpuContext>>) -> Outcome {
    catch_unwind(AssertUnwindSafe(|| run_case(case, engine, ctx))).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Outcome::Broken(format!("panicked: {msg}"))
    })
}

#[test]
fn every_fixture_matches_its_reference_on_every_engine() {
    let manifest: Manifest = read_json(&fixtures().join("manifest.json"));
    assert!(!manifest.cases.is_empty(), "the manifest lists no case");
    eprintln!("references from {}", manifest.versions);
    let ctx = match gpu_context() {
        Ok(ctx) => {
            eprintln!("webgpu adapter: {}", ctx.adapter_name());
            Some(ctx)
        }
        Err(e) => {
            eprintln!("NOTE: no WebGPU adapter ({e}); the webgpu rows are skipped");
            None
        }
    };
    let mut engines = vec![EngineKind::Cpu];
    if ctx.is_some() {
        engines.push(EngineKind::Webgpu);
    }

    let mut failures = Vec::new();
    let mut known = Vec::new();
    let mut rows = Vec::new();
    for case in &manifest.cases {
        if case.kind != Kind::Refuse {
            let reference: Reference =
                read_json(&fixtures().join(&case.name).join("reference.json"));
            assert_eq!(reference.tokens, manifest.tokens, "{}: tokens", case.name);
        }
        for &engine in &engines {
            let outcome = run_case_guarded(case, engine, ctx.as_ref());
            let (delta, verdict) = outcome.cell();
            let tol = case.tolerance.map_or("-".into(), |t| format!("{t:.0e}"));
            let label = format!("{} [{}] ({})", case.name, engine, case.note);
            match (case.known_failure_on(engine), outcome.passed()) {
                (Some(why), false) => known.push(format!("{label}: {verdict} — known: {why}")),
                (Some(_), true) => known.push(format!(
                    "{label}: now passes; remove its known_failure from the manifest"
                )),
                (None, false) => failures.push(format!(
                    "{label}: max |Δ| {delta}, tolerance {tol}: {verdict}"
                )),
                (None, true) => {}
            }
            rows.push((case.name.clone(), engine, delta, tol, verdict));
        }
    }

    eprintln!(
        "\n{:<34} {:<7} {:>9} {:>6}  verdict",
        "case", "engine", "max |Δ|", "tol"
    );
    for (name, engine, delta, tol, verdict) in &rows {
        eprintln!("{name:<34} {engine:<7} {delta:>9} {tol:>6}  {verdict}");
    }
    for k in &known {
        eprintln!("KNOWN FAILURE (reported, not failing the test): {k}");
    }
    assert!(
        failures.is_empty(),
        "{} case(s) disagree with their reference:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
