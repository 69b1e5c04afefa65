//! The results store: one record per job (status + result) with a TTL, the
//! inference cache, and cancellation notices.
//!
//! Two back ends behind one type: Redis (`redis` crate, `ConnectionManager`)
//! for real deployments and a bounded in-process map for `sluice up`.
//!
//! Both enforce the job lifecycle on write: [`Store::put`] only replaces a
//! record when [`JobStatus::may_become`] allows it, atomically (a Lua script
//! in Redis, a mutex in memory). A finished job is therefore never changed,
//! a replayed Kafka record cannot regress a job, and a late `queued` write
//! from the gateway cannot overwrite the worker's `running` or `succeeded`.
//! Each record also remembers whether its terminal version has been
//! published to the results topic, so a replay publishes what a crash left
//! unpublished and nothing twice.
//!
//! Architecture invariant: this is the only module of Sluice that imports
//! `redis`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sluice_schemas::{JobResult, JobStatus, Output};
use tokio::sync::{broadcast, mpsc};

/// Failures of the results store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("results store unreachable: {0}")]
    Unavailable(String),
    #[error("results store holds a corrupt record for {job_id}: {message}")]
    Corrupt { job_id: String, message: String },
}

/// Outcome of a conditional [`Store::put`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The record was written.
    Written,
    /// The stored record is in this status and may not become the new one;
    /// nothing was written.
    Kept(JobStatus),
}

/// Outcome of [`Store::create`].
#[derive(Debug, Clone, PartialEq)]
pub enum Create {
    /// The record was written: a new job.
    Created,
    /// A job with this id exists already; this is its record.
    Exists(Box<JobResult>),
}

/// Notification channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    /// A job was cancelled: workers holding it drop it.
    Cancel,
    /// A job reached a terminal status: long-polls answer.
    Done,
}

impl Channel {
    fn name(self) -> &'static str {
        match self {
            Channel::Cancel => "cancel",
            Channel::Done => "done",
        }
    }
}

/// Outcome of [`Store::cancel`].
#[derive(Debug, Clone, PartialEq)]
pub enum Cancel {
    /// The job is now cancelled (this record).
    Cancelled(JobResult),
    /// The job had already finished; it is unchanged.
    Finished(JobResult),
    /// No such job.
    NotFound,
}

/// Settings of the results store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How long a job record lives after its last write.
    pub ttl: Duration,
    /// Most records the in-process store keeps; the oldest go first.
    pub memory_capacity: usize,
    /// Prefix of Redis keys and channels.
    pub key_prefix: String,
    /// How long a cached inference result lives (zero: no cache).
    pub cache_ttl: Duration,
    /// Most entries of the in-process inference cache.
    pub cache_capacity: usize,
}

/// The results store (cheap to clone).
#[derive(Clone)]
pub enum Store {
    Redis(RedisStore),
    Memory(MemoryStore),
}

impl Store {
    /// Connects to Redis at `url` (`redis://127.0.0.1:6379/0`).
    pub async fn redis(url: &str, cfg: &StoreConfig) -> Result<Store, StoreError> {
        Ok(Store::Redis(RedisStore::connect(url, cfg).await?))
    }

    /// An in-process store: not durable, bounded by `cfg.memory_capacity`.
    pub fn memory(cfg: &StoreConfig) -> Store {
        Store::Memory(MemoryStore::new(cfg))
    }

    /// Writes `record` unless the stored record's status forbids it.
    pub async fn put(&self, record: &JobResult) -> Result<Put, StoreError> {
        match self {
            Store::Redis(r) => r.put(record).await,
            Store::Memory(m) => Ok(m.put(record)),
        }
    }

    /// The record of `job_id`, if it exists and has not expired.
    pub async fn get(&self, job_id: &str) -> Result<Option<JobResult>, StoreError> {
        Ok(self.get_meta(job_id).await?.map(|(r, _)| r))
    }

    /// The record of `job_id` and whether its terminal version was published.
    pub async fn get_meta(&self, job_id: &str) -> Result<Option<(JobResult, bool)>, StoreError> {
        match self {
            Store::Redis(r) => r.get_meta(job_id).await,
            Store::Memory(m) => Ok(m.get_meta(job_id)),
        }
    }

