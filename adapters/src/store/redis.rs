//! The Redis store: job records as hashes (`<prefix>job:<tenant>/<job_id>`),
//! a Lua script per conditional write, pub/sub channels for notices.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sluice_schemas::topics::job_key;
use sluice_schemas::{JobResult, JobStatus, Output};
use tokio::sync::{mpsc, oneshot};

use super::{BatchProgress, Channel, Create, NOTICE_BUFFER, Put, StoreConfig, StoreError, Stored, forbidden_pairs};

/// Applies a batch of record writes in order, one reply per key. KEYS:
/// the records' keys. ARGV[1]: the lifecycle pairs that may not follow each
/// other (`|from>to|…|`), ARGV[2]: TTL in ms, ARGV[3]: the completion
/// channel, ARGV[4]: the terminal statuses (`|a|b|…|`), ARGV[5]: the keys'
/// prefix before the job key; then four values per key: op, status, record
/// JSON, and the digest of the request the write is for (empty: none).
///
/// The key holds the tenant (`<tenant>/<job_id>`), so a write can only ever
/// reach its own tenant's job. A record keeps the digest of the first write
/// that gave one (`digest`); a write with another digest is a job id used
/// for another request, and changes nothing.
///
/// - `P` (put): writes the record unless the job was made for another
///   request or the stored status may not become the new one; replies `ok`,
///   `#` (another request's), or the stored status. A written record is
///   not yet published. Terminal writes are announced on the completion
///   channel, all of a batch's in one message (job keys separated by spaces).
/// - `C` (create): writes the record only if there is none; replies `ok`,
///   or `=` (the same request) or `#` (another) followed by the stored record.
/// - `M` (mark published): on an existing record only (an expired one stays
///   missing); replies `ok`.
const WRITE_SCRIPT: &str = r#"
local forbidden, ttl, channel, terminal, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out, done = {}, {}
for i, key in ipairs(KEYS) do
  local op, status, record, digest = ARGV[4 * i + 2], ARGV[4 * i + 3], ARGV[4 * i + 4], ARGV[4 * i + 5]
  if op == 'P' then
    local cur, had = unpack(redis.call('HMGET', key, 'status', 'digest'))
    if digest ~= '' and had and had ~= digest then
      out[i] = '#'
    elseif cur and string.find(forbidden, '|' .. cur .. '>' .. status .. '|', 1, true) then
      out[i] = cur
    else
      -- No 'published' mark can be there: marks are only set on terminal
      -- records, and a terminal record is never written over.
      if digest ~= '' and not had then
        redis.call('HSET', key, 'status', status, 'record', record, 'digest', digest)
      else
        redis.call('HSET', key, 'status', status, 'record', record)
      end
      redis.call('PEXPIRE', key, ttl)
      out[i] = 'ok'
      if string.find(terminal, '|' .. status .. '|', 1, true) then
        done[#done + 1] = string.sub(key, #prefix + 1)
      end
    end
  elseif op == 'C' then
    local existing, had = unpack(redis.call('HMGET', key, 'record', 'digest'))
    if existing then
      if had and had ~= digest then
        out[i] = '#' .. existing
      else
        out[i] = '=' .. existing
      end
    else
      redis.call('HSET', key, 'status', status, 'record', record, 'digest', digest)
      redis.call('PEXPIRE', key, ttl)
      out[i] = 'ok'
    end
  elseif op == 'M' then
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'published', '1')
    end
    out[i] = 'ok'
  else
    return redis.error_reply('unknown write op ' .. tostring(op))
  end
end
if #done > 0 then
  redis.call('PUBLISH', channel, table.concat(done, ' '))
end
return out
"#;

/// Most writes in one script call (one round trip).
const MAX_BATCH_WRITES: usize = 512;
/// Most bytes of records in one script call; a larger record goes alone.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Delays between attempts to reconnect the notification channel.
const RECONNECT: crate::retry::Backoff =
    crate::retry::Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(3) };
/// Writes waiting for the writer; callers wait when it is full (the worker's
/// in-flight bound keeps them far below it).
const WRITE_QUEUE: usize = 4096;

