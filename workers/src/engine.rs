//! The inference engine: a bounded queue, a batcher task, and inference
//! threads that own the ONNX Runtime sessions.
//!
//! ```text
//!  InferenceHandle ──(queue: queue_capacity)──► batcher task ──(1 batch)──► inference thread(s)
//!   (clone = a Sender)                          max_batch_size / max_wait        blocking_recv → tokenize → run
//! ```
//!
//! Callers hold only a [`InferenceHandle`] (an `mpsc::Sender`); the batcher's
//! state lives in its task, the sessions live on OS threads, so inference
//! never runs on the async runtime's threads. When the last handle drops, the
//! queue closes, the batcher drains and exits, and the threads follow.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::WorkerError;
use crate::embed::{Embedder, SessionConfig};
use crate::model::ModelVersion;

/// Batching and threading of one model's engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most jobs in one forward pass.
    pub max_batch_size: usize,
    /// Longest the oldest job of a partial batch waits for more jobs
    /// (Triton's `max_queue_delay`).
    pub max_wait: Duration,
    /// Bound of the queue in front of the batcher. When it is full,
    /// [`InferenceHandle::enqueue`] waits (back-pressure on the Kafka
    /// consumer) and [`InferenceHandle::try_enqueue`] fails with
    /// [`WorkerError::Overloaded`].
    pub queue_capacity: usize,
    /// OS threads running inference, each with its own session.
    pub inference_threads: usize,
    /// ONNX Runtime settings.
    pub session: SessionConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_size: 32,
            max_wait: Duration::from_millis(5),
            queue_capacity: 1024,
            inference_threads: 1,
            session: SessionConfig::default(),
        }
    }
}

/// What one job got out of the engine.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The pooled (and, per `model.toml`, normalised) embedding.
    pub embedding: Vec<f32>,
    /// Tokens of the input after truncation.
    pub input_tokens: u32,
    /// Jobs in the batch this job ran in.
    pub batch_size: u32,
    /// Time from `enqueue` to the start of the batch.
    pub queued: Duration,
    /// Time the batch spent in tokenisation and the forward pass.
    pub inference: Duration,
}

struct Pending {
    text: String,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Embedded, WorkerError>>,
}

/// Cloneable handle to a running engine: holds only a sender.
#[derive(Clone)]
pub struct InferenceHandle {
    tx: mpsc::Sender<Pending>,
    model: Arc<ModelVersion>,
    capacity: usize,
}

/// A job accepted by the engine; await it for the result.
pub struct Ticket(oneshot::Receiver<Result<Embedded, WorkerError>>);

impl Ticket {
    /// Waits for the job's batch to run.
    pub async fn wait(self) -> Result<Embedded, WorkerError> {
        // A dropped sender means the inference thread is gone.
        self.0.await.unwrap_or(Err(WorkerError::Closed))
    }
}

impl InferenceHandle {
    /// Loads `model` on `cfg.inference_threads` new OS threads and starts the
    /// batcher on the current Tokio runtime. Returns once every session is
    /// loaded, or with the first load error.
    pub async fn start(model: ModelVersion, cfg: EngineConfig) -> Result<InferenceHandle, WorkerError> {
        assert!(cfg.max_batch_size > 0 && cfg.queue_capacity > 0, "engine bounds must be positive. This is a bug.");
        // Bound: one batch may wait here while the threads are busy, so the
        // next batch is ready the moment a thread frees up (TEI's prefetch).
        let (batch_tx, batch_rx) = mpsc::channel::<Vec<Pending>>(1);
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        let name = format!("{}/{}", model.spec.name, model.spec.version);
        let mut ready = Vec::new();
        for i in 0..cfg.inference_threads.max(1) {
            let (ready_tx, ready_rx) = oneshot::channel();
            let (model, session, rx) = (model.clone(), cfg.session.clone(), batch_rx.clone());
            std::thread::Builder::new()
                .name(format!("infer-{}-{i}", model.spec.name))
                .spawn(move || match Embedder::load(&model, &session) {
                    Ok(embedder) => {
                        let _ = ready_tx.send(Ok(()));
                        inference_loop(embedder, rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })
                .map_err(|e| WorkerError::Load { model: name.clone(), message: format!("spawn thread: {e}") })?;
            ready.push(ready_rx);
        }
        for r in ready {
            r.await.unwrap_or(Err(WorkerError::Closed))?;
        }
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        tokio::spawn(batcher(rx, batch_tx, cfg.max_batch_size, cfg.max_wait));
        tracing::info!(model = %name, threads = cfg.inference_threads.max(1), "inference engine ready");
        Ok(InferenceHandle { tx, model: Arc::new(model), capacity: cfg.queue_capacity })
    }

    /// The model version this engine serves.
    pub fn model(&self) -> &ModelVersion {
        &self.model
    }

    /// Jobs waiting in the queue in front of the batcher.
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// Queues `text`, waiting while the queue is full.
    pub async fn enqueue(&self, text: String) -> Result<Ticket, WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Pending { text, enqueued: Instant::now(), reply }).await.map_err(|_| WorkerError::Closed)?;
        Ok(Ticket(rx))
    }