    /// Notes that the record's terminal version is on the results topic.
    pub async fn mark_published(&self, job_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.mark_published(job_id).await,
            Store::Memory(m) => {
                m.mark_published(job_id);
                Ok(())
            }
        }
    }

    /// Writes `record` (a `queued` record from the gateway) only if no record
    /// of its job exists; otherwise returns the existing one. This makes a
    /// client-given `job_id` idempotent.
    pub async fn create(&self, record: &JobResult) -> Result<Create, StoreError> {
        match self {
            Store::Redis(r) => r.create(record).await,
            Store::Memory(m) => Ok(m.create(record)),
        }
    }

    /// Removes a job's record if it is still `queued` (undoes [`Store::create`]
    /// when the job could not be produced, so that the client may retry).
    pub async fn remove_queued(&self, job_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.remove_queued(job_id).await,
            Store::Memory(m) => {
                m.remove_queued(job_id);
                Ok(())
            }
        }
    }

    /// The records of `job_ids`, in order (`None` where there is none).
    pub async fn get_many(&self, job_ids: &[String]) -> Result<Vec<Option<JobResult>>, StoreError> {
        match self {
            Store::Redis(r) => r.get_many(job_ids).await,
            Store::Memory(m) => Ok(job_ids.iter().map(|id| m.get_meta(id).map(|(r, _)| r)).collect()),
        }
    }

    /// Stores a document (e.g. a batch) of `kind` under `id`, with the record TTL.
    pub async fn put_doc(&self, kind: &str, id: &str, json: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.put_doc(kind, id, json).await,
            Store::Memory(m) => {
                m.put_doc(kind, id, json);
                Ok(())
            }
        }
    }

    /// A document stored with [`Store::put_doc`].
    pub async fn get_doc(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Redis(r) => r.get_doc(kind, id).await,
            Store::Memory(m) => Ok(m.get_doc(kind, id)),
        }
    }

    /// Tells long-polling readers that `job_id` reached a terminal status.
    pub async fn notify_done(&self, job_id: &str) -> Result<(), StoreError> {
        self.notify(Channel::Done, job_id).await
    }

    /// Job ids that reach a terminal status from now on (best effort, like
    /// [`Store::cancellations`]; readers re-read the store).
    pub fn completions(&self) -> mpsc::Receiver<String> {
        self.subscribe(Channel::Done)
    }

    async fn notify(&self, channel: Channel, job_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.notify(channel, job_id).await,
            Store::Memory(m) => {
                m.notify(channel, job_id);
                Ok(())
            }
        }
    }

    fn subscribe(&self, channel: Channel) -> mpsc::Receiver<String> {
        match self {
            Store::Redis(r) => r.subscribe(channel),
            Store::Memory(m) => m.subscribe(channel),
        }
    }

    /// Cancels a job that has not finished, and notifies the workers.
    pub async fn cancel(&self, job_id: &str) -> Result<Cancel, StoreError> {
        for _ in 0..3 {
            let Some(current) = self.get(job_id).await? else { return Ok(Cancel::NotFound) };
            if current.status.is_terminal() {
                return Ok(Cancel::Finished(current));
            }
            let mut cancelled = current;
            cancelled.status = JobStatus::Cancelled;
            cancelled.finished_at = Some(chrono::Utc::now());
            if self.put(&cancelled).await? == Put::Written {
                self.notify(Channel::Cancel, job_id).await?;
                self.notify(Channel::Done, job_id).await?;
                return Ok(Cancel::Cancelled(cancelled));
            }
            // It finished (or changed) under us: look again.
        }
        match self.get(job_id).await? {
            Some(r) => Ok(Cancel::Finished(r)),
            None => Ok(Cancel::NotFound),
        }
    }

    /// Job ids cancelled from now on, as they are cancelled. Best effort: a
    /// missed notice only means the job runs, and its result is then
    /// refused by the store because the job is already cancelled.
    pub fn cancellations(&self) -> mpsc::Receiver<String> {
        self.subscribe(Channel::Cancel)
    }

    /// A cached output for `key` (model, version and input digest).
    pub async fn cache_get(&self, key: &str) -> Result<Option<Output>, StoreError> {
        match self {
            Store::Redis(r) => r.cache_get(key).await,
            Store::Memory(m) => Ok(m.cache_get(key)),
        }
    }

    /// Caches `output` under `key`.
    pub async fn cache_put(&self, key: &str, output: &Output) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.cache_put(key, output).await,
            Store::Memory(m) => {
                m.cache_put(key, output);
                Ok(())
            }
        }
    }

    /// Whether the inference cache is on.
    pub fn cache_enabled(&self) -> bool {
        match self {
            Store::Redis(r) => r.cache_ttl_ms > 0,
            Store::Memory(m) => !m.cache_ttl.is_zero(),
        }
    }

    /// Succeeds when the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.ping().await,
            Store::Memory(_) => Ok(()),
        }
    }

    /// A short description for logs and `/readyz`.
    pub fn describe(&self) -> &'static str {
        match self {
            Store::Redis(_) => "redis",
            Store::Memory(_) => "in-process (not durable)",
        }
    }
}

