//! The open-loop driver every scenario uses.
//!
//! Each stream (a tenant) sends jobs at the rate of its current phase, on a
//! fixed schedule: job `i` of a phase is due at `phase start + i / rate`,
//! whatever the system does. A job's latency is counted from when it was
//! due, not from when it was sent, so a slow system cannot hide its latency
//! by slowing the generator (no coordinated omission). Jobs in flight are
//! bounded ([`Plan::max_outstanding`]); when the bound is reached a job is
//! sent late, its lateness counted in its latency and in `late_sends`.
//!
//! Jobs go through `POST /v1/jobs` or straight to the model's jobs topic.
//! Completion is read from the results topic (a consumer group of this
//! run's own), so finishing is observed where every consumer of Sluice sees
//! it, once per job, with the pipeline's own timings; a job with results
//! at two offsets there is counted as a duplicate delivery (the same record
//! read again by this consumer is not). Poison records (`--poison`)
//! always go to Kafka and are matched to their dead letters by key.
//!
//! Everything a report needs is derived afterwards from the per-job book
//! ([`Book`]): counts, percentiles, backlog over time.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use sluice_pipeline::kafka::{Consumer, Producer, RebalanceHooks};
use sluice_schemas::{JobResult, JobStatus, headers, topics};
use tokio::sync::Semaphore;

use super::target::Target;
use crate::procstat;

/// How jobs are submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// `POST /v1/jobs` (rate limits and backlog bounds answer 429/503).
    Rest,
    /// Produced to the model's jobs topic, as a Kafka producer would.
    Kafka,
}

/// A tenant sending jobs, phase after phase.
#[derive(Debug, Clone)]
pub struct Stream {
    pub tenant: String,
    /// REST API key of this stream (the target's when `None`).
    pub api_key: Option<String>,
    pub phases: Vec<Phase>,
}

/// A stretch of constant arrival rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    pub name: String,
    pub secs: f64,
    /// Jobs per second.
    pub rate: f64,
}

/// What a run sends and how.
pub struct Plan {
    pub model: String,
    /// Job inputs, used in turn.
    pub inputs: Vec<Value>,
    pub via: Via,
    pub streams: Vec<Stream>,
    /// Share of records (0..1) replaced by malformed ones.
    pub poison: f64,
    /// Most jobs awaiting their submit answer at once.
    pub max_outstanding: usize,
    /// Most jobs the run sends in all (a bound on its memory and length).
    pub max_jobs: u64,
    /// How long to wait, once sending stops, for accepted jobs to finish.
    pub drain: Duration,
}

/// How a submission was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Sent, no answer yet.
    Pending,
    /// 202 (or 200 for an id that exists), or acknowledged by the broker.
    Accepted,
    /// 429: over the tenant's rate limit.
    Limited,
    /// 503: the pipeline's backlog bound, or a dependency down.
    Overloaded,
    /// Anything else (another status, a connection error, a produce error).
    Error,
}

/// One job's life, as the driver saw it. Times are seconds since the run
/// started.
#[derive(Debug, Clone)]
pub struct Job {
    pub stream: usize,
    pub phase: usize,
    /// When it was due (its latency counts from here).
    pub due: f64,
    pub answer: Answer,
    /// When its terminal result was first seen on the results topic.
    pub done: Option<f64>,
    /// Terminal results for it on the results topic, at distinct offsets
    /// (more than one: the pipeline published it again).
    pub deliveries: u32,
    /// Where its first terminal result is (partition, offset): seeing that
    /// record again is this run's consumer reading it twice (it commits
    /// nothing, so a rebalance or a broker restart starts it over), not a
    /// second result.
    pub result_at: Option<(i32, i64)>,
    pub status: Option<JobStatus>,
    pub error_code: Option<String>,
    /// The pipeline's own timings from the result.
    pub queued_ms: Option<u64>,
    pub inference_ms: Option<u64>,
    pub batch_size: Option<u32>,
    /// From the result's `finished_at` to when it was seen on the results
    /// topic (ms; wall clocks of two machines when the target is remote).
    pub delivery_ms: Option<f64>,
}

impl Job {
    /// A job of `stream` due at `due` (seconds) in `phase`, not yet answered.
    pub fn new(stream: usize, phase: usize, due: f64) -> Job {
        Job {
            stream,
            phase,
            due,
            answer: Answer::Pending,
            done: None,
            deliveries: 0,
            result_at: None,
            status: None,
            error_code: None,
            queued_ms: None,
            inference_ms: None,
            batch_size: None,
            delivery_ms: None,
        }
    }

