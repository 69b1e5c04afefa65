//! The `results` table: how a finished [`JobResult`] is laid out at rest.
//!
//! One definition for both sinks and for analytics. The lake stores
//! [`lake_schema`] in Parquet under `model=<m>/date=<YYYY-MM-DD>/` (so
//! [`PARTITION_COLUMNS`] are directory names, not file columns); the SQL
//! shards store the [`SHARD_COLUMNS`] subset (no outputs: the shards are the
//! operational index, the lake keeps the vectors), with timestamps as epoch
//! milliseconds because SQLite has no timestamp type. The lake also keeps
//! each job's `metadata` (the caller's document id, source, …: what a search
//! result needs next to the vector); lake files written before that column
//! existed read it as NULL. The migrations under
//! `sql/migrations/` create exactly these columns; a test in `sluice-sql`
//! checks that they agree.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
use chrono::{DateTime, Utc};

use crate::{JobResult, Output};

/// Directory partitions of the lake, outermost first, both strings.
pub const PARTITION_COLUMNS: [&str; 2] = ["model", "date"];

/// Columns of a shard's `results` table, in order. (`tenant`, `job_id`) is
/// the primary key (job ids are per tenant); `*_ms` timestamps are milliseconds since the Unix epoch.
pub const SHARD_COLUMNS: [&str; 15] = [
    "job_id",
    "tenant",
    "model",
    "model_version",
    "status",
    "error_code",
    "error_message",
    "queued_ms",
    "inference_ms",
    "batch_size",
    "input_tokens",
    "worker_id",
    "submitted_at_ms",
    "finished_at_ms",
    "kafka_offset",
];

fn utc_millis() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// `metadata`'s type: a map of strings, laid out as Arrow's map builder
/// writes it (`entries` of `keys` and `values`).
pub fn metadata_type() -> DataType {
    let entries =
        Fields::from(vec![Field::new("keys", DataType::Utf8, false), Field::new("values", DataType::Utf8, true)]);
    DataType::Map(Arc::new(Field::new("entries", DataType::Struct(entries), false)), false)
}

/// The Arrow schema of the lake's Parquet files (partition columns excluded).
pub fn lake_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("job_id", DataType::Utf8, false),
        Field::new("tenant", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, false),
        Field::new("error_code", DataType::Utf8, true),
        Field::new("error_message", DataType::Utf8, true),
        Field::new("queued_ms", DataType::Int64, true),
        Field::new("inference_ms", DataType::Int64, true),
        Field::new("batch_size", DataType::Int64, true),
        Field::new("input_tokens", DataType::Int64, true),
        Field::new("worker_id", DataType::Utf8, true),
        Field::new("submitted_at", utc_millis(), true),
        Field::new("finished_at", utc_millis(), true),
        Field::new("embedding", DataType::List(Arc::new(Field::new("item", DataType::Float32, false))), true),
        // Outputs that are not an embedding (generic tensor models), as JSON.
        Field::new("output_json", DataType::Utf8, true),
        // The request's metadata, a string map: `metadata['doc_id']` in SQL.
        Field::new("metadata", metadata_type(), true),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]))
}

/// The Arrow schema of a shard's `results` table, column for column
/// [`SHARD_COLUMNS`] (text → Utf8, integers → Int64).
pub fn shard_schema() -> Arc<Schema> {
    let text = ["job_id", "tenant", "model", "model_version", "status", "error_code", "error_message", "worker_id"];
    let required = ["job_id", "tenant", "model", "status", "finished_at_ms", "kafka_offset"];
    Arc::new(Schema::new(
        SHARD_COLUMNS
            .iter()
            .map(|c| {
                let ty = if text.contains(c) { DataType::Utf8 } else { DataType::Int64 };
                Field::new(*c, ty, !required.contains(c))
            })
            .collect::<Vec<_>>(),
    ))
}

/// A finished job, flattened: one row of the `results` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub job_id: String,
    pub tenant: String,
    pub model: String,
    pub model_version: Option<String>,
    pub status: &'static str,
    pub error_code: Option<&'static str>,
    pub error_message: Option<String>,
    pub queued_ms: Option<i64>,
    pub inference_ms: Option<i64>,
    pub batch_size: Option<i64>,
    pub input_tokens: Option<i64>,
    pub worker_id: Option<String>,
    pub submitted_at: Option<DateTime<Utc>>,
    /// When the job finished; the record's Kafka timestamp when absent.
    pub finished_at: DateTime<Utc>,
    pub embedding: Option<Vec<f32>>,
    pub output_json: Option<String>,
    /// The request's metadata.
    pub metadata: BTreeMap<String, String>,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

impl ResultRow {
    /// Flattens `r`, read from `partition`/`offset` of the results topic
    /// whose record carried `record_time`.
    pub fn new(r: JobResult, partition: i32, offset: i64, record_time: DateTime<Utc>) -> ResultRow {
        let (embedding, output_json) = match r.output {
            Some(Output::Embedding(v)) => (Some(v), None),
            Some(Output::Tensors(t)) => (None, serde_json::to_string(&t).ok()),
            None => (None, None),
        };
        let t = r.timings;
        ResultRow {
            job_id: r.job_id,
            tenant: r.tenant,
            model: r.model,
            model_version: r.model_version,
            status: r.status.as_str(),
            error_code: r.error.as_ref().map(|e| e.code.as_str()),
            error_message: r.error.map(|e| e.message),
            queued_ms: t.map(|t| t.queued_ms as i64),
            inference_ms: t.map(|t| t.inference_ms as i64),
            batch_size: t.map(|t| i64::from(t.batch_size)),
            input_tokens: t.map(|t| i64::from(t.input_tokens)),
            worker_id: r.worker_id,
            submitted_at: r.submitted_at,
            finished_at: r.finished_at.unwrap_or(record_time),
            embedding,
            output_json,
            metadata: r.metadata,
            kafka_partition: partition,
            kafka_offset: offset,
        }
    }

    /// The lake's `date=` partition: the UTC day the job finished.
    pub fn date(&self) -> String {
        self.finished_at.format("%Y-%m-%d").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_columns_are_the_lake_columns_plus_model_minus_outputs() {
        let lake = lake_schema();
        for c in SHARD_COLUMNS {
            let lake_name = c.strip_suffix("_at_ms").map(|s| format!("{s}_at")).unwrap_or(c.to_owned());
            assert!(
                c == "model" || lake.field_with_name(&lake_name).is_ok(),
                "shard column {c} has no lake counterpart"
            );
        }
        for p in PARTITION_COLUMNS {
            assert!(lake.field_with_name(p).is_err(), "{p} is a directory, not a file column");
        }
    }
}
