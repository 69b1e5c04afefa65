//! The notifier: completion callbacks. A consumer group of its own on
//! `<prefix>.results` that POSTs each terminal result whose job asked for
//! a callback ([`sluice_schemas::Callback`]) to the callback's URL, signed
//! with the tenant's secret ([`sluice_schemas::callback`]).
//!
//! At least once: a record's offset is committed only when its callback is
//! delivered or dead-lettered on `<prefix>.callbacks.dlq`. Deliveries run
//! concurrently, so each partition commits up to its oldest callback still
//! pending ([`Tracker`]); a crash repeats the callbacks after that point,
//! with the same `Sluice-Delivery-Id`, for receivers to dedupe.
//!
//! Isolation: each destination (scheme, host, port) has its own
//! `per_host_concurrency` slots and at most `per_host_pending` callbacks
//! held; past that its callbacks are dead-lettered at once
//! (`callback_saturated`), so a dead receiver holds a bounded share of the
//! `max_pending` callbacks and never the consumer. At `max_pending` (or
//! `max_pending_bytes`) the consumer pauses until callbacks finish.
//!
//! Batches: a result that is a line of a batch with a `callback_url`
//! ([`sluice_schemas::BatchLine`]) is counted in the results store
//! ([`Store::batch_line_done`], once per line whatever the replays). The
//! count that completes the batch delivers one `batch.completed`
//! ([`sluice_schemas::BatchCompleted`]) with a delivery id of the batch's
//! own; once it is delivered or dead-lettered the store remembers it, so a
//! replayed line does not announce the batch again. The line's offset is
//! held until its count (and a completion it makes) is done, like a
//! callback's, so a crash before the count recounts the line, which the
//! store ignores, and a crash before the completion was announced
//! announces it again, under the same id.
//!
//! - [`policy`]: where callbacks may go (allowlist, SSRF protection); also
//!   the gateway's check at submission.
//! - [`deliver`]: one callback's attempts, retries and outcome.

mod config;
mod deliver;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use sluice_schemas::callback::delivery_id;
use sluice_schemas::{BatchCompleted, BatchLine, CallbackEvent, JobResult, JobStatus, batch, headers, topics};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use config::NotifierConfig;
pub use deliver::{Delivery, Destination, Outcome, Reason, Sender, Subject};
pub use policy::{Policy, Refusal};

use crate::config::Config;
use crate::kafka::{Consumer, KafkaError, Producer, RebalanceHooks, Record};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// What stops the notifier from starting.
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The notifier's consumer group (`callbacks.consumer_group`, or
/// `<prefix>.notifier`).
pub fn group(cfg: &Config) -> String {
    match cfg.callbacks.consumer_group.as_str() {
        "" => format!("{}.notifier", cfg.kafka.topic_prefix),
        g => g.to_owned(),
    }
}

/// The notifier's state, for `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    stopped: Mutex<Option<String>>,
    pending: AtomicUsize,
    paused: AtomicBool,
}

impl Health {
    /// `(ready, report)`: ready while the consumer loop runs.
    pub fn report(&self) -> (bool, Value) {
        let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let status = stopped.clone().map_or_else(|| "ok".to_owned(), |e| format!("stopped: {e}"));
        let body = json!({
            "status": status,
            "pending": self.pending.load(Ordering::Relaxed),
            "paused": self.paused.load(Ordering::Relaxed),
        });
        (stopped.is_none(), body)
    }
}

