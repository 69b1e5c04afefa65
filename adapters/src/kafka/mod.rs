//! Everything that talks to Kafka: the job/result/DLQ producer, the
//! consumer-group consumer, topic creation, and the embedded broker of
//! `sluice up`.
//!
//! Architecture invariant: this is the only module of Sluice that imports
//! `rdkafka`. The rest of the pipeline sees [`Record`], [`Producer`],
//! [`Consumer`] and [`KafkaError`].

mod embedded;
mod producer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

pub use embedded::{EmbeddedBroker, forward_bootstrap};
pub use producer::Producer;

/// Failures talking to Kafka. `retryable` errors are outages (broker down,
/// timeouts, full local queue): the caller should back off, not give up on
/// the data.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka client configuration: {0}")]
    Config(String),
    #[error("producing to {topic}: {message}")]
    Produce { topic: String, message: String, retryable: bool },
    #[error("consuming: {0}")]
    Consume(String),
    #[error("committing offsets: {0}")]
    Commit(String),
    #[error("creating topics: {0}")]
    Admin(String),
    #[error("embedded broker: {0}")]
    Embedded(String),
    #[error("broker metadata: {0}")]
    Metadata(String),
}

impl crate::retry::Retryable for KafkaError {
    fn is_retryable(&self) -> bool {
        match self {
            KafkaError::Produce { retryable, .. } => *retryable,
            KafkaError::Consume(_) | KafkaError::Commit(_) | KafkaError::Metadata(_) => true,
            _ => false,
        }
    }
}

/// One consumed Kafka record, detached from the client.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The value; an absent value (tombstone) is an empty payload.
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Create or log-append time, when the broker gave one.
    pub timestamp: Option<DateTime<Utc>>,
}

impl Record {
    /// The first header called `name`, as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

fn base_config(brokers: &str, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        // librdkafka logs connection refusals at error level; keep them in
        // our own tracing instead of stderr.
        .set("log_level", "3");
    c
}

/// What a consumer's owner is told about rebalances. Called on the thread
/// that polls the consumer, inside the rebalance: keep it short.
pub trait RebalanceHooks: Send + Sync + 'static {
    /// These partitions are being taken away. Returns the offsets (`topic,
    /// partition, next offset`) to commit before they go, and forgets them.
    fn revoking(&self, partitions: &[(String, i32)]) -> Vec<(String, i32, i64)>;
}

struct GroupContext {
    hooks: Arc<dyn RebalanceHooks>,
    /// While set, newly assigned partitions are paused too.
    paused: Arc<AtomicBool>,
    /// Partitions of the last assignment; -1 before the first one.
    assigned: Arc<AtomicI64>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        // The broker no longer holds the offset this member was about to read
        // (retention, or the embedded broker's 5 MiB per partition): librdkafka
        // jumps to the oldest offset it still holds, and what lay between is
        // lost to this group. Never let that pass as a warning.
        if skipped_records(fac, message) {
            metrics::counter!(sluice_schemas::metrics::OFFSET_RESETS.name).increment(1);
            tracing::error!(
                target: "librdkafka",
                "RECORDS SKIPPED: the broker no longer holds offsets this consumer had not read yet \
                 (retention passed them, or the embedded broker's 5 MiB per partition overflowed): {message}"
            );
            return;
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(target: "librdkafka", "{fac} {message}"),
            L::Warning => tracing::warn!(target: "librdkafka", "{fac} {message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "{fac} {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "{fac} {message}"),
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<(String, i32)> =
                tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            let commits = self.hooks.revoking(&parts);
            if !commits.is_empty() {
                match offsets_list(&commits) {
                    Ok(list) => {
                        if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
                            tracing::warn!(error = %e, "commit before revocation failed; records will be redelivered");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "commit before revocation failed"),
                }
            }
            self.assigned.store(0, Ordering::Release);
            tracing::info!(partitions = parts.len(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.assigned.store(tpl.count() as i64, Ordering::Release);
            tracing::info!(partitions = tpl.count(), "partitions assigned");
            if self.paused.load(Ordering::Acquire)
                && let Err(e) = consumer.pause(tpl)
            {
                tracing::warn!(error = %e, "cannot pause newly assigned partitions");
            }
        }
    }
}

/// Whether a librdkafka log line says the consumer's next offset is gone
/// from the broker and it jumped ahead (records lost to this group).
fn skipped_records(fac: &str, message: &str) -> bool {
    fac == "OFFSET" && message.contains("offset reset") && message.contains("Offset out of range")
}

fn offsets_list(offsets: &[(String, i32, i64)]) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (topic, partition, next) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
            .map_err(|e| KafkaError::Commit(e.to_string()))?;
    }
    Ok(tpl)
}

