//! The inference engine of one model version: admission, preprocessing, the
//! batcher, and inference threads that own the ONNX Runtime sessions.
//!
//! ```text
//! InferenceHandle ─► admission (queue_capacity permits) ─► preprocess thread ─► batcher task ─(on demand)─► inference thread(s)
//!  (clone = a Sender)   full: enqueue waits,                tokenize / check      Scheduler:               blocking_recv → run
//!                       try_enqueue → Overloaded                                  lanes, tenants, lengths
//! ```
//!
//! Callers hold only an [`InferenceHandle`] (a sender, a semaphore and
//! shared read-only state). The scheduler's state lives in the batcher task,
//! the sessions live on OS threads, and tokenisation runs on its own thread,
//! so nothing CPU-heavy runs on the async runtime's threads. When the last
//! handle drops, queued jobs still run, then the task and threads exit: a
//! replaced model version finishes its in-flight batches on its old session.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_schemas::{Input, Output, Priority};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::WorkerError;
use crate::backend::{Prepared, Preprocessor, Runner};
use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::model::ModelVersion;
use crate::runtime::{ExecutionProvider, SessionConfig};
use crate::scheduler::{Dropped, Entry, Limits, Scheduler};

/// Batching and threading of one model's engine. `model.toml`'s
/// `[batching]` overrides the batch limits per model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most jobs in one forward pass.
    pub max_batch_size: usize,
    /// Most padded tokens (longest input × jobs) in one forward pass.
    pub max_batch_tokens: usize,
    /// Longest the oldest queued job waits for more jobs (Triton's
    /// `max_queue_delay`): for a batch to fill, or, with length-aware
    /// grouping, for a window of candidates to choose a tight batch from.
    pub max_wait: Duration,
    /// A priority lane whose oldest job waited this long is served first.
    pub starvation_after: Duration,
    /// Group jobs of similar length into a batch (less padding).
    pub length_aware: bool,
    /// Bound on jobs admitted and not yet running. When it is reached,
    /// [`InferenceHandle::enqueue`] waits (back-pressure on the Kafka
    /// consumer) and [`InferenceHandle::try_enqueue`] fails with
    /// [`WorkerError::Overloaded`].
    pub queue_capacity: usize,
    /// OS threads running inference, each with its own session; 0: one per
    /// core (one on a GPU).
    pub inference_threads: usize,
    /// ONNX Runtime settings.
    pub session: SessionConfig,
    /// When to stop feeding a failing model.
    pub breaker: BreakerConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_size: 32,
            max_batch_tokens: 16_384,
            max_wait: Duration::from_millis(5),
            starvation_after: Duration::from_secs(2),
            length_aware: true,
            queue_capacity: 1024,
            inference_threads: 1,
            session: SessionConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }
}

/// One job for the engine.
#[derive(Debug, Clone)]
pub struct EngineJob {
    pub input: Input,
    pub tenant: String,
    pub priority: Priority,
    /// Not started by then: the job fails with [`WorkerError::Expired`].
    pub deadline: Option<Instant>,
    /// Set it to cancel the job while it waits ([`WorkerError::Cancelled`]).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Run in a batch of its own (retries after a failed batch).
    pub solo: bool,
}

impl EngineJob {
    /// A normal-priority job with no deadline (tests, benchmarks).
    pub fn new(input: Input, tenant: &str) -> EngineJob {
        EngineJob {
            input,
            tenant: tenant.to_owned(),
            priority: Priority::Normal,
            deadline: None,
            cancel: None,
            solo: false,
        }
    }

    /// A text job of the default tenant.
    pub fn text(text: impl Into<String>) -> EngineJob {
        EngineJob::new(Input::Text(text.into()), "default")
    }
}

/// What one job got out of the engine.
#[derive(Debug, Clone)]
pub struct Inferred {
    pub output: Output,
    /// Tokens of the input after truncation (0 for tensor inputs).
    pub input_tokens: u32,
    /// Jobs in the batch this job ran in.
    pub batch_size: u32,
    /// Share of the batch that was padding.
    pub padding_ratio: f64,
    /// From `enqueue` to the start of the batch.
    pub queued: Duration,
    /// The batch's forward pass.
    pub inference: Duration,
}

