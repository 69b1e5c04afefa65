//! The worker stage: a consumer-group member that turns job records into
//! results.
//!
//! ```text
//! Kafka <prefix>.jobs.<model> ─► decode + validate ─┬─► engine (batcher → inference thread)
//!                                                   │        │
//!                                                   │        ▼
//!                                                   │   results store + <prefix>.results
//!                                                   └─► <prefix>.dlq + failed status (bad input)
//!                                     offsets committed once all of the above is durable
//! ```
//!
//! Every record becomes one task; at most `max_in_flight` exist at a time,
//! and the consumer stops reading while that many are open, so a backlog
//! stays in Kafka rather than in memory. A record's offset is committed only
//! after its effects are durable (at-least-once); every effect is keyed by
//! `job_id` and the store refuses to change a finished job, so a redelivered
//! record changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_schemas::{ErrorCode, JobError, JobRequest, JobResult, JobStatus, Output, Timings, headers, topics};
use sluice_workers::InferenceHandle;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::kafka::{Consumer, KafkaError, Producer, Record};
use crate::offsets::OffsetTracker;
use crate::shutdown::Shutdown;
use crate::store::{Put, Store};

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Names this worker in results, DLQ headers and logs.
    pub worker_id: String,
    /// Topic prefix (`<prefix>.jobs.<model>`, `<prefix>.results`, `<prefix>.dlq`).
    pub topic_prefix: String,
    /// Most records being processed at once. Bounds memory: the consumer
    /// does not read further while this many are open.
    pub max_in_flight: usize,
    /// How often finished offsets are committed.
    pub commit_interval: Duration,
    /// How long shutdown waits for in-flight records before abandoning them
    /// (uncommitted, so they are redelivered).
    pub drain_timeout: Duration,
}

/// What processing a record needs; shared by its tasks.
struct Ctx {
    producer: Producer,
    store: Store,
    engines: HashMap<String, InferenceHandle>,
    cfg: WorkerConfig,
    shutdown: Shutdown,
}

/// A record given up on during shutdown: its offset stays uncommitted.
struct Abandoned;

/// Consumes job topics until `shutdown` fires.
pub async fn run(
    consumer: Consumer,
    producer: Producer,
    store: Store,
    engines: HashMap<String, InferenceHandle>,
    cfg: WorkerConfig,
    mut shutdown: Shutdown,
) -> Result<(), KafkaError> {
    let max_in_flight = cfg.max_in_flight.max(1);
    let commit_interval = cfg.commit_interval;
    let drain_timeout = cfg.drain_timeout;
    let mut models: Vec<&str> = engines.keys().map(String::as_str).collect();
    models.sort();
    let in_flight = metrics::gauge!("sluice_worker_in_flight", "model" => models.join(","));
    let ctx = Arc::new(Ctx { producer, store, engines, cfg, shutdown: shutdown.clone() });
    let mut tracker = OffsetTracker::default();
    let mut tasks: JoinSet<Option<(String, i32, i64)>> = JoinSet::new();
    let mut tick = tokio::time::interval(commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut consume_errors = 0u32;

    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            Some(done) = tasks.join_next() => {
                finish(&mut tracker, done);
                in_flight.set(tasks.len() as f64);
            }
            _ = tick.tick() => commit(&consumer, &mut tracker),
            rec = consumer.recv(), if tasks.len() < max_in_flight => match rec {
                Ok(rec) => {
                    consume_errors = 0;
                    tracker.start(&rec.topic, rec.partition, rec.offset);
                    let ctx = ctx.clone();
                    let span = tracing::info_span!(
                        "record",
                        topic = %rec.topic,
                        partition = rec.partition,
                        offset = rec.offset,
                        job_id = tracing::field::Empty,
                    );
                    tasks.spawn(
                        async move {
                            let at = (rec.topic.clone(), rec.partition, rec.offset);
                            ctx.process(rec).await.ok().map(|()| at)
                        }
                        .instrument(span),
                    );
                    in_flight.set(tasks.len() as f64);
                }
                Err(e) => {
                    consume_errors += 1;
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(backoff(consume_errors)).await;
                }
            },
        }
    }

    tracing::info!(in_flight = tasks.len(), "worker stopping: draining in-flight records");
    let drained = tokio::time::timeout(drain_timeout, async {
        while let Some(done) = tasks.join_next().await {
            finish(&mut tracker, done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(abandoned = tasks.len(), "drain timed out; abandoned records will be redelivered");
        tasks.abort_all();
    }
    let commits = tracker.take_commits();
    if let Err(e) = consumer.commit_sync(&commits) {
        tracing::warn!(error = %e, "final commit failed; the last records will be redelivered");
    }
    ctx.producer.flush(Duration::from_secs(5));
    Ok(())
}

fn finish(tracker: &mut OffsetTracker, done: Result<Option<(String, i32, i64)>, tokio::task::JoinError>) {
    match done {
        Ok(Some((topic, partition, offset))) => tracker.finish(&topic, partition, offset),
        // Abandoned: stays in flight, so its offset is never committed.
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "record task failed. This is a bug."),
    }
}

fn commit(consumer: &Consumer, tracker: &mut OffsetTracker) {
    let commits = tracker.take_commits();
    if let Err(e) = consumer.commit(&commits) {
        tracing::warn!(error = %e, "offset commit failed; will retry");
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(6)).min(2_000))
}