/// Longest a fetch waits for records on a partition with none.
///
/// A broker answers a fetch when records arrive or when this time is up.
/// librdkafka's mock cluster (the embedded broker of `sluice up`) answers
/// only when the time is up, so on an idle partition this is added to every
/// job's queue time and to every result's delivery (librdkafka's default of
/// 500 ms made a lone REST job take ~750 ms end to end; `sluice-load
/// steady` at 25 jobs/s: queue p99 511 ms with 500, 62 ms with 50). Brokers
/// that answer early pay an idle fetch per 100 ms per connection instead.
const FETCH_WAIT: Duration = Duration::from_millis(100);

/// A member of a consumer group. Offsets are never committed automatically:
/// the owner commits with [`Consumer::commit`] once the records' effects are
/// durable (at-least-once), and is asked for final offsets before a
/// rebalance takes partitions away.
pub struct Consumer {
    inner: StreamConsumer<GroupContext>,
    paused: Arc<AtomicBool>,
    assigned: Arc<AtomicI64>,
    brokers: String,
    group: String,
    topics: Vec<String>,
    idle: std::sync::Mutex<Option<Idle>>,
    /// How long this member may be idle in a group that makes no progress
    /// before it rejoins: see [`IDLE_REJOIN_AFTER`].
    rejoin_after: Duration,
}

/// How long a member may hold no partition while its group commits nothing
/// and has records waiting, before it leaves and rejoins the group.
///
/// A member with nothing assigned is normal (more members than partitions)
/// as long as the others make progress. tansu 0.6 can also leave a group
/// wedged: when the leader's session expires between a follower's JoinGroup
/// and its SyncGroup, the follower is answered with an empty assignment and
/// a stable generation, and no member owns the partitions again. Rejoining
/// starts a new generation with the live members. The same happens after a
/// member is killed: tansu keeps handing the dead member its partitions after
/// its session has expired, until a live member rejoins.
///
/// Twice the group's session timeout, within these bounds (30 s with the
/// default session): a rebalance that is making progress finishes well
/// within it, and a member killed mid-load costs its partitions' jobs about
/// session + this much on tansu (the session alone on Kafka).
pub const IDLE_REJOIN_AFTER: (Duration, Duration) = (Duration::from_secs(15), Duration::from_secs(30));

/// Since when this member has held no partition, and what its group had
/// committed then.
struct Idle {
    since: Instant,
    committed: Option<i64>,
    probes: Vec<LagProbe>,
}

/// Whether an idle member should rejoin: it has held nothing for
/// `after` (the member's `rejoin_after`), records wait, and the group's committed offsets have
/// not moved since it became idle (nobody else is working them off).
fn wedged(idle_for: Duration, after: Duration, committed_then: i64, now: GroupProgress) -> bool {
    idle_for >= after && now.lag > 0 && now.committed == committed_then
}

impl Consumer {
    /// Joins `group` and subscribes to `topics`.
    pub fn new(
        brokers: &str,
        client_id: &str,
        group: &str,
        topics: &[String],
        hooks: Arc<dyn RebalanceHooks>,
    ) -> Result<Consumer, KafkaError> {
        Self::with_timeouts(brokers, client_id, group, topics, hooks, None)
    }

