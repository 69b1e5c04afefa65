//! The results store: one record per job (status + result) with a TTL.
//!
//! Two back ends behind one type: Redis (`redis` crate, `ConnectionManager`)
//! for real deployments and a bounded in-process map for `sluice up`.
//!
//! Both enforce the job lifecycle on write: [`Store::put`] only replaces a
//! record when [`JobStatus::may_become`] allows it, atomically (a Lua script
//! in Redis, a mutex in memory). A finished job is therefore never changed,
//! a replayed Kafka record cannot regress a job, and a late `queued` write
//! from the gateway cannot overwrite the worker's `running` or `succeeded`.
//!
//! Architecture invariant: this is the only module of Sluice that imports
//! `redis`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sluice_schemas::{JobResult, JobStatus};

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

/// Settings of the results store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How long a job record lives after its last write.
    pub ttl: Duration,
    /// Most records the in-process store keeps; the oldest go first.
    pub memory_capacity: usize,
    /// Prefix of Redis keys.
    pub key_prefix: String,
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
        match self {
            Store::Redis(r) => r.get(job_id).await,
            Store::Memory(m) => Ok(m.get(job_id)),
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

/// Statuses from which no write is allowed, and the pairs that may not
/// follow each other, as the Lua script sees them. Derived from
/// [`JobStatus::may_become`] so the rule is written once.
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
/// pairs (`|from>to|...|`). Returns "ok", or the stored status when the
/// write is refused.
const PUT_SCRIPT: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'status')
if cur and string.find(ARGV[4], '|' .. cur .. '>' .. ARGV[1] .. '|', 1, true) then
  return cur
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 'ok'
"#;

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    script: Arc<redis::Script>,
    forbidden: Arc<str>,
    ttl_ms: u64,
    prefix: Arc<str>,
}

impl RedisStore {
    async fn connect(url: &str, cfg: &StoreConfig) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        Ok(RedisStore {
            conn,
            script: Arc::new(redis::Script::new(PUT_SCRIPT)),
            forbidden: forbidden_pairs().into(),
            ttl_ms: cfg.ttl.as_millis().max(1) as u64,
            prefix: cfg.key_prefix.clone().into(),
        })
    }

    fn key(&self, job_id: &str) -> String {
        format!("{}job:{job_id}", self.prefix)
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
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if reply == "ok" {
            return Ok(Put::Written);
        }
        let status = serde_json::from_value(serde_json::Value::String(reply.clone())).map_err(|_| {
            StoreError::Corrupt { job_id: record.job_id.clone(), message: format!("unknown status {reply:?}") }
        })?;
        Ok(Put::Kept(status))
    }

    async fn get(&self, job_id: &str) -> Result<Option<JobResult>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.key(job_id))
            .arg("record")
            .query_async(&mut conn)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        raw.map(|s| {
            serde_json::from_str(&s)
                .map_err(|e| StoreError::Corrupt { job_id: job_id.to_owned(), message: e.to_string() })
        })
        .transpose()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

/// In-process store for `sluice up`: a map with per-record expiry and a
/// capacity bound (the oldest-written records are evicted first).
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
    ttl: Duration,
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
    expires: Instant,
    seq: u64,
}

impl MemoryStore {
    fn new(cfg: &StoreConfig) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Mutex::new(MemoryInner { records: HashMap::new(), order: VecDeque::new(), next_seq: 0 })),
            ttl: cfg.ttl,
            capacity: cfg.memory_capacity.max(1),
        }
    }

    fn put(&self, record: &JobResult) -> Put {
        let now = Instant::now();
        let expires = now + self.ttl;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.records.get_mut(&record.job_id) {
            Some(e) if e.expires > now => {
                if !e.record.status.may_become(record.status) {
                    return Put::Kept(e.record.status);
                }
                e.record = record.clone();
                e.expires = expires;
            }
            _ => {
                let seq = g.next_seq;
                g.next_seq += 1;
                g.records.insert(record.job_id.clone(), Entry { record: record.clone(), expires, seq });
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

    fn get(&self, job_id: &str) -> Option<JobResult> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.records.get(job_id).filter(|e| e.expires > Instant::now()).map(|e| e.record.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::{ErrorCode, JobRequest};

    fn cfg(capacity: usize) -> StoreConfig {
        StoreConfig { ttl: Duration::from_secs(60), memory_capacity: capacity, key_prefix: "test:".into() }
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
        let s = MemoryStore::new(&cfg(10));
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
        let g = s.inner.lock().unwrap();
        assert_eq!(g.records.len(), 3);
        assert!(g.records.contains_key("j9") && !g.records.contains_key("j0"));
        assert!(g.order.len() <= 3);
        drop(g);
        let failed =
            JobResult::failed("j9".into(), "t".into(), "m".into(), ErrorCode::Internal, "x".into(), chrono::Utc::now());
        assert_eq!(s.put(&failed), Put::Written);
        assert_eq!(s.get("j9").unwrap().status, JobStatus::Failed);
    }
}
