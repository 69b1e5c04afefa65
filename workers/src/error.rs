use std::path::{Path, PathBuf};

/// Everything that can go wrong in the inference layer.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: {message}")]
    ModelConfig { path: PathBuf, message: String },

    #[error("checksum mismatch for {path}: SHA256SUMS says {expected}, file hashes to {actual}")]
    Checksum { path: PathBuf, expected: String, actual: String },

    #[error("model `{0}` is not in the model repository")]
    UnknownModel(String),

    #[error(
        "cannot load ONNX Runtime: {0}. Set engine.ort_dylib or ORT_DYLIB_PATH to a libonnxruntime.so \
         (`make setup` puts one under ~/.cache/sluice/venv, where it is found without either)"
    )]
    Runtime(String),

    #[error("cannot load model {model}: {message}")]
    Load { model: String, message: String },

    #[error("tokenizer failed: {0}")]
    Tokenizer(String),

    #[error("inference failed: {0}")]
    Inference(String),

    /// The queue in front of the batcher is full: back off and retry.
    #[error("inference queue is full ({capacity} jobs waiting)")]
    Overloaded { capacity: usize },

    /// The engine has shut down (or its inference thread died).
    #[error("inference engine is shut down")]
    Closed,

    /// The input does not fit the model (tensor names, dtypes, shapes).
    #[error("{0}")]
    InvalidInput(String),

    /// The job's deadline passed while it waited for a batch.
    #[error("the job's deadline passed before inference started")]
    Expired,

    /// The job was cancelled while it waited for a batch.
    #[error("the job was cancelled before inference started")]
    Cancelled,
}

impl WorkerError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> WorkerError {
        WorkerError::Io { path: path.to_path_buf(), source }
    }

    /// Whether retrying the same job later can succeed (overload, shutdown),
    /// as opposed to a failure of this job's input or of the model itself.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WorkerError::Overloaded { .. } | WorkerError::Closed)
    }
}
