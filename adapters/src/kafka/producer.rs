//! The producer: sends that resolve when the broker acknowledges them, and
//! the thread that serves librdkafka's delivery reports.
//!
//! rdkafka's `FutureProducer` serves them from a thread that calls
//! `poll(100 ms)` in a loop, and rdkafka's poll loop turns the last
//! fraction of a millisecond before its deadline into a 0 ms wait: the
//! thread spins for up to a millisecond in every 100 (about 1% of a core
//! per producer, idle or not; measured with `sluice up` idle: 0.9% each).
//! Here the thread sleeps until librdkafka says the report queue is no
//! longer empty (`rd_kafka_queue_cb_event_enable`), drains it without
//! blocking, and sleeps again.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::bindings as rdsys;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use tokio::sync::oneshot;

use super::{KafkaError, base_config};

/// Where a delivery report goes: the partition and offset, or the error.
type Report = oneshot::Sender<Result<(i32, i64), RdError>>;

/// Hands each delivery report to the `send` waiting for it, and counts them
/// (how the report thread tells a pass that served reports from one that
/// served nothing).
#[derive(Default)]
struct Deliveries {
    served: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Report>;

    fn delivery(&self, result: &DeliveryResult<'_>, report: Box<Report>) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        // The sender gave up waiting (its own timeout): nothing to tell.
        let _ = report.send(outcome);
        self.served.fetch_add(1, Ordering::Relaxed);
    }
}

/// How librdkafka wakes the report thread.
#[derive(Default)]
struct Wake {
    /// Set when the report queue went from empty to not empty.
    pending: Mutex<bool>,
    ready: Condvar,
    stop: AtomicBool,
}

impl Wake {
    fn notify(&self) {
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.ready.notify_one();
    }
}

/// Called by librdkafka, on one of its threads, when an event is put on the
/// empty report queue. `opaque` is the `Wake` that [`Inner`] keeps alive
/// until the callback is disabled.
unsafe extern "C" fn queue_not_empty(_rk: *mut rdsys::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is `Arc::as_ptr` of the `Wake` held by `Inner`, which
    // disables this callback before that `Arc` is dropped.
    let wake = unsafe { &*(opaque as *const Wake) };
    wake.notify();
}

/// The report queue's handle (`rd_kafka_queue_get_main`), destroyed on drop.
struct Queue(*mut rdsys::rd_kafka_queue_t);

// SAFETY: librdkafka's queue handles are thread-safe.
unsafe impl Send for Queue {}
unsafe impl Sync for Queue {}

