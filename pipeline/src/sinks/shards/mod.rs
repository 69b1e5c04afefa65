//! The shard sink: results into the SQL shards, exactly once in effect
//! (upserts keyed by (`tenant`, `job_id`); a retried flush goes only to the
//! shards that failed).

mod config;
pub use config::open_shards;

use std::sync::Arc;

use sluice_schemas::results_table::ResultRow;
use sluice_sql::ShardSet;

use super::{Batch, Destination, SinkError};

/// Lands results in the SQL shards.
pub struct ShardSink {
    shards: Arc<ShardSet>,
    /// Shards that already hold the batch being retried.
    done: Vec<bool>,
}

impl ShardSink {
    pub fn new(shards: Arc<ShardSet>) -> ShardSink {
        let done = vec![false; shards.len()];
        ShardSink { shards, done }
    }
}

impl Destination for ShardSink {
    fn name(&self) -> &'static str {
        "shards"
    }

    async fn resume_point(&mut self, _topic: &str, _partition: i32) -> Result<i64, SinkError> {
        Ok(0) // Kafka's committed offset; upserts make replays harmless.
    }

    async fn flush(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let mut per_shard: Vec<Vec<&ResultRow>> = vec![Vec::new(); self.shards.len()];
        for run in batch.runs.values() {
            for row in &run.rows {
                per_shard[self.shards.route(row)].push(row);
            }
        }
        // Every shard in parallel; the flush is done when all are. A retry
        // only goes to the shards that failed.
        let shards = &self.shards;
        let writes =
            per_shard.iter().enumerate().filter(|(i, rows)| !rows.is_empty() && !self.done[*i]).map(
                |(i, rows)| async move {
                    let r = shards.upsert(i, rows).await;
                    metrics::gauge!(sluice_schemas::metrics::SHARD_UP.name, "shard" => i.to_string())
                        .set(if r.is_ok() { 1.0 } else { 0.0 });
                    (i, r)
                },
            );
        let mut first_error = None;
        for (i, r) in futures::future::join_all(writes).await {
            match r {
                Ok(_) => self.done[i] = true,
                Err(e) => {
                    if !e.is_retryable() {
                        tracing::error!(shard = i, error = %e, "shard write failed and retrying may not help");
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => {
                self.done.iter_mut().for_each(|d| *d = false);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
