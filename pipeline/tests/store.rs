//! The Redis results store against a real Redis (started by `make test`;
//! SLUICE_TEST_REDIS): its group commit applies many concurrent writes in
//! few round trips, keeps the lifecycle rule for each write, and announces
//! every terminal write on the completion channel.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sluice_pipeline::store::{Create, Put, Store, StoreConfig};
use sluice_schemas::{JobRequest, JobResult, JobStatus, Output};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through `make test`"))
}

fn unique_prefix(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("st{}-{nanos}-{name}:", std::process::id())
}

async fn store(prefix: &str) -> Store {
    let cfg = StoreConfig {
        ttl: Duration::from_secs(600),
        memory_capacity: 1,
        key_prefix: prefix.to_owned(),
        cache_ttl: Duration::ZERO,
        cache_capacity: 1,
    };
    Store::redis(&env("SLUICE_TEST_REDIS"), &cfg).await.unwrap()
}

fn record(id: &str, status: JobStatus) -> JobResult {
    let req = JobRequest::decode(
        format!(r#"{{"job_id":"{id}","tenant":"t","model":"m","input":{{"text":"x"}}}}"#).as_bytes(),
    )
    .unwrap();
    let mut r = JobResult::queued(&req);
    r.status = status;
    if status == JobStatus::Succeeded {
        r.output = Some(Output::Embedding(vec![0.5; 8]));
        r.finished_at = Some(chrono::Utc::now());
    }
    r
}

/// Script calls Redis has served so far (`INFO commandstats`, read with
/// redis-cli so that nothing but the store links the Redis client).
fn script_calls() -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", &env("SLUICE_TEST_REDIS"), "info", "commandstats"])
        .output()
        .expect("redis-cli runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until the store's completion subscription delivers: a probe job is
/// finished again and again until its notice arrives.
async fn subscribed(store: &Store, notices: &mut tokio::sync::mpsc::Receiver<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        let probe = format!("probe-{i}");
        assert_eq!(store.put(&record(&probe, JobStatus::Succeeded)).await.unwrap(), Put::Written);
        if let Ok(Some(id)) = tokio::time::timeout(Duration::from_millis(200), notices.recv()).await {
            assert!(id.starts_with("t/probe-"), "{id}");
            while notices.try_recv().is_ok() {}
            return;
        }
        assert!(Instant::now() < deadline, "the completion channel never delivered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_round_trips_and_keep_the_lifecycle() {
    let prefix = unique_prefix("group");
    let store = store(&prefix).await;
    let mut notices = store.completions();
    subscribed(&store, &mut notices).await;

    let n = 2000;
    let before = script_calls();
    let jobs = (0..n).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let id = format!("job-{i}");
            let running = store.put(&record(&id, JobStatus::Running)).await.unwrap();
            let done = store.put(&record(&id, JobStatus::Succeeded)).await.unwrap();
            // A replay of the job after it finished changes nothing.
            let replay = store.put(&record(&id, JobStatus::Running)).await.unwrap();
            store.mark_published("t", &id).await.unwrap();
            (running, done, replay)
        })
    });
    for j in futures::future::join_all(jobs).await {
        assert_eq!(j.unwrap(), (Put::Written, Put::Written, Put::Kept(JobStatus::Succeeded)));
    }
    let calls = script_calls() - before;
    let writes = 4 * n as u64;
    println!("{writes} writes in {calls} script calls");
    assert!(calls * 10 <= writes, "group commit: {writes} concurrent writes took {calls} round trips");

    // Every job is stored finished and published, and was announced once.
    let ids: Vec<String> = (0..n).map(|i| format!("job-{i}")).collect();
    for id in &ids {
        let stored = store.get_meta("t", id).await.unwrap().expect("stored");
        assert_eq!((stored.record.status, stored.published), (JobStatus::Succeeded, true), "{id}");
    }
    let mut announced = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while announced.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, notices.recv()).await {
            Ok(Some(id)) => assert!(announced.insert(id.clone()), "{id} announced twice"),
            _ => panic!("{} of {n} completions announced", announced.len()),
        }
    }
    // Notices name jobs by tenant and id.
    assert_eq!(announced, ids.into_iter().map(|id| format!("t/{id}")).collect::<HashSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_writes_once_and_returns_the_existing_record() {
    let store = store(&unique_prefix("create")).await;
    let queued = record("c-1", JobStatus::Queued);
    assert_eq!(store.create(&queued, "d").await.unwrap(), Create::Created);
    assert_eq!(store.put(&record("c-1", JobStatus::Running)).await.unwrap(), Put::Written);
    match store.create(&queued, "d").await.unwrap() {
        Create::Exists(r) => assert_eq!(r.status, JobStatus::Running, "the stored record, not the new one"),
        other => panic!("created twice, or refused: {other:?}"),
    }
    // A large record goes through the same path (one write alone in its batch).
    let mut big = record("c-2", JobStatus::Succeeded);
    big.output = Some(Output::Embedding(vec![0.25; 3_000_000]));
    assert_eq!(store.put(&big).await.unwrap(), Put::Written);
    assert_eq!(store.get("t", "c-2").await.unwrap().unwrap().output, big.output);
}

/// Issue 10, items 7 and 12: job ids are per tenant. Another tenant's job
/// of the same id is another record: its writes never touch the first
/// tenant's job (a Kafka record naming someone else's id), in Redis and in
/// the in-process store, and each tenant reads only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_job_of_the_same_id_is_another_job() {
    let cfg = StoreConfig {
        ttl: Duration::from_secs(600),
        memory_capacity: 100,
        key_prefix: String::new(),
        cache_ttl: Duration::ZERO,
        cache_capacity: 1,
    };
    for store in [store(&unique_prefix("owner")).await, Store::memory(&cfg)] {
        let mine = record("o-1", JobStatus::Queued);
        assert_eq!(store.create(&mine, "d").await.unwrap(), Create::Created);
        let mut theirs = record("o-1", JobStatus::Succeeded);
        theirs.tenant = "mallory".into();
        assert_eq!(store.put(&theirs).await.unwrap(), Put::Written);
        let mut running = theirs.clone();
        running.status = JobStatus::Running;
        running.output = None;
        running.finished_at = None;
        assert_eq!(store.put(&running).await.unwrap(), Put::Kept(JobStatus::Succeeded), "mallory's job is finished");
        assert_eq!(store.create(&running, "d").await.unwrap(), Create::Exists(Box::new(theirs.clone())));
        let stored = store.get("t", "o-1").await.unwrap().unwrap();
        assert_eq!((stored.tenant.as_str(), stored.status), ("t", JobStatus::Queued), "unchanged");
        assert_eq!(store.get("mallory", "o-1").await.unwrap(), Some(theirs.clone()));
        assert_eq!(store.get_many("mallory", &["o-1".into(), "o-2".into()]).await.unwrap(), vec![Some(theirs), None]);
        // Its owner's job goes on.
        assert_eq!(store.put(&record("o-1", JobStatus::Succeeded)).await.unwrap(), Put::Written);
        assert_eq!(store.get("t", "o-1").await.unwrap().unwrap().status, JobStatus::Succeeded);
        assert!(store.get("nobody", "o-1").await.unwrap().is_none());
    }
}