    /// [`Consumer::new`] with the group's `(session timeout, max poll
    /// interval)`: how soon a dead member is noticed, and how long a
    /// rebalance waits for members (librdkafka's defaults: 45 s, 300 s).
    pub fn with_timeouts(
        brokers: &str,
        client_id: &str,
        group: &str,
        topics: &[String],
        hooks: Arc<dyn RebalanceHooks>,
        timeouts: Option<(Duration, Duration)>,
    ) -> Result<Consumer, KafkaError> {
        let paused = Arc::new(AtomicBool::new(false));
        let assigned = Arc::new(AtomicI64::new(-1));
        let mut config = base_config(brokers, client_id);
        let (least, most) = IDLE_REJOIN_AFTER;
        let rejoin_after = timeouts.map_or(most, |(session, _)| (session * 2).clamp(least, most));
        if let Some((session, poll)) = timeouts {
            config
                .set("session.timeout.ms", session.as_millis().to_string())
                .set("heartbeat.interval.ms", (session.as_millis() / 4).max(100).to_string())
                .set("max.poll.interval.ms", poll.as_millis().to_string());
        }
        let inner: StreamConsumer<GroupContext> = config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT.as_millis().to_string())
            // librdkafka prefetches up to this much per partition; bounded.
            .set("queued.max.messages.kbytes", "16384")
            .create_with_context(GroupContext { hooks, paused: paused.clone(), assigned: assigned.clone() })
            .map_err(|e| KafkaError::Config(e.to_string()))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        inner.subscribe(&names).map_err(|e| KafkaError::Consume(e.to_string()))?;
        Ok(Consumer {
            inner,
            paused,
            assigned,
            brokers: brokers.to_owned(),
            group: group.to_owned(),
            topics: topics.to_vec(),
            idle: std::sync::Mutex::new(None),
            rejoin_after,
        })
    }

    /// Call every few seconds: leaves and rejoins the group when this member
    /// has held no partition for its `rejoin_after` ([`IDLE_REJOIN_AFTER`]) while records wait
    /// and the group commits nothing (a wedged group; see there). Returns
    /// whether it rejoined.
    pub async fn rejoin_if_wedged(&self) -> bool {
        // Idle also while a join is pending (-1: never assigned since this
        // member joined or rejoined): a join tansu never answers is the
        // wedge this exists for, and a rejoin must be retried, not waited on.
        if self.assigned.load(Ordering::Acquire) > 0 {
            *self.idle.lock().expect("idle lock") = None;
            return false;
        }
        let (since, committed_then, probes) = {
            let mut idle = self.idle.lock().expect("idle lock");
            let idle = match &mut *idle {
                Some(idle) => idle,
                None => {
                    let probes =
                        self.topics.iter().filter_map(|t| LagProbe::new(&self.brokers, &self.group, t).ok()).collect();
                    idle.insert(Idle { since: Instant::now(), committed: None, probes })
                }
            };
            (idle.since, idle.committed, idle.probes.clone())
        };
        let mut now = GroupProgress::default();
        for probe in &probes {
            match probe.progress().await {
                Ok(p) => {
                    now.committed += p.committed;
                    now.lag += p.lag;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot measure the group's progress");
                    return false;
                }
            }
        }
        let Some(committed_then) = committed_then else {
            if let Some(idle) = &mut *self.idle.lock().expect("idle lock") {
                idle.committed = Some(now.committed);
            }
            return false;
        };
        if !wedged(since.elapsed(), self.rejoin_after, committed_then, now) {
            if now.committed != committed_then
                && let Some(idle) = &mut *self.idle.lock().expect("idle lock")
            {
                // The group is working: start the window again.
                idle.since = Instant::now();
                idle.committed = Some(now.committed);
            }
            return false;
        }
        tracing::warn!(
            group = %self.group,
            waiting = now.lag,
            "this member has held no partition for {}s while its group committed nothing and records wait: \
             leaving and rejoining the group",
            self.rejoin_after.as_secs()
        );
        metrics::counter!(sluice_schemas::metrics::CONSUMER_REJOINS.name).increment(1);
        *self.idle.lock().expect("idle lock") = None;
        self.assigned.store(-1, Ordering::Release);
        self.inner.unsubscribe();
        let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        if let Err(e) = self.inner.subscribe(&names) {
            tracing::error!(error = %e, "cannot subscribe again after leaving a wedged group");
        }
        true
    }

    /// Stops fetching from every assigned partition (and from partitions
    /// assigned later) until [`Consumer::resume`]. Records already fetched
    /// are dropped by librdkafka and fetched again after resuming. Returns
    /// how many partitions were paused.
    pub fn pause(&self) -> Result<usize, KafkaError> {
        self.paused.store(true, Ordering::Release);
        let assigned = self.inner.assignment().map_err(|e| KafkaError::Consume(e.to_string()))?;
        self.inner.pause(&assigned).map_err(|e| KafkaError::Consume(e.to_string()))?;
        Ok(assigned.count())
    }

    /// Undoes [`Consumer::pause`].
    pub fn resume(&self) -> Result<(), KafkaError> {
        self.paused.store(false, Ordering::Release);
        let assigned = self.inner.assignment().map_err(|e| KafkaError::Consume(e.to_string()))?;
        self.inner.resume(&assigned).map_err(|e| KafkaError::Consume(e.to_string()))
    }

    /// The next record of any assigned partition.
    pub async fn recv(&self) -> Result<Record, KafkaError> {
        let m = self.inner.recv().await.map_err(|e| KafkaError::Consume(e.to_string()))?;
        let headers = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect())
            .unwrap_or_default();
        Ok(Record {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
            timestamp: m.timestamp().to_millis().and_then(DateTime::<Utc>::from_timestamp_millis),
        })
    }

    /// Commits `next offset to read` for each (topic, partition), without
    /// waiting for the broker.
    pub fn commit(&self, offsets: &[(String, i32, i64)]) -> Result<(), KafkaError> {
        self.commit_with(offsets, CommitMode::Async)
    }

    /// Commits and waits for the broker (used at shutdown, before leaving
    /// the group).
    pub fn commit_sync(&self, offsets: &[(String, i32, i64)]) -> Result<(), KafkaError> {
        self.commit_with(offsets, CommitMode::Sync)
    }

    fn commit_with(&self, offsets: &[(String, i32, i64)], mode: CommitMode) -> Result<(), KafkaError> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.inner.commit(&offsets_list(offsets)?, mode).map_err(|e| KafkaError::Commit(e.to_string()))
    }
}

