//! Sluice inference: the model repository, ONNX Runtime sessions on
//! dedicated OS threads, and the batcher in front of them.
//!
//! Public API: [`ModelRepository`] finds and verifies model versions;
//! [`ModelPool`] serves every version of a set of models, routes jobs
//! between them and reloads them without a restart; an [`InferenceHandle`]
//! runs jobs on one version. Nothing here knows Kafka, Redis or HTTP: the
//! pipeline crate wires those to this API.

mod backend;
mod breaker;
mod engine;
mod error;
mod model;
mod pool;
mod raw;
mod runtime;
mod scheduler;

pub use backend::{InputSpec, Prepared};
pub use breaker::{BreakerConfig, BreakerState};
pub use engine::{EngineConfig, EngineJob, InferenceHandle, Inferred, Ticket};
pub use error::WorkerError;
pub use model::{
    BatchingSpec, Canary, EmbeddingSpec, ModelCatalog, ModelListing, ModelRepository, ModelSpec, ModelVersion, Pooling,
    Routing, Task, TensorSpec, TokenizerSpec,
};
pub use pool::{ModelPool, ReloadReport};
pub use raw::RawSession;
pub use runtime::{ExecutionProvider, ProviderFallback, SessionConfig};
pub use scheduler::Limits;