#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    writes: mpsc::Sender<Write>,
    ttl_ms: u64,
    pub(super) cache_ttl_ms: u64,
    prefix: Arc<str>,
}

/// One write waiting for the writer's next batch.
struct Write {
    key: String,
    op: Op,
    reply: oneshot::Sender<Result<String, StoreError>>,
}

enum Op {
    /// `digest`: empty for a write on behalf of no request.
    Put {
        status: &'static str,
        record: String,
        digest: String,
    },
    Create {
        status: &'static str,
        record: String,
        digest: String,
    },
    Mark,
}

impl Op {
    fn args(&self) -> (&'static str, &'static str, &str, &str) {
        match self {
            Op::Put { status, record, digest } => ("P", status, record, digest),
            Op::Create { status, record, digest } => ("C", status, record, digest),
            Op::Mark => ("M", "", "", ""),
        }
    }

    fn bytes(&self) -> usize {
        self.args().2.len()
    }
}

/// What every batch passes besides the writes.
struct Fixed {
    forbidden: String,
    ttl_ms: u64,
    channel: String,
    terminal: String,
    /// What precedes the job key in a record's key.
    key_prefix: String,
}

/// Group commit: takes every write that is waiting (up to the batch
/// bounds), applies them in one script call, answers each. Up to
/// [`FLUSHES_IN_FLIGHT`] batches are in Redis at once; while they are, the
/// next one gathers, so under load a round trip carries many writes and at
/// low load a write waits for no one.
async fn writer(mut rx: mpsc::Receiver<Write>, conn: ConnectionManager, fixed: Fixed) {
    use futures::StreamExt;
    let script = Arc::new(redis::Script::new(WRITE_SCRIPT));
    let fixed = Arc::new(fixed);
    let mut flushes = futures::stream::FuturesUnordered::new();
    let mut carry: Option<Write> = None;
    let mut open = true;
    while open || !flushes.is_empty() {
        tokio::select! {
            // A finished flush frees a slot (its writes were answered).
            Some(()) = flushes.next(), if !flushes.is_empty() => {}
            first = next_write(&mut rx, &mut carry), if open && flushes.len() < FLUSHES_IN_FLIGHT => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let batch = gather(first, &mut rx, &mut carry);
                metrics::histogram!(sluice_schemas::metrics::STORE_BATCH_WRITES.name).record(batch.len() as f64);
                flushes.push(flush(batch, conn.clone(), script.clone(), fixed.clone()));
            }
        }
    }
}

/// Batches of writes in Redis at once.
const FLUSHES_IN_FLIGHT: usize = 2;

async fn next_write(rx: &mut mpsc::Receiver<Write>, carry: &mut Option<Write>) -> Option<Write> {
    match carry.take() {
        Some(w) => Some(w),
        None => rx.recv().await,
    }
}

