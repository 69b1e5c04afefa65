//! The results store: one record per job (status + result) with a TTL, the
//! inference cache, and cancellation notices.
//!
//! Two back ends behind one type: Redis (`redis` crate, `ConnectionManager`)
//! for real deployments and a bounded in-process map for `sluice up`.
//!
//! A job is named by its tenant and its id together
//! ([`sluice_schemas::topics::job_key`]): job ids are the caller's, and two
//! tenants that use the same one hold two jobs that never meet.
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
//! It also counts each batch's finished lines ([`Store::batch_line_done`]),
//! once per line whatever the replays, for the notifier's
//! `batch.completed` callback.
//!
//! Architecture invariant: this is the only module of Sluice that imports
//! `redis`.

mod memory;
mod redis;

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_schemas::topics::job_key;
use sluice_schemas::{JobResult, JobStatus, Output};
use tokio::sync::mpsc;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// Failures of the results store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("results store unreachable: {0}")]
    Unavailable(String),
    #[error("results store holds a corrupt record for {job_id}: {message}")]
    Corrupt { job_id: String, message: String },
}

impl crate::retry::Retryable for StoreError {
    /// An unreachable store may come back; a corrupt record stays corrupt.
    fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Outcome of a conditional [`Store::put`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The record was written.
    Written,
    /// The stored record is in this status and may not become the new one;
    /// nothing was written.
    Kept(JobStatus),
    /// The tenant's job under this id was made for another request (its
    /// [`sluice_schemas::JobRequest::digest`] differs); nothing was written.
    Reused,
}

/// Outcome of [`Store::create`].
#[derive(Debug, Clone, PartialEq)]
pub enum Create {
    /// The record was written: a new job.
    Created,
    /// The tenant has a job with this id already, for the same request (or
    /// one written without a digest); this is its record.
    Exists(Box<JobResult>),
    /// The tenant has a job with this id already, for another request; this
    /// is its record, unchanged.
    Reused(Box<JobResult>),
}

/// A stored job record and what the store keeps beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub record: JobResult,
    /// Whether its terminal version is on the results topic.
    pub published: bool,
    /// The digest of the request that made the job (`None` for records
    /// written without one).
    pub digest: Option<String>,
}

/// Notices a subscriber has not looked at yet, per subscription: newer ones
/// are dropped beyond this (notices are best effort; readers re-read the
/// store). Sized for bursts: one script call of the Redis writer can finish
/// 512 jobs at once. At most ~4 MiB of job keys.
const NOTICE_BUFFER: usize = 16_384;

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

