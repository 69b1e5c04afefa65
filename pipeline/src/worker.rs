//! The worker stage: a consumer-group member that turns job records into
//! results.
//!
//! ```text
//! Kafka <prefix>.jobs.<model> ─► decode + route ─┬─► cache hit? ─► result
//!                                                 ├─► engine (scheduler → inference thread) ─► result
//!                                                 └─► <prefix>.dlq + failed status (bad input)
//! result = results store (conditional) ─► <prefix>.results ─► "published" mark
//! offsets committed once all of the above is durable
//! ```
//!
//! Every record becomes one task. At `max_in_flight` open tasks (or
//! `max_in_flight_bytes` of their payloads) the loop stops taking records:
//! the backlog stays in Kafka and in librdkafka's bounded prefetch, not in
//! this process. Partitions are paused only when the model's circuit
//! breaker is open or the bound has held for a while, and resume below
//! `resume_below`. A record's offset is committed only after its effects
//! are durable (at-least-once); every effect is keyed by the job (its tenant and `job_id`), the store
//! refuses to change a finished job, and a result is published once, so a
//! redelivered record changes nothing.
//!
//! Nothing here waits on a round trip of its own: the store batches the
//! writes of concurrent jobs into shared script calls, the producer batches
//! their results, and a job's `running` record is written only if its
//! batch's forward pass outlasts `running_after` (so a fast job costs two
//! store writes however long it queued: its terminal record and the
//! published mark).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sluice_schemas::{ErrorCode, JobError, JobRequest, JobResult, JobStatus, Timings, headers, topics};
use sluice_workers::{BreakerState, EngineJob, ModelPool, WorkerError};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::Config;
use crate::kafka::{Consumer, KafkaError, Producer, RebalanceHooks, Record};
use crate::offsets::OffsetTracker;
use crate::retry::{Backoff, GaveUp, Retryable, retry};
use crate::shutdown::Shutdown;
use crate::store::{Put, Store, Stored};
use Unfinished::Abandoned;

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Names this worker in results, DLQ headers and logs.
    pub worker_id: String,
    /// Topic prefix (`<prefix>.jobs.<model>`, `<prefix>.results`, `<prefix>.dlq`).
    pub topic_prefix: String,
    /// Most records being processed at once: at this many the worker stops
    /// taking records (they wait in Kafka and in librdkafka's bounded
    /// prefetch). Enough to cover the per-job latency of the store and the
    /// broker at full speed (Little's law), and to give the engine's
    /// scheduler a window to batch from.
    pub max_in_flight: usize,
    /// Most payload bytes of the records being processed at once: the same
    /// stop, for large records (a record larger than this is still taken
    /// when nothing else is in flight).
    pub max_in_flight_bytes: usize,
    /// Paused partitions resume when fewer records than this are open.
    pub resume_below: usize,
    /// How often finished offsets are committed.
    pub commit_interval: Duration,
    /// How long shutdown waits for in-flight records before abandoning them
    /// (uncommitted, so they are redelivered).
    pub drain_timeout: Duration,
    /// A job whose batch's forward pass has not finished this long after it
    /// began gets its `running` record stored; one that finishes sooner goes
    /// from queued to its terminal status in one write, however long it
    /// waited in the engine's queue. Zero stores `running` as soon as the
    /// job is taken (one more store write per job).
    pub running_after: Duration,
    /// Inference attempts of a job while its model is healthy, before the
    /// job fails with `inference_failed`. Attempts while the model's breaker
    /// is open do not count: the job waits.
    pub max_attempts: u32,
    /// The inference cache is shared by all tenants (`store.cache_shared`):
    /// a hit (`batch_size` 0) then tells a tenant that another submitted the
    /// same input. Off by default: each tenant has its own entries.
    pub cache_shared: bool,
}

impl WorkerConfig {
    pub fn from_config(cfg: &Config) -> WorkerConfig {
        let w = &cfg.worker;
        WorkerConfig {
            worker_id: if w.id.is_empty() { default_worker_id() } else { w.id.clone() },
            topic_prefix: cfg.kafka.topic_prefix.clone(),
            max_in_flight: w.max_in_flight,
            max_in_flight_bytes: w.max_in_flight_bytes,
            resume_below: w.resume_below,
            running_after: Duration::from_millis(w.running_status_after_ms),
            max_attempts: w.max_attempts,
            commit_interval: Duration::from_millis(w.commit_interval_ms),
            drain_timeout: Duration::from_millis(w.drain_timeout_ms),
            cache_shared: cfg.store.cache_shared,
        }
    }

