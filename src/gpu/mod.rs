//! The WebGPU engine (wgpu): device acquisition, WGSL kernels and the ops that encode them.
//!
//! Ops are built once at load (pipeline, bind group, uniform buffer) and then only
//! encoded into a caller-provided `CommandEncoder`, so one token is one submit.

pub mod buffers;
pub mod device;
pub mod engine;
pub mod model;
pub mod ops;
pub mod uniforms;

pub use buffers::{QuantWeight, WeightFormat};
pub use device::GpuContext;
pub use engine::{GpuEngine, PromptDispatches};
pub use ops::{Kernels, MatVecEpilogue, MatVecKind, MatVecStore};

/// A failure of the GPU engine (no adapter, device lost, out of memory, a bad shape).
pub(crate) fn gpu_error(message: impl std::fmt::Display) -> crate::error::Error {
    crate::error::Error::Gpu(message.to_string())
}

#[cfg(all(test, target_arch = "wasm32"))]
#[path = "../../tests/web/gpu.rs"]
mod browser_tests;