    /// Submit → result, in milliseconds.
    pub fn latency_ms(&self) -> Option<f64> {
        self.done.map(|d| ((d - self.due) * 1000.0).max(0.0))
    }
}

/// Everything a run recorded.
#[derive(Default)]
pub struct Book {
    /// Every job id of the run starts with `<tag>-`.
    pub tag: String,
    pub jobs: HashMap<String, Job>,
    /// Poison record key → the code of its dead letter, once seen.
    pub poison: HashMap<String, Option<String>>,
    /// Results for a job already finished, at another offset of the results
    /// topic (at-least-once redeliveries; a record read twice by this run's
    /// consumer does not count).
    pub duplicate_results: u64,
    /// Dead letters for jobs that were not poison (should be none).
    pub good_dead_lettered: u64,
    /// Jobs sent later than due because `max_outstanding` was reached.
    pub late_sends: u64,
    /// First few submission errors, verbatim.
    pub errors: Vec<String>,
    /// (seconds, process, bytes) samples of resident memory.
    pub rss: Vec<(f64, String, u64)>,
    /// When sending stopped and when the run ended (seconds).
    pub sent_until: f64,
    pub ended: f64,
}

/// The shared state of a running run.
pub struct Run {
    /// Every job id of the run starts with `<tag>-`.
    pub tag: String,
    start: Instant,
    book: Mutex<Book>,
    /// Set to stop sending at the next phase boundary.
    pub stop: AtomicBool,
    sent: AtomicU64,
}

impl Run {
    /// Reads the book under its lock.
    pub fn with_book<T>(&self, f: impl FnOnce(&Book) -> T) -> T {
        f(&self.book.lock().expect("book lock"))
    }