impl Inferred {
    /// The embedding, for embedding models.
    pub fn embedding(&self) -> Option<&[f32]> {
        match &self.output {
            Output::Embedding(v) => Some(v),
            Output::Tensors(_) => None,
        }
    }
}

type Reply = oneshot::Sender<Result<Inferred, WorkerError>>;

struct Submission {
    job: EngineJob,
    enqueued: Instant,
    permit: OwnedSemaphorePermit,
    started: oneshot::Sender<()>,
    reply: Reply,
}

struct Queued {
    prepared: Prepared,
    permit: OwnedSemaphorePermit,
    /// Sent when the job's batch starts its forward pass.
    started: oneshot::Sender<()>,
    reply: Reply,
}

struct BatchMsg {
    entries: Vec<Entry<Queued>>,
    padding_ratio: f64,
}

/// Cloneable handle to a running engine.
#[derive(Clone)]
pub struct InferenceHandle {
    tx: mpsc::Sender<Submission>,
    admission: Arc<Semaphore>,
    capacity: usize,
    model: Arc<ModelVersion>,
    pre: Arc<Preprocessor>,
    breaker: Arc<Breaker>,
}

/// A job accepted by the engine; await it for the result.
pub struct Ticket {
    /// `None` once the answer is in `began`.
    started: Option<oneshot::Receiver<()>>,
    began: bool,
    result: oneshot::Receiver<Result<Inferred, WorkerError>>,
}

impl Ticket {
    /// Waits until the job's batch starts its forward pass (`true`), or
    /// until the job leaves the engine without running (`false`: expired,
    /// cancelled, refused by preprocessing, or the engine stopped; [`wait`]
    /// says which). Once answered, answers the same at once.
    ///
    /// [`wait`]: Ticket::wait
    pub async fn started(&mut self) -> bool {
        if let Some(rx) = &mut self.started {
            self.began = rx.await.is_ok();
            self.started = None;
        }
        self.began
    }

    /// Waits for the job's batch to run.
    pub async fn wait(self) -> Result<Inferred, WorkerError> {
        // A dropped sender means the inference thread is gone.
        self.result.await.unwrap_or(Err(WorkerError::Closed))
    }
}

