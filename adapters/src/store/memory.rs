//! The in-process store of `sluice up`: not durable, bounded in records.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_schemas::topics::job_key;
use sluice_schemas::{JobResult, Output};
use tokio::sync::{broadcast, mpsc};

use super::{BatchProgress, Channel, Create, NOTICE_BUFFER, Put, StoreConfig, Stored};

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
    /// Batches' finished lines ([`MEMORY_BATCHES`] batches at most).
    batches: Arc<Mutex<Bounded<BatchLines>>>,
    ttl: Duration,
    pub(super) cache_ttl: Duration,
    capacity: usize,
}

struct MemoryInner {
    /// By [`job_key`]: `<tenant>/<job_id>`.
    records: HashMap<String, Entry>,
    /// Insertion order for eviction: (job key, the entry's `seq`). A key whose
    /// record expired and was written again appears twice; the stale entry
    /// is recognised by its `seq` and skipped.
    order: VecDeque<(String, u64)>,
    next_seq: u64,
}

struct Entry {
    record: JobResult,
    published: bool,
    /// The digest of the request that made the job, once one is known.
    digest: Option<String>,
    expires: Instant,
    seq: u64,
}

impl MemoryStore {
    pub(super) fn new(cfg: &StoreConfig) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Mutex::new(MemoryInner { records: HashMap::new(), order: VecDeque::new(), next_seq: 0 })),
            cache: Arc::new(Mutex::new(Bounded::new(cfg.cache_capacity.max(1)))),
            cancels: broadcast::channel(NOTICE_BUFFER).0,
            done: broadcast::channel(NOTICE_BUFFER).0,
            docs: Arc::new(Mutex::new(Bounded::new(cfg.memory_capacity.max(1)))),
            batches: Arc::new(Mutex::new(Bounded::new(MEMORY_BATCHES))),
            ttl: cfg.ttl,
            cache_ttl: cfg.cache_ttl,
            capacity: cfg.memory_capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn put(&self, record: &JobResult, digest: Option<&str>) -> Put {
        let put = self.put_locked(&mut self.lock(), record, digest);
        if put == Put::Written && record.status.is_terminal() {
            self.notify(Channel::Done, &job_key(&record.tenant, &record.job_id));
        }
        put
    }

    fn put_locked(&self, g: &mut MemoryInner, record: &JobResult, digest: Option<&str>) -> Put {
        let now = Instant::now();
        let expires = now + self.ttl;
        let key = job_key(&record.tenant, &record.job_id);
        match g.records.get_mut(&key) {
            Some(e) if e.expires > now => {
                if let (Some(had), Some(d)) = (&e.digest, digest)
                    && had != d
                {
                    return Put::Reused;
                }
                if !e.record.status.may_become(record.status) {
                    return Put::Kept(e.record.status);
                }
                e.record = record.clone();
                e.published = false;
                e.expires = expires;
                if e.digest.is_none() {
                    e.digest = digest.map(str::to_owned);
                }
            }
            _ => {
                let seq = g.next_seq;
                g.next_seq += 1;
                let digest = digest.map(str::to_owned);
                g.records.insert(key.clone(), Entry { record: record.clone(), published: false, digest, expires, seq });
                g.order.push_back((key, seq));
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

    /// The record under `key` (a [`job_key`]).
    pub(super) fn get_meta(&self, key: &str) -> Option<Stored> {
        let g = self.lock();
        g.records.get(key).filter(|e| e.expires > Instant::now()).map(|e| Stored {
            record: e.record.clone(),
            published: e.published,
            digest: e.digest.clone(),
        })
    }

    pub(super) fn mark_published(&self, key: &str) {
        if let Some(e) = self.lock().records.get_mut(key) {
            e.published = true;
        }
    }

    pub(super) fn sender(&self, channel: Channel) -> &broadcast::Sender<String> {
        match channel {
            Channel::Cancel => &self.cancels,
            Channel::Done => &self.done,
        }
    }

    pub(super) fn notify(&self, channel: Channel, key: &str) {
        let _ = self.sender(channel).send(key.to_owned());
    }

    pub(super) fn create(&self, record: &JobResult, digest: &str) -> Create {
        let mut g = self.lock();
        if let Some(e) = g.records.get(&job_key(&record.tenant, &record.job_id)).filter(|e| e.expires > Instant::now())
        {
            return match &e.digest {
                Some(had) if had != digest => Create::Reused(Box::new(e.record.clone())),
                _ => Create::Exists(Box::new(e.record.clone())),
            };
        }
        self.put_locked(&mut g, record, Some(digest));
        Create::Created
    }

    pub(super) fn put_doc(&self, kind: &str, id: &str, json: &str) {
        let expires = Instant::now() + self.ttl;
        self.docs.lock().unwrap_or_else(|p| p.into_inner()).put(format!("{kind}:{id}"), json.to_owned(), expires);
    }

    pub(super) fn get_doc(&self, kind: &str, id: &str) -> Option<String> {
        self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(&format!("{kind}:{id}"))
    }

    pub(super) fn batch_line_done(&self, key: &str, index: u32, status: &str) -> BatchProgress {
        let now = Instant::now();
        let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        if batches.map.get(key).is_none_or(|(_, exp)| *exp <= now) {
            batches.put(key.to_owned(), BatchLines::default(), now);
        }
        let (entry, expires) = batches.map.get_mut(key).expect("put just above");
        *expires = now + self.ttl;
        let (word, bit) = (index as usize / 64, 1u64 << (index % 64));
        if entry.lines.len() <= word {
            entry.lines.resize(word + 1, 0);
        }
        if entry.lines[word] & bit == 0 {
            entry.lines[word] |= bit;
            entry.progress.done += 1;
            *entry.progress.counts.entry(status.to_owned()).or_default() += 1;
        }
        entry.progress.clone()
    }

    pub(super) fn batch_announced(&self, key: &str) {
        let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((entry, _)) = batches.map.get_mut(key) {
            entry.progress.announced = true;
        }
    }

    pub(super) fn subscribe(&self, channel: Channel) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel(NOTICE_BUFFER);
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

    pub(super) fn cache_get(&self, key: &str) -> Option<Output> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(key)
    }

    pub(super) fn cache_put(&self, key: &str, output: &Output) {
        let expires = Instant::now() + self.cache_ttl;
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(key.to_owned(), output.clone(), expires);
    }
}

/// A map with expiry and a size bound (oldest insertions evicted first).
/// Most batches whose finished lines the in-process store counts at once
/// (the oldest go first): each is a bit per line, so at most 1024 × 125 KB
/// for batches of the largest size.
const MEMORY_BATCHES: usize = 1024;

/// One batch's lines: a bit each, and the counts.
#[derive(Clone, Default)]
struct BatchLines {
    lines: Vec<u64>,
    progress: BatchProgress,
}

struct Bounded<V> {
    map: HashMap<String, (V, Instant)>,
    order: VecDeque<String>,
    capacity: usize,
}

impl<V: Clone> Bounded<V> {
    pub(super) fn new(capacity: usize) -> Bounded<V> {
        Bounded { map: HashMap::new(), order: VecDeque::new(), capacity }
    }

    pub(super) fn get(&self, key: &str) -> Option<V> {
        self.map.get(key).filter(|(_, exp)| *exp > Instant::now()).map(|(v, _)| v.clone())
    }

    pub(super) fn put(&mut self, key: String, value: V, expires: Instant) {
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
    use sluice_schemas::{ErrorCode, JobRequest, JobStatus};

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
    fn memory_store_follows_the_lifecycle() {
        let s = MemoryStore::new(&cfg(100));
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                let id = format!("{from}-{to}");
                assert_eq!(s.put(&record(&id, from), None), Put::Written);
                let want = if from.may_become(to) { Put::Written } else { Put::Kept(from) };
                assert_eq!(s.put(&record(&id, to), None), want, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn memory_store_is_bounded() {
        let s = MemoryStore::new(&cfg(3));
        for i in 0..10 {
            s.put(&record(&format!("j{i}"), JobStatus::Queued), None);
        }
        let g = s.lock();
        assert_eq!(g.records.len(), 3);
        assert!(g.records.contains_key("t/j9") && !g.records.contains_key("t/j0"));
        assert!(g.order.len() <= 3);
        drop(g);
        let failed =
            JobResult::failed("j9".into(), "t".into(), "m".into(), ErrorCode::Internal, "x".into(), chrono::Utc::now());
        assert_eq!(s.put(&failed, None), Put::Written);
        assert_eq!(s.get_meta("t/j9").unwrap().record.status, JobStatus::Failed);
    }

    #[test]
    fn two_tenants_hold_one_job_id_apart() {
        let s = MemoryStore::new(&cfg(10));
        let mine = record("same", JobStatus::Succeeded);
        let mut theirs = record("same", JobStatus::Running);
        theirs.tenant = "u".into();
        assert_eq!(s.put(&mine, None), Put::Written);
        assert_eq!(s.put(&theirs, None), Put::Written, "another tenant's id is another job");
        assert_eq!(s.get_meta("t/same").unwrap().record.status, JobStatus::Succeeded);
        assert_eq!(s.get_meta("u/same").unwrap().record.status, JobStatus::Running);
        assert_eq!(s.create(&theirs, "d"), Create::Exists(Box::new(theirs.clone())));
    }

    #[test]
    fn published_flag_resets_on_every_write() {
        let s = MemoryStore::new(&cfg(10));
        s.put(&record("p", JobStatus::Running), None);
        s.mark_published("t/p");
        assert!(s.get_meta("t/p").unwrap().published);
        let mut done = record("p", JobStatus::Succeeded);
        done.output = Some(Output::Embedding(vec![1.0]));
        s.put(&done, None);
        assert!(!s.get_meta("t/p").unwrap().published, "the terminal record is not published yet");
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
