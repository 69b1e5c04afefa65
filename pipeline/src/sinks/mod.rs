//! The batch sinks: consumer groups on `<prefix>.results` that land every
//! finished job in the Parquet lake and in the SQL shards.
//!
//! Both run the same loop ([`run`]): decode records into
//! [`ResultRow`]s, buffer them (bounded: `flush_rows` rows or `flush_bytes`
//! bytes, whichever comes first), flush when full or when the oldest
//! buffered row has waited `flush_interval`, and commit the Kafka offsets
//! only after the flush is durable. A flush that fails is retried with
//! backoff until it succeeds or the sink is stopped, while nothing is
//! consumed (the records wait in Kafka); it is never skipped, and rows are
//! never re-routed to another destination.
//!
//! Each destination is a directory of its own with the same files:
//! `config.rs` (its settings, and how it is built from the configuration;
//! `None` where it is not configured), `mod.rs` (the [`Destination`]) and
//! `tests.rs`. A new consumer of the results topic is one more such
//! directory and one line in [`start`].
//!
//! - [`LakeSink`]: one [`sluice_sql::Lake::commit`] per topic-partition per flush. The
//!   lake is its own commit log ([`sluice_sql::Lake::recover`]), so records at offsets
//!   the lake already holds are skipped: a crash at any point is replayed
//!   without duplicates or gaps. A result published twice (a worker crash
//!   between the topic's acknowledgement and the published mark) is a second
//!   record; the worker marks such records, and the lake sink lands one only
//!   if the lake does not hold that job's result yet.
//! - [`ShardSink`]: rows routed by the [`sluice_sql::ShardSet`]'s strategy, one
//!   transaction of multi-row upserts per shard, all shards in parallel.
//!   Upserts are keyed by (`tenant`, `job_id`), so a replay writes nothing new.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use sluice_schemas::results_table::ResultRow;
use sluice_schemas::{JobResult, headers, topics};
use sluice_sql::{LakeError, ShardError, ShardSet};
use tokio::task::JoinHandle;

mod lake;
mod shards;

pub use lake::LakeSink;
pub use shards::{ShardSink, open_shards};

use crate::config::Config;
use crate::kafka::{Consumer, KafkaError, RebalanceHooks, Record};
use crate::retry::{Attempts, Backoff, GaveUp, Retryable};
use crate::shutdown::Shutdown;

/// What stops a sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What the results consumers of one process share.
pub struct Context<'a> {
    pub cfg: &'a Config,
    pub bootstrap: &'a str,
    pub shutdown: &'a Shutdown,
    /// The lake (`sinks.lake`, or `sluice up`'s default).
    pub lake: Option<&'a Path>,
    /// The shards, opened (`sinks.shards`, or `sluice up`'s default).
    pub shards: Option<Arc<ShardSet>>,
    /// Names the embedded broker's runs apart in the lake's commit log (the
    /// embedded broker starts every run at offset 0); `None` with a real
    /// broker.
    pub run_suffix: Option<String>,
}

/// Starts every consumer of the results topic that is configured, each in
/// its own consumer group. A new consumer is a directory of this module and
/// one line here.
pub fn start(ctx: &Context<'_>, tasks: &mut Vec<JoinHandle<()>>) -> Result<(), SinkError> {
    spawn(ctx, LakeSink::from_config(ctx)?, tasks)?;
    spawn(ctx, ShardSink::from_config(ctx), tasks)?;
    Ok(())
}

/// Runs `dest`, when configured, in the consumer group
/// `<sinks.consumer_group>.<name>` until shutdown.
fn spawn<D: Destination + 'static>(
    ctx: &Context<'_>,
    dest: Option<D>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<(), SinkError> {
    let Some(dest) = dest else { return Ok(()) };
    let (cfg, name) = (ctx.cfg, dest.name());
    let hooks = Arc::new(SinkHooks::default());
    let consumer = Consumer::with_timeouts(
        ctx.bootstrap,
        &format!("sluice-sink-{name}"),
        &format!("{}.{name}", group_prefix(cfg)),
        &[topics::results(&cfg.kafka.topic_prefix)],
        hooks.clone(),
        Some(group_timeouts(cfg)),
    )?;
    let (settings, sd) = (SinkConfig::from_config(cfg), ctx.shutdown.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = run(consumer, hooks, dest, settings, sd).await {
            tracing::error!(sink = name, error = %e, "sink stopped");
        }
    }));
    Ok(())
}