impl InferenceHandle {
    /// Loads `model` on `cfg.inference_threads` new OS threads and starts the
    /// preprocessing thread and the batcher on the current Tokio runtime.
    /// Returns once every session is loaded, or with the first load error.
    pub async fn start(model: ModelVersion, cfg: EngineConfig) -> Result<InferenceHandle, WorkerError> {
        assert!(cfg.queue_capacity > 0, "queue_capacity must be positive. This is a bug.");
        let b = &model.spec.batching;
        let limits = Limits {
            max_batch_size: b.max_batch_size.unwrap_or(cfg.max_batch_size).max(1),
            max_batch_tokens: b.max_batch_tokens.unwrap_or(cfg.max_batch_tokens).max(1),
            max_wait: b.max_wait_ms.map(Duration::from_millis).unwrap_or(cfg.max_wait),
            starvation_after: cfg.starvation_after,
            length_aware: cfg.length_aware,
            ..Limits::default()
        };
        let label = model.label();
        let breaker = Arc::new(Breaker::new(cfg.breaker.clone()));
        let threads = match (cfg.inference_threads, cfg.session.provider) {
            // A GPU runs one batch at a time anyway.
            (0, ExecutionProvider::Cuda { .. }) => 1,
            (0, ExecutionProvider::Cpu) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            (n, _) => n,
        };
        let idle = Arc::new(Idle { busy: AtomicUsize::new(0), threads, notify: tokio::sync::Notify::new() });
        // Bound: one batch in hand-over, formed when a thread is free or,
        // with a deep queue, one batch ahead of the threads (see `Idle`): it
        // waits here at most one forward pass.
        let (batch_tx, batch_rx) = mpsc::channel::<BatchMsg>(1);
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        let mut ready = Vec::new();
        for i in 0..threads {
            let (ready_tx, ready_rx) = oneshot::channel();
            let (model, session, rx, breaker, idle) =
                (model.clone(), cfg.session.clone(), batch_rx.clone(), breaker.clone(), idle.clone());
            std::thread::Builder::new()
                .name(format!("infer-{}-{i}", model.spec.name))
                .spawn(move || match Runner::load(&model, &session) {
                    Ok((runner, inputs)) => {
                        let _ = ready_tx.send(Ok(inputs));
                        inference_loop(runner, rx, idle, breaker, model.label());
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })
                .map_err(|e| WorkerError::Load { model: label.clone(), message: format!("spawn thread: {e}") })?;
            ready.push(ready_rx);
        }
        let mut inputs = Vec::new();
        for r in ready {
            inputs = r.await.unwrap_or(Err(WorkerError::Closed))?;
        }
        let pre = Arc::new(Preprocessor::new(&model, inputs)?);

        // Both bounded by the admission semaphore as well; declared bounded
        // so that no stage can grow past it even by mistake.
        let (tx, submit_rx) = mpsc::channel::<Submission>(cfg.queue_capacity);
        let (sched_tx, sched_rx) = mpsc::channel::<(Submission, Prepared)>(cfg.queue_capacity);
        let p = pre.clone();
        std::thread::Builder::new()
            .name(format!("prep-{}", model.spec.name))
            .spawn(move || preprocess_loop(p, submit_rx, sched_tx))
            .map_err(|e| WorkerError::Load { model: label.clone(), message: format!("spawn thread: {e}") })?;
        tokio::spawn(batcher(sched_rx, batch_tx, idle, Scheduler::new(limits), label.clone()));
        tracing::info!(model = %label, threads, "inference engine ready");
        Ok(InferenceHandle {
            tx,
            admission: Arc::new(Semaphore::new(cfg.queue_capacity)),
            capacity: cfg.queue_capacity,
            model: Arc::new(model),
            pre,
            breaker,
        })
    }

    /// The model version this engine serves.
    pub fn model(&self) -> &ModelVersion {
        &self.model
    }

    /// Checks an input against the model (tensor names, dtypes and shapes
    /// against the graph; the kind of input against the task).
    pub fn check_input(&self, input: &Input) -> Result<(), String> {
        self.pre.check(input)
    }

    /// The breaker's view of this engine's health.
    pub fn breaker(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Jobs admitted and not yet running.
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.admission.available_permits()
    }

    /// Queues a job, waiting while the engine is full.
    pub async fn enqueue(&self, job: EngineJob) -> Result<Ticket, WorkerError> {
        let permit = self.admission.clone().acquire_owned().await.map_err(|_| WorkerError::Closed)?;
        self.submit(job, permit).await
    }

    /// Queues a job, or fails at once with [`WorkerError::Overloaded`].
    pub async fn try_enqueue(&self, job: EngineJob) -> Result<Ticket, WorkerError> {
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| WorkerError::Overloaded { capacity: self.capacity })?;
        self.submit(job, permit).await
    }

    async fn submit(&self, job: EngineJob, permit: OwnedSemaphorePermit) -> Result<Ticket, WorkerError> {
        let (reply, result) = oneshot::channel();
        let (started, started_rx) = oneshot::channel();
        // Never blocks for long: the channel holds as many as there are permits.
        self.tx
            .send(Submission { job, enqueued: Instant::now(), permit, started, reply })
            .await
            .map_err(|_| WorkerError::Closed)?;
        Ok(Ticket { started: Some(started_rx), began: false, result })
    }

    /// Runs one job (enqueue and wait).
    pub async fn infer(&self, job: EngineJob) -> Result<Inferred, WorkerError> {
        self.enqueue(job).await?.wait().await
    }
}

