//! The library's one error type. Variants carry the file, field or tensor they are
//! about, so a message read in a terminal or a browser console says where to look.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a file failed (missing, unreadable, shorter than its header says).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model or adapter file is malformed: bad magic, truncated, a header that lies.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },

    /// A required metadata key or config field is missing or has the wrong type.
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor exists but its shape is not the one the config implies.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {want:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },

    /// The model uses something this crate does not implement.
    #[error("{path}: unsupported {what}")]
    Unsupported { path: PathBuf, what: String },

    /// Base and ARM cannot be combined (vocabulary, tokenizer, shapes).
    #[error("ARM {arm}: {message}")]
    Incompatible { arm: String, message: String },

    /// A request the engine cannot serve: prompt longer than the context, empty prompt...
    #[error("{0}")]
    Request(String),

    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The GPU engine failed: no adapter, device lost, out of memory, a bad op shape.
    #[error("gpu: {0}")]
    Gpu(String),

    /// Rendering a chat template failed.
    #[error("chat template: {0}")]
    Template(String),

    /// An error from candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Field {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Self::Unsupported {
            path: path.into(),
            what: what.into(),
        }
    }
}
