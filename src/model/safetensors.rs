//! Safetensors checkpoints: one file, or shards listed by `model.safetensors.index.json`.
//! Each header is validated against its file at open (offsets inside the buffer, sizes
//! matching dtype × shape), so a header that lies fails early with the file named.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::weights::{missing, Bytes, Weight, WeightSource};
use crate::error::{Error, Result};

struct Shard {
    path: PathBuf,
    bytes: Bytes,
    /// Where tensor data starts: 8 bytes of header length, then the JSON header.
    data_start: usize,
    metadata: Metadata,
}

pub struct SafetensorsFiles {
    /// The directory (or single file) for messages.
    path: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
}

impl SafetensorsFiles {
    /// Opens `model.safetensors`, the shards of `model.safetensors.index.json`, or the
    /// given file when `path` is a file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Self::from_shards(path, vec![(path.to_path_buf(), Bytes::open(path)?)]);
        }
        let single = path.join("model.safetensors");
        let index = path.join("model.safetensors.index.json");
        if single.is_file() {
            let bytes = Bytes::open(&single)?;
            Self::from_shards(path, vec![(single, bytes)])
        } else if index.is_file() {
            let text = std::fs::read(&index).map_err(|e| Error::io(&index, e))?;
            let files = shard_names(&text, &index)?;
            let shards = files
                .into_iter()
                .map(|f| {
                    let p = path.join(f);
                    Bytes::open(&p).map(|b| (p, b))
                })
                .collect::<Result<Vec<_>>>()?;
            Self::from_shards(path, shards)
        } else {
            Err(Error::format(
                path,
                "no model.safetensors or model.safetensors.index.json",
            ))
        }
    }

    /// Builds from files already in memory (`path` names them in errors).
    pub fn from_shards(path: &Path, files: Vec<(PathBuf, Bytes)>) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, (file, bytes)) in files.into_iter().enumerate() {
            let (header_len, metadata) = SafeTensors::read_metadata(&bytes)
                .map_err(|e| Error::format(&file, format!("invalid safetensors: {e}")))?;
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
            shards.push(Shard {
                path: file,
                bytes,
                data_start: 8 + header_len,
                metadata,
            });
        }
        Ok(Self {
            path: path.into(),
            shards,
            index,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

/// The distinct shard file names of an index, in a stable order.
fn shard_names(json: &[u8], path: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let index: Index = serde_json::from_slice(json)
        .map_err(|e| Error::format(path, format!("invalid index: {e}")))?;
    let mut files: Vec<String> = index.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn candle_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

impl WeightSource for SafetensorsFiles {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&self, name: &str, device: &Device) -> Result<Weight> {
        let shard = &self.shards[*self
            .index
            .get(name)
            .ok_or_else(|| missing(&self.path, name))?];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| missing(&shard.path, name))?;
        let dtype = candle_dtype(info.dtype).ok_or_else(|| {
            Error::unsupported(
                &shard.path,
                format!("dtype {:?} of tensor `{name}`", info.dtype),
            )
        })?;
        let (start, end) = info.data_offsets;
        let data = &shard.bytes[shard.data_start + start..shard.data_start + end];
        let t = Tensor::from_raw_buffer(data, dtype, &info.shape, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(device)?;
        Ok(Weight::Dense(t))
    }
}