fn preprocess_loop(
    pre: Arc<Preprocessor>,
    mut rx: mpsc::Receiver<Submission>,
    out: mpsc::Sender<(Submission, Prepared)>,
) {
    while let Some(sub) = rx.blocking_recv() {
        match pre.prepare(&sub.job.input) {
            Ok(prepared) => {
                if out.blocking_send((sub, prepared)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = sub.reply.send(Err(e));
            }
        }
    }
}

/// The batcher: owns the [`Scheduler`], forms a batch whenever an inference
/// thread can take one and the scheduler says one is due.
async fn batcher(
    mut rx: mpsc::Receiver<(Submission, Prepared)>,
    out: mpsc::Sender<BatchMsg>,
    idle: Arc<Idle>,
    mut sched: Scheduler<Queued>,
    model: String,
) {
    let depth = metrics::gauge!(sluice_schemas::metrics::QUEUE_DEPTH.name, "model" => model.clone());
    let push = |sched: &mut Scheduler<Queued>, (sub, prepared): (Submission, Prepared)| {
        let cost = prepared.cost();
        let Submission { job, enqueued, permit, started, reply } = sub;
        sched.push(Entry {
            item: Queued { prepared, permit, started, reply },
            tenant: job.tenant,
            priority: job.priority,
            cost,
            enqueued,
            deadline: job.deadline,
            cancel: job.cancel,
            solo: job.solo,
            skipped: 0,
        });
    };
    let mut open = true;
    loop {
        if sched.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(m) => push(&mut sched, m),
                None => return,
            }
        }
        // Form the batch when an inference thread is free, or, while every
        // thread is busy, once the queue holds `READY_AHEAD_WINDOW` batches'
        // worth: that batch waits in the hand-over slot, and the thread
        // that finishes next takes it at once instead of idling through a
        // round trip to this task (a wake-up of the runtime, which on a
        // saturated machine waits for the scheduler: measured at ~2 ms per
        // batch, 2.5% of a backlog's drain). Below that depth a batch formed
        // early would be chosen from fewer jobs and group lengths worse, so
        // it waits for a free thread and keeps queueing meanwhile.
        while !idle.any_idle() && !sched.can_fill(READY_AHEAD_WINDOW) {
            let notified = idle.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if idle.any_idle() {
                break;
            }
            tokio::select! {
                _ = &mut notified => {}
                m = rx.recv(), if open => match m {
                    Some(m) => push(&mut sched, m),
                    None => open = false,
                },
            }
        }
        let permit = loop {
            tokio::select! {
                biased;
                p = out.reserve() => match p {
                    Ok(p) => break p,
                    Err(_) => {
                        tracing::error!(model, "every inference thread has exited; batcher stops");
                        return;
                    }
                },
                m = rx.recv(), if open => match m {
                    Some(m) => push(&mut sched, m),
                    None => open = false,
                },
            }
        };
        // Wait until a batch is due: full, or its oldest job waited max_wait.
        loop {
            while let Ok(m) = rx.try_recv() {
                push(&mut sched, m);
            }
            for (e, why) in sched.sweep(Instant::now()) {
                drop_job(e, why, &model);
            }
            depth.set(sched.len() as f64);
            if sched.is_empty() || !open || sched.due(Instant::now()) {
                break;
            }
            let wake = sched.next_due().expect("non-empty scheduler has an oldest job");
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => push(&mut sched, m),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        if sched.is_empty() {
            continue;
        }
        let batch = sched.take_batch(Instant::now());
        depth.set(sched.len() as f64);
        let padding_ratio = batch.padding_ratio();
        metrics::histogram!(sluice_schemas::metrics::BATCH_PADDING.name, "model" => model.clone())
            .record(padding_ratio);
        metrics::histogram!(sluice_schemas::metrics::BATCH_TOKENS.name, "model" => model.clone())
            .record((batch.padded_len * batch.entries.len()) as f64);
        permit.send(BatchMsg { entries: batch.entries, padding_ratio });
    }
}

/// While every inference thread is busy, the batcher forms the next batch
/// ahead (into the hand-over slot) only when the queue holds this many
/// batches' worth of jobs, so that the batch is still cut from a window.
const READY_AHEAD_WINDOW: usize = 4;

