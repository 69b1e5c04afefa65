//! Sluice inference: the model repository, ONNX Runtime sessions on
//! dedicated OS threads, and the batcher in front of them.
//!
//! Public API: [`ModelRepository`] finds and verifies model versions,
//! [`InferenceHandle::start`] loads one and returns the cloneable handle
//! that everything else uses to run jobs. Nothing here knows Kafka, Redis or
//! HTTP: the pipeline crate wires those to this API.

mod embed;
mod engine;
mod error;
mod model;

pub use embed::{ExecutionProvider, SessionConfig};
pub use engine::{Embedded, EngineConfig, InferenceHandle, Ticket};
pub use error::WorkerError;
pub use model::{EmbeddingSpec, ModelRepository, ModelSpec, ModelVersion, Pooling, Task, TokenizerSpec};
