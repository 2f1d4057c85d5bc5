//! The float type a candle model computes in. The CPU engine is the reference the tests
//! check, so it keeps every dense weight and activation in f32; on a GPU a bf16/f16
//! checkpoint stays in its own type (a 7B model is 14 GB there, not 28 GB of f32), with
//! the steps whose precision matters — norms, softmax, logits — done in f32, as
//! transformers does in half precision. Block-quantised weights (Q4_0, Q4_1, Q8_0) meet
//! f32 activations under `F32`; `Auto` rounds their activations to 16-bit integers where
//! that kernel is the faster one (WebAssembly, x86 with AVX-512 VNNI; `quant::Activations`).

use candle_core::{DType, Device, Tensor};

use super::quant::Activations;
use super::row_ops;
use crate::error::Result;
use crate::model::llama;
use crate::model::weights::WeightSource;

/// How dense weights are loaded and activations kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Dense weights converted to f32, activations in f32.
    F32,
    /// Dense weights in the checkpoint's own float type (the embedding's), activations
    /// in that type. Quantized checkpoints compute in f32 either way.
    Stored,
    /// `F32`, except that block-quantised weights are multiplied by activations rounded
    /// to 16-bit integers per 32-block (`Activations::Int16`).
    Int16,
    /// On the CPU `F32`, or `Int16` where its kernel is the faster one (WebAssembly, x86
    /// with AVX-512 VNNI); `Stored` on any other device.
    #[default]
    Auto,
}

impl Precision {
    /// The activation type of a model read from `src` on `device`.
    pub fn compute_dtype(self, src: &dyn WeightSource, device: &Device) -> DType {
        let stored = || match src.stored_dtype(llama::EMBED) {
            Some(d @ (DType::BF16 | DType::F16)) => d,
            _ => DType::F32,
        };
        match self {
            Self::F32 | Self::Int16 => DType::F32,
            Self::Stored => stored(),
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto => stored(),
        }
    }

    /// What the block kernel multiplies quantised weights with.
    pub fn block_activations(self) -> Activations {
        match self {
            Self::F32 => Activations::F32,
            Self::Int16 => Activations::Int16,
            Self::Stored | Self::Auto => Activations::fastest(),
        }
    }
}

/// RMSNorm computed in f32 whatever the activation type, returned in that type
/// (`weight` is f32).
pub fn rms_norm_f32(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let dtype = x.dtype();
    let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, weight, eps)?;
    Ok(y.to_dtype(dtype)?)
}

/// Softmax over the last dimension computed in f32, returned in `x`'s type (an f32
/// tensor on the CPU by the engine's host op, `row_ops::SOFTMAX`).
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    if row_ops::on_host_f32(x) {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&row_ops::SOFTMAX)?);
    }
    let dtype = x.dtype();
    let y = candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?;
    Ok(y.to_dtype(dtype)?)
}