/// Answers a job that leaves the engine without running.
fn drop_job(e: Entry<Queued>, why: Dropped, model: &str) {
    let (err, reason) = match why {
        Dropped::Expired => (WorkerError::Expired, "expired"),
        Dropped::Cancelled => (WorkerError::Cancelled, "cancelled"),
    };
    metrics::counter!(sluice_schemas::metrics::JOBS_DROPPED.name, "model" => model.to_owned(), "reason" => reason)
        .increment(1);
    let _ = e.item.reply.send(Err(err));
}

/// How many inference threads are running a batch; the batcher forms the
/// next batch when one is free (or, with a deep queue, one ahead).
struct Idle {
    busy: AtomicUsize,
    threads: usize,
    notify: tokio::sync::Notify,
}

impl Idle {
    fn any_idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) < self.threads
    }
}

fn inference_loop(
    mut runner: Runner,
    rx: Arc<Mutex<mpsc::Receiver<BatchMsg>>>,
    idle: Arc<Idle>,
    breaker: Arc<Breaker>,
    model: String,
) {
    let breaker_gauge = metrics::gauge!(sluice_schemas::metrics::BREAKER_STATE.name, "model" => model.clone());
    loop {
        // One idle thread waits on the channel while the others wait on the
        // lock; whoever gets a batch releases the lock before running it.
        let msg = {
            let mut guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.blocking_recv()
        };
        let Some(BatchMsg { mut entries, padding_ratio }) = msg else { return };
        idle.busy.fetch_add(1, Ordering::AcqRel);
        let started = Instant::now();
        // A batch formed ahead waited in the hand-over slot: a job cancelled
        // or expired meanwhile does not run.
        if entries.iter().any(|e| e.dropped(started).is_some()) {
            let mut live = Vec::with_capacity(entries.len());
            for e in entries {
                match e.dropped(started) {
                    Some(why) => drop_job(e, why, &model),
                    None => live.push(e),
                }
            }
            entries = live;
        }
        if entries.is_empty() {
            idle.busy.fetch_sub(1, Ordering::AcqRel);
            idle.notify.notify_one();
            continue;
        }
        let batch_size = entries.len() as u32;
        let (prepared, rest): (Vec<Prepared>, Vec<(Instant, usize, Reply)>) = entries
            .into_iter()
            .map(|e| {
                let Queued { prepared, permit, started, reply } = e.item;
                // Running jobs no longer count against the admission bound.
                drop(permit);
                let _ = started.send(());
                let tokens = match &prepared {
                    Prepared::Tokens { ids, .. } => ids.len(),
                    Prepared::Tensors(_) => 0,
                };
                (prepared, (e.enqueued, tokens, reply))
            })
            .unzip();
        let refs: Vec<&Prepared> = prepared.iter().collect();
        let outcome = catch_unwind(AssertUnwindSafe(|| runner.run(&refs)));
        let inference = started.elapsed();
        metrics::histogram!(sluice_schemas::metrics::BATCH_SIZE.name, "model" => model.clone())
            .record(batch_size as f64);
        metrics::histogram!(sluice_schemas::metrics::INFERENCE_SECONDS.name, "model" => model.clone())
            .record(inference.as_secs_f64());
        let results: Vec<Result<Output, WorkerError>> = match outcome {
            Ok(Ok(results)) => {
                // Jobs of a tensor batch fail one by one; a batch where
                // every job failed counts against the model's health.
                let healthy = results.iter().any(Result::is_ok);
                breaker_gauge.set(breaker.record(healthy).gauge());
                results
            }
            Ok(Err(e)) => {
                tracing::warn!(model, batch_size, error = %e, "batch failed");
                breaker_gauge.set(breaker.record(false).gauge());
                let msg = e.to_string();
                rest.iter().map(|_| Err(WorkerError::Inference(msg.clone()))).collect()
            }
            Err(_) => {
                tracing::error!(model, batch_size, "inference panicked; failing the batch");
                breaker_gauge.set(breaker.record(false).gauge());
                rest.iter().map(|_| Err(WorkerError::Inference("inference panicked".into()))).collect()
            }
        };
        for ((enqueued, tokens, reply), result) in rest.into_iter().zip(results) {
            let _ = reply.send(result.map(|output| Inferred {
                output,
                input_tokens: tokens as u32,
                batch_size,
                padding_ratio,
                queued: started.saturating_duration_since(enqueued),
                inference,
            }));
        }
        idle.busy.fetch_sub(1, Ordering::AcqRel);
        idle.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelRepository;

    fn sigmoid_input(v: f64) -> Input {
        serde_json::from_value(serde_json::json!(
            {"tensors": {"x": {"dtype": "float32", "shape": [3, 4, 5], "data": vec![v; 60]}}}
        ))
        .expect("a tensor input")
    }

    /// A batch formed ahead waits in the hand-over slot for a thread: a job
    /// cancelled or expired while it waited there does not run (it gets its
    /// error, never a `started`), and the rest of the batch runs without it.
    #[test]
    fn a_batch_taken_from_the_slot_runs_only_its_live_jobs() {
        let repo = std::env::var("SLUICE_MODEL_REPO").expect("SLUICE_MODEL_REPO is not set (run through `make test`)");
        let model = ModelRepository::new(repo).latest("sigmoid").expect("`make models` imports sigmoid");
        let (runner, inputs) = Runner::load(&model, &SessionConfig::default()).expect("sigmoid loads");
        let pre = Preprocessor::new(&model, inputs).unwrap();
        let admission = Arc::new(Semaphore::new(3));
        let now = Instant::now();
        let mut answers = Vec::new();
        let mut entries = Vec::new();
        for (i, (cancelled, deadline)) in
            [(true, None), (false, Some(now)), (false, Some(now + Duration::from_secs(3600)))].into_iter().enumerate()
        {
            let (started, started_rx) = oneshot::channel();
            let (reply, result) = oneshot::channel();
            let item = Queued {
                prepared: pre.prepare(&sigmoid_input(i as f64)).unwrap(),
                permit: admission.clone().try_acquire_owned().unwrap(),
                started,
                reply,
            };
            entries.push(Entry {
                item,
                tenant: "t".into(),
                priority: Priority::Normal,
                cost: 1,
                enqueued: now,
                deadline,
                cancel: Some(Arc::new(AtomicBool::new(cancelled))),
                solo: false,
                skipped: 0,
            });
            answers.push((started_rx, result));
        }
        let (tx, rx) = mpsc::channel(1);
        let idle = Arc::new(Idle { busy: AtomicUsize::new(0), threads: 1, notify: tokio::sync::Notify::new() });
        let breaker = Arc::new(Breaker::new(BreakerConfig::default()));
        let thread = {
            let idle = idle.clone();
            std::thread::spawn(move || {
                inference_loop(runner, Arc::new(Mutex::new(rx)), idle, breaker, "sigmoid".into())
            })
        };
        tx.blocking_send(BatchMsg { entries, padding_ratio: 0.0 }).ok().unwrap();
        drop(tx);
        thread.join().unwrap();

        let mut answers = answers.into_iter();
        let (started, result) = answers.next().unwrap();
        assert!(started.blocking_recv().is_err(), "the cancelled job never started");
        assert!(matches!(result.blocking_recv().unwrap(), Err(WorkerError::Cancelled)));
        let (started, result) = answers.next().unwrap();
        assert!(started.blocking_recv().is_err(), "the expired job never started");
        assert!(matches!(result.blocking_recv().unwrap(), Err(WorkerError::Expired)));
        let (started, result) = answers.next().unwrap();
        assert!(started.blocking_recv().is_ok(), "the live job started");
        let out = result.blocking_recv().unwrap().expect("the live job ran");
        assert_eq!(out.batch_size, 1, "it ran alone");
        let Output::Tensors(t) = &out.output else { panic!("a tensor output: {:?}", out.output) };
        let y = t.values().next().expect("one output").data.clone();
        let expected = 1.0 / (1.0 + (-2.0f64).exp());
        assert!(y.iter().all(|v| (v - expected).abs() < 1e-6), "sigmoid(2) = {expected}: {y:?}");
        assert_eq!(admission.available_permits(), 3, "every permit is back");
        assert_eq!(idle.busy.load(Ordering::Acquire), 0, "the thread is idle again");
    }
}