    /// `(session timeout, max poll interval)` of the workers' consumer
    /// groups (`worker.session_timeout_ms`, `worker.max_poll_interval_ms`).
    pub fn group_timeouts(cfg: &Config) -> (Duration, Duration) {
        let w = &cfg.worker;
        (Duration::from_millis(w.session_timeout_ms.max(1000)), Duration::from_millis(w.max_poll_interval_ms.max(1000)))
    }
}

/// `<host>-<pid>`, the worker id when `worker.id` is empty.
fn default_worker_id() -> String {
    let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// The offsets tracker, shared with the consumer's rebalance callback.
#[derive(Default)]
pub struct SharedTracker(Mutex<OffsetTracker>);

impl SharedTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, OffsetTracker> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RebalanceHooks for SharedTracker {
    fn revoking(&self, partitions: &[(String, i32)]) -> Vec<(String, i32, i64)> {
        self.lock().revoke(partitions)
    }
}

/// Cancel flags of the jobs this worker holds, by job key
/// (`<tenant>/<job_id>`), set by cancellation notices.
#[derive(Default)]
struct Cancels(Mutex<HashMap<String, Arc<AtomicBool>>>);

struct CancelGuard<'a> {
    cancels: &'a Cancels,
    key: String,
    flag: Arc<AtomicBool>,
}

impl Cancels {
    fn register(&self, req: &JobRequest) -> CancelGuard<'_> {
        let flag = Arc::new(AtomicBool::new(false));
        let key = topics::job_key(&req.tenant, &req.job_id);
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), flag.clone());
        CancelGuard { cancels: self, key, flag }
    }

    /// Cancels the job held under `key`, if any.
    fn cancel(&self, key: &str) {
        if let Some(f) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
            f.store(true, Ordering::Release);
        }
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.cancels.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// One consumer-group member for one model.
pub struct Worker {
    pub consumer: Consumer,
    pub tracker: Arc<SharedTracker>,
    pub producer: Producer,
    pub store: Store,
    pub pool: ModelPool,
    /// The model whose jobs topic `consumer` reads.
    pub model: String,
    pub cfg: WorkerConfig,
}

/// What processing a record needs; shared by its tasks.
struct Ctx {
    producer: Producer,
    store: Store,
    pool: ModelPool,
    cancels: Cancels,
    cfg: WorkerConfig,
    shutdown: Shutdown,
    stages: Stages,
}

/// The stages of a record, in order; each is timed from the end of the one
/// before (`sluice_worker_stage_seconds{model, stage}`), so a slow pipeline
/// shows which stage it waits on.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Decoded and routed (and, with `running_after` zero, the `running`
    /// record stored).
    Started,
    /// The engine's queue and the batch's forward pass.
    Inferred,
    /// The terminal record stored.
    Stored,
    /// The result acknowledged by the results topic.
    Published,
    /// The published mark stored.
    Marked,
}

/// Histogram handles of the stages, made once per worker.
struct Stages([metrics::Histogram; 5]);

impl Stages {
    fn new(model: &str) -> Stages {
        let h = |stage: &'static str| metrics::histogram!(sluice_schemas::metrics::WORKER_STAGE.name, "model" => model.to_owned(), "stage" => stage);
        Stages([h("started"), h("inferred"), h("stored"), h("published"), h("marked")])
    }

    /// Records the stage that ends now, begun at `since`; returns now.
    fn done(&self, stage: Stage, since: Instant) -> Instant {
        let now = Instant::now();
        self.0[stage as usize].record(now.duration_since(since).as_secs_f64());
        now
    }
}

/// A task's share of the payload bytes in flight, given back on drop.
struct InFlightBytes(Arc<AtomicUsize>, usize);

impl InFlightBytes {
    fn take(total: &Arc<AtomicUsize>, n: usize) -> InFlightBytes {
        total.fetch_add(n, Ordering::AcqRel);
        InFlightBytes(total.clone(), n)
    }
}