impl Queue {
    fn len(&self) -> usize {
        // SAFETY: the handle is valid until `drop`.
        unsafe { rdsys::rd_kafka_queue_length(self.0) }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rd_kafka_queue_get_main` and is
        // destroyed once; the callback that used it is disabled first.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(self.0, None, std::ptr::null_mut());
            rdsys::rd_kafka_queue_destroy(self.0);
        }
    }
}

/// Fields drop in order: the thread is joined in `Drop::drop`, then the
/// queue handle (disabling the callback), then the producer (which purges
/// and flushes), and the `Wake` the callback pointed at last.
struct Inner {
    thread: Option<JoinHandle<()>>,
    /// Held for its drop (the thread holds the other reference).
    _queue: Arc<Queue>,
    producer: Arc<BaseProducer<Deliveries>>,
    wake: Arc<Wake>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.wake.stop.store(true, Ordering::Release);
        self.wake.notify();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the producer's delivery thread panicked");
        }
    }
}

/// Serves delivery reports until `stop`: drains the queue without blocking,
/// then sleeps until librdkafka wakes it.
///
/// librdkafka wakes it only when the queue goes from empty to not empty, so
/// the thread sleeps long only on an empty queue: reports that arrive while
/// a pass runs keep it draining (under load the queue may never be empty
/// between passes; the wait for a wake-up that cannot come used to hold
/// reports for up to the 1 s safety net, and results with them). A pass
/// that serves nothing while events are queued (something `poll` does not
/// hand out) is retried after `STUCK_RETRY`, not spun on. The 1 s wait on
/// an empty queue is a safety net, not a poll interval.
fn serve_reports(producer: Arc<BaseProducer<Deliveries>>, queue: Arc<Queue>, wake: Arc<Wake>) {
    const STUCK_RETRY: Duration = Duration::from_millis(10);
    loop {
        loop {
            let queued = queue.len();
            if queued == 0 {
                break;
            }
            let served = producer.context().served.load(Ordering::Relaxed);
            for _ in 0..queued {
                producer.poll(Duration::ZERO);
            }
            if producer.context().served.load(Ordering::Relaxed) == served && queue.len() >= queued {
                break;
            }
        }
        let wait = if queue.len() == 0 { Duration::from_secs(1) } else { STUCK_RETRY };
        let mut pending = wake.pending.lock().unwrap_or_else(PoisonError::into_inner);
        while !*pending && !wake.stop.load(Ordering::Acquire) {
            let (p, timeout) = wake.ready.wait_timeout(pending, wait).unwrap_or_else(PoisonError::into_inner);
            pending = p;
            if timeout.timed_out() {
                break;
            }
        }
        *pending = false;
        drop(pending);
        if wake.stop.load(Ordering::Acquire) {
            return;
        }
    }
}

/// An idempotent producer (`enable.idempotence`, acks=all) whose sends
/// resolve within `timeout` — delivered, or a typed error — never hang.
/// Clones share one client and one delivery thread.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
    timeout: Duration,
}

impl Producer {
    /// Connects lazily to `brokers`; records up to librdkafka's default
    /// `message.max.bytes` (1,000,000).
    pub fn new(brokers: &str, client_id: &str, timeout: Duration) -> Result<Producer, KafkaError> {
        Self::with_max_message_bytes(brokers, client_id, timeout, 1_000_000)
    }

    /// [`Producer::new`] for records of at most `max_message_bytes` (keep it
    /// at most the broker's `message.max.bytes`): a larger record fails at
    /// once with a permanent [`KafkaError::Produce`], never retried.
    pub fn with_max_message_bytes(
        brokers: &str,
        client_id: &str,
        timeout: Duration,
        max_message_bytes: usize,
    ) -> Result<Producer, KafkaError> {
        let ms = timeout.as_millis().max(1).to_string();
        let producer: BaseProducer<Deliveries> = base_config(brokers, client_id)
            .set("message.max.bytes", max_message_bytes.clamp(1000, 1_000_000_000).to_string())
            .set("enable.idempotence", "true")
            // One request in flight per connection: tansu 0.6 (our test
            // broker) races on concurrent idempotent batches for one
            // partition and panics. Throughput comes from batching (linger).
            .set("max.in.flight.requests.per.connection", "1")
            .set("linger.ms", "5")
            // Bound on records buffered in this process while the broker is
            // slow or away; a full buffer makes `send` wait, then time out.
            .set("queue.buffering.max.messages", "100000")
            .set("message.timeout.ms", &ms)
            .set("socket.timeout.ms", &ms)
            .create_with_context(Deliveries::default())
            .map_err(|e| KafkaError::Config(e.to_string()))?;
        let producer = Arc::new(producer);
        let wake = Arc::new(Wake::default());
        // SAFETY: a valid client; the handle is owned by `Queue`.
        let queue = Arc::new(Queue(unsafe { rdsys::rd_kafka_queue_get_main(producer.client().native_ptr()) }));
        // SAFETY: the `Wake` outlives the registration (see `Inner`).
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(
                queue.0,
                Some(queue_not_empty),
                Arc::as_ptr(&wake) as *const c_void as *mut c_void,
            );
        }
        let thread = {
            let (producer, queue, wake) = (producer.clone(), queue.clone(), wake.clone());
            std::thread::Builder::new()
                .name("kafka-deliveries".into())
                .spawn(move || serve_reports(producer, queue, wake))
                .map_err(|e| KafkaError::Config(format!("starting the delivery thread: {e}")))?
        };
        Ok(Producer { inner: Arc::new(Inner { thread: Some(thread), _queue: queue, producer, wake }), timeout })
    }

    /// Sends one record and waits for the broker's acknowledgement.
    /// Returns the partition and offset it was written at.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64), KafkaError> {
        // librdkafka enforces `message.timeout.ms` only on its own schedule
        // (seconds late while a broker is unreachable); the caller's bound is
        // kept here. A record that times out here may still be delivered
        // later; every effect of a job is keyed by its id, so that is safe.
        let sent = tokio::time::timeout(self.timeout, self.deliver(topic, key, payload, headers)).await;
        let Ok(sent) = sent else {
            return Err(KafkaError::Produce {
                topic: topic.to_owned(),
                message: format!("not acknowledged within {:?}", self.timeout),
                retryable: true,
            });
        };
        sent.map_err(|e| {
            let retryable = !matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessage)
            );
            KafkaError::Produce { topic: topic.to_owned(), message: e.to_string(), retryable }
        })
    }

    /// Queues the record (waiting while librdkafka's buffer is full) and
    /// awaits its delivery report.
    async fn deliver(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64), RdError> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(*v) });
        }
        let (tx, rx) = oneshot::channel();
        let mut record =
            BaseRecord::<[u8], [u8], Box<Report>>::with_opaque_to(topic, Box::new(tx)).payload(payload).headers(h);
        if let Some(k) = key {
            record = record.key(k);
        }
        let started = Instant::now();
        loop {
            match self.inner.producer.send(record) {
                Ok(()) => break,
                Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < self.timeout =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
        // The sender is dropped unsent only when the producer goes away
        // with the record undelivered.
        rx.await.unwrap_or(Err(RdError::Canceled))
    }

    /// Asks the cluster for its metadata: succeeds when a broker answers.
    /// Blocking inside librdkafka, so it runs on the blocking pool.
    pub async fn ping(&self) -> Result<(), KafkaError> {
        let inner = self.inner.clone();
        let timeout = self.timeout.min(Duration::from_secs(2));
        tokio::task::spawn_blocking(move || {
            inner
                .producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| KafkaError::Metadata(e.to_string()))
        })
        .await
        .map_err(|e| KafkaError::Metadata(e.to_string()))?
    }

    /// Waits up to `timeout` for buffered records to be delivered.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.inner.producer.flush(timeout) {
            tracing::warn!(error = %e, "producer flush incomplete");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::EmbeddedBroker;
    use crate::retry::Retryable as _;

    /// How many threads of this process have a name starting with
    /// `prefix`, and their nanoseconds on the CPU (`/proc/self/task/*`).
    fn threads(prefix: &str) -> (usize, u64) {
        let (mut count, mut total) = (0, 0);
        for task in std::fs::read_dir("/proc/self/task").expect("procfs").flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with(prefix) {
                count += 1;
                let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
                total += stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        (count, total)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_resolve_at_their_offsets_and_an_idle_producer_uses_no_cpu() {
        let broker = EmbeddedBroker::start().unwrap();
        broker.create_topic("produced", 1).unwrap();
        let producer =
            Producer::with_max_message_bytes(broker.bootstrap(), "producer-test", Duration::from_secs(10), 2000)
                .unwrap();

        // 300 concurrent sends, each answered with its own offset.
        let sends = (0..300).map(|i| {
            let p = producer.clone();
            async move { p.send("produced", Some(b"k"), format!("record {i}").as_bytes(), &[("h", b"v")]).await }
        });
        let mut offsets: Vec<i64> = futures::future::join_all(sends)
            .await
            .into_iter()
            .map(|r| {
                let (partition, offset) = r.expect("delivered");
                assert_eq!(partition, 0);
                offset
            })
            .collect();
        offsets.sort_unstable();
        assert_eq!(offsets, (0..300).collect::<Vec<i64>>());

        // Too large for `message.max.bytes`: refused at once, not retryable.
        let err = producer.send("produced", None, &[b'x'; 4000], &[]).await.unwrap_err();
        assert!(matches!(err, KafkaError::Produce { .. }) && !err.is_retryable(), "{err}");

        // Idle: the delivery thread sleeps until librdkafka has a report.
        // rdkafka's own polling thread spun ~1 ms in every 100 (18 ms of CPU
        // in these 2 s); this one wakes at most twice.
        let (count, before) = threads("kafka-deliver");
        assert_eq!(count, 1, "one delivery thread per producer, shared by its clones");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = threads("kafka-deliver").1 - before;
        assert!(idle < 3_000_000, "the idle delivery thread used {idle} ns of CPU in 2 s");

        // Still serving after the idle spell; dropping the last clone joins
        // the thread.
        assert_eq!(producer.send("produced", None, b"after", &[]).await.unwrap(), (0, 300));
        drop(producer);
        assert_eq!(threads("kafka-deliver").0, 0, "the delivery thread outlived its producer");
    }
}