/// A batch's finished lines, as [`Store::batch_line_done`] left them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchProgress {
    /// Distinct lines finished.
    pub done: u32,
    /// Those lines by status (`succeeded`, `failed`, ...).
    pub counts: BTreeMap<String, u32>,
    /// Whether the batch's completion was delivered (or dead-lettered):
    /// [`Store::batch_announced`].
    pub announced: bool,
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

    /// Writes `record` unless the stored record's status forbids it. A
    /// terminal record that is written wakes [`Store::completions`].
    pub async fn put(&self, record: &JobResult) -> Result<Put, StoreError> {
        match self {
            Store::Redis(r) => r.put(record, None, None).await,
            Store::Memory(m) => Ok(m.put(record, None)),
        }
    }

    /// [`Store::put`] on behalf of the request with `digest` (if known):
    /// refused ([`Put::Reused`]) when the job was made for another request.
    /// `json`, when given, is `record` serialised (sent as is).
    pub async fn put_for(
        &self,
        record: &JobResult,
        json: Option<&str>,
        digest: Option<&str>,
    ) -> Result<Put, StoreError> {
        match self {
            Store::Redis(r) => r.put(record, json, digest).await,
            Store::Memory(m) => Ok(m.put(record, digest)),
        }
    }

    /// The record of `tenant`'s job `job_id`, if it exists and has not expired.
    pub async fn get(&self, tenant: &str, job_id: &str) -> Result<Option<JobResult>, StoreError> {
        Ok(self.get_meta(tenant, job_id).await?.map(|s| s.record))
    }

    /// The record of `tenant`'s job `job_id`, whether its terminal version
    /// was published, and the digest of the request that made it.
    pub async fn get_meta(&self, tenant: &str, job_id: &str) -> Result<Option<Stored>, StoreError> {
        let key = job_key(tenant, job_id);
        match self {
            Store::Redis(r) => r.get_meta(&key).await,
            Store::Memory(m) => Ok(m.get_meta(&key)),
        }
    }

    /// Notes that the record's terminal version is on the results topic.
    pub async fn mark_published(&self, tenant: &str, job_id: &str) -> Result<(), StoreError> {
        let key = job_key(tenant, job_id);
        match self {
            Store::Redis(r) => r.mark_published(&key).await,
            Store::Memory(m) => {
                m.mark_published(&key);
                Ok(())
            }
        }
    }

    /// Writes `record` (a `queued` record from the gateway, for the request
    /// with `digest`) only if no record of its job exists; otherwise returns
    /// the existing one, as [`Create::Reused`] when it was made for another
    /// request. This makes a client-given `job_id` idempotent.
    pub async fn create(&self, record: &JobResult, digest: &str) -> Result<Create, StoreError> {
        match self {
            Store::Redis(r) => r.create(record, digest).await,
            Store::Memory(m) => Ok(m.create(record, digest)),
        }
    }

    /// The records of `tenant`'s jobs `job_ids`, in order (`None` where
    /// there is none).
    pub async fn get_many(&self, tenant: &str, job_ids: &[String]) -> Result<Vec<Option<JobResult>>, StoreError> {
        let keys: Vec<String> = job_ids.iter().map(|id| job_key(tenant, id)).collect();
        match self {
            Store::Redis(r) => r.get_many(&keys).await,
            Store::Memory(m) => Ok(keys.iter().map(|k| m.get_meta(k).map(|s| s.record)).collect()),
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

    /// Jobs that reach a terminal status from now on, by
    /// [`job_key`] (best effort, like [`Store::cancellations`]; readers
    /// re-read the store).
    pub fn completions(&self) -> mpsc::Receiver<String> {
        self.subscribe(Channel::Done)
    }

    async fn notify(&self, channel: Channel, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Redis(r) => r.notify(channel, key).await,
            Store::Memory(m) => {
                m.notify(channel, key);
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

    /// Counts line `index` of `tenant`'s batch `batch_id` as finished in
    /// `status` (once: a line counted already changes nothing) and returns
    /// the batch's progress, atomically, so that exactly the state after
    /// the last line's count shows every line done. The count lives as long
    /// as the records (`store.ttl_secs`), from its last change.
    pub async fn batch_line_done(
        &self,
        tenant: &str,
        batch_id: &str,
        index: u32,
        status: JobStatus,
    ) -> Result<BatchProgress, StoreError> {
        let key = job_key(tenant, batch_id);
        match self {
            Store::Redis(r) => r.batch_line_done(&key, index, status.as_str()).await,
            Store::Memory(m) => Ok(m.batch_line_done(&key, index, status.as_str())),
        }
    }

    /// Records that the batch's completion was delivered or dead-lettered:
    /// a line replayed after it does not announce the batch again.
    pub async fn batch_announced(&self, tenant: &str, batch_id: &str) -> Result<(), StoreError> {
        let key = job_key(tenant, batch_id);
        match self {
            Store::Redis(r) => r.batch_announced(&key).await,
            Store::Memory(m) => {
                m.batch_announced(&key);
                Ok(())
            }
        }
    }

    /// Cancels a job that has not finished, and notifies the workers.
    pub async fn cancel(&self, tenant: &str, job_id: &str) -> Result<Cancel, StoreError> {
        for _ in 0..3 {
            let Some(current) = self.get(tenant, job_id).await? else { return Ok(Cancel::NotFound) };
            if current.status.is_terminal() {
                return Ok(Cancel::Finished(current));
            }
            let mut cancelled = current;
            cancelled.status = JobStatus::Cancelled;
            cancelled.finished_at = Some(chrono::Utc::now());
            if self.put(&cancelled).await? == Put::Written {
                self.notify(Channel::Cancel, &job_key(tenant, job_id)).await?;
                return Ok(Cancel::Cancelled(cancelled));
            }
            // It finished (or changed) under us: look again.
        }
        match self.get(tenant, job_id).await? {
            Some(r) => Ok(Cancel::Finished(r)),
            None => Ok(Cancel::NotFound),
        }
    }

    /// Jobs cancelled from now on, by [`job_key`], as they are cancelled. Best effort: a
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_pairs_cover_terminal_states() {
        let f = forbidden_pairs();
        assert!(f.contains("|succeeded>running|"));
        assert!(f.contains("|running>queued|"));
        assert!(!f.contains("|queued>running|"));
        assert!(!f.contains("|running>running|"));
    }
}
