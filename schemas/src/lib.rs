//! Wire contracts of Sluice.
//!
//! Everything that crosses a process boundary is defined here and nowhere
//! else: the job a producer puts on Kafka ([`JobRequest`] v1), the record a
//! worker writes back ([`JobResult`] with its [`JobStatus`]), the completion
//! [`callback`] a job may ask for and how its deliveries are signed, a
//! job's place in a [`batch`], the stable error
//! [`ErrorCode`]s, the Kafka header names, the topic naming scheme, and the
//! layout of finished jobs at rest ([`results_table`]: Arrow and SQL).
//!
//! The JSON Schema files under `schemas/json/` describe the same contracts for
//! clients in other languages; `tests/contracts.rs` checks every example under
//! `schemas/examples/` against both the schema and these types, so the two
//! cannot drift apart.
//!
//! This crate depends on nothing else of Sluice's.

pub mod batch;
pub mod callback;
mod error_code;
pub mod headers;
pub mod metrics;
mod request;
mod result;
pub mod results_table;
pub mod topics;

pub use batch::{BatchCompleted, BatchLine};
pub use callback::{Callback, CallbackEvent};
pub use error_code::ErrorCode;
pub use request::{
    DType, DecodeError, Input, JobRequest, Priority, SEARCH_QUERY_MARK, Tensor, limits, valid_job_id, valid_tenant,
};
pub use result::{JobError, JobResult, JobStatus, Output, Timings};
