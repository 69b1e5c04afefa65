//! Fault tests of the worker stage with `sluice worker` processes: SIGKILL
//! mid-stream, a 100,000-job backlog, a consumer-group rebalance. Nothing is
//! lost, and what repeats is bounded.

mod support;

use support::*;

/// SIGKILL a worker mid-stream, start another: every job ends with one
/// result, none is lost, and the results topic holds every job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_no_job() {
    let prefix = unique_prefix("sigkill");
    let store = redis_store(&prefix).await;
    // Topics are created by the worker: start one, and stop it once they
    // exist, so that the whole backlog is in Kafka before the worker that
    // is killed starts (it is killed mid-stream, not after the last job).
    let creator = WorkerProcess::start(&prefix, "");
    let h = Harness {
        sluice: None,
        http: String::new(),
        brokers: env("SLUICE_TEST_BROKERS"),
        prefix: prefix.clone(),
        client: reqwest::Client::new(),
    };
    let n = 1000;
    let ids: Vec<String> = (0..n).map(|i| format!("k9-{i}")).collect();
    // Wait for the topics, then publish the backlog.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sluice_pipeline::kafka::high_watermarks(&h.brokers, &h.jobs_topic()).await.map(|w| w.len()).unwrap_or(0) == 0
    {
        assert!(Instant::now() < deadline, "worker never created its topics");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    creator.terminate();
    let records: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| record(Some(id), job(id, &format!("crash test sentence {i}")).to_string()))
        .collect();
    h.produce(&h.jobs_topic(), None, records).await;

    // Kill it once a good part of the backlog is done, and before all of it.
    let worker = WorkerProcess::start(&prefix, "");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = statuses(&store, &ids).await.iter().filter(|s| s.as_deref() == Some("succeeded")).count();
        if done >= n / 4 {
            println!("killing the worker with SIGKILL after {done} of {n} jobs");
            assert!(done < n, "the worker finished before it could be killed mid-stream");
            break;
        }
        assert!(Instant::now() < deadline, "worker too slow: {done} done");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.kill9();

    // Done when every job's record is finished and its result is on the
    // results topic: a result stored before the kill but not yet published
    // is published by the new worker when it replays the record.
    let worker = WorkerProcess::start(&prefix, "");
    let deadline = Instant::now() + Duration::from_secs(240);
    let per_job = loop {
        let s = statuses(&store, &ids).await;
        let done = s.iter().filter(|s| s.as_deref() == Some("succeeded")).count();
        let failed: Vec<_> =
            s.iter().filter(|s| s.as_deref().is_some_and(|s| s != "succeeded" && s != "running")).collect();
        assert!(failed.is_empty(), "{failed:?}");
        let mut per_job: std::collections::HashMap<String, usize> = Default::default();
        if done == n {
            for r in &h.consume(&format!("{prefix}.results"), 3 * n, 10).await {
                *per_job.entry(r["key"].as_str().unwrap().to_owned()).or_default() += 1;
            }
            if per_job.len() == n {
                break per_job;
            }
        }
        assert!(Instant::now() < deadline, "after the restart: {done} of {n} stored, {} published", per_job.len());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    worker.terminate();
    let results: usize = per_job.values().sum();
    let duplicates: usize = per_job.values().map(|c| c - 1).sum();
    println!("results topic: {results} records, {} distinct jobs, {duplicates} duplicates", per_job.len());
    assert_eq!(per_job.len(), n, "every job's result is on the results topic");
    assert!(duplicates <= 512, "duplicates bounded by what was in flight at the crash: {duplicates}");
}