/// Starts the notifier in its consumer group until `shutdown`; `store`
/// counts batches' finished lines.
pub fn start(
    cfg: &Config,
    bootstrap: &str,
    store: Store,
    shutdown: &Shutdown,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Arc<Health>, NotifierError> {
    if cfg.callbacks.signing_key.is_empty() {
        return Err(NotifierError::Config("callbacks.signing_key is not set: deliveries could not be signed".into()));
    }
    let policy = Arc::new(Policy::from_config(&cfg.callbacks).map_err(NotifierError::Config)?);
    // Every outcome's series from the start, at 0: rates and alerts over
    // them see a notifier that never dead-lettered anything.
    for reason in Reason::ALL {
        metrics::counter!(sluice_schemas::metrics::CALLBACK_DEAD_LETTERS.name, "reason" => reason.label()).absolute(0);
    }
    for outcome in ["delivered", "dead_lettered"] {
        metrics::counter!(sluice_schemas::metrics::CALLBACK_DELIVERIES.name, "outcome" => outcome).absolute(0);
    }
    let settings = NotifierConfig::from_config(cfg);
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let c = &cfg.callbacks;
    let timeouts = (
        Duration::from_millis(c.session_timeout_ms.max(1000)),
        Duration::from_millis(c.max_poll_interval_ms.max(1000)),
    );
    let prefix = &cfg.kafka.topic_prefix;
    let consumer = Consumer::with_timeouts(
        bootstrap,
        "sluice-notifier",
        &group(cfg),
        &[topics::results(prefix)],
        Arc::new(Hooks(tracker.clone())),
        Some(timeouts),
    )?;
    let producer = Producer::with_max_message_bytes(
        bootstrap,
        "sluice-notifier",
        cfg.produce_timeout(),
        cfg.kafka.max_message_bytes,
    )?;
    let stage = Stage {
        consumer,
        producer,
        sender: Arc::new(Sender::new(policy, settings.clone())?),
        store,
        cfg: settings,
        dlq: topics::callbacks_dlq(prefix),
        tracker,
        health: Arc::new(Health::default()),
        destinations: HashMap::new(),
        waiting: None,
    };
    let health = stage.health.clone();
    let sd = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let health = stage.health.clone();
        if let Err(e) = stage.run(sd).await {
            tracing::error!(error = %e, "notifier stopped");
            *health.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    }));
    Ok(health)
}

/// A delivery task's report to the consumer loop.
struct Done {
    topic: String,
    partition: i32,
    offset: i64,
    generation: u64,
    bytes: usize,
    /// False when stopped before the callback was delivered or
    /// dead-lettered: the offset stays pending (not committed).
    finished: bool,
}

struct Stage {
    consumer: Consumer,
    producer: Producer,
    sender: Arc<Sender>,
    store: Store,
    cfg: NotifierConfig,
    dlq: String,
    tracker: Arc<Mutex<Tracker>>,
    health: Arc<Health>,
    destinations: HashMap<String, Arc<Destination>>,
    /// A callback whose destination is at `per_host_pending` and keeps up:
    /// nothing more is read until it has room (or stops keeping up).
    waiting: Option<Waiting>,
}

struct Waiting {
    source: (String, i32, i64),
    generation: u64,
    delivery: Delivery,
    dest: Arc<Destination>,
}

impl Stage {
    async fn run(mut self, mut shutdown: Shutdown) -> Result<(), KafkaError> {
        // Unbounded in type, bounded in fact: one report per callback held,
        // and at most `max_pending` (plus what one fetch brings past it) are.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut paused = false;
        let gauge = metrics::gauge!(sluice_schemas::metrics::CALLBACK_PENDING.name);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                // Before the reports: a steady stream of them must not
                // starve the commits.
                _ = tick.tick() => {
                    self.consumer.rejoin_if_wedged().await;
                    self.commit(false);
                    // Destinations with nothing held are forgotten.
                    self.destinations.retain(|_, d| d.pending() > 0);
                }
                Some(done) = done_rx.recv() => {
                    self.finished(done);
                    while let Ok(done) = done_rx.try_recv() {
                        self.finished(done);
                    }
                }
                rec = self.consumer.recv(), if self.waiting.is_none() => match rec {
                    Ok(rec) => self.take(rec, &done_tx, &shutdown),
                    Err(e) => {
                        tracing::warn!(error = %e, "notifier: consume error");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
            if let Some(w) = self.waiting.take() {
                self.dispatch(w, &done_tx, &shutdown);
            }
            let (pending, bytes) = self.tracker().held();
            gauge.set(pending as f64);
            self.health.pending.store(pending, Ordering::Relaxed);
            let full = pending >= self.cfg.max_pending || bytes >= self.cfg.max_pending_bytes;
            if full != paused {
                let r = if full { self.consumer.pause().map(|_| ()) } else { self.consumer.resume() };
                match r {
                    Ok(()) => paused = full,
                    Err(e) => tracing::warn!(error = %e, "notifier: pause/resume failed; tried again"),
                }
                self.health.paused.store(paused, Ordering::Relaxed);
            }
        }
        // Stopping: deliveries waiting to retry give up at once (not
        // committed: the next owner delivers them); attempts in flight get
        // up to their timeout to finish.
        let deadline = tokio::time::Instant::now() + self.cfg.timeout + Duration::from_secs(1);
        // A callback still waiting for room never started: its offset stays.
        while self.tracker().held().0 > self.waiting.is_some() as usize {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(done)) => self.finished(done),
                _ => break,
            }
        }
        self.commit(true);
        Ok(())
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finished(&self, done: Done) {
        self.tracker().finish(&done);
    }