impl Ctx {
    /// Turns one record into its effects. `Err` only when shutdown stopped
    /// the work before its effects were durable.
    async fn process(&self, rec: Record) -> Result<(), Abandoned> {
        let req = match JobRequest::decode(&rec.payload) {
            Ok(req) => req,
            Err(e) => {
                let job_id = e.job_id.clone();
                if let Some(id) = &job_id {
                    tracing::Span::current().record("job_id", id.as_str());
                }
                return self.reject(&rec, None, job_id, e.code, e.message).await;
            }
        };
        tracing::Span::current().record("job_id", req.job_id.as_str());
        let Some(engine) = self.engines.get(&req.model) else {
            let mut served: Vec<_> = self.engines.keys().map(String::as_str).collect();
            served.sort();
            let msg = format!("model `{}` is not served here (served: {})", req.model, served.join(", "));
            return self.reject(&rec, Some(&req), Some(req.job_id.clone()), ErrorCode::UnknownModel, msg).await;
        };
        if let Err((code, msg)) = engine.model().check(&req) {
            return self.reject(&rec, Some(&req), Some(req.job_id.clone()), code, msg).await;
        }
        let text = req.text().expect("check() admits only text inputs. This is a bug.").to_owned();
        let submitted = req.submitted_at.or(rec.timestamp);
        let version = engine.model().spec.version.clone();

        let mut record = JobResult::queued(&req);
        record.submitted_at = submitted;
        record.model_version = Some(version);
        record.worker_id = Some(self.cfg.worker_id.clone());
        let now = Utc::now();
        if req.expires_at(rec.timestamp).is_some_and(|at| at <= now) {
            record.status = JobStatus::Expired;
            record.finished_at = Some(now);
            record.error = Some(JobError {
                code: ErrorCode::DeadlineExceeded,
                message: "the job's deadline passed before inference started".into(),
            });
            return self.finish_job(&record).await;
        }

        record.status = JobStatus::Running;
        record.started_at = Some(now);
        match self.durably("store running status", || self.store.put(&record)).await? {
            Put::Written | Put::Kept(JobStatus::Queued | JobStatus::Running) => {}
            Put::Kept(done) => {
                // Finished or cancelled already: a redelivery, or a cancel.
                tracing::debug!(job_id = %req.job_id, status = %done, "job already finished; skipped");
                return Ok(());
            }
        }

        let ticket = engine.enqueue(text).await.map_err(|_| Abandoned)?;
        let outcome = ticket.wait().await;
        let finished = Utc::now();
        record.finished_at = Some(finished);
        match outcome {
            Ok(out) => {
                let batch_start = finished - chrono::Duration::from_std(out.inference).unwrap_or_default();
                record.status = JobStatus::Succeeded;
                record.output = Some(Output::Embedding(out.embedding));
                record.timings = Some(Timings {
                    queued_ms: millis_between(submitted.unwrap_or(now), batch_start),
                    inference_ms: out.inference.as_millis() as u64,
                    batch_size: out.batch_size,
                    input_tokens: out.input_tokens,
                });
                metrics::histogram!("sluice_queue_time_seconds", "model" => req.model.clone())
                    .record(millis_between(submitted.unwrap_or(now), batch_start) as f64 / 1000.0);
            }
            Err(e) if e.is_retryable() => return Err(Abandoned),
            Err(e) => {
                record.status = JobStatus::Failed;
                record.error = Some(JobError { code: ErrorCode::InferenceFailed, message: e.to_string() });
            }
        }
        self.finish_job(&record).await
    }