/// Creates the topics that do not exist yet (`TopicAlreadyExists` is fine).
pub async fn ensure_topics(
    brokers: &str,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        base_config(brokers, "sluice-admin").create().map_err(|e| KafkaError::Config(e.to_string()))?;
    // Only what the cluster lacks: a process without the right to create
    // topics (or a broker without a controller) starts when they exist. A
    // topic whose metadata does not come back in time is created as before
    // (`TopicAlreadyExists` is fine), so a slow broker only costs the wait.
    let existing: std::collections::HashSet<String> = {
        let client: rdkafka::consumer::BaseConsumer =
            base_config(brokers, "sluice-admin").create().map_err(|e| KafkaError::Config(e.to_string()))?;
        let wanted = topics.to_vec();
        tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .filter(|t| {
                    client
                        .fetch_metadata(Some(t), Duration::from_secs(5))
                        .is_ok_and(|md| md.topics().iter().any(|m| m.name() == t && !m.partitions().is_empty()))
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    };
    let new: Vec<NewTopic> = topics
        .iter()
        .filter(|t| !existing.contains(t.as_str()))
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new, &opts).await.map_err(|e| KafkaError::Admin(e.to_string()))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaError::Admin(format!("{topic}: {code}"))),
        }
    }
    Ok(())
}