/// `first` and every write waiting behind it, up to the batch bounds; a
/// write that would pass the byte bound waits in `carry` for the next batch.
fn gather(first: Write, rx: &mut mpsc::Receiver<Write>, carry: &mut Option<Write>) -> Vec<Write> {
    let mut bytes = first.op.bytes();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_WRITES {
        match rx.try_recv() {
            Ok(w) if bytes + w.op.bytes() > MAX_BATCH_BYTES => {
                *carry = Some(w);
                break;
            }
            Ok(w) => {
                bytes += w.op.bytes();
                batch.push(w);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Applies one batch in one script call and answers each write.
async fn flush(batch: Vec<Write>, mut conn: ConnectionManager, script: Arc<redis::Script>, fixed: Arc<Fixed>) {
    let mut call = script.prepare_invoke();
    call.arg(&fixed.forbidden).arg(fixed.ttl_ms).arg(&fixed.channel).arg(&fixed.terminal).arg(&fixed.key_prefix);
    for w in &batch {
        let (op, status, record, digest) = w.op.args();
        call.key(&w.key).arg(op).arg(status).arg(record).arg(digest);
    }
    let replies: Result<Vec<String>, StoreError> = call.invoke_async(&mut conn).await.map_err(unavailable);
    match replies {
        Ok(replies) if replies.len() == batch.len() => {
            for (w, r) in batch.into_iter().zip(replies) {
                let _ = w.reply.send(Ok(r));
            }
        }
        Ok(replies) => {
            let message = format!("write script answered {} replies for {} writes", replies.len(), batch.len());
            for w in batch {
                let _ = w.reply.send(Err(StoreError::Unavailable(message.clone())));
            }
        }
        Err(e) => {
            for w in batch {
                let _ = w.reply.send(Err(StoreError::Unavailable(e.to_string())));
            }
        }
    }
}

impl RedisStore {
    pub(super) async fn connect(url: &str, cfg: &StoreConfig) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        let prefix: Arc<str> = cfg.key_prefix.clone().into();
        let ttl_ms = cfg.ttl.as_millis().max(1) as u64;
        let (writes, rx) = mpsc::channel(WRITE_QUEUE);
        let fixed = Fixed {
            forbidden: forbidden_pairs(),
            ttl_ms,
            channel: format!("{prefix}{}", Channel::Done.name()),
            terminal: format!(
                "|{}|",
                JobStatus::ALL.iter().filter(|s| s.is_terminal()).map(|s| s.as_str()).collect::<Vec<_>>().join("|")
            ),
            key_prefix: format!("{prefix}job:"),
        };
        // Ends when the last clone of this store is dropped.
        tokio::spawn(writer(rx, conn.clone(), fixed));
        Ok(RedisStore { client, conn, writes, ttl_ms, cache_ttl_ms: cfg.cache_ttl.as_millis() as u64, prefix })
    }

    /// Queues one write of the record under `job` (a job key) for the
    /// writer and waits for its reply.
    async fn write(&self, job: &str, op: Op) -> Result<String, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Unavailable("the results store's writer has stopped".into());
        self.writes.send(Write { key: self.key(job), op, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The Redis key of a job key (`<tenant>/<job_id>`).
    pub(super) fn key(&self, job: &str) -> String {
        format!("{}job:{job}", self.prefix)
    }

    pub(super) fn channel(&self, channel: Channel) -> String {
        format!("{}{}", self.prefix, channel.name())
    }

    pub(super) async fn create(&self, record: &JobResult, digest: &str) -> Result<Create, StoreError> {
        let json = serde_json::to_string(record).expect("JobResult serialises. This is a bug.");
        let op = Op::Create { status: record.status.as_str(), record: json, digest: digest.to_owned() };
        let reply = self.write(&job_key(&record.tenant, &record.job_id), op).await?;
        if reply == "ok" {
            return Ok(Create::Created);
        }
        let corrupt = |message: String| StoreError::Corrupt { job_id: record.job_id.clone(), message };
        let (same, raw) = match (reply.strip_prefix('='), reply.strip_prefix('#')) {
            (Some(raw), _) => (true, raw),
            (_, Some(raw)) => (false, raw),
            _ => return Err(corrupt(format!("unknown reply {reply:?}"))),
        };
        let stored = Box::new(serde_json::from_str(raw).map_err(|e| corrupt(e.to_string()))?);
        Ok(if same { Create::Exists(stored) } else { Create::Reused(stored) })
    }

    /// The records under `jobs` (job keys), in order.
    pub(super) async fn get_many(&self, jobs: &[String]) -> Result<Vec<Option<JobResult>>, StoreError> {
        let mut out = Vec::with_capacity(jobs.len());
        // Pipelined in chunks: one round trip per 1000 records.
        for chunk in jobs.chunks(1000) {
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

    pub(super) async fn put_doc(&self, kind: &str, id: &str, json: &str) -> Result<(), StoreError> {
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

    pub(super) async fn get_doc(&self, kind: &str, id: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET").arg(format!("{}{kind}:{id}", self.prefix)).query_async(&mut conn).await.map_err(unavailable)
    }

    pub(super) async fn put(
        &self,
        record: &JobResult,
        json: Option<&str>,
        digest: Option<&str>,
    ) -> Result<Put, StoreError> {
        let json = match json {
            Some(j) => j.to_owned(),
            None => serde_json::to_string(record).expect("JobResult serialises. This is a bug."),
        };
        let op = Op::Put { status: record.status.as_str(), record: json, digest: digest.unwrap_or("").to_owned() };
        let reply = self.write(&job_key(&record.tenant, &record.job_id), op).await?;
        match reply.as_str() {
            "ok" => return Ok(Put::Written),
            "#" => return Ok(Put::Reused),
            _ => {}
        }
        let status = serde_json::from_value(serde_json::Value::String(reply.clone())).map_err(|_| {
            StoreError::Corrupt { job_id: record.job_id.clone(), message: format!("unknown status {reply:?}") }
        })?;
        Ok(Put::Kept(status))
    }

    /// The record under `job` (a job key), its published mark and digest.
    pub(super) async fn get_meta(&self, job: &str) -> Result<Option<Stored>, StoreError> {
        let mut conn = self.conn.clone();
        let (raw, published, digest): (Option<String>, Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.key(job))
            .arg("record")
            .arg("published")
            .arg("digest")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        raw.map(|s| {
            serde_json::from_str(&s)
                .map(|record| Stored { record, published: published.is_some(), digest })
                .map_err(|e| StoreError::Corrupt { job_id: job.to_owned(), message: e.to_string() })
        })
        .transpose()
    }

    pub(super) async fn mark_published(&self, job: &str) -> Result<(), StoreError> {
        self.write(job, Op::Mark).await.map(|_| ())
    }

    pub(super) async fn notify(&self, channel: Channel, job: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.channel(channel))
            .arg(job)
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    pub(super) fn subscribe(&self, channel: Channel) -> mpsc::Receiver<String> {
        // Bound: NOTICE_BUFFER notices the subscriber has not looked at yet;
        // when full, newer ones are dropped (best effort, see `Store::cancellations`).
        let (tx, rx) = mpsc::channel(NOTICE_BUFFER);
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
                                // One notice may name several jobs (a batch's
                                // completions), separated by spaces.
                                let Ok(payload) = msg.get_payload::<String>() else { continue };
                                for id in payload.split(' ').filter(|id| !id.is_empty()) {
                                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(id.to_owned()) {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, channel, "notification channel: cannot connect"),
                }
                attempt += 1;
                tokio::time::sleep(RECONNECT.delay(attempt)).await;
            }
        });
        rx
    }

    pub(super) async fn cache_get(&self, key: &str) -> Result<Option<Output>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(format!("{}cache:{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        // A cache entry that does not parse is a miss, not an error.
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub(super) async fn cache_put(&self, key: &str, output: &Output) -> Result<(), StoreError> {
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

    fn batch_keys(&self, key: &str) -> (String, String) {
        (format!("{}batch:{key}:lines", self.prefix), format!("{}batch:{key}:counts", self.prefix))
    }

    pub(super) async fn batch_line_done(
        &self,
        key: &str,
        index: u32,
        status: &str,
    ) -> Result<BatchProgress, StoreError> {
        let (lines, counts) = self.batch_keys(key);
        let mut conn = self.conn.clone();
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(BATCH_LINE_SCRIPT));
        let fields: Vec<(String, u64)> = SCRIPT
            .key(&lines)
            .key(&counts)
            .arg(index)
            .arg(status)
            .arg(self.ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut progress = BatchProgress::default();
        for (field, n) in fields {
            match field.as_str() {
                "_done" => progress.done = n as u32,
                "_announced" => progress.announced = n > 0,
                _ => {
                    progress.counts.insert(field, n as u32);
                }
            }
        }
        Ok(progress)
    }

    pub(super) async fn batch_announced(&self, key: &str) -> Result<(), StoreError> {
        let (_, counts) = self.batch_keys(key);
        let mut conn = self.conn.clone();
        redis::cmd("HSET").arg(&counts).arg("_announced").arg(1).query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()).map_err(unavailable)
    }
}

/// Counts a batch line once: a bit per line (`KEYS[1]`, at most 125 KB
/// for the largest batch) says whether it was counted; the hash
/// (`KEYS[2]`) holds the counts by status, `_done` and `_announced`.
/// ARGV: line index, status, TTL in ms. Returns the hash.
const BATCH_LINE_SCRIPT: &str = r"
if redis.call('SETBIT', KEYS[1], ARGV[1], 1) == 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  redis.call('HINCRBY', KEYS[2], '_done', 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return redis.call('HGETALL', KEYS[2])
";

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}
