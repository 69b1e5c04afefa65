//! Sluice's results at rest.
//!
//! - [`lake`]: the Parquet results lake, partitioned `model=/date=`, with a
//!   commit protocol that makes replays after a crash harmless.
//! - [`shards`]: N SQL databases (SQLite or PostgreSQL through `sqlx`),
//!   the shard strategies, idempotent batched upserts and the migrations
//!   under `sql/migrations/`.
//! - [`analytics`]: DataFusion over both, read-only, bounded, tenant-scoped
//!   (`scoped.rs`: the sealed per-tenant tables; `bounds.rs`: memory bounds),
//!   with [`vectors`]' similarity functions for exact search over embeddings.
//! - [`ann`]: approximate nearest-neighbour indexes (HNSW, one per tenant,
//!   model and version), built from the lake's commit log and persisted
//!   next to it.
//!
//! Nothing here talks to Kafka: the sinks in `sluice-pipeline` consume the
//! results topic and hand rows to [`Lake::commit`] and [`ShardSet::upsert`],
//! committing offsets only after those return.

pub mod analytics;
pub mod ann;
mod bounds;
pub mod lake;
mod scoped;
pub mod shards;
pub mod vectors;

pub use analytics::{Analytics, Answer, QueryError, QueryLimits, Scope, Sources};
pub use ann::{Filter, IndexConfig, IndexError, IndexKey, VectorIndex};
pub use lake::{Lake, LakeError, Manifest};
pub use shards::{ShardError, ShardSet, ShardStrategy};