    fn commit(&self, sync: bool) {
        let offsets = self.tracker().committable();
        tracing::debug!(?offsets, "notifier: committing");
        let r = if sync { self.consumer.commit_sync(&offsets) } else { self.consumer.commit(&offsets) };
        match r {
            Ok(()) => self.tracker().committed(&offsets),
            Err(e) => tracing::warn!(error = %e, "notifier: offset commit failed; retried next tick"),
        }
    }

    /// A results-topic record: a batch line to count, a callback to
    /// deliver, both, or nothing to do.
    fn take(&mut self, mut rec: Record, done_tx: &mpsc::UnboundedSender<Done>, shutdown: &Shutdown) {
        let generation = self.tracker().seen(&rec.topic, rec.partition, rec.offset);
        let Some(result) = decode(&rec) else { return };
        let source = (rec.topic.clone(), rec.partition, rec.offset);
        if let Some(line) = BatchStep::of(&result) {
            self.count_line(line, source.clone(), generation, done_tx, shutdown);
        }
        let Some(delivery) = delivery(result, &mut rec) else { return };
        let dest = self.destination(&delivery.url);
        // Held from here: its offset is not committed past until it is
        // delivered or dead-lettered, waiting included.
        self.tracker().hold(&rec.topic, rec.partition, rec.offset, delivery.body.len());
        let w = Waiting { source, generation, delivery, dest };
        self.dispatch(w, done_tx, shutdown);
    }

    /// The slots and holdings of `url`'s destination.
    fn destination(&mut self, url: &str) -> Arc<Destination> {
        let concurrency = self.cfg.per_host_concurrency;
        self.destinations.entry(destination_key(url)).or_insert_with(|| Arc::new(Destination::new(concurrency))).clone()
    }

    /// Counts a finished batch line, and when it completes the batch,
    /// delivers the batch's completion (through the destination's slots,
    /// like any callback). The offset is held meanwhile.
    fn count_line(
        &mut self,
        step: BatchStep,
        source: (String, i32, i64),
        generation: u64,
        done_tx: &mpsc::UnboundedSender<Done>,
        shutdown: &Shutdown,
    ) {
        let dest = self.destination(&step.url);
        let bytes = step.url.len() + step.id.len();
        self.tracker().hold(&source.0, source.1, source.2, bytes);
        let (sender, producer, dlq, store) =
            (self.sender.clone(), self.producer.clone(), self.dlq.clone(), self.store.clone());
        let (done_tx, shutdown) = (done_tx.clone(), shutdown.clone());
        tokio::spawn(async move {
            let finished = step.run(&store, &sender, &dest, &producer, &dlq, &source, &shutdown).await;
            let (topic, partition, offset) = source;
            let _ = done_tx.send(Done { topic, partition, offset, generation, bytes, finished });
        });
    }

