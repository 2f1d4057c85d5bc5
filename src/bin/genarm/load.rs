//! Opening the engine a command asks for, and what commands share around it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use genarm::cpu::CpuEngine;
use genarm::gpu::{GpuContext, GpuEngine, PromptDispatches};
use genarm::model::arm_plan::{plan_arm, plan_policy, ArmPlan};
use genarm::model::Checkpoint;
use genarm::{ArmSpec, Engine};

use crate::args::{Backend, ModelArgs};

pub fn device(backend: Backend) -> Result<Device> {
    match backend {
        Backend::Cpu | Backend::Webgpu => Ok(Device::Cpu),
        Backend::Cuda => genarm::cpu::cuda_device::open(0)
            .context("cannot open CUDA device 0 (is this binary built with `--features cuda`?)"),
    }
}

/// An engine of either kind, with the speed facts only the WebGPU engine reports.
pub struct Loaded {
    pub engine: Box<dyn Engine>,
    /// Bytes of weights one token reads.
    pub weight_bytes: Option<u64>,
    /// Compute dispatches per token.
    pub dispatches: Option<usize>,
    /// Compute dispatches from a prompt to its first new token.
    pub prompt_dispatches: Option<PromptDispatches>,
}

/// Loads base (with `--lora` when given) and ARMs, with a spinner on stderr when it is a
/// terminal.
pub fn load_engine(models: &ModelArgs, arms: &[ArmSpec]) -> Result<Loaded> {
    load_engine_with(models, models.lora.as_deref(), arms)
}

/// [`load_engine`] with `lora` as the policy instead of `--lora`'s.
pub fn load_engine_with(
    models: &ModelArgs,
    lora: Option<&Path>,
    arms: &[ArmSpec],
) -> Result<Loaded> {
    let dev = device(models.backend)?;
    let spinner = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("loading {}", models.model.display()));
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        pb
    });
    let context = Some(models.context);
    let loaded = plans(&models.model, lora, arms, &dev).and_then(|(base, plans)| {
        if models.backend == Backend::Webgpu {
            let ctx = std::sync::Arc::new(GpuContext::new_blocking()?);
            GpuEngine::new(ctx, base, plans, context).map(|e| Loaded {
                weight_bytes: Some(e.weight_bytes_per_token()),
                dispatches: Some(e.dispatches_per_token()),
                prompt_dispatches: Some(e.prompt_dispatches()),
                engine: Box::new(e),
            })
        } else {
            CpuEngine::from_parts_with(base, plans, context, &dev, models.precision.into()).map(
                |e| Loaded {
                    weight_bytes: None,
                    dispatches: None,
                    prompt_dispatches: None,
                    engine: Box::new(e),
                },
            )
        }
    });
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    Ok(loaded?)
}

/// The base and what to load with it: the `--lora` policy (first), then the ARMs.
fn plans(
    model: &Path,
    lora: Option<&Path>,
    arms: &[ArmSpec],
    dev: &Device,
) -> genarm::Result<(Checkpoint, Vec<(PathBuf, ArmPlan)>)> {
    let base = Checkpoint::open(model)?;
    let policy = lora.map(|dir| plan_policy(dir, model, dev));
    let arms = arms.iter().map(|a| plan_arm(&a.path, model, dev));
    Ok((
        base,
        policy
            .into_iter()
            .chain(arms)
            .collect::<genarm::Result<_>>()?,
    ))
}

/// A progress bar on stderr with an ETA, or `None` when stderr is not a terminal (logs
/// and pipes get plain lines instead). `unit` follows the counts, e.g. "steps {msg}".
pub fn progress_bar(total: u64, unit: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new(total);
        let template =
            format!("{{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed_precise}} < {{eta_precise}}]");
        if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
            pb.set_style(style);
        }
        pb
    })
}