/// With 100,000 jobs waiting in Kafka, the worker's memory stays flat: the
/// backlog stays in Kafka, not in the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_100k_jobs_does_not_grow_worker_memory() {
    let prefix = unique_prefix("backlog");
    // A broker of its own: 100,000 records produced while a worker
    // publishes results once made the shared tansu 0.6's storage panic
    // ("more or less than one row" in its idempotent producer check), which
    // took the broker away from every later test.
    let services = OwnServices::start(&prefix);
    let h = Harness {
        sluice: None,
        http: String::new(),
        brokers: services.brokers.clone(),
        prefix: prefix.clone(),
        client: reqwest::Client::new(),
    };
    let topic = h.jobs_topic();
    let args =
        ["produce-jobs", "--brokers", &h.brokers, "--topic", &topic, "--tag", "bl", "--count", "100000", "--create"];
    kafka_client(&args.map(String::from), "");
    let backlog: i64 = sluice_pipeline::kafka::high_watermarks(&h.brokers, &topic).await.unwrap().iter().sum();
    assert_eq!(backlog, 100_000);

    let worker = WorkerProcess::start_on(&h.brokers, &prefix, "[worker]\nmax_in_flight = 512\n");
    // Progress is what the group has committed (every committed offset is
    // a job whose result is stored and published), measured on the broker:
    // not a sample of job ids, whose place in the fetch order varies.
    let lag = sluice_pipeline::kafka::LagProbe::new(&h.brokers, &format!("{prefix}.workers.{MODEL}"), &topic).unwrap();
    let results = format!("{prefix}.results");
    // The broker is busy with the backlog: a metadata request may time out.
    let lag_now = || async {
        for _ in 0..20 {
            match lag.lag().await {
                Ok(l) => return l,
                Err(e) => println!("lag probe: {e}"),
            }
        }
        panic!("the group's lag could not be read 20 times in a row")
    };
    let produced = || async {
        for _ in 0..20 {
            match sluice_pipeline::kafka::high_watermarks(&h.brokers, &results).await {
                Ok(w) => return w.iter().sum::<i64>(),
                Err(e) => println!("watermarks: {e}"),
            }
        }
        panic!("the results topic's watermarks could not be read 20 times in a row")
    };
    // Warm-up: the group join, model sessions, the first commits.
    let deadline = Instant::now() + Duration::from_secs(120);
    while lag_now().await == 100_000 {
        assert!(Instant::now() < deadline, "the worker never committed a job");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (lag_before, results_before) = (lag_now().await, produced().await);
    // Steady state: 20 s of working off the backlog; RSS must stay flat.
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(20) {
        samples.push(worker.rss_kib());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (lag_after, results_after) = (lag_now().await, produced().await);
    worker.terminate();

    let (first, peak) = (samples[0], *samples.iter().max().unwrap());
    println!(
        "backlog 100000: RSS {} MiB when working, peak {} MiB over the next 20 s; {} jobs committed and {} \
         results published meanwhile (lag {lag_before} -> {lag_after})",
        first / 1024,
        peak / 1024,
        lag_before - lag_after,
        results_after - results_before,
    );
    assert!(lag_after < lag_before, "the worker kept committing: lag {lag_before} -> {lag_after}");
    assert!(results_after > results_before, "the worker kept publishing: {results_before} -> {results_after}");
    assert!(
        peak.saturating_sub(first) < 96 * 1024,
        "RSS grew {} MiB while working off the backlog",
        (peak - first) / 1024
    );
}

/// Two workers share a model's consumer group; one leaves mid-stream (its
/// partitions are revoked after it commits what it finished) and the other
/// takes over: every job ends succeeded, and each result is published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_rebalance_loses_and_repeats_nothing() {
    let prefix = unique_prefix("rebalance");
    // A small in-flight bound, so that the member that leaves cannot have
    // fetched (and then drained) the whole topic before it goes.
    let worker = |id: &str| json!({"worker": {"id": id, "max_in_flight": 16, "resume_below": 8}});
    let mut a = Harness::start_role(prefix.clone(), Role::Worker, true, worker("worker-a")).await;
    let mut b = Harness::start_role(prefix.clone(), Role::Worker, true, worker("worker-b")).await;
    let mut gw = Harness::start_role(prefix.clone(), Role::Gateway, true, json!({})).await;
    let n = 300;
    let records = numbered_jobs("rb", n, "rebalance sentence");
    gw.produce(&gw.jobs_topic(), None, records).await;
    // Both members work; then one leaves while jobs are in flight.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = gw.get(&format!("/v1/jobs/rb-{}", n / 3)).await.1["status"] == "succeeded";
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    let mut by_worker: std::collections::HashMap<String, usize> = Default::default();
    for i in 0..n {
        let body = gw.wait_done(&format!("rb-{i}")).await;
        assert_eq!(body["status"], "succeeded", "{body}");
        *by_worker.entry(body["worker_id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let results = gw.consume(&format!("{prefix}.results"), 2 * n, 10).await;
    let mut keys: Vec<&str> = results.iter().map(|r| r["key"].as_str().unwrap()).collect();
    let total = keys.len();
    keys.sort();
    keys.dedup();
    println!("rebalance: results by worker {by_worker:?}; {total} published, {} distinct", keys.len());
    assert_eq!(keys.len(), n);
    assert_eq!(total, n, "no result published twice");
    assert!(by_worker.len() == 2, "both members worked: {by_worker:?}");
    b.stop().await;
    gw.stop().await;
}
