//! The lake sink: results into the Parquet lake, exactly once in effect
//! (the lake's manifests are its commit log; a result published again is
//! checked against what the lake holds).

mod config;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use sluice_schemas::results_table::ResultRow;
use sluice_sql::{Lake, LakeError};

use super::{Batch, Destination, SinkError};

/// Lands results in the Parquet lake.
pub struct LakeSink {
    pub lake: Lake,
    /// Appended to the topic name in the lake's commit log. The embedded
    /// broker starts every run at offset 0, so `sluice up` names its runs
    /// apart; with a real broker this is `None`.
    pub run_suffix: Option<String>,
}

impl LakeSink {
    fn log_name(&self, topic: &str) -> String {
        match &self.run_suffix {
            Some(s) => format!("{topic}~{s}"),
            None => topic.to_owned(),
        }
    }
}

impl Destination for LakeSink {
    fn name(&self) -> &'static str {
        "lake"
    }

    async fn resume_point(&mut self, topic: &str, partition: i32) -> Result<i64, SinkError> {
        let (lake, topic) = (self.lake.clone(), self.log_name(topic));
        let next = tokio::task::spawn_blocking(move || lake.recover(&topic, partition))
            .await
            .expect("lake recovery does not panic")?;
        Ok(next.unwrap_or(0))
    }

    async fn flush(&mut self, batch: &Batch) -> Result<(), SinkError> {
        for ((topic, partition), run) in &batch.runs {
            // The lake may already hold part of this run (a replay after a
            // commit whose offsets never reached Kafka): write only the rest.
            let lake = self.lake.clone();
            let (topic, partition) = (self.log_name(topic), *partition);
            let rows: Vec<ResultRow> = run.rows.clone();
            let maybe_repeated = run.maybe_repeated.clone();
            let (first, last) = (run.first, run.last);
            tokio::task::spawn_blocking(move || -> Result<(), LakeError> {
                let next = lake.last_manifest(&topic, partition)?.map_or(0, |m| m.last_offset + 1);
                if last < next {
                    return Ok(());
                }
                let rows: Vec<ResultRow> = rows.into_iter().filter(|r| r.kafka_offset >= next).collect();
                let rows = without_repeats(&lake, &topic, partition, rows, &maybe_repeated)?;
                lake.commit(&topic, partition, first.max(next), last, &rows).map(|_| ())
            })
            .await
            .expect("lake commits do not panic")?;
        }
        Ok(())
    }
}

/// `rows` (one topic-partition's, in offset order) without the results
/// that repeat one already in the lake or earlier in `rows`. Only rows at
/// `maybe_repeated` offsets are checked: a job's result is published again
/// only after a crash or a retried send, which marks it so (the shards
/// refuse a repeated (`tenant`, `job_id`) by themselves). A repeat of a job
/// lands in the same topic-partition (the key is the job key) and the same
/// `model=/date=` directory (it is the same stored record), which is where
/// [`Lake::holding`] looks.
fn without_repeats(
    lake: &Lake,
    topic: &str,
    partition: i32,
    rows: Vec<ResultRow>,
    maybe_repeated: &BTreeSet<i64>,
) -> Result<Vec<ResultRow>, LakeError> {
    if maybe_repeated.is_empty() {
        return Ok(rows);
    }
    let mut by_dir: BTreeMap<String, HashSet<(&str, &str)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| maybe_repeated.contains(&r.kafka_offset)) {
        by_dir.entry(format!("model={}/date={}", r.model, r.date())).or_default().insert((&r.tenant, &r.job_id));
    }
    let mut landed = HashSet::new();
    for (dir, jobs) in &by_dir {
        landed.extend(lake.holding(topic, partition, dir, jobs)?);
    }
    let checked: HashSet<(String, String)> =
        by_dir.values().flatten().map(|(t, id)| ((*t).to_owned(), (*id).to_owned())).collect();
    // A repeat is the same stored record: same job, same finish (a job id
    // used again later is a new job, and lands).
    let mut earlier: HashSet<(String, String, i64)> = HashSet::new();
    let mut kept = Vec::with_capacity(rows.len());
    for r in rows {
        let result = (r.tenant.clone(), r.job_id.clone(), r.finished_at.timestamp_millis());
        let flagged = maybe_repeated.contains(&r.kafka_offset);
        if flagged && (landed.contains(&result) || earlier.contains(&result)) {
            metrics::counter!(sluice_schemas::metrics::SINK_REPEATS_SKIPPED.name).increment(1);
            tracing::info!(job_id = %r.job_id, offset = r.kafka_offset, "result already in the lake; not landed again");
            continue;
        }
        if checked.contains(&(result.0.clone(), result.1.clone())) {
            earlier.insert(result);
        }
        kept.push(r);
    }
    Ok(kept)
}

#[cfg(test)]
mod tests;
