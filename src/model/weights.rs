//! One loader API over GGUF and safetensors checkpoints: the model asks for tensors by
//! their HF names and gets either a quantized block tensor (kept quantized) or a dense
//! tensor, f32 unless the caller asks for another float type (`load_as`). A missing
//! tensor is an error naming the file and the tensor.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

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
            let file = open_regular_file(path)?;
            // SAFETY: the mapping is read-only; a checkpoint modified while we run is
            // outside what any loader can defend against.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            Ok(Self::Mapped(map))
        }
        #[cfg(target_arch = "wasm32")]
        {
            read_regular_file(path, u64::MAX).map(Self::Owned)
        }
    }

    /// Lets the system take back the pages of `range` once its contents have been
    /// copied out: a mapped file's pages leave this process's resident memory (they stay
    /// in the page cache and come back on the next read), so a loaded model is not held
    /// twice, as mapped file and as the engine's weights. Owned bytes are kept.
    pub fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Self::Mapped(map) = self {
            // SAFETY: the mapping is read-only and file-backed: dropped pages are read
            // back from the file on the next access, never lost. A failure only keeps
            // the pages resident.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// Opens `path` for reading only if it is a regular file (after following links).
/// Opening a FIFO blocks until a writer appears and a device may never end, so a
/// model directory whose `tokenizer.json` or shard is one must fail, not hang. Every
/// reader of model, adapter and tokenizer files goes through here.
pub fn open_regular_file(path: &Path) -> Result<std::fs::File> {
    let not_regular = || {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // The path may have been swapped between the two calls.
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => Ok(file),
        Ok(_) => Err(not_regular()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Reads a whole regular file (see `open_regular_file`) of at most `max_len` bytes:
/// JSON side files are read into memory, and a size is checked before it is allocated.
pub fn read_regular_file(path: &Path, max_len: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular_file(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max_len {
        return Err(Error::format(
            path,
            format!("{len} bytes, more than the {max_len} this file may have"),
        ));
    }
    let mut bytes = Vec::new();
    // `take` bounds the read even if the file grows after the size check.
    file.take(max_len)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The size cap for JSON side files (configs, tokenizers, indexes): the largest real
/// `tokenizer.json` files are tens of MiB.
pub const MAX_JSON_FILE_LEN: u64 = 1 << 30;

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

/// A weight as stored: quantized blocks stay quantized; everything else is a dense float
/// tensor (f32 unless loaded with `load_as`).
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
    /// The float type a dense tensor is stored in, where the source keeps it (a
    /// safetensors bf16/f16 checkpoint); `None` when it is quantized, absent, or the
    /// source only offers f32.
    fn stored_dtype(&self, _name: &str) -> Option<DType> {
        None
    }
    /// Like `load`, with a dense tensor in `dtype` on `device` (quantized blocks stay
    /// quantized). Sources that store half floats override this so that a bf16 weight
    /// reaches the device as bf16, never as f32 on the way.
    fn load_as(&self, name: &str, dtype: DType, device: &Device) -> Result<Weight> {
        Ok(match self.load(name, device)? {
            Weight::Dense(t) => Weight::Dense(t.to_dtype(dtype)?),
            q => q,
        })
    }
    /// How many distinct decoder layers (`model.layers.N.*`) the source has tensors for.
    fn layer_count(&self) -> usize;

    /// The config's layer count must be one the file backs: the loader sizes
    /// per-layer state from it before it reaches a missing tensor, so a corrupt count
    /// (2^40) would otherwise abort on allocation instead of failing cleanly.
    fn check_layer_count(&self, num_layers: usize) -> Result<()> {
        let present = self.layer_count();
        if num_layers > present {
            return Err(Error::format(
                self.path(),
                format!(
                    "the config declares {num_layers} layers but the weights have tensors for {present}"
                ),
            ));
        }
        Ok(())
    }

    /// Loads a tensor and checks its shape.
    fn load_shaped(&self, name: &str, dims: &[usize], device: &Device) -> Result<Weight> {
        self.load_shaped_as(name, dims, DType::F32, device)
    }

    /// `load_shaped` with a dense tensor in `dtype` (see `load_as`).
    fn load_shaped_as(
        &self,
        name: &str,
        dims: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Weight> {
        let w = self.load_as(name, dtype, device)?;
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

/// The number of distinct `N` in names `{prefix}N.…`.
pub(crate) fn count_layers<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> usize {
    names
        .filter_map(|n| {
            n.strip_prefix(prefix)?
                .split_once('.')?
                .0
                .parse::<u64>()
                .ok()
        })
        .collect::<std::collections::BTreeSet<u64>>()
        .len()
}

pub(crate) fn missing(path: &Path, name: &str) -> Error {
    Error::MissingTensor {
        path: PathBuf::from(path),
        name: name.into(),
    }
}