/// The lifecycle pairs that may not follow each other, as the Lua script
/// sees them (`|from>to|...|`). Derived from [`JobStatus::may_become`] so
/// the rule is written once.
fn forbidden_pairs() -> String {
    let mut pairs = Vec::new();
    for from in JobStatus::ALL {
        for to in JobStatus::ALL {
            if !from.may_become(to) {
                pairs.push(format!("{from}>{to}"));
            }
        }
    }
    format!("|{}|", pairs.join("|"))
}

/// KEYS[1] = record key; ARGV = new status, record JSON, TTL ms, forbidden
/// pairs. Returns "ok", or the stored status when the write is refused. A
/// written record is not yet published.
const PUT_SCRIPT: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'status')
if cur and string.find(ARGV[4], '|' .. cur .. '>' .. ARGV[1] .. '|', 1, true) then
  return cur
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'record', ARGV[2])
redis.call('HDEL', KEYS[1], 'published')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 'ok'
"#;

#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    script: Arc<redis::Script>,
    forbidden: Arc<str>,
    ttl_ms: u64,
    cache_ttl_ms: u64,
    prefix: Arc<str>,
}

impl RedisStore {
    async fn connect(url: &str, cfg: &StoreConfig) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        Ok(RedisStore {
            client,
            conn,
            script: Arc::new(redis::Script::new(PUT_SCRIPT)),
            forbidden: forbidden_pairs().into(),
            ttl_ms: cfg.ttl.as_millis().max(1) as u64,
            cache_ttl_ms: cfg.cache_ttl.as_millis() as u64,
            prefix: cfg.key_prefix.clone().into(),
        })
    }

    fn key(&self, job_id: &str) -> String {
        format!("{}job:{job_id}", self.prefix)
    }

    fn channel(&self, channel: Channel) -> String {
        format!("{}{}", self.prefix, channel.name())
    }

    async fn create(&self, record: &JobResult) -> Result<Create, StoreError> {
        let json = serde_json::to_string(record).expect("JobResult serialises. This is a bug.");
        let mut conn = self.conn.clone();
        let existing: Option<String> = redis::cmd("EVAL")
            .arg(
                "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGET', KEYS[1], 'record') end \
                 redis.call('HSET', KEYS[1], 'status', ARGV[1], 'record', ARGV[2]) \
                 redis.call('PEXPIRE', KEYS[1], ARGV[3]) return false",
            )
            .arg(1)
            .arg(self.key(&record.job_id))
            .arg(record.status.as_str())
            .arg(json)
            .arg(self.ttl_ms)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match existing {
            None => Ok(Create::Created),
            Some(raw) => serde_json::from_str(&raw)
                .map(|r| Create::Exists(Box::new(r)))
                .map_err(|e| StoreError::Corrupt { job_id: record.job_id.clone(), message: e.to_string() }),
        }
    }

    async fn remove_queued(&self, job_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("EVAL")
            .arg("if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('DEL', KEYS[1]) end return 1")
            .arg(1)
            .arg(self.key(job_id))
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn get_many(&self, job_ids: &[String]) -> Result<Vec<Option<JobResult>>, StoreError> {
        let mut out = Vec::with_capacity(job_ids.len());
        // Pipelined in chunks: one round trip per 1000 records.
        for chunk in job_ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HGET").arg(self.key(id)).arg("record");
            }
            let mut conn = self.conn.clone();
            let raws: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
            for (id, raw) in chunk.iter().zip(raws) {
                out.push(
                    raw.map(|s| serde_json::from_str(&s))
                        .transpose()
                        .map_err(|e| StoreError::Corrupt { job_id: id.clone(), message: e.to_string() })?,
                );
            }
        }
        Ok(out)
    }

    async fn put_doc(&self, kind: &str, id: &str, json: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}{kind}:{id}", self.prefix))
            .arg(json)
            .arg("PX")
            .arg(self.ttl_ms)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn get_doc(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET").arg(format!("{}{kind}:{id}", self.prefix)).query_async(&mut conn).await.map_err(unavailable)
    }

    async fn put(&self, record: &JobResult) -> Result<Put, StoreError> {
        let json = serde_json::to_string(record).expect("JobResult serialises. This is a bug.");
        let mut conn = self.conn.clone();
        let reply: String = self
            .script
            .key(self.key(&record.job_id))
            .arg(record.status.as_str())
            .arg(json)
            .arg(self.ttl_ms)
            .arg(&*self.forbidden)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if reply == "ok" {
            return Ok(Put::Written);
        }
        let status = serde_json::from_value(serde_json::Value::String(reply.clone())).map_err(|_| {
            StoreError::Corrupt { job_id: record.job_id.clone(), message: format!("unknown status {reply:?}") }
        })?;
        Ok(Put::Kept(status))
    }

    async fn get_meta(&self, job_id: &str) -> Result<Option<(JobResult, bool)>, StoreError> {
        let mut conn = self.conn.clone();
        let (raw, published): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.key(job_id))
            .arg("record")
            .arg("published")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        raw.map(|s| {
            serde_json::from_str(&s)
                .map(|r| (r, published.is_some()))
                .map_err(|e| StoreError::Corrupt { job_id: job_id.to_owned(), message: e.to_string() })
        })
        .transpose()
    }

    async fn mark_published(&self, job_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        // HSETNX-like on an existing key only: a missing (expired) record stays missing.
        redis::cmd("EVAL")
            .arg(
                "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'published', '1') end return 1",
            )
            .arg(1)
            .arg(self.key(job_id))
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn notify(&self, channel: Channel, job_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.channel(channel))
            .arg(job_id)
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    fn subscribe(&self, channel: Channel) -> mpsc::Receiver<String> {
        // Bound: notices the subscriber has not looked at yet; when full,
        // newer notices are dropped (best effort, see `Store::cancellations`).
        let (tx, rx) = mpsc::channel(1024);
        let (client, channel) = (self.client.clone(), self.channel(channel));
        tokio::spawn(async move {
            let mut attempt = 0u32;
            while !tx.is_closed() {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => {
                        if let Err(e) = pubsub.subscribe(&channel).await {
                            tracing::warn!(error = %e, channel, "subscribe failed");
                        } else {
                            attempt = 0;
                            use futures::StreamExt;
                            let mut messages = pubsub.into_on_message();
                            while let Some(msg) = messages.next().await {
                                if let Ok(id) = msg.get_payload::<String>()
                                    && let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(id)
                                {
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, channel, "notification channel: cannot connect"),
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis((100u64 << attempt.min(5)).min(3_000))).await;
            }
        });
        rx
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Output>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(format!("{}cache:{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        // A cache entry that does not parse is a miss, not an error.
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    async fn cache_put(&self, key: &str, output: &Output) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}cache:{key}", self.prefix))
            .arg(serde_json::to_string(output).expect("Output serialises. This is a bug."))
            .arg("PX")
            .arg(self.cache_ttl_ms.max(1))
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()).map_err(unavailable)
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// In-process store for `sluice up`: a map with per-record expiry and a
/// capacity bound (the oldest-written records are evicted first).
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
    cache: Arc<Mutex<Bounded<Output>>>,
    /// Cancellation notices (bounded: a slow listener misses old notices).
    cancels: broadcast::Sender<String>,
    /// Completion notices (bounded likewise).
    done: broadcast::Sender<String>,
    /// Documents (batches), bounded like the records.
    docs: Arc<Mutex<Bounded<String>>>,
    ttl: Duration,
    cache_ttl: Duration,
    capacity: usize,
}

struct MemoryInner {
    records: HashMap<String, Entry>,
    /// Insertion order for eviction: (job id, the entry's `seq`). An id whose
    /// record expired and was written again appears twice; the stale entry
    /// is recognised by its `seq` and skipped.
    order: VecDeque<(String, u64)>,
    next_seq: u64,
}

struct Entry {
    record: JobResult,
    published: bool,
    expires: Instant,
    seq: u64,
}

impl MemoryStore {
    fn new(cfg: &StoreConfig) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Mutex::new(MemoryInner { records: HashMap::new(), order: VecDeque::new(), next_seq: 0 })),
            cache: Arc::new(Mutex::new(Bounded::new(cfg.cache_capacity.max(1)))),
            cancels: broadcast::channel(1024).0,
            done: broadcast::channel(1024).0,
            docs: Arc::new(Mutex::new(Bounded::new(cfg.memory_capacity.max(1)))),
            ttl: cfg.ttl,
            cache_ttl: cfg.cache_ttl,
            capacity: cfg.memory_capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, record: &JobResult) -> Put {
        let mut g = self.lock();
        self.put_locked(&mut g, record)
    }

    fn put_locked(&self, g: &mut MemoryInner, record: &JobResult) -> Put {
        let now = Instant::now();
        let expires = now + self.ttl;
        match g.records.get_mut(&record.job_id) {
            Some(e) if e.expires > now => {
                if !e.record.status.may_become(record.status) {
                    return Put::Kept(e.record.status);
                }
                e.record = record.clone();
                e.published = false;
                e.expires = expires;
            }
            _ => {
                let seq = g.next_seq;
                g.next_seq += 1;
                g.records
                    .insert(record.job_id.clone(), Entry { record: record.clone(), published: false, expires, seq });
                g.order.push_back((record.job_id.clone(), seq));
            }
        }
        // Evict from the oldest end: past capacity, expired, or stale.
        while let Some((id, seq)) = g.order.front() {
            let live = g.records.get(id).filter(|e| e.seq == *seq).map(|e| e.expires);
            let evict = match live {
                None => true,
                Some(exp) => g.records.len() > self.capacity || exp <= now,
            };
            if !evict {
                break;
            }
            let (id, _) = g.order.pop_front().expect("front exists");
            if live.is_some() {
                g.records.remove(&id);
            }
        }
        Put::Written
    }

    fn get_meta(&self, job_id: &str) -> Option<(JobResult, bool)> {
        let g = self.lock();
        g.records.get(job_id).filter(|e| e.expires > Instant::now()).map(|e| (e.record.clone(), e.published))
    }

    fn mark_published(&self, job_id: &str) {
        if let Some(e) = self.lock().records.get_mut(job_id) {
            e.published = true;
        }
    }

    fn sender(&self, channel: Channel) -> &broadcast::Sender<String> {
        match channel {
            Channel::Cancel => &self.cancels,
            Channel::Done => &self.done,
        }
    }

    fn notify(&self, channel: Channel, job_id: &str) {
        let _ = self.sender(channel).send(job_id.to_owned());
    }

    fn create(&self, record: &JobResult) -> Create {
        let mut g = self.lock();
        if let Some(e) = g.records.get(&record.job_id).filter(|e| e.expires > Instant::now()) {
            return Create::Exists(Box::new(e.record.clone()));
        }
        self.put_locked(&mut g, record);
        Create::Created
    }

    fn remove_queued(&self, job_id: &str) {
        let mut g = self.lock();
        if g.records.get(job_id).is_some_and(|e| e.record.status == JobStatus::Queued) {
            g.records.remove(job_id);
        }
    }

    fn put_doc(&self, kind: &str, id: &str, json: &str) {
        let expires = Instant::now() + self.ttl;
        self.docs.lock().unwrap_or_else(|p| p.into_inner()).put(format!("{kind}:{id}"), json.to_owned(), expires);
    }

    fn get_doc(&self, kind: &str, id: &str) -> Option<String> {
        self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(&format!("{kind}:{id}"))
    }

    fn subscribe(&self, channel: Channel) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel(1024);
        let mut sub = self.sender(channel).subscribe();
        tokio::spawn(async move {
            loop {
                match sub.recv().await {
                    Ok(id) => {
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(id) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        rx
    }

    fn cache_get(&self, key: &str) -> Option<Output> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(key)
    }

    fn cache_put(&self, key: &str, output: &Output) {
        let expires = Instant::now() + self.cache_ttl;
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(key.to_owned(), output.clone(), expires);
    }
}

/// A map with expiry and a size bound (oldest insertions evicted first).
struct Bounded<V> {
    map: HashMap<String, (V, Instant)>,
    order: VecDeque<String>,
    capacity: usize,
}

impl<V: Clone> Bounded<V> {
    fn new(capacity: usize) -> Bounded<V> {
        Bounded { map: HashMap::new(), order: VecDeque::new(), capacity }
    }

    fn get(&self, key: &str) -> Option<V> {
        self.map.get(key).filter(|(_, exp)| *exp > Instant::now()).map(|(v, _)| v.clone())
    }

    fn put(&mut self, key: String, value: V, expires: Instant) {
        if self.map.insert(key.clone(), (value, expires)).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > self.capacity {
            let Some(old) = self.order.pop_front() else { break };
            self.map.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::{ErrorCode, JobRequest};

    fn cfg(capacity: usize) -> StoreConfig {
        StoreConfig {
            ttl: Duration::from_secs(60),
            memory_capacity: capacity,
            key_prefix: "test:".into(),
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 2,
        }
    }

    fn record(id: &str, status: JobStatus) -> JobResult {
        let req = JobRequest::decode(
            format!(r#"{{"job_id":"{id}","tenant":"t","model":"m","input":{{"text":"x"}}}}"#).as_bytes(),
        )
        .unwrap();
        let mut r = JobResult::queued(&req);
        r.status = status;
        r
    }

    #[test]
    fn forbidden_pairs_cover_terminal_states() {
        let f = forbidden_pairs();
        assert!(f.contains("|succeeded>running|"));
        assert!(f.contains("|running>queued|"));
        assert!(!f.contains("|queued>running|"));
        assert!(!f.contains("|running>running|"));
    }

    #[test]
    fn memory_store_follows_the_lifecycle() {
        let s = MemoryStore::new(&cfg(100));
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                let id = format!("{from}-{to}");
                assert_eq!(s.put(&record(&id, from)), Put::Written);
                let want = if from.may_become(to) { Put::Written } else { Put::Kept(from) };
                assert_eq!(s.put(&record(&id, to)), want, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn memory_store_is_bounded() {
        let s = MemoryStore::new(&cfg(3));
        for i in 0..10 {
            s.put(&record(&format!("j{i}"), JobStatus::Queued));
        }
        let g = s.lock();
        assert_eq!(g.records.len(), 3);
        assert!(g.records.contains_key("j9") && !g.records.contains_key("j0"));
        assert!(g.order.len() <= 3);
        drop(g);
        let failed =
            JobResult::failed("j9".into(), "t".into(), "m".into(), ErrorCode::Internal, "x".into(), chrono::Utc::now());
        assert_eq!(s.put(&failed), Put::Written);
        assert_eq!(s.get_meta("j9").unwrap().0.status, JobStatus::Failed);
    }

    #[test]
    fn published_flag_resets_on_every_write() {
        let s = MemoryStore::new(&cfg(10));
        s.put(&record("p", JobStatus::Running));
        s.mark_published("p");
        assert!(s.get_meta("p").unwrap().1);
        let mut done = record("p", JobStatus::Succeeded);
        done.output = Some(Output::Embedding(vec![1.0]));
        s.put(&done);
        assert!(!s.get_meta("p").unwrap().1, "the terminal record is not published yet");
    }

    #[test]
    fn cache_is_bounded() {
        let s = MemoryStore::new(&cfg(10));
        for i in 0..5 {
            s.cache_put(&format!("k{i}"), &Output::Embedding(vec![i as f32]));
        }
        assert_eq!(s.cache_get("k4"), Some(Output::Embedding(vec![4.0])));
        assert_eq!(s.cache_get("k0"), None);
        assert_eq!(s.cache.lock().unwrap().map.len(), 2);
    }
}