    /// Starts the delivery of `w`, or dead-letters it at once when its
    /// destination is full and does not keep up, or keeps it waiting (and
    /// reads nothing more) while its destination is full and keeps up.
    fn dispatch(&mut self, w: Waiting, done_tx: &mpsc::UnboundedSender<Done>, shutdown: &Shutdown) {
        let full = w.dest.pending() >= self.cfg.per_host_pending;
        if full && w.dest.keeps_up(self.cfg.slow_after) {
            self.waiting = Some(w);
            return;
        }
        let Waiting { source, generation, delivery, dest } = w;
        let saturated = full;
        let bytes = delivery.body.len();
        dest.hold();
        let (sender, producer, dlq) = (self.sender.clone(), self.producer.clone(), self.dlq.clone());
        let (done_tx, shutdown) = (done_tx.clone(), shutdown.clone());
        let per_host_pending = self.cfg.per_host_pending;
        tokio::spawn(async move {
            let outcome = if saturated {
                Some(Outcome::DeadLetter {
                    reason: Reason::Saturated,
                    message: format!(
                        "{per_host_pending} callbacks already pending for this destination (callbacks.per_host_pending), which does not keep up (no 2xx within callbacks.slow_after_ms)"
                    ),
                    attempts: 0,
                })
            } else {
                sender.deliver(&delivery, &dest, &shutdown).await
            };
            let finished = match outcome {
                Some(outcome) => record(&producer, &dlq, &delivery, &outcome, &source, &shutdown).await,
                None => false,
            };
            dest.release();
            let (topic, partition, offset) = source;
            let _ = done_tx.send(Done { topic, partition, offset, generation, bytes, finished });
        });
    }
}

/// A result worth a look: one whose record names a callback or a batch
/// (most name neither, and are not decoded; a value that merely holds the
/// word costs a decode, never a missed callback).
fn decode(rec: &Record) -> Option<JobResult> {
    let finder = |key: &[u8]| memchr::memmem::find(&rec.payload, key).is_some();
    if !finder(b"\"callback\"") && !finder(b"\"batch\"") {
        return None;
    }
    match JobResult::decode(&rec.payload) {
        Ok(r) => Some(r),
        Err(e) => {
            metrics::counter!(sluice_schemas::metrics::SINK_UNDECODABLE.name).increment(1);
            tracing::warn!(partition = rec.partition, offset = rec.offset, error = %e, "notifier: undecodable result record; skipped");
            None
        }
    }
}

/// The callback a result asks for, if any: a terminal result whose
/// callback wants its status. The body is the record's bytes, moved.
fn delivery(result: JobResult, rec: &mut Record) -> Option<Delivery> {
    let callback = result.callback.as_ref().filter(|c| c.wants(result.status))?;
    let event = CallbackEvent::of(result.status)?;
    Some(Delivery {
        url: callback.url.clone(),
        body: Bytes::from(std::mem::take(&mut rec.payload)),
        id: delivery_id(&result.tenant, &result.job_id, event, result.finished_at),
        tenant: result.tenant,
        subject: Subject::Job(result.job_id),
        event: event.header_value(),
        arrived: Instant::now(),
    })
}

/// A finished line of a batch that asked for a `batch.completed` callback.
struct BatchStep {
    tenant: String,
    id: String,
    index: u32,
    total: u32,
    status: JobStatus,
    url: String,
}

impl BatchStep {
    fn of(result: &JobResult) -> Option<BatchStep> {
        let BatchLine { id, index, total, callback_url } = result.batch.as_ref()?;
        if !result.status.is_terminal() || index >= total {
            return None;
        }
        Some(BatchStep {
            tenant: result.tenant.clone(),
            id: id.clone(),
            index: *index,
            total: *total,
            status: result.status,
            url: callback_url.clone()?,
        })
    }