    /// Seconds since the run started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

struct NoHooks;

impl RebalanceHooks for NoHooks {
    fn revoking(&self, _: &[(String, i32)]) -> Vec<(String, i32, i64)> {
        // Nothing is ever committed: each run reads in a group of its own.
        Vec::new()
    }
}

/// Runs `plan` against `target`: sends every stream's phases, then waits
/// for accepted jobs to finish (at most `plan.drain`). `during` runs
/// alongside (a scenario's own checks; it may set [`Run::stop`]).
pub async fn drive<F, Fut>(target: &Target, plan: &Plan, during: F) -> anyhow::Result<Book>
where
    F: FnOnce(Arc<Run>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let tag = format!("load{}", chrono::Utc::now().format("%H%M%S%3f"));
    let results = topics::results(&target.topic_prefix);
    let dlq = topics::dlq(&target.topic_prefix);
    let consumer = Consumer::new(
        &target.brokers,
        "sluice-load",
        &format!("sluice-load-{tag}-{}", std::process::id()),
        &[results, dlq.clone()],
        Arc::new(NoHooks),
    )?;
    let producer = Producer::new(&target.brokers, "sluice-load", Duration::from_secs(30))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(plan.max_outstanding)
        .build()?;
    let submitter = Submitter {
        http_base: target.http.clone(),
        api_key: target.api_key.clone(),
        topic_prefix: target.topic_prefix.clone(),
        model: plan.model.clone(),
        via: plan.via,
        producer,
        http,
    };
    warm_up(&submitter, plan, &consumer, &tag).await?;
    let run = Arc::new(Run {
        tag: tag.clone(),
        start: Instant::now(),
        book: Mutex::new(Book::default()),
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
    });
    let planned: f64 = plan.streams.iter().map(|s| s.phases.iter().map(|p| p.secs).sum::<f64>()).fold(0.0, f64::max);
    let bar = progress(planned);

    let watch = watch_results(&run, &consumer, &dlq);
    let sample = sample(&run, target, &bar);
    let slots = Arc::new(Semaphore::new(plan.max_outstanding.max(1)));
    let sender = Arc::new(Sender { submitter, run: run.clone(), tag });
    let send = async {
        let streams =
            plan.streams.iter().enumerate().map(|(i, s)| sender.clone().stream(i, s.clone(), plan, slots.clone()));
        futures::future::join_all(streams).await;
        // Every submission answered.
        let _ = slots.acquire_many(plan.max_outstanding.max(1) as u32).await;
        run.book.lock().expect("book lock").sent_until = run.elapsed();
        drain(&run, plan.drain, &bar).await;
    };
    tokio::select! {
        _ = watch => unreachable!("the results consumer runs until the run ends"),
        _ = sample => unreachable!("the sampler runs until the run ends"),
        _ = async { tokio::join!(send, during(run.clone())) } => {}
    }
    bar.finish_and_clear();
    let mut book = std::mem::take(&mut *run.book.lock().expect("book lock"));
    book.ended = run.elapsed();
    book.tag = run.tag.clone();
    Ok(book)
}

/// Submits one job through REST or Kafka.
struct Submitter {
    http_base: String,
    api_key: Option<String>,
    topic_prefix: String,
    model: String,
    via: Via,
    producer: Producer,
    http: reqwest::Client,
}

impl Submitter {
    /// Sends job `id` of stream `s`; how it was answered, or why it failed.
    async fn submit(&self, id: &str, s: &Stream, input: &Value) -> Result<Answer, String> {
        let body = json!({"job_id": id, "tenant": s.tenant, "model": self.model, "input": input});
        match self.via {
            Via::Rest => self.post(&body, s.api_key.as_ref().or(self.api_key.as_ref())).await,
            Via::Kafka => {
                let topic = topics::jobs(&self.topic_prefix, &self.model);
                let hdrs = [(headers::TENANT, s.tenant.as_bytes())];
                match self.producer.send(&topic, Some(id.as_bytes()), body.to_string().as_bytes(), &hdrs).await {
                    Ok(_) => Ok(Answer::Accepted),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    async fn post(&self, body: &Value, key: Option<&String>) -> Result<Answer, String> {
        let mut req = self.http.post(format!("{}/v1/jobs", self.http_base)).json(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| format!("POST /v1/jobs: {e}"))?;
        match resp.status().as_u16() {
            200 | 202 => Ok(Answer::Accepted),
            429 => Ok(Answer::Limited),
            503 => Ok(Answer::Overloaded),
            s => Err(format!("POST /v1/jobs: {s} {}", resp.text().await.unwrap_or_default())),
        }
    }
}

/// Sends jobs on schedule and books them; shared by the streams' tasks.
struct Sender {
    submitter: Submitter,
    run: Arc<Run>,
    tag: String,
}

impl Sender {
    /// Sends one stream's phases on schedule, each job from a task of its
    /// own (answers are awaited through `slots`).
    async fn stream(self: Arc<Self>, index: usize, stream: Stream, plan: &Plan, slots: Arc<Semaphore>) {
        let start = tokio::time::Instant::from_std(self.run.start);
        let stream = Arc::new(stream);
        let mut phase_start = 0.0;
        let mut n = 0usize;
        for (p, phase) in stream.phases.iter().enumerate() {
            if self.run.stop.load(Ordering::Acquire) {
                break;
            }
            let due_count = (phase.secs * phase.rate).floor() as usize;
            for k in 0..due_count {
                if self.run.sent.fetch_add(1, Ordering::AcqRel) >= plan.max_jobs {
                    self.run.stop.store(true, Ordering::Release);
                    break;
                }
                let due = phase_start + k as f64 / phase.rate;
                tokio::time::sleep_until(start + Duration::from_secs_f64(due)).await;
                let permit = slots.clone().acquire_owned().await.expect("semaphore never closed");
                if self.run.elapsed() - due > 0.1 {
                    self.run.book.lock().expect("book lock").late_sends += 1;
                }
                let id = format!("{}-{index}-{n}", self.tag);
                let poison = poisoned(n, plan.poison);
                let input = plan.inputs[n % plan.inputs.len()].clone();
                n += 1;
                let (me, stream) = (self.clone(), stream.clone());
                tokio::spawn(async move {
                    if let Some(kind) = poison {
                        me.send_poison(&id, &stream.tenant, kind).await;
                    } else {
                        me.send_job(id, index, p, due, &stream, input).await;
                    }
                    drop(permit);
                });
            }
            phase_start += phase.secs;
        }
    }

    async fn send_job(&self, id: String, stream: usize, phase: usize, due: f64, s: &Stream, input: Value) {
        let job = Job::new(stream, phase, due);
        self.run.book.lock().expect("book lock").jobs.insert(id.clone(), job);
        let answer = self.submitter.submit(&id, s, &input).await;
        let mut book = self.run.book.lock().expect("book lock");
        let answer = answer.unwrap_or_else(|e| {
            if book.errors.len() < 10 {
                book.errors.push(e);
            }
            Answer::Error
        });
        if let Some(job) = book.jobs.get_mut(&id) {
            job.answer = answer;
        }
    }

    /// A malformed record, produced straight to the jobs topic: the worker
    /// must dead-letter it with a code and go on.
    async fn send_poison(&self, id: &str, tenant: &str, kind: usize) {
        let model = &self.submitter.model;
        let payload = match kind % 4 {
            // Not JSON at all.
            0 => format!("{{\"job_id\": \"{id}\", \"model\": \"{model}\", \"inp"),
            // No input.
            1 => json!({"job_id": id, "tenant": tenant, "model": model}).to_string(),
            // An input of the wrong type.
            2 => json!({"job_id": id, "tenant": tenant, "model": model, "input": {"text": 42}}).to_string(),
            // A model this topic does not serve.
            _ => json!({"job_id": id, "tenant": tenant, "model": "no-such-model", "input": {"text": "x"}}).to_string(),
        };
        self.run.book.lock().expect("book lock").poison.insert(id.to_owned(), None);
        let topic = topics::jobs(&self.submitter.topic_prefix, model);
        let hdrs = [(headers::TENANT, tenant.as_bytes())];
        if let Err(e) = self.submitter.producer.send(&topic, Some(id.as_bytes()), payload.as_bytes(), &hdrs).await {
            let mut book = self.run.book.lock().expect("book lock");
            book.poison.remove(id);
            if book.errors.len() < 10 {
                book.errors.push(format!("poison record: {e}"));
            }
        }
    }
}

/// Jobs sent, and their results awaited, before the clock starts: the
/// worker's group join, the sessions' first runs and this run's consumer
/// are not what a load test measures.
const WARM_UP_JOBS: usize = 8;
/// Longest wait for the warm-up results.
const WARM_UP_LIMIT: Duration = Duration::from_secs(180);

async fn warm_up(submitter: &Submitter, plan: &Plan, consumer: &Consumer, tag: &str) -> anyhow::Result<()> {
    let mut waiting = std::collections::HashSet::new();
    let stream = plan.streams.first().context("a plan without streams")?;
    for i in 0..WARM_UP_JOBS {
        let id = format!("{tag}-warm-{i}");
        match submitter.submit(&id, stream, &plan.inputs[i % plan.inputs.len()]).await {
            Ok(Answer::Accepted) => {}
            Ok(other) => anyhow::bail!("warm-up: job {id} answered {other:?}"),
            Err(e) => anyhow::bail!("warm-up: {e}"),
        }
        waiting.insert(id);
    }
    let seen = async {
        while !waiting.is_empty() {
            let rec = consumer.recv().await?;
            if let Ok(r) = serde_json::from_slice::<JobResult>(&rec.payload)
                && r.status.is_terminal()
            {
                waiting.remove(&r.job_id);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(WARM_UP_LIMIT, seen)
        .await
        .with_context(|| format!("warm-up: no results for {WARM_UP_JOBS} jobs within {WARM_UP_LIMIT:?}"))?
}

/// Whether the `n`-th record of a stream is poison (exactly `share` of them,
/// spread evenly), and which kind.
fn poisoned(n: usize, share: f64) -> Option<usize> {
    if share <= 0.0 {
        return None;
    }
    let before = (n as f64 * share).floor();
    let after = ((n + 1) as f64 * share).floor();
    (after > before).then_some(before as usize)
}

/// Reads results and dead letters into the book until the run ends.
async fn watch_results(run: &Run, consumer: &Consumer, dlq: &str) -> std::convert::Infallible {
    let mut reported = false;
    loop {
        let rec = match consumer.recv().await {
            Ok(rec) => rec,
            Err(e) => {
                // The broker restarting or down (the `faults` scenario):
                // librdkafka reconnects by itself; say so once.
                if !reported {
                    eprintln!("results consumer: {e} (retrying)");
                    reported = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let now = run.elapsed();
        let mut book = run.book.lock().expect("book lock");
        if rec.topic == dlq {
            let key = rec.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            let code = rec.header(headers::ERROR_CODE).unwrap_or("").to_owned();
            if let Some(seen) = book.poison.get_mut(&key) {
                seen.get_or_insert(code);
            } else if book.jobs.contains_key(&key) {
                book.good_dead_lettered += 1;
            }
            continue;
        }
        let Ok(result) = serde_json::from_slice::<JobResult>(&rec.payload) else { continue };
        if !result.status.is_terminal() {
            continue;
        }
        let Some(job) = book.jobs.get_mut(&result.job_id) else { continue };
        if job.result_at == Some((rec.partition, rec.offset)) {
            continue;
        }
        job.deliveries += 1;
        if job.done.is_some() {
            book.duplicate_results += 1;
            continue;
        }
        job.done = Some(now);
        job.result_at = Some((rec.partition, rec.offset));
        job.delivery_ms =
            result.finished_at.map(|f| (chrono::Utc::now() - f).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        job.status = Some(result.status);
        job.error_code = result.error.map(|e| e.code.as_str().to_owned());
        if let Some(t) = result.timings {
            job.queued_ms = Some(t.queued_ms);
            job.inference_ms = Some(t.inference_ms);
            job.batch_size = Some(t.batch_size);
        }
    }
}

/// Samples memory each second and shows progress.
async fn sample(run: &Run, target: &Target, bar: &indicatif::ProgressBar) -> std::convert::Infallible {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = run.elapsed();
        let mut book = run.book.lock().expect("book lock");
        for (name, pid) in &target.pids {
            if let Some(bytes) = procstat::rss_bytes(*pid) {
                book.rss.push((now, name.clone(), bytes));
            }
        }
        let (mut accepted, mut done, mut refused) = (0u64, 0u64, 0u64);
        for j in book.jobs.values() {
            match j.answer {
                Answer::Accepted => accepted += 1,
                Answer::Limited | Answer::Overloaded | Answer::Error => refused += 1,
                Answer::Pending => {}
            }
            done += u64::from(j.done.is_some());
        }
        bar.set_position(now as u64);
        bar.set_message(format!(
            "sent {}  accepted {accepted}  refused {refused}  done {done}  backlog {}",
            book.jobs.len() + book.poison.len(),
            accepted.saturating_sub(done)
        ));
    }
}

/// Waits until every accepted job has a result, or `limit` has passed.
async fn drain(run: &Run, limit: Duration, bar: &indicatif::ProgressBar) {
    let until = Instant::now() + limit;
    bar.set_prefix("draining");
    while Instant::now() < until {
        let waiting = run.with_book(|b| {
            b.jobs.values().filter(|j| j.answer == Answer::Accepted && j.done.is_none()).count()
                + b.poison.values().filter(|c| c.is_none()).count()
        });
        if waiting == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn progress(planned: f64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(planned.ceil() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos:>4}/{len}s  {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix("sending");
    bar
}

/// Percentile summary of latencies (ms) in an HdrHistogram.
pub fn histogram(values: impl Iterator<Item = f64>) -> hdrhistogram::Histogram<u64> {
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("valid bounds");
    for v in values {
        h.saturating_record(v.round().max(1.0) as u64);
    }
    h
}

/// Counts by answer.
pub fn answers<'a>(jobs: impl Iterator<Item = &'a Job>) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for j in jobs {
        let k = match j.answer {
            Answer::Pending => "unanswered",
            Answer::Accepted => "accepted",
            Answer::Limited => "429",
            Answer::Overloaded => "503",
            Answer::Error => "error",
        };
        *out.entry(k).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_is_the_requested_share_spread_evenly() {
        let n = 10_000;
        let picked: Vec<usize> = (0..n).filter(|&i| poisoned(i, 0.05).is_some()).collect();
        assert_eq!(picked.len(), 500);
        assert!(picked.windows(2).all(|w| w[1] - w[0] == 20), "one in twenty, evenly");
        let kinds: Vec<usize> = (0..n).filter_map(|i| poisoned(i, 0.05)).take(8).collect();
        assert_eq!(kinds, (0..8).collect::<Vec<_>>(), "every kind in turn");
        assert!((0..n).all(|i| poisoned(i, 0.0).is_none()));
    }

    #[test]
    fn latency_counts_from_when_the_job_was_due() {
        let j = Job {
            answer: Answer::Accepted,
            done: Some(10.25),
            deliveries: 1,
            status: Some(JobStatus::Succeeded),
            ..Job::new(0, 0, 10.0)
        };
        assert_eq!(j.latency_ms(), Some(250.0));
        let h = histogram([5.0, 10.0, 1000.0].into_iter());
        assert_eq!(h.len(), 3);
        assert!(h.value_at_quantile(1.0) >= 1000);
    }
}
