//! One loader API over GGUF and safetensors checkpoints: the model asks for tensors by
//! their HF names and gets either a quantized block tensor (kept quantized) or a dense
//! f32 tensor. A missing tensor is an error naming the file and the tensor.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// File contents: memory-mapped natively, owned bytes in the browser.
pub enum Bytes {
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    /// Maps a file read-only (natively) or reads it whole (wasm).
    pub fn open(path: &Path) -> Result<Self> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while we run is
            // outside what any loader can defend against.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            Ok(Self::Mapped(map))
        }
        #[cfg(target_arch = "wasm32")]
        {
            std::fs::read(path)
                .map(Self::Owned)
                .map_err(|e| Error::io(path, e))
        }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// A weight as stored: quantized blocks stay quantized; everything else is f32.
#[derive(Clone, Debug)]
pub enum Weight {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Weight {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Quantized(q) => q.shape().dims().to_vec(),
            Self::Dense(t) => t.dims().to_vec(),
        }
    }

    /// The weight as a dense f32 tensor (dequantising if needed).
    pub fn dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.dequantize(device)?,
            Self::Dense(t) => t.to_device(device)?,
        })
    }
}

/// Where a model's tensors come from. Names are HF names
/// (`model.layers.3.self_attn.q_proj.weight`); each source maps them to its own.
pub trait WeightSource {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    fn contains(&self, name: &str) -> bool;
    fn load(&self, name: &str, device: &Device) -> Result<Weight>;

    /// Loads a tensor and checks its shape.
    fn load_shaped(&self, name: &str, dims: &[usize], device: &Device) -> Result<Weight> {
        let w = self.load(name, device)?;
        if w.dims() != dims {
            return Err(Error::TensorShape {
                path: self.path().into(),
                name: name.into(),
                got: w.dims(),
                want: dims.to_vec(),
            });
        }
        Ok(w)
    }

    /// Loads a tensor as dense f32 and checks its shape (norms, biases).
    fn load_dense(&self, name: &str, dims: &[usize], device: &Device) -> Result<Tensor> {
        self.load_shaped(name, dims, device)?.dense(device)
    }
}

pub(crate) fn missing(path: &Path, name: &str) -> Error {
    Error::MissingTensor {
        path: PathBuf::from(path),
        name: name.into(),
    }
}