/// Issue 10, item 14: within a tenant a job id names one request. A write on
/// behalf of another request (another digest) changes nothing, whether the
/// job is queued or finished; the same request, and writes on behalf of no
/// request (a cancel), go through; a record written without a digest takes
/// the first one it is given. In Redis and in the in-process store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_names_one_request_of_its_tenant() {
    let cfg = StoreConfig {
        ttl: Duration::from_secs(600),
        memory_capacity: 100,
        key_prefix: String::new(),
        cache_ttl: Duration::ZERO,
        cache_capacity: 1,
    };
    for store in [store(&unique_prefix("digest")).await, Store::memory(&cfg)] {
        let queued = record("r-1", JobStatus::Queued);
        assert_eq!(store.create(&queued, "aaaa").await.unwrap(), Create::Created);
        assert_eq!(store.create(&queued, "bbbb").await.unwrap(), Create::Reused(Box::new(queued.clone())));
        assert_eq!(store.create(&queued, "aaaa").await.unwrap(), Create::Exists(Box::new(queued.clone())));
        let running = record("r-1", JobStatus::Running);
        assert_eq!(store.put_for(&running, None, Some("bbbb")).await.unwrap(), Put::Reused);
        assert_eq!(store.get("t", "r-1").await.unwrap().unwrap().status, JobStatus::Queued, "unchanged");
        assert_eq!(store.put_for(&running, None, Some("aaaa")).await.unwrap(), Put::Written);
        let done = record("r-1", JobStatus::Succeeded);
        let json = serde_json::to_string(&done).unwrap();
        assert_eq!(store.put_for(&done, Some(&json), Some("bbbb")).await.unwrap(), Put::Reused);
        assert_eq!(store.put_for(&done, Some(&json), Some("aaaa")).await.unwrap(), Put::Written);
        let stored = store.get_meta("t", "r-1").await.unwrap().unwrap();
        assert_eq!((stored.record.status, stored.digest.as_deref()), (JobStatus::Succeeded, Some("aaaa")));
        // Finished: the same request again is kept out by the lifecycle,
        // another request still by its digest.
        assert_eq!(store.put_for(&running, None, Some("aaaa")).await.unwrap(), Put::Kept(JobStatus::Succeeded));
        assert_eq!(store.put_for(&running, None, Some("bbbb")).await.unwrap(), Put::Reused);

        // Written without a digest (before digests were kept): the first
        // request that writes it names it.
        assert_eq!(store.put(&record("r-2", JobStatus::Running)).await.unwrap(), Put::Written);
        assert_eq!(store.get_meta("t", "r-2").await.unwrap().unwrap().digest, None);
        assert_eq!(store.put_for(&record("r-2", JobStatus::Running), None, Some("cccc")).await.unwrap(), Put::Written);
        assert_eq!(store.put_for(&record("r-2", JobStatus::Succeeded), None, Some("dddd")).await.unwrap(), Put::Reused);
        assert_eq!(store.get_meta("t", "r-2").await.unwrap().unwrap().digest.as_deref(), Some("cccc"));
    }
}

