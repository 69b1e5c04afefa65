//! The adapters of Sluice to the outside systems its stages share: Kafka
//! ([`kafka`]: consumer, producer, admin calls, the embedded broker of
//! `sluice up`) and the results store ([`store`]: Redis, or in-process),
//! with the retry policy ([`retry`]) and the shutdown signal ([`shutdown`])
//! they are built on.
//!
//! Architecture invariant: this is the only crate of Sluice that depends on
//! `rdkafka` or `redis` (`kafka/` imports the one, `store/` the other). The
//! stages (`sluice-pipeline`) see [`kafka::Record`]s and job records, never
//! a client library's types, and the compiler holds them to it: their
//! `Cargo.toml` names neither crate.

pub mod kafka;
pub mod retry;
pub mod shutdown;
pub mod store;