    /// Makes a terminal record durable: results store, then results topic.
    async fn finish_job(&self, record: &JobResult) -> Result<(), Abandoned> {
        debug_assert!(record.validate().is_ok(), "{:?}", record.validate());
        let put = self.durably("store result", || self.store.put(record)).await?;
        if let Put::Kept(status) = put {
            // Someone else finished it first (a cancel, or a redelivery that
            // raced us); their record stands and was already published.
            tracing::debug!(job_id = %record.job_id, %status, "result not stored: job already finished");
            return Ok(());
        }
        let json = serde_json::to_vec(record).expect("JobResult serialises. This is a bug.");
        let topic = topics::results(&self.cfg.topic_prefix);
        let hdrs = [(headers::TENANT, record.tenant.as_bytes())];
        self.durably("publish result", || self.producer.send(&topic, Some(record.job_id.as_bytes()), &json, &hdrs))
            .await?;
        metrics::counter!("sluice_jobs_completed_total", "model" => record.model.clone(), "status" => record.status.as_str())
            .increment(1);
        Ok(())
    }

    /// Bad input: a dead-letter record with the original bytes and the
    /// reason, and a `failed` job record when the job id is known.
    async fn reject(
        &self,
        rec: &Record,
        req: Option<&JobRequest>,
        job_id: Option<String>,
        code: ErrorCode,
        message: String,
    ) -> Result<(), Abandoned> {
        tracing::info!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, %code, %message, "dead-lettering record");
        let partition = rec.partition.to_string();
        let offset = rec.offset.to_string();
        let mut hdrs: Vec<(&str, &[u8])> = rec
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with("sluice."))
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        hdrs.extend([
            (headers::ERROR_CODE, code.as_str().as_bytes()),
            (headers::ERROR_MESSAGE, message.as_bytes()),
            (headers::SOURCE_TOPIC, rec.topic.as_bytes()),
            (headers::SOURCE_PARTITION, partition.as_bytes()),
            (headers::SOURCE_OFFSET, offset.as_bytes()),
            (headers::WORKER_ID, self.cfg.worker_id.as_bytes()),
        ]);
        let dlq = topics::dlq(&self.cfg.topic_prefix);
        self.durably("dead-letter record", || self.producer.send(&dlq, rec.key.as_deref(), &rec.payload, &hdrs))
            .await?;
        metrics::counter!("sluice_dead_lettered_total", "code" => code.as_str()).increment(1);

        let Some(job_id) = job_id else { return Ok(()) };
        let tenant =
            req.map(|r| r.tenant.clone()).or_else(|| readable_tenant(rec)).unwrap_or_else(|| "unknown".to_owned());
        let model = req.map(|r| r.model.clone()).unwrap_or_else(|| model_of_topic(&self.cfg.topic_prefix, &rec.topic));
        let mut failed = JobResult::failed(job_id, tenant, model, code, message, Utc::now());
        failed.worker_id = Some(self.cfg.worker_id.clone());
        failed.submitted_at = req.and_then(|r| r.submitted_at).or(rec.timestamp);
        if let Some(r) = req {
            failed.metadata = r.metadata.clone();
        }
        self.finish_job(&failed).await
    }

    /// Retries `op` with backoff until it succeeds or shutdown is requested.
    async fn durably<T, E: std::fmt::Display, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Abandoned>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(attempt, error = %e, "{what} failed; retrying");
                    if self.shutdown.is_triggered() {
                        return Err(Abandoned);
                    }
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                        _ = shutdown.wait() => return Err(Abandoned),
                    }
                }
            }
        }
    }
}

/// The tenant of an undecodable record: its `tenant` header, or the
/// `tenant` field if the JSON is at least readable. Only well-formed values.
fn readable_tenant(rec: &Record) -> Option<String> {
    let valid =
        |t: &str| !t.is_empty() && t.len() <= 64 && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    rec.header(headers::TENANT).filter(|t| valid(t)).map(str::to_owned).or_else(|| {
        let v: serde_json::Value = serde_json::from_slice(&rec.payload).ok()?;
        v.get("tenant")?.as_str().filter(|t| valid(t)).map(str::to_owned)
    })
}

fn model_of_topic(prefix: &str, topic: &str) -> String {
    topic.strip_prefix(&format!("{prefix}.jobs.")).unwrap_or(topic).to_owned()
}

fn millis_between(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    (to - from).num_milliseconds().max(0) as u64
}