impl Drop for InFlightBytes {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// How long the in-flight bound may hold consumption up before the worker
/// pauses its partitions (and polls the consumer again: librdkafka's
/// `max.poll.interval.ms`, 300 s by default, must never pass unpolled).
const HELD_PAUSE_AFTER: Duration = Duration::from_secs(5);

/// Why a record's effects did not all happen.
enum Unfinished {
    /// Given up on during shutdown: its offset stays uncommitted, and the
    /// record is redelivered.
    Abandoned,
    /// The broker or the store refused an effect for good (a result larger
    /// than the topic accepts, a corrupt stored record): retrying cannot
    /// help, so the record is dead-lettered with the reason instead of
    /// holding its partition.
    Refused { what: &'static str, error: String },
    /// The tenant's job under the record's id was made for another request
    /// (another body): the record is dead-lettered with `job_id_in_use`, and
    /// that job is unchanged.
    Reused { tenant: String, job_id: String },
}

impl Worker {
    /// Consumes until `shutdown` fires, then drains and commits.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), KafkaError> {
        let Worker { consumer, tracker, producer, store, pool, model, cfg } = self;
        let max_in_flight = cfg.max_in_flight.max(1);
        let max_bytes = cfg.max_in_flight_bytes.max(1);
        let resume_below = cfg.resume_below.clamp(1, max_in_flight);
        // Payload bytes of the records in flight; each task gives its share
        // back when it ends, however it ends.
        let bytes = Arc::new(AtomicUsize::new(0));
        let (commit_interval, drain_timeout) = (cfg.commit_interval, cfg.drain_timeout);
        let in_flight = metrics::gauge!(sluice_schemas::metrics::WORKER_IN_FLIGHT.name, "model" => model.clone());
        let paused_gauge = metrics::gauge!(sluice_schemas::metrics::PAUSED_PARTITIONS.name, "model" => model.clone());
        let stages = Stages::new(&model);
        let ctx = Arc::new(Ctx {
            producer,
            store,
            pool,
            cancels: Cancels::default(),
            cfg,
            shutdown: shutdown.clone(),
            stages,
        });