/// A batch's lines, counted concurrently, each once and then again (a
/// replay, with another status): exactly one count sees the batch
/// complete, replays change nothing, another tenant's batch of the same id
/// is another batch, and the announcement sticks. Redis and the in-process
/// store alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_lines_count_once_and_exactly_one_count_completes_the_batch() {
    let prefix = unique_prefix("batch");
    let memory = Store::memory(&StoreConfig {
        ttl: Duration::from_secs(600),
        memory_capacity: 10,
        key_prefix: prefix.clone(),
        cache_ttl: Duration::ZERO,
        cache_capacity: 1,
    });
    for store in [store(&prefix).await, memory] {
        let total = 300u32;
        let status = |i: u32| if i.is_multiple_of(3) { JobStatus::Failed } else { JobStatus::Succeeded };
        let count = |replay: bool| {
            let store = store.clone();
            async move {
                let tasks: Vec<_> = (0..8u32)
                    .map(|t| {
                        let store = store.clone();
                        tokio::spawn(async move {
                            let mut complete = 0;
                            for i in (t..total).step_by(8) {
                                let s = if replay { JobStatus::Cancelled } else { status(i) };
                                let p = store.batch_line_done("acme", "batch_1", i, s).await.unwrap();
                                assert!(p.done <= total);
                                complete += usize::from(p.done == total);
                            }
                            complete
                        })
                    })
                    .collect();
                let mut complete = 0;
                for t in tasks {
                    complete += t.await.unwrap();
                }
                complete
            }
        };
        assert_eq!(count(false).await, 1, "{}: exactly one count completes the batch", store.describe());
        assert_eq!(count(true).await, total as usize, "{}: every replay sees it complete", store.describe());
        let p = store.batch_line_done("acme", "batch_1", 7, JobStatus::Expired).await.unwrap();
        assert_eq!(p.done, total);
        assert_eq!(p.counts.get("failed"), Some(&100));
        assert_eq!(p.counts.get("succeeded"), Some(&200));
        assert_eq!(p.counts.get("cancelled"), None, "a replay's status is not counted");
        assert!(!p.announced);
        store.batch_announced("acme", "batch_1").await.unwrap();
        assert!(store.batch_line_done("acme", "batch_1", 0, JobStatus::Succeeded).await.unwrap().announced);

        let other = store.batch_line_done("other", "batch_1", 0, JobStatus::Succeeded).await.unwrap();
        assert_eq!((other.done, other.announced), (1, false), "{}: another tenant's batch", store.describe());
    }
}
