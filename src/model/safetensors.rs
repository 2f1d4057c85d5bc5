//! Safetensors checkpoints: one file, or shards listed by `model.safetensors.index.json`.
//! Each header is validated against its file at open (offsets inside the buffer, sizes
//! matching dtype × shape), so a header that lies fails early with the file named.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::weights::{
    count_layers, missing, read_regular_file, Bytes, Weight, WeightSource, MAX_JSON_FILE_LEN,
};
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
        if single.exists() {
            let bytes = Bytes::open(&single)?;
            Self::from_shards(path, vec![(single, bytes)])
        } else if index.exists() {
            let text = read_regular_file(&index, MAX_JSON_FILE_LEN)?;
            let files = shard_names(&text, &index)?;
            let shards = files
                .into_iter()
                .map(|f| {
                    let p = shard_path(path, &f, &index)?;
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
            let (data_start, metadata) = read_header(&bytes, &file)?;
            for name in metadata.tensors().keys() {
                if let Some(other) = index.insert(name.clone(), i) {
                    return Err(Error::format(
                        &file,
                        format!(
                            "tensor `{name}` is also in {}",
                            shards_path(&shards, other).display()
                        ),
                    ));
                }
            }
            shards.push(Shard {
                path: file,
                bytes,
                data_start,
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

fn shards_path(shards: &[Shard], i: usize) -> &Path {
    &shards[i].path
}

/// The safetensors header of `bytes`: where the data starts and the tensor table.
/// The `safetensors` crate checks the JSON and that offsets tile the data exactly;
/// the length prefix and every tensor's range are checked here too, with checked
/// arithmetic, so no later slice can fall outside the file.
fn read_header(bytes: &[u8], file: &Path) -> Result<(usize, Metadata)> {
    let invalid = |message: String| Error::format(file, format!("invalid safetensors: {message}"));
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| invalid(format!("{} bytes, too short for a header", bytes.len())))?;
    let header_len = u64::from_le_bytes(prefix);
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            invalid(format!(
                "header length {header_len} runs past the end of the {}-byte file",
                bytes.len()
            ))
        })?;
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| invalid(e.to_string()))?;
    let data_len = bytes.len() - data_start;
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        let elems = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let size = elems
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|b| b / 8);
        if start > end || end > data_len || size != Some(end - start) {
            return Err(invalid(format!(
                "tensor `{name}` ({:?}, shape {:?}) claims bytes {start}..{end} of {data_len}",
                info.dtype, info.shape
            )));
        }
    }
    Ok((data_start, metadata))
}

/// A shard named by the index, which must be a plain file name in the model folder
/// (not `../x`, not absolute) and, after links are followed, still inside it.
fn shard_path(dir: &Path, name: &str, index: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let outside = |why: &str| {
        Error::field(
            index,
            "weight_map",
            format!("shard `{name}` {why}; shards must be files inside the model folder"),
        )
    };
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) => {}
        _ => return Err(outside("is not a plain file name")),
    }
    let path = dir.join(name);
    let real_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let real = path.canonicalize().map_err(|e| Error::io(&path, e))?;
    if !real.starts_with(&real_dir) {
        return Err(outside("links outside the folder"));
    }
    Ok(path)
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

    fn layer_count(&self) -> usize {
        count_layers(self.names(), "model.layers.")
    }

    fn load(&self, name: &str, device: &Device) -> Result<Weight> {
        self.load_as(name, DType::F32, device)
    }

    fn stored_dtype(&self, name: &str) -> Option<DType> {
        let shard = &self.shards[*self.index.get(name)?];
        candle_dtype(shard.metadata.info(name)?.dtype)
    }

    /// Converts on the host, one tensor at a time, then copies to `device`: a bf16
    /// weight asked for as bf16 is copied as is.
    fn load_as(&self, name: &str, dtype: DType, device: &Device) -> Result<Weight> {
        let shard = &self.shards[*self
            .index
            .get(name)
            .ok_or_else(|| missing(&self.path, name))?];
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| missing(&shard.path, name))?;
        let stored = candle_dtype(info.dtype).ok_or_else(|| {
            Error::unsupported(
                &shard.path,
                format!("dtype {:?} of tensor `{name}`", info.dtype),
            )
        })?;
        let (start, end) = info.data_offsets;
        // `read_header` checked the range; `get` keeps a bad one an error regardless.
        let data = shard
            .bytes
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| Error::format(&shard.path, format!("tensor `{name}` out of bounds")))?;
        let t = Tensor::from_raw_buffer(data, stored, &info.shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        Ok(Weight::Dense(t))
    }
}