        // Cancellation notices set the flags of jobs held here.
        let mut notices = ctx.store.cancellations();
        let listener = {
            let (ctx, mut sd) = (ctx.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        key = notices.recv() => match key {
                            Some(key) => ctx.cancels.cancel(&key),
                            None => return,
                        },
                        _ = sd.wait() => return,
                    }
                }
            })
        };

        let mut tasks: JoinSet<Option<(String, i32, i64)>> = JoinSet::new();
        let mut commit_tick = tokio::time::interval(commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health_tick = tokio::time::interval(Duration::from_millis(200));
        // A member holding no partition checks that its group is not wedged.
        let mut group_tick = tokio::time::interval(Duration::from_secs(5));
        let mut consume_errors = 0u32;
        let mut paused = false;
        // Since when the in-flight bound has held consumption up.
        let mut held_since: Option<Instant> = None;
        let pauses = |reason: &'static str| metrics::counter!(sluice_schemas::metrics::PARTITION_PAUSES.name, "model" => model.clone(), "reason" => reason);

        loop {
            // Flow control. At the in-flight bound the loop stops taking
            // records: librdkafka stops fetching once its bounded prefetch
            // queue is full, and the prefetched records are served as soon
            // as tasks finish. Partitions are paused only when the model is
            // failing or the bound has held for `HELD_PAUSE_AFTER` (so the
            // loop keeps polling the consumer, which serves rebalances and
            // keeps the member in its group): librdkafka drops a paused
            // partition's prefetched records and fetches them again on
            // resume, so pausing at every crossing of the bound would
            // refetch the backlog over and over.
            let unhealthy = ctx.pool.health(&model) == Some(BreakerState::Open);
            let full = tasks.len() >= max_in_flight || bytes.load(Ordering::Acquire) >= max_bytes;
            if full {
                if held_since.is_none() {
                    held_since = Some(Instant::now());
                    pauses("in_flight").increment(1);
                }
            } else {
                held_since = None;
            }
            let stalled = held_since.is_some_and(|t| t.elapsed() >= HELD_PAUSE_AFTER);
            if !paused && (unhealthy || stalled) {
                match consumer.pause() {
                    Ok(n) => {
                        paused = true;
                        paused_gauge.set(n as f64);
                        pauses(if unhealthy { "breaker" } else { "stalled" }).increment(1);
                        tracing::info!(in_flight = tasks.len(), unhealthy, "partitions paused");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot pause partitions"),
                }
            } else if paused && tasks.len() < resume_below && !unhealthy {
                match consumer.resume() {
                    Ok(()) => {
                        paused = false;
                        paused_gauge.set(0.0);
                        tracing::info!(in_flight = tasks.len(), "partitions resumed");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot resume partitions"),
                }
            }
            // Take records below the bound; while paused, keep polling (to
            // serve rebalances) up to a hard cap that covers records fetched
            // just before the pause.
            let take = !full || (paused && tasks.len() < 2 * max_in_flight);
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                Some(done) = tasks.join_next() => {
                    finish(&tracker, done);
                    in_flight.set(tasks.len() as f64);
                }
                _ = commit_tick.tick() => commit(&consumer, &tracker),
                _ = health_tick.tick() => {}
                _ = group_tick.tick() => {
                    consumer.rejoin_if_wedged().await;
                }
                rec = consumer.recv(), if take => match rec {
                    Ok(rec) => {
                        consume_errors = 0;
                        tracker.lock().start(&rec.topic, rec.partition, rec.offset);
                        let share = InFlightBytes::take(&bytes, rec.payload.len());
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
                                let _share = share;
                                let at = (rec.topic.clone(), rec.partition, rec.offset);
                                ctx.settle(&rec).await.ok().map(|()| at)
                            }
                            .instrument(span),
                        );
                        in_flight.set(tasks.len() as f64);
                    }
                    Err(e) => {
                        consume_errors += 1;
                        tracing::warn!(error = %e, "consumer error");
                        tokio::time::sleep(Backoff::DEFAULT.delay(consume_errors)).await;
                    }
                },
            }
        }

        tracing::info!(in_flight = tasks.len(), "worker stopping: draining in-flight records");
        let drained = tokio::time::timeout(drain_timeout, async {
            while let Some(done) = tasks.join_next().await {
                finish(&tracker, done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(abandoned = tasks.len(), "drain timed out; abandoned records will be redelivered");
            tasks.abort_all();
        }
        let commits = tracker.lock().take_commits();
        if let Err(e) = consumer.commit_sync(&commits) {
            tracing::warn!(error = %e, "final commit failed; the last records will be redelivered");
        }
        listener.abort();
        ctx.producer.flush(Duration::from_secs(5));
        Ok(())
    }
}

fn finish(tracker: &SharedTracker, done: Result<Option<(String, i32, i64)>, tokio::task::JoinError>) {
    match done {
        Ok(Some((topic, partition, offset))) => tracker.lock().finish(&topic, partition, offset),
        // Abandoned: stays in flight, so its offset is never committed.
        Ok(None) => {}
        Err(e) if e.is_cancelled() => {}
        Err(e) => tracing::error!(error = %e, "record task failed. This is a bug."),
    }
}

fn commit(consumer: &Consumer, tracker: &SharedTracker) {
    let commits = tracker.lock().take_commits();
    if let Err(e) = consumer.commit(&commits) {
        tracing::warn!(error = %e, "offset commit failed; will retry");
    }
}

/// Cache key: the tenant (`*` when the cache is shared), model, version
/// and a digest of the input's canonical JSON.
fn cache_key(shared: bool, model: &str, version: &str, req: &JobRequest) -> String {
    let input = serde_json::to_vec(&req.input).expect("Input serialises. This is a bug.");
    let digest = hex(&Sha256::digest(&input));
    match shared {
        true => format!("*:{model}:{version}:{digest}"),
        // Tenant names hold no ':' (JobRequest's validation), so no two
        // tenants, and no tenant and the shared scope, share a key.
        false => format!("t={}:{model}:{version}:{digest}", req.tenant),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn reused(record: &JobResult) -> Unfinished {
    Unfinished::Reused { tenant: record.tenant.clone(), job_id: record.job_id.clone() }
}

/// What [`Ctx::dead_letter`] calls its send when it is refused.
const DEAD_LETTER: &str = "dead-letter record";

/// How inference ended for a job.
enum Ran {
    Done { version: String, out: sluice_workers::Inferred },
    Failed(ErrorCode, String),
    Expired,
    Cancelled,
    BadInput(ErrorCode, String),
}

impl Ctx {
    /// [`Ctx::process`], then, if an effect was refused for good, the record
    /// dead-lettered (code `internal`, the refusal as the message) so that
    /// its offset can be committed. When what was refused is the record's
    /// own dead letter (a bad input's), it is not tried a second time.
    /// `Err` only at shutdown.
    async fn settle(&self, rec: &Record) -> Result<(), Unfinished> {
        let (what, error) = match self.process(rec).await {
            Err(Unfinished::Refused { what, error }) => (what, error),
            Err(Unfinished::Reused { tenant, job_id }) => {
                let message = format!(
                    "tenant {tenant:?} has a job {job_id:?} for another request (another body); it is unchanged: \
                     a new request needs a new job_id"
                );
                tracing::info!(%message, "dead-lettering record");
                match self.dead_letter(rec, ErrorCode::JobIdInUse, &message).await {
                    Err(Unfinished::Refused { what, error }) => (what, error),
                    other => return other,
                }
            }
            done => return done,
        };
        let message = format!("{what} refused for good: {error}");
        let dead_letter_error = if what == DEAD_LETTER {
            error
        } else {
            match self.dead_letter(rec, ErrorCode::Internal, &message).await {
                Err(Unfinished::Refused { error, .. }) => error,
                other => return other,
            }
        };
        // Nowhere left to put it: say so loudly and move on rather than
        // stop the partition.
        metrics::counter!(sluice_schemas::metrics::DEAD_LETTER_FAILURES.name).increment(1);
        tracing::error!(%message, %dead_letter_error, "record dropped: dead-lettering was refused too");
        Ok(())
    }

    async fn process(&self, rec: &Record) -> Result<(), Unfinished> {
        let started = Instant::now();
        let req = match JobRequest::decode(&rec.payload) {
            Ok(req) => req,
            Err(e) => {
                if let Some(id) = &e.job_id {
                    tracing::Span::current().record("job_id", id.as_str());
                }
                let job_id = e.job_id.clone();
                return self.reject(rec, None, job_id, e.code, e.message).await;
            }
        };
        tracing::Span::current().record("job_id", req.job_id.as_str());
        // The header is what topic ACLs and the gateway vouch for; a body
        // that names another tenant is not trusted with either's job.
        if let Some(said) = rec.header(headers::TENANT)
            && said != req.tenant
        {
            let message = format!("the {} header names tenant {said:?}, the body {:?}", headers::TENANT, req.tenant);
            return self.reject(rec, Some(&req), None, ErrorCode::TenantMismatch, message).await;
        }
        let engine = match self.pool.route(&req) {
            Ok(e) => e,
            Err((code, msg)) => return self.reject(rec, Some(&req), Some(req.job_id.clone()), code, msg).await,
        };
        let digest = req.digest();
        let digest = Some(digest.as_str());
        let submitted = req.submitted_at.or(rec.timestamp);
        let now = Utc::now();
        let mut record = JobResult::queued(&req);
        record.submitted_at = submitted;
        record.worker_id = Some(self.cfg.worker_id.clone());
        let expires = req.expires_at(rec.timestamp);
        if expires.is_some_and(|at| at <= now) {
            return self.finish_job(expired(record, now), started, digest).await;
        }

        let version = engine.model().spec.version.clone();
        record.status = JobStatus::Running;
        record.started_at = Some(now);
        record.model_version = Some(version.clone());
        if self.cfg.running_after.is_zero() && self.store_running(&record, digest).await? {
            return self.publish_stored(&req.tenant, &req.job_id).await;
        }
        self.stages.done(Stage::Started, started);

        let key = self.store.cache_enabled().then(|| cache_key(self.cfg.cache_shared, &req.model, &version, &req));
        if let Some(k) = &key
            && let Ok(Some(output)) = self.store.cache_get(k).await
        {
            metrics::counter!(sluice_schemas::metrics::CACHE_HITS.name, "model" => req.model.clone()).increment(1);
            let finished = Utc::now();
            record.status = JobStatus::Succeeded;
            record.output = Some(output);
            record.finished_at = Some(finished);
            record.timings = Some(Timings {
                queued_ms: millis_between(submitted.unwrap_or(now), finished),
                inference_ms: 0,
                batch_size: 0,
                input_tokens: 0,
            });
            return self.finish_job(record, started, digest).await;
        }

        let inferring = Instant::now();
        let ran = {
            // The `running` record is stored only once the job's batch has
            // been in its forward pass for `running_after`: a job that
            // finishes sooner (or waits in the engine's queue, where it is
            // still queued) goes to its terminal status in one store write,
            // so a backlog costs no extra write per job. Nothing else
            // changes: the terminal write refuses to replace a finished or
            // cancelled record, so a redelivered or cancelled job only runs
            // once more and then publishes what the store holds.
            let started = tokio::sync::Notify::new();
            let infer = self.infer(&req, expires, &started);
            tokio::pin!(infer);
            let running_for = async {
                started.notified().await;
                tokio::time::sleep(self.cfg.running_after).await;
            };
            tokio::select! {
                biased;
                ran = &mut infer => ran?,
                _ = running_for, if !self.cfg.running_after.is_zero() => {
                    if self.store_running(&record, digest).await? {
                        // Its engine job is dropped unrun.
                        self.cancels.cancel(&topics::job_key(&req.tenant, &req.job_id));
                        return self.publish_stored(&req.tenant, &req.job_id).await;
                    }
                    infer.await?
                }
            }
        };
        let inferred = self.stages.done(Stage::Inferred, inferring);
        match ran {
            Ran::Done { version, out } => {
                let finished = Utc::now();
                let batch_start = finished - chrono::Duration::from_std(out.inference).unwrap_or_default();
                let queued_ms = millis_between(submitted.unwrap_or(now), batch_start);
                metrics::histogram!(sluice_schemas::metrics::QUEUE_TIME.name, "model" => req.model.clone())
                    .record(queued_ms as f64 / 1000.0);
                if key.is_some()
                    && let Err(e) = self
                        .store
                        .cache_put(&cache_key(self.cfg.cache_shared, &req.model, &version, &req), &out.output)
                        .await
                {
                    tracing::debug!(error = %e, "cache write failed");
                }
                record.status = JobStatus::Succeeded;
                record.model_version = Some(version);
                record.output = Some(out.output);
                record.finished_at = Some(finished);
                record.timings = Some(Timings {
                    queued_ms,
                    inference_ms: out.inference.as_millis() as u64,
                    batch_size: out.batch_size,
                    input_tokens: out.input_tokens,
                });
                self.finish_job(record, inferred, digest).await
            }
            Ran::Failed(code, message) => {
                record.status = JobStatus::Failed;
                record.finished_at = Some(Utc::now());
                record.error = Some(JobError { code, message });
                self.finish_job(record, inferred, digest).await
            }
            Ran::Expired => self.finish_job(expired(record, Utc::now()), inferred, digest).await,
            Ran::Cancelled => self.publish_stored(&req.tenant, &req.job_id).await,
            Ran::BadInput(code, msg) => self.reject(rec, Some(&req), Some(req.job_id.clone()), code, msg).await,
        }
    }

    /// Stores the `running` record (for the request with `digest`); `true`
    /// when the job has finished or been cancelled already (a redelivery,
    /// or a cancel) and must not run.
    async fn store_running(&self, record: &JobResult, digest: Option<&str>) -> Result<bool, Unfinished> {
        match self.durably("store running status", || self.store.put_for(record, None, digest)).await? {
            Put::Written | Put::Kept(JobStatus::Queued | JobStatus::Running) => Ok(false),
            Put::Kept(done) => {
                tracing::debug!(status = %done, "job already finished");
                Ok(true)
            }
            Put::Reused => Err(reused(record)),
        }
    }

    /// Runs the job, retrying while its model is unhealthy (the job waits
    /// for the breaker) and up to `max_attempts` while it is healthy.
    /// `started` is notified when an attempt's batch starts its forward pass.
    async fn infer(
        &self,
        req: &JobRequest,
        expires: Option<DateTime<Utc>>,
        started: &tokio::sync::Notify,
    ) -> Result<Ran, Unfinished> {
        let cancel = self.cancels.register(req);
        let deadline = expires.map(|at| {
            let left = (at - Utc::now()).to_std().unwrap_or_default();
            Instant::now() + left
        });
        let mut attempts = 0u32;
        let mut retried = false;
        loop {
            // Routed again on each attempt: a reload may have replaced the version.
            let engine = match self.pool.route(req) {
                Ok(e) => e,
                Err((code, msg)) => return Ok(Ran::BadInput(code, msg)),
            };
            let version = engine.model().spec.version.clone();
            let job = EngineJob {
                input: req.input.clone(),
                tenant: req.tenant.clone(),
                priority: req.priority,
                deadline,
                cancel: Some(cancel.flag.clone()),
                // Retries run alone: a bad input cannot fail its neighbours twice.
                solo: retried,
            };
            let outcome = match engine.enqueue(job).await {
                Ok(mut ticket) => {
                    if ticket.started().await {
                        started.notify_one();
                    }
                    ticket.wait().await
                }
                Err(e) => Err(e),
            };
            drop(engine);
            match outcome {
                Ok(out) => {
                    // JSON has no NaN or infinity: such an output would be
                    // stored as null and the job could not be read back.
                    if let Some(at) = out.output.non_finite() {
                        let message =
                            format!("model {} version {version} produced a NaN or infinity at {at}", req.model);
                        return Ok(Ran::Failed(ErrorCode::InferenceFailed, message));
                    }
                    return Ok(Ran::Done { version, out });
                }
                Err(WorkerError::Expired) => return Ok(Ran::Expired),
                Err(WorkerError::Cancelled) => return Ok(Ran::Cancelled),
                Err(WorkerError::InvalidInput(m) | WorkerError::Tokenizer(m)) => {
                    return Ok(Ran::BadInput(ErrorCode::InvalidInput, m));
                }
                Err(e) if e.is_retryable() && !self.shutdown.is_triggered() => {
                    // The engine was replaced by a reload: route again.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) if e.is_retryable() => return Err(Abandoned),
                Err(e) => {
                    retried = true;
                    metrics::counter!(sluice_schemas::metrics::JOB_RETRIES.name, "model" => req.model.clone())
                        .increment(1);
                    tokio::time::sleep(Backoff::DEFAULT.delay(attempts + 1)).await;
                    if self.pool.health(&req.model) == Some(BreakerState::Open) {
                        tracing::info!(error = %e, "model unhealthy; job waits for the circuit breaker");
                        self.wait_for_breaker(&req.model).await?;
                        continue;
                    }
                    attempts += 1;
                    if attempts >= self.cfg.max_attempts.max(1) {
                        return Ok(Ran::Failed(ErrorCode::InferenceFailed, e.to_string()));
                    }
                }
            }
        }
    }

    async fn wait_for_breaker(&self, model: &str) -> Result<(), Unfinished> {
        let mut shutdown = self.shutdown.clone();
        while self.pool.health(model) == Some(BreakerState::Open) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.wait() => return Err(Abandoned),
            }
        }
        Ok(())
    }

    /// Makes a terminal record durable: results store, results topic, mark.
    /// `since`: when the stage before storing began (for its timing);
    /// `digest`: the request's, when the record is its job's.
    async fn finish_job(&self, record: JobResult, since: Instant, digest: Option<&str>) -> Result<(), Unfinished> {
        debug_assert!(record.validate().is_ok(), "{:?}", record.validate());
        // Encoded once, for the store and the results topic.
        let json = record.encode();
        match self.durably("store result", || self.store.put_for(&record, Some(&json), digest)).await? {
            // The store's completion notice has woken long-polls.
            Put::Written => self.publish(&record, &json, self.stages.done(Stage::Stored, since)).await,
            // Someone else finished it first (a cancel, or a redelivery that
            // raced us): their record stands; make sure it is published.
            Put::Kept(_) => self.publish_stored(&record.tenant, &record.job_id).await,
            Put::Reused => Err(reused(&record)),
        }
    }

    /// Publishes the stored terminal record if nobody has yet (a crash
    /// between storing and publishing, or a cancel from the gateway).
    async fn publish_stored(&self, tenant: &str, job_id: &str) -> Result<(), Unfinished> {
        if let Some(Stored { record, published: false, .. }) =
            self.durably("read stored result", || self.store.get_meta(tenant, job_id)).await?
            && record.status.is_terminal()
        {
            let json = record.encode();
            // Stored but not marked: an earlier publish may have reached the topic.
            return self.publish_as(&record, &json, Instant::now(), true).await;
        }
        Ok(())
    }

    /// Publishes a stored terminal record (`json`: the record, serialised)
    /// and marks it published.
    async fn publish(&self, record: &JobResult, json: &str, since: Instant) -> Result<(), Unfinished> {
        self.publish_as(record, json, since, false).await
    }

    /// [`Ctx::publish`]; `maybe_repeated`: the result may be on the topic
    /// already. Sends after the first are marked so too: a send that timed
    /// out may still have been written.
    async fn publish_as(
        &self,
        record: &JobResult,
        json: &str,
        since: Instant,
        maybe_repeated: bool,
    ) -> Result<(), Unfinished> {
        let topic = topics::results(&self.cfg.topic_prefix);
        let key = topics::job_key(&record.tenant, &record.job_id);
        let sent = std::sync::atomic::AtomicBool::new(maybe_repeated);
        self.durably("publish result", || {
            let repeat = sent.swap(true, Ordering::AcqRel);
            let mut hdrs = vec![(headers::TENANT, record.tenant.as_bytes())];
            if repeat {
                hdrs.push((headers::MAYBE_REPEATED, b"1".as_slice()));
            }
            let (topic, key) = (&topic, &key);
            async move { self.producer.send(topic, Some(key.as_bytes()), json.as_bytes(), &hdrs).await }
        })
        .await?;
        let published = self.stages.done(Stage::Published, since);
        self.durably("mark result published", || self.store.mark_published(&record.tenant, &record.job_id)).await?;
        self.stages.done(Stage::Marked, published);
        metrics::counter!(sluice_schemas::metrics::JOBS_COMPLETED.name, "model" => record.model.clone(), "status" => record.status.as_str())
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
    ) -> Result<(), Unfinished> {
        tracing::info!(%code, %message, "dead-lettering record");
        self.dead_letter(rec, code, &message).await?;
        let Some(job_id) = job_id else { return Ok(()) };
        let tenant =
            req.map(|r| r.tenant.clone()).or_else(|| readable_tenant(rec)).unwrap_or_else(|| "unknown".to_owned());
        let model = req.map(|r| r.model.clone()).unwrap_or_else(|| model_of_topic(&self.cfg.topic_prefix, &rec.topic));
        let mut failed = JobResult::failed(job_id, tenant, model, code, message, Utc::now());
        failed.worker_id = Some(self.cfg.worker_id.clone());
        failed.submitted_at = req.and_then(|r| r.submitted_at).or(rec.timestamp);
        if let Some(r) = req {
            failed.metadata = r.metadata.clone();
            failed.callback = r.callback.clone();
        }
        // A job of this id made for another request is not failed by this
        // record, which is dead-lettered already.
        let digest = req.map(JobRequest::digest);
        match self.finish_job(failed, Instant::now(), digest.as_deref()).await {
            Err(Unfinished::Reused { .. }) => Ok(()),
            done => done,
        }
    }

    /// The record, as it came, on the dead-letter topic with `code` and
    /// `message` in its headers.
    async fn dead_letter(&self, rec: &Record, code: ErrorCode, message: &str) -> Result<(), Unfinished> {
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
        self.durably(DEAD_LETTER, || self.producer.send(&dlq, rec.key.as_deref(), &rec.payload, &hdrs)).await?;
        metrics::counter!(sluice_schemas::metrics::DEAD_LETTERED.name, "code" => code.as_str()).increment(1);
        Ok(())
    }

    /// Runs `op` with [`retry`]: retryable failures are retried until it
    /// succeeds or shutdown is requested ([`Abandoned`]); a permanent one is
    /// [`Unfinished::Refused`].
    async fn durably<T, E, F, Fut>(&self, what: &'static str, op: F) -> Result<T, Unfinished>
    where
        E: Retryable + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        retry(what, Backoff::DEFAULT, &self.shutdown, op).await.map_err(|e| match e {
            GaveUp::Shutdown => Abandoned,
            GaveUp::Permanent(e) => Unfinished::Refused { what, error: e.to_string() },
        })
    }
}

fn expired(mut record: JobResult, now: DateTime<Utc>) -> JobResult {
    record.status = JobStatus::Expired;
    record.output = None;
    record.finished_at = Some(now);
    record.error = Some(JobError {
        code: ErrorCode::DeadlineExceeded,
        message: "the job's deadline passed before inference started".into(),
    });
    record
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