/// Returns the high watermark of each partition of `topic` (for tests and
/// lag sampling). Blocking inside librdkafka, so it runs on the blocking pool.
pub async fn high_watermarks(brokers: &str, topic: &str) -> Result<Vec<i64>, KafkaError> {
    let consumer: rdkafka::consumer::BaseConsumer =
        base_config(brokers, "sluice-watermarks").create().map_err(|e| KafkaError::Config(e.to_string()))?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let t = Duration::from_secs(5);
        let md = consumer.fetch_metadata(Some(&topic), t).map_err(|e| KafkaError::Metadata(e.to_string()))?;
        let parts = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
        (0..parts as i32)
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, t)
                    .map(|(_, high)| high)
                    .map_err(|e| KafkaError::Metadata(e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(|e| KafkaError::Metadata(e.to_string()))?
}

/// Measures a consumer group's lag on a topic: what is in the topic and not
/// yet committed by the group. Uses a consumer that carries the group's id
/// but never joins it.
#[derive(Clone)]
pub struct LagProbe {
    consumer: Arc<rdkafka::consumer::BaseConsumer>,
    topic: String,
}

/// A group's standing on a topic: the sum of its committed offsets, and the
/// records past them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupProgress {
    pub committed: i64,
    pub lag: i64,
}

impl LagProbe {
    pub fn new(brokers: &str, group: &str, topic: &str) -> Result<LagProbe, KafkaError> {
        let consumer: rdkafka::consumer::BaseConsumer = base_config(brokers, "sluice-lag")
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(LagProbe { consumer: Arc::new(consumer), topic: topic.to_owned() })
    }

    /// Records in the topic past the group's committed offsets (or past the
    /// low watermark where the group has committed nothing).
    pub async fn lag(&self) -> Result<i64, KafkaError> {
        Ok(self.progress().await?.lag)
    }

    /// The group's committed offsets and lag on the topic.
    pub async fn progress(&self) -> Result<GroupProgress, KafkaError> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            let t = Duration::from_secs(5);
            let err = |e: rdkafka::error::KafkaError| KafkaError::Metadata(e.to_string());
            let md = consumer.fetch_metadata(Some(&topic), t).map_err(err)?;
            let parts: Vec<i32> =
                md.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
            let mut tpl = TopicPartitionList::with_capacity(parts.len());
            for p in &parts {
                tpl.add_partition(&topic, *p);
            }
            let committed = consumer.committed_offsets(tpl, t).map_err(err)?;
            let mut progress = GroupProgress::default();
            for p in parts {
                let (low, high) = consumer.fetch_watermarks(&topic, p, t).map_err(err)?;
                let done = committed
                    .find_partition(&topic, p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(low);
                progress.committed += done;
                progress.lag += (high - done).max(0);
            }
            Ok(progress)
        })
        .await
        .map_err(|e| KafkaError::Metadata(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_reset_past_unread_records_is_recognised() {
        // As librdkafka 2.12 logs it when the embedded broker dropped a backlog.
        let line = "bench.jobs.sigmoid [0]: offset reset (at offset 4 (leader epoch 0), broker 1) to cached \
                    BEGINNING offset offset 3576 (leader epoch -1): fetch failed due to requested offset not \
                    available on the broker: Broker: Offset out of range";
        assert!(skipped_records("OFFSET", line));
        assert!(!skipped_records("OFFSET", "bench.jobs.sigmoid [0]: offset reset to END"));
        assert!(!skipped_records("FETCH", line));
    }

    #[test]
    fn an_idle_member_rejoins_only_a_group_that_makes_no_progress() {
        let stuck = GroupProgress { committed: 100, lag: 50 };
        let after = Duration::from_secs(20);
        assert!(wedged(after, after, 100, stuck));
        // Not idle for long enough yet.
        assert!(!wedged(after / 2, after, 100, stuck));
        // Other members are committing: idle is normal (more members than partitions).
        assert!(!wedged(after * 4, after, 90, stuck));
        // Nothing waits: there is nothing to own.
        assert!(!wedged(after * 4, after, 100, GroupProgress { committed: 100, lag: 0 }));
    }
}
