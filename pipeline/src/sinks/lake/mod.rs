//! The lake sink: results into the Parquet lake, exactly once in effect
//! (the lake's manifests are its commit log; a result published again is
//! checked against what the lake holds).

mod config;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

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
    /// Per topic-partition, results that landed marked as maybe repeated.
    pub flagged: HashMap<(String, i32), FlaggedLanded>,
}

/// The one result key of a job's finish: (tenant, job id, finished at ms).
type ResultKey = (String, String, i64);

/// Results that landed although marked [`headers::MAYBE_REPEATED`]: no
/// copy was there before them. Two workers can race to publish one stored
/// record (a rebalance moves a job whose result was published but not yet
/// marked), and the marked copy can then reach the topic first; the
/// unmarked copy that follows it is the repeat. At most
/// [`FLAGGED_REMEMBERED`] per partition, the oldest forgotten first; not
/// kept across restarts (the window is one rebalance's in-flight jobs).
///
/// [`headers::MAYBE_REPEATED`]: sluice_schemas::headers::MAYBE_REPEATED
#[derive(Debug, Default)]
pub struct FlaggedLanded {
    set: HashSet<ResultKey>,
    order: VecDeque<ResultKey>,
}

/// How many [`FlaggedLanded`] results a partition remembers (about 100
/// bytes each).
const FLAGGED_REMEMBERED: usize = 16_384;

impl FlaggedLanded {
    fn insert(&mut self, key: ResultKey) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > FLAGGED_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
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
            let mut flagged = self.flagged.remove(&(topic.clone(), partition)).unwrap_or_default();
            let key = (topic.clone(), partition);
            let (committed, flagged) = tokio::task::spawn_blocking(move || {
                let committed = (|| -> Result<(), LakeError> {
                    let next = lake.last_manifest(&topic, partition)?.map_or(0, |m| m.last_offset + 1);
                    if last < next {
                        return Ok(());
                    }
                    let rows: Vec<ResultRow> = rows.into_iter().filter(|r| r.kafka_offset >= next).collect();
                    let (rows, landed) = without_repeats(&lake, &topic, partition, rows, &maybe_repeated, &flagged)?;
                    lake.commit(&topic, partition, first.max(next), last, &rows)?;
                    // Remembered only once committed: a failed flush is retried whole.
                    for k in landed {
                        flagged.insert(k);
                    }
                    Ok(())
                })();
                (committed, flagged)
            })
            .await
            .expect("lake commits do not panic");
            self.flagged.insert(key, flagged);
            committed?;
        }
        Ok(())
    }
}

/// `rows` (one topic-partition's, in offset order) without the results
/// that repeat one already in the lake or earlier in `rows`, and the marked
/// results among those kept (for [`FlaggedLanded`]). Rows at
/// `maybe_repeated` offsets are checked against the lake: a job's result is
/// published again only after a crash, a rebalance or a retried send, which
/// marks it so (the shards refuse a repeated (`tenant`, `job_id`) by
/// themselves). An unmarked row is checked only against marked copies that
/// came before it (`flagged`, and earlier in `rows`). A repeat of a job
/// lands in the same topic-partition (the key is the job key) and the same
/// `model=/date=` directory (it is the same stored record), which is where
/// [`Lake::holding`] looks.
fn without_repeats(
    lake: &Lake,
    topic: &str,
    partition: i32,
    rows: Vec<ResultRow>,
    maybe_repeated: &BTreeSet<i64>,
    flagged: &FlaggedLanded,
) -> Result<(Vec<ResultRow>, Vec<ResultKey>), LakeError> {
    if maybe_repeated.is_empty() && flagged.set.is_empty() {
        return Ok((rows, Vec::new()));
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
    let mut earlier: HashSet<ResultKey> = HashSet::new();
    let mut kept_flagged: HashSet<ResultKey> = HashSet::new();
    let mut kept = Vec::with_capacity(rows.len());
    for r in rows {
        let result = (r.tenant.clone(), r.job_id.clone(), r.finished_at.timestamp_millis());
        let marked = maybe_repeated.contains(&r.kafka_offset);
        let repeat = if marked {
            landed.contains(&result) || earlier.contains(&result)
        } else {
            // The original after its marked copy.
            flagged.set.contains(&result) || kept_flagged.contains(&result)
        };
        if repeat {
            metrics::counter!(sluice_schemas::metrics::SINK_REPEATS_SKIPPED.name).increment(1);
            tracing::info!(job_id = %r.job_id, offset = r.kafka_offset, "result already in the lake; not landed again");
            continue;
        }
        if checked.contains(&(result.0.clone(), result.1.clone())) {
            earlier.insert(result.clone());
        }
        if marked {
            kept_flagged.insert(result);
        }
        kept.push(r);
    }
    Ok((kept, kept_flagged.into_iter().collect()))
}

#[cfg(test)]
mod tests;
