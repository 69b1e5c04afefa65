//! Sluice's stages and their wiring.
//!
//! - [`kafka`]: producers, consumer groups, topic creation, the embedded
//!   broker. The only module that imports `rdkafka`.
//! - [`store`]: the results store (Redis or in-process). The only module
//!   that imports `redis`.
//! - [`worker`]: consume jobs → inference engine → results, at-least-once.
//! - [`gateway`]: the REST API (including `POST /v1/sql`).
//! - [`sinks`]: results topic → Parquet lake and SQL shards, offsets
//!   committed only after a flush is durable.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics` of every process (the
//!   gateway among its routes, workers and sinks on their own listener).
//! - [`app`]: builds the stages for a role (`sluice up`, `worker`, `gateway`,
//!   `sink`).

pub mod app;
pub mod config;
pub mod gateway;
pub mod kafka;
mod offsets;
pub mod ops;
pub mod publish;
pub mod retry;
pub mod shutdown;
pub mod sinks;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use app::{Role, Sluice, StartError};
pub use config::Config;