    /// Queues `text`, or fails at once with [`WorkerError::Overloaded`].
    pub fn try_enqueue(&self, text: String) -> Result<Ticket, WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(Pending { text, enqueued: Instant::now(), reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => WorkerError::Overloaded { capacity: self.capacity },
            mpsc::error::TrySendError::Closed(_) => WorkerError::Closed,
        })?;
        Ok(Ticket(rx))
    }

    /// Embeds one text (enqueue and wait).
    pub async fn embed(&self, text: String) -> Result<Embedded, WorkerError> {
        self.enqueue(text).await?.wait().await
    }
}

/// Forms batches: a batch leaves when it holds `max_batch_size` jobs or its
/// oldest job has waited `max_wait`.
async fn batcher(
    mut rx: mpsc::Receiver<Pending>,
    out: mpsc::Sender<Vec<Pending>>,
    max_batch_size: usize,
    max_wait: Duration,
) {
    while let Some(first) = rx.recv().await {
        let deadline = first.enqueued + max_wait;
        let mut batch = Vec::with_capacity(max_batch_size);
        batch.push(first);
        while batch.len() < max_batch_size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) | Err(_) => break,
            }
        }
        // Callers that gave up (dropped their ticket) cost no inference.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if out.send(batch).await.is_err() {
            tracing::error!("every inference thread has exited; batcher stops");
            return;
        }
    }
}

fn inference_loop(mut embedder: Embedder, rx: Arc<Mutex<mpsc::Receiver<Vec<Pending>>>>) {
    let model = embedder.model().spec.name.clone();
    loop {
        // One idle thread waits on the channel while the others wait on the
        // lock; whoever gets a batch releases the lock before running it.
        let batch = {
            let mut guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.blocking_recv()
        };
        let Some(batch) = batch else { return };
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| run_batch(&mut embedder, &batch)));
        let inference = started.elapsed();
        let batch_size = batch.len() as u32;
        metrics::histogram!("sluice_batch_size", "model" => model.clone()).record(batch_size as f64);
        metrics::histogram!("sluice_inference_seconds", "model" => model.clone()).record(inference.as_secs_f64());
        let results = match outcome {
            Ok(results) => results,
            Err(_) => {
                tracing::error!(model, batch_size, "inference panicked; failing the batch");
                batch.iter().map(|_| Err(WorkerError::Inference("inference panicked".into()))).collect()
            }
        };
        for (pending, result) in batch.into_iter().zip(results) {
            let reply = result.map(|(embedding, input_tokens)| Embedded {
                embedding,
                input_tokens,
                batch_size,
                queued: started.saturating_duration_since(pending.enqueued),
                inference,
            });
            let _ = pending.reply.send(reply);
        }
    }
}

/// Tokenizes and runs one batch. A text that fails to tokenize fails alone;
/// a failed forward pass fails the whole batch.
fn run_batch(embedder: &mut Embedder, batch: &[Pending]) -> Vec<Result<(Vec<f32>, u32), WorkerError>> {
    let encoded: Vec<_> = batch.iter().map(|p| embedder.encode(&p.text)).collect();
    let ok: Vec<_> = encoded.iter().filter_map(|e| e.as_ref().ok().cloned()).collect();
    let mut vectors = match embedder.embed(&ok) {
        Ok(v) => v.into_iter(),
        Err(e) => {
            let msg = e.to_string();
            return batch.iter().map(|_| Err(WorkerError::Inference(msg.clone()))).collect();
        }
    };
    encoded
        .into_iter()
        .map(|e| {
            let e = e?;
            let v = vectors.next().ok_or_else(|| WorkerError::Inference("missing output row".into()))?;
            Ok((v, e.ids.len() as u32))
        })
        .collect()
}
