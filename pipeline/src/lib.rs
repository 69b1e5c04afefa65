//! Sluice's stages and their wiring.
//!
//! - [`kafka`], [`store`], [`retry`], [`shutdown`]: the adapters, from the
//!   `sluice-adapters` crate (the only crate that depends on `rdkafka` and
//!   `redis`), re-exported here.
//! - [`worker`]: consume jobs → inference engine → results, at-least-once.
//! - [`gateway`]: the REST API (including `POST /v1/sql`).
//! - [`sinks`]: results topic → Parquet lake and SQL shards, offsets
//!   committed only after a flush is durable.
//! - [`notifier`]: results topic → completion callbacks (signed webhooks),
//!   offsets committed only after delivery or dead-lettering.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics` of every process (the
//!   gateway among its routes, workers and sinks on their own listener).
//! - [`app`]: builds the stages for a role (`sluice up`, `worker`, `gateway`,
//!   `sink`).

pub mod app;
pub mod config;
pub mod gateway;
pub mod http;
pub mod notifier;
mod offsets;
pub mod ops;
pub mod publish;
pub mod sinks;
pub mod telemetry;
pub mod worker;

pub use sluice_adapters::{kafka, retry, shutdown, store};