/// The sinks' consumer-group prefix (`<group>.lake`, `<group>.shards`).
pub fn group_prefix(cfg: &Config) -> String {
    match cfg.sinks.consumer_group.as_str() {
        "" => format!("{}.sink", cfg.kafka.topic_prefix),
        g => g.to_owned(),
    }
}

/// `(session timeout, max poll interval)` of the sinks' consumer groups.
fn group_timeouts(cfg: &Config) -> (Duration, Duration) {
    let s = &cfg.sinks;
    (Duration::from_millis(s.session_timeout_ms.max(1000)), Duration::from_millis(s.max_poll_interval_ms.max(1000)))
}

/// Buffering and retry settings of a sink (`[sinks]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct SinkConfig {
    /// Flush (and, for the lake, roll a file) at this many buffered rows.
    pub flush_rows: usize,
    /// … or at this many buffered bytes (estimated) …
    pub flush_bytes: usize,
    /// … or when the oldest buffered row has waited this long.
    pub flush_interval: Duration,
    /// First retry delay of a failed flush; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl SinkConfig {
    pub fn from_config(cfg: &Config) -> SinkConfig {
        let s = &cfg.sinks;
        SinkConfig {
            flush_rows: s.flush_rows.max(1),
            flush_bytes: s.flush_bytes.max(1),
            flush_interval: Duration::from_millis(s.flush_interval_ms.max(1)),
            retry_initial: Duration::from_millis(s.retry_initial_ms.max(1)),
            retry_max: Duration::from_millis(s.retry_max_ms.max(s.retry_initial_ms).max(1)),
        }
    }
}

/// A place rows are flushed to.
pub trait Destination: Send {
    /// The metric label.
    fn name(&self) -> &'static str;

    /// The first offset of a topic-partition not yet held here (records
    /// below it are skipped), checked when the partition is (re)assigned.
    fn resume_point(&mut self, topic: &str, partition: i32) -> impl Future<Output = Result<i64, SinkError>> + Send;

    /// Makes a flush durable. One attempt; the loop retries.
    fn flush(&mut self, batch: &Batch) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Buffered rows of one topic-partition: offsets `first..=last`.
#[derive(Debug)]
pub struct Run {
    pub first: i64,
    pub last: i64,
    pub rows: Vec<ResultRow>,
    /// Offsets of the rows whose record may repeat a result already on the
    /// topic ([`headers::MAYBE_REPEATED`]).
    pub maybe_repeated: BTreeSet<i64>,
}

/// A flush: the buffered runs by topic-partition.
#[derive(Debug, Default)]
pub struct Batch {
    pub runs: BTreeMap<(String, i32), Run>,
    rows: usize,
    bytes: usize,
    oldest: Option<Instant>,
}

impl Batch {
    fn push(&mut self, rec: &Record, row: Option<ResultRow>) {
        let run = self.runs.entry((rec.topic.clone(), rec.partition)).or_insert(Run {
            first: rec.offset,
            last: rec.offset,
            rows: Vec::new(),
            maybe_repeated: BTreeSet::new(),
        });
        run.last = rec.offset;
        if let Some(row) = row {
            if rec.header(headers::MAYBE_REPEATED) == Some("1") {
                run.maybe_repeated.insert(rec.offset);
            }
            self.bytes += sluice_sql::lake::estimated_bytes(&row);
            self.rows += 1;
            run.rows.push(row);
        }
        self.oldest.get_or_insert_with(Instant::now);
    }