    /// Counts the line (retrying while the store is unavailable) and, when
    /// the batch is complete and not yet announced, delivers its completion
    /// and then marks it announced. `false`: stopped before all of that was
    /// done (the offset stays pending).
    #[allow(clippy::too_many_arguments)]
    async fn run(
        self,
        store: &Store,
        sender: &Sender,
        dest: &Destination,
        producer: &Producer,
        dlq: &str,
        source: &(String, i32, i64),
        shutdown: &Shutdown,
    ) -> bool {
        let backoff = crate::retry::Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(5) };
        let counted = crate::retry::retry("batch line count", backoff, shutdown, || {
            store.batch_line_done(&self.tenant, &self.id, self.index, self.status)
        })
        .await;
        let Ok(progress) = counted else { return false };
        if progress.done < self.total || progress.announced {
            return true;
        }
        let summary = BatchCompleted::new(&self.id, &self.tenant, self.total, progress.counts, chrono::Utc::now());
        let delivery = Delivery {
            url: self.url,
            body: Bytes::from(serde_json::to_vec(&summary).expect("a BatchCompleted serialises. This is a bug.")),
            id: batch::completed_delivery_id(&self.tenant, &self.id),
            tenant: self.tenant.clone(),
            subject: Subject::Batch(self.id.clone()),
            event: batch::COMPLETED_EVENT,
            arrived: Instant::now(),
        };
        dest.hold();
        let outcome = sender.deliver(&delivery, dest, shutdown).await;
        let recorded = match outcome {
            Some(outcome) => record(producer, dlq, &delivery, &outcome, source, shutdown).await,
            None => false,
        };
        dest.release();
        if !recorded {
            return false;
        }
        crate::retry::retry("batch announced", backoff, shutdown, || store.batch_announced(&self.tenant, &self.id))
            .await
            .is_ok()
    }
}

/// Counts the outcome and, for a dead letter, produces it to the
/// callbacks dead-letter topic (retried until it is acknowledged). `false`:
/// stopped before the dead letter was written.
async fn record(
    producer: &Producer,
    dlq: &str,
    d: &Delivery,
    outcome: &Outcome,
    (topic, partition, offset): &(String, i32, i64),
    shutdown: &Shutdown,
) -> bool {
    let (reason, message, attempts) = match outcome {
        Outcome::Delivered { .. } => {
            metrics::counter!(sluice_schemas::metrics::CALLBACK_DELIVERIES.name, "outcome" => "delivered").increment(1);
            metrics::histogram!(sluice_schemas::metrics::CALLBACK_DELIVERY_SECONDS.name)
                .record(d.arrived.elapsed().as_secs_f64());
            return true;
        }
        Outcome::DeadLetter { reason, message, attempts } => (reason, message, attempts),
    };
    tracing::warn!(delivery_id = %d.id, about = d.subject.id(), tenant = %d.tenant, code = reason.code(), %message, "callback dead-lettered");
    let (partition, offset, attempts) = (partition.to_string(), offset.to_string(), attempts.to_string());
    let hdrs: [(&str, &[u8]); 8] = [
        (headers::ERROR_CODE, reason.code().as_bytes()),
        (headers::ERROR_MESSAGE, message.as_bytes()),
        (headers::CALLBACK_URL, d.url.as_bytes()),
        (headers::CALLBACK_DELIVERY_ID, d.id.as_bytes()),
        (headers::CALLBACK_ATTEMPTS, attempts.as_bytes()),
        (headers::SOURCE_TOPIC, topic.as_bytes()),
        (headers::SOURCE_PARTITION, partition.as_bytes()),
        (headers::SOURCE_OFFSET, offset.as_bytes()),
    ];
    let key = topics::job_key(&d.tenant, d.subject.id());
    let backoff = crate::retry::Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(5) };
    let sent = crate::retry::retry("callback dead letter", backoff, shutdown, || {
        producer.send(dlq, Some(key.as_bytes()), &d.body, &hdrs)
    })
    .await;
    match sent {
        Ok(_) => {}
        Err(crate::retry::GaveUp::Shutdown) => return false,
        // The topic refuses this record for good (too large for it): there
        // is nowhere left to put it; holding its offset would stall the
        // partition for ever.
        Err(crate::retry::GaveUp::Permanent(e)) => {
            metrics::counter!(sluice_schemas::metrics::DEAD_LETTER_FAILURES.name).increment(1);
            tracing::error!(delivery_id = %d.id, about = d.subject.id(), error = %e, "callback dead letter refused by its topic; dropped");
            return true;
        }
    }
    metrics::counter!(sluice_schemas::metrics::CALLBACK_DELIVERIES.name, "outcome" => "dead_lettered").increment(1);
    metrics::counter!(sluice_schemas::metrics::CALLBACK_DEAD_LETTERS.name, "reason" => reason.label()).increment(1);
    true
}

