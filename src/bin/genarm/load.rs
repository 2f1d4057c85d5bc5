//! Opening the engine a command asks for, and what commands share around it.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use genarm::cpu::CpuEngine;
use genarm::gpu::GpuEngine;
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
}

/// Loads base and ARMs, with a spinner on stderr when it is a terminal.
pub fn load_engine(models: &ModelArgs, arms: &[ArmSpec]) -> Result<Loaded> {
    let dev = device(models.backend)?;
    let spinner = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("loading {}", models.model.display()));
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        pb
    });
    let paths: Vec<PathBuf> = arms.iter().map(|a| a.path.clone()).collect();
    let context = Some(models.context);
    let loaded = if models.backend == Backend::Webgpu {
        GpuEngine::load(&models.model, &paths, context).map(|e| Loaded {
            weight_bytes: Some(e.weight_bytes_per_token()),
            dispatches: Some(e.dispatches_per_token()),
            engine: Box::new(e),
        })
    } else {
        CpuEngine::load(&models.model, &paths, context, &dev).map(|e| Loaded {
            weight_bytes: None,
            dispatches: None,
            engine: Box::new(e),
        })
    };
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    Ok(loaded?)
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