    fn forget(&mut self, topic: &str, partition: i32) {
        if let Some(run) = self.runs.remove(&(topic.to_owned(), partition)) {
            self.rows -= run.rows.len();
            self.bytes -= run.rows.iter().map(sluice_sql::lake::estimated_bytes).sum::<usize>();
            if self.runs.is_empty() {
                self.oldest = None;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn offsets(&self) -> Vec<(String, i32, i64)> {
        self.runs.iter().map(|((t, p), run)| (t.clone(), *p, run.last + 1)).collect()
    }
}

/// Rebalance hooks of a sink's consumer: everything durable is committed
/// at flush time, so revoked partitions only need forgetting (their
/// buffered rows are dropped; the next owner reads them again).
#[derive(Default)]
pub struct SinkHooks(Mutex<Vec<(String, i32)>>);

impl SinkHooks {
    fn take(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl RebalanceHooks for SinkHooks {
    fn revoking(&self, partitions: &[(String, i32)]) -> Vec<(String, i32, i64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(partitions);
        Vec::new()
    }
}

/// Drops what is held for the partitions revoked since the last call: their
/// buffered rows, resume points and durable offsets (a revoked partition may
/// have a new owner, whose progress this member must not commit over).
fn forget_revoked(
    hooks: &SinkHooks,
    batch: &mut Batch,
    resume: &mut HashMap<(String, i32), i64>,
    durable: &mut HashMap<(String, i32), i64>,
) {
    for (t, p) in hooks.take() {
        batch.forget(&t, p);
        resume.remove(&(t.clone(), p));
        durable.remove(&(t, p));
    }
}

/// Decodes a results-topic record. `None`: not a valid JobResult (counted,
/// then skipped: the record's offset is still covered by the next commit).
/// Validated, because its `model` names a lake directory: a record on the
/// results topic that Sluice did not write could otherwise name `../x`.
fn decode(rec: &Record) -> Option<ResultRow> {
    match JobResult::decode(&rec.payload) {
        Ok(r) if r.status.is_terminal() => {
            Some(ResultRow::new(r, rec.partition, rec.offset, rec.timestamp.unwrap_or_else(Utc::now)))
        }
        Ok(r) => {
            tracing::warn!(job_id = %r.job_id, status = %r.status, "non-terminal record on the results topic; skipped");
            None
        }
        Err(e) => {
            metrics::counter!(sluice_schemas::metrics::SINK_UNDECODABLE.name).increment(1);
            tracing::warn!(partition = rec.partition, offset = rec.offset, error = %e, "undecodable result record; skipped");
            None
        }
    }
}

/// Consumes until `shutdown`, flushing to `dest`. `consumer` must have
/// been created with `hooks`.
pub async fn run<D: Destination>(
    consumer: Consumer,
    hooks: Arc<SinkHooks>,
    mut dest: D,
    cfg: SinkConfig,
    mut shutdown: Shutdown,
) -> Result<(), SinkError> {
    let name = dest.name();
    let buffered = metrics::gauge!(sluice_schemas::metrics::SINK_BUFFERED_ROWS.name, "sink" => name);
    let mut batch = Batch::default();
    let mut resume: HashMap<(String, i32), i64> = HashMap::new();
    // Next offset past what is durable, per partition held: committed after
    // each flush and again every tick, because an asynchronous commit can
    // fail (a rebalance in progress) and a quiet partition would otherwise
    // keep a stale committed offset, and its lag, until new records come.
    let mut durable: HashMap<(String, i32), i64> = HashMap::new();
    // A member holding no partition checks that its group is not wedged.
    let mut group_tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let due = batch.oldest.map(|t| t + cfg.flush_interval);
        let rec = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = sleep_until(due), if due.is_some() => None,
            _ = group_tick.tick() => {
                consumer.rejoin_if_wedged().await;
                // Only partitions still held: a revoked one may have a new
                // owner further on.
                forget_revoked(&hooks, &mut batch, &mut resume, &mut durable);
                let held: Vec<(String, i32, i64)> = durable.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect();
                if let Err(e) = consumer.commit(&held) {
                    tracing::warn!(sink = name, error = %e, "periodic offset commit failed; retried next tick");
                }
                continue;
            }
            rec = consumer.recv() => match rec {
                Ok(rec) => Some(rec),
                Err(e) => {
                    // librdkafka reconnects by itself; keep what is buffered.
                    tracing::warn!(sink = name, error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        forget_revoked(&hooks, &mut batch, &mut resume, &mut durable);
        if let Some(rec) = rec {
            let key = (rec.topic.clone(), rec.partition);
            let from = match resume.get(&key) {
                Some(o) => *o,
                None => {
                    let o = dest.resume_point(&rec.topic, rec.partition).await?;
                    resume.insert(key.clone(), o);
                    o
                }
            };
            if rec.offset < from {
                metrics::counter!(sluice_schemas::metrics::SINK_REPLAYED_SKIPPED.name, "sink" => name).increment(1);
                // Already durable in the destination, so the group may
                // commit past it (next tick). Without this, a partition
                // whose commit was lost (one that failed in a rebalance) is
                // read again, skipped to its end and never committed: its
                // lag stays until new records come.
                let d = durable.entry(key).or_insert(0);
                *d = (*d).max(rec.offset + 1);
                continue;
            }
            batch.push(&rec, decode(&rec));
            buffered.set(batch.rows as f64);
            if batch.rows < cfg.flush_rows && batch.bytes < cfg.flush_bytes {
                continue;
            }
        }
        if batch.is_empty() {
            continue;
        }
        if !flush_with_retry(&mut dest, &batch, &cfg, &mut shutdown).await {
            // Stopped while a destination was down: nothing is committed,
            // the records are read again by whoever consumes next.
            return Ok(());
        }
        if let Err(e) = consumer.commit(&batch.offsets()) {
            tracing::warn!(error = %e, "offset commit failed; the flushed records will be skipped or re-written idempotently");
        }
        for ((t, p), run) in &batch.runs {
            resume.insert((t.clone(), *p), run.last + 1);
            durable.insert((t.clone(), *p), run.last + 1);
        }
        batch = Batch::default();
        buffered.set(0.0);
    }
    // Graceful stop: one last attempt at what is buffered, then leave.
    if !batch.is_empty() {
        match tokio::time::timeout(Duration::from_secs(10), dest.flush(&batch)).await {
            Ok(Ok(())) => consumer.commit_sync(&batch.offsets())?,
            Ok(Err(e)) => tracing::warn!(sink = name, error = %e, "last flush failed; its records stay in Kafka"),
            Err(_) => tracing::warn!(sink = name, "last flush timed out; its records stay in Kafka"),
        }
    }
    Ok(())
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

impl Retryable for SinkError {
    fn is_retryable(&self) -> bool {
        match self {
            SinkError::Kafka(e) => e.is_retryable(),
            // A full or read-only disk can be fixed while the sink waits.
            SinkError::Lake(LakeError::Io { .. } | LakeError::Parquet { .. }) => true,
            SinkError::Lake(LakeError::Arrow(_) | LakeError::Corrupt(_)) => false,
            SinkError::Shard(e) => e.is_retryable(),
            SinkError::Config(_) => false,
        }
    }
}

/// Flushes until it works (offsets stay uncommitted meanwhile); `false` if
/// `shutdown` came first. Retryable failures back off from `retry_initial`
/// to `retry_max`. A result has nowhere else to go, so even a failure that
/// retrying cannot fix (a damaged lake, a shard refusing the schema) holds
/// the batch rather than skip it: it is logged as an error, counted with
/// `retryable="false"`, and tried again every `retry_max` until an operator
/// fixes the destination.
async fn flush_with_retry<D: Destination>(
    dest: &mut D,
    batch: &Batch,
    cfg: &SinkConfig,
    shutdown: &mut Shutdown,
) -> bool {
    let name = dest.name();
    let backoff = Backoff { initial: cfg.retry_initial, max: cfg.retry_max };
    let shutdown = shutdown.clone();
    let mut attempts = Attempts::new("sink flush", backoff, &shutdown);
    loop {
        let started = Instant::now();
        let e = match dest.flush(batch).await {
            Ok(()) => {
                metrics::histogram!(sluice_schemas::metrics::SINK_FLUSH_SECONDS.name, "sink" => name)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(sluice_schemas::metrics::SINK_ROWS.name, "sink" => name).increment(batch.rows as u64);
                metrics::counter!(sluice_schemas::metrics::SINK_FLUSHES.name, "sink" => name).increment(1);
                return true;
            }
            Err(e) => e,
        };
        metrics::counter!(sluice_schemas::metrics::SINK_FLUSH_FAILURES.name, "sink" => name, "retryable" => e.is_retryable().to_string())
            .increment(1);
        match attempts.failed(e).await {
            Ok(()) => {}
            Err(GaveUp::Shutdown) => return false,
            Err(GaveUp::Permanent(e)) => {
                tracing::error!(sink = name, error = %e, retry_in = ?cfg.retry_max, "flush refused; holding the batch (offsets stay uncommitted)");
                let mut shutdown = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(cfg.retry_max) => {}
                    _ = shutdown.wait() => return false,
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A results-topic record holding `r` (offset 7 of `t.results` 0).
    pub(crate) fn record(r: &JobResult) -> Record {
        let payload = serde_json::to_vec(r).expect("serialises");
        Record {
            topic: "t.results".into(),
            partition: 0,
            offset: 7,
            key: None,
            payload,
            headers: vec![],
            timestamp: None,
        }
    }

    /// Issue 10, item 11: a results-topic record Sluice did not write cannot
    /// name a lake directory outside the table; it is skipped and counted.
    #[test]
    fn a_result_whose_model_is_a_path_is_skipped() {
        let code = sluice_schemas::ErrorCode::Internal;
        let mut r = JobResult::failed("j".into(), "t".into(), "m".into(), code, "x".into(), Utc::now());
        assert_eq!(decode(&record(&r)).map(|row| row.model), Some("m".to_owned()));
        for model in ["../../escape", "a/b", "model=x"] {
            r.model = model.into();
            assert!(decode(&record(&r)).is_none(), "{model}");
        }
    }
}