/// Where a URL's requests go: scheme, host and port (what shares a
/// destination's slots).
fn destination_key(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!("{}://{}:{}", u.scheme(), u.host_str().unwrap_or(""), u.port_or_known_default().unwrap_or(0)),
        Err(_) => url.to_owned(),
    }
}

/// Which offsets of each partition held are done, and what may be
/// committed: the oldest pending callback's offset, or past the last
/// record seen when none is pending.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    parts: HashMap<(String, i32), Part>,
    next_generation: u64,
    /// Callbacks held in all, and their bodies' bytes (revoked partitions'
    /// included, until their tasks end).
    pending: usize,
    bytes: usize,
}

#[derive(Debug)]
struct Part {
    /// Names this holding of the partition apart from an earlier one (a
    /// revoke and a re-assign): a late report from before is ignored.
    generation: u64,
    /// Offsets with work in flight, and how much (a record may hold a
    /// callback and a batch line's count at once).
    pending: BTreeMap<i64, usize>,
    /// Past the last record seen.
    next: i64,
    committed: i64,
}

impl Tracker {
    /// A record at `offset` was read; returns the partition's generation.
    pub(crate) fn seen(&mut self, topic: &str, partition: i32, offset: i64) -> u64 {
        let generation = &mut self.next_generation;
        let part = self.parts.entry((topic.to_owned(), partition)).or_insert_with(|| {
            *generation += 1;
            Part { generation: *generation, pending: BTreeMap::new(), next: offset, committed: -1 }
        });
        part.next = part.next.max(offset + 1);
        part.generation
    }

    /// The record at `offset` has a callback in flight.
    pub(crate) fn hold(&mut self, topic: &str, partition: i32, offset: i64, bytes: usize) {
        if let Some(part) = self.parts.get_mut(&(topic.to_owned(), partition)) {
            *part.pending.entry(offset).or_default() += 1;
        }
        self.pending += 1;
        self.bytes += bytes;
    }

    fn finish(&mut self, done: &Done) {
        self.pending -= 1;
        self.bytes -= done.bytes;
        if !done.finished {
            return;
        }
        if let Some(part) = self.parts.get_mut(&(done.topic.clone(), done.partition))
            && part.generation == done.generation
            && let Some(n) = part.pending.get_mut(&done.offset)
        {
            *n -= 1;
            if *n == 0 {
                part.pending.remove(&done.offset);
            }
        }
    }

    pub(crate) fn held(&self) -> (usize, usize) {
        (self.pending, self.bytes)
    }

    /// `(topic, partition, next offset)` that may be committed and was not yet.
    pub(crate) fn committable(&self) -> Vec<(String, i32, i64)> {
        self.parts
            .iter()
            .map(|((t, p), part)| (t.clone(), *p, part.pending.keys().next().copied().unwrap_or(part.next)))
            .filter(|(t, p, o)| self.parts[&(t.clone(), *p)].committed < *o)
            .collect()
    }

    pub(crate) fn committed(&mut self, offsets: &[(String, i32, i64)]) {
        for (t, p, o) in offsets {
            if let Some(part) = self.parts.get_mut(&(t.clone(), *p)) {
                part.committed = part.committed.max(*o);
            }
        }
    }

    /// Forgets revoked partitions; returns what may be committed for them.
    pub(crate) fn revoke(&mut self, partitions: &[(String, i32)]) -> Vec<(String, i32, i64)> {
        partitions
            .iter()
            .filter_map(|key| {
                let part = self.parts.remove(key)?;
                let next = part.pending.keys().next().copied().unwrap_or(part.next);
                (next > part.committed).then(|| (key.0.clone(), key.1, next))
            })
            .collect()
    }
}

/// Rebalance hooks: a revoked partition's progress is committed before it
/// goes, and its callbacks still in flight no longer count for it.
struct Hooks(Arc<Mutex<Tracker>>);

impl RebalanceHooks for Hooks {
    fn revoking(&self, partitions: &[(String, i32)]) -> Vec<(String, i32, i64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).revoke(partitions)
    }
}

#[cfg(test)]
mod tests;
