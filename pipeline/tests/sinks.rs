//! End-to-end tests of the results sinks (Parquet lake, SQL shards) and SQL
//! analytics: exactly once through SIGKILLs, a shard down, sinks ahead of
//! their commits, health and metrics of every role, and SQL over HTTP.

mod support;

use support::*;

/// 100,000 results through both sinks while the sink process is SIGKILLed
/// twice at random points: the lake and the shards each end with exactly
/// 100,000 distinct jobs, and DataFusion's counts agree with both.
///
/// On a tansu of its own ([`OwnServices`]): the three sink processes fetch
/// the topic from offset 0 each, ~600,000 records in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_land_100k_results_exactly_once_through_two_sigkills() {
    let prefix = unique_prefix("sinks");
    let services = OwnServices::start(&prefix);
    let n = 100_000;
    let lake = scratch(&prefix).join("lake");
    let shards = vec![
        fresh_pg_database(0, &format!("{prefix}_a")).await,
        fresh_pg_database(1, &format!("{prefix}_b")).await,
        format!("sqlite:{}/shard-2.db", scratch(&prefix).display()),
    ];
    let brokers = services.brokers.clone();
    let started = Instant::now();
    produce_results(&brokers, &prefix, "r", 0..n);
    println!("sinks: produced {n} results in {:.1} s", started.elapsed().as_secs_f64());

    let set = sluice_sql::ShardSet::open(&shards, sluice_sql::ShardStrategy::Jump, Duration::from_secs(3)).unwrap();
    let analytics = sluice_sql::Analytics::new(
        sluice_sql::Sources { lake: Some(lake.clone()), shards: shards.clone() },
        sluice_sql::QueryLimits::new(10, Duration::from_secs(60)),
    )
    .unwrap();
    let progress = || async {
        let mut in_shards = 0;
        for i in 0..set.len() {
            in_shards += set.count(i).await.unwrap().0;
        }
        let in_lake = count_json(&analytics, "SELECT count(*) AS n FROM results").await["n"].as_i64().unwrap();
        (in_lake, in_shards)
    };

    // Kill points vary from run to run: somewhere in a flush, a commit, a fetch.
    let jitter =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() % 15_000) as i64;
    let started = Instant::now();
    // Each replacement joins a new consumer group, so it starts from offset
    // 0 and replays everything the killed one had done: the lake must skip
    // what its commit log holds and the shards must insert nothing twice.
    // (It also keeps this test clear of tansu 0.6's group coordinator, which
    // can leave a rejoining member waiting on the killed one for minutes.)
    let mut sink = start_sink(&brokers, &prefix, 0, &lake, &shards);
    for (run, kill_at) in [(1, 15_000 + jitter), (2, 50_000 + jitter)] {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let (l, s) = progress().await;
            if l.max(s) >= kill_at {
                sink.0.kill().unwrap(); // SIGKILL
                sink.0.wait().unwrap();
                println!("sinks: SIGKILL at lake {l} / shards {s} rows");
                break;
            }
            assert!(Instant::now() < deadline, "no progress: lake {l}, shards {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sink = start_sink(&brokers, &prefix, run, &lake, &shards);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (l, s) = progress().await;
        if l >= n as i64 && s >= n as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "not all landed: lake {l}, shards {s}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    // Give a straggling duplicate the chance to show up before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    unsafe { libc::kill(sink.0.id() as i32, libc::SIGTERM) };
    sink.0.wait().unwrap();

    let lake_counts = count_json(&analytics, "SELECT count(*) AS n, count(DISTINCT job_id) AS d FROM results").await;
    let shard_counts = count_json(&analytics, "SELECT count(*) AS n, count(DISTINCT job_id) AS d FROM shards").await;
    let mut direct = 0;
    let mut ids = std::collections::HashSet::new();
    for i in 0..set.len() {
        let (rows, distinct) = set.count(i).await.unwrap();
        assert_eq!(rows, distinct);
        direct += rows;
        ids.extend(set.job_ids(i).await.unwrap());
    }
    println!(
        "sinks: {n} results landed in {secs:.1} s through 2 SIGKILLs ({:.0}/s); lake {lake_counts}, shards {shard_counts}, shard tables {direct}",
        n as f64 / secs
    );
    assert_eq!(lake_counts, json!({"n": n, "d": n}), "the lake holds every result exactly once");
    assert_eq!(shard_counts, json!({"n": n, "d": n}), "the shards hold every result exactly once");
    assert_eq!(direct, n as i64, "DataFusion agrees with the shards' own counts");
    assert_eq!(ids.len(), n, "no job is in two shards");
    let parts =
        count_json(&analytics, "SELECT count(DISTINCT model) AS m, count(DISTINCT date) AS d FROM results").await;
    assert_eq!(parts, json!({"m": 2, "d": 1}), "partitioned model=/date=");
    set.close().await;
}

/// Two `sluice sink` members share the lake's consumer group and one is
/// SIGKILLed: the group drops it after `sinks.session_timeout_ms` (6 s here;
/// librdkafka's default is 45 s) and the survivor takes its partitions. The
/// quantity measured is the group's committed progress: every partition's
/// results committed, and all of them in the survivor's lake.
///
/// On the embedded broker (librdkafka's mock cluster): tansu 0.6 expires
/// the member on time but keeps it in the member list it hands the group's
/// leader, so the survivor is given back only its own partitions and the
/// killed member's stay unowned (reproduced with two confluent-kafka
/// consumers; see ARCHITECTURE.md, `kafka/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sink_member_is_dropped_from_its_group_within_the_session_timeout() {
    let prefix = unique_prefix("sinkgroup");
    let broker = sluice_pipeline::kafka::EmbeddedBroker::start().unwrap();
    for topic in [format!("{prefix}.results"), format!("{prefix}.dlq")] {
        broker.create_topic(&topic, 4).unwrap();
    }
    let brokers = broker.bootstrap().to_owned();
    let settings = "session_timeout_ms = 6000\nmax_poll_interval_ms = 20000";
    let (lake_a, lake_b) = (scratch(&prefix).join("lake-a"), scratch(&prefix).join("lake-b"));
    let group = format!("{prefix}.sink-0.lake");
    let probe = sluice_pipeline::kafka::LagProbe::new(&brokers, &group, &format!("{prefix}.results")).unwrap();
    let drained = |what: &'static str, within: Duration| {
        let probe = &probe;
        async move {
            let started = Instant::now();
            loop {
                let lag = probe.lag().await.unwrap_or(i64::MAX);
                if lag == 0 {
                    return started.elapsed();
                }
                assert!(started.elapsed() < within, "{what}: lag {lag} after {within:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let rows = |lake: PathBuf, tag: &'static str| async move {
        if !lake.exists() {
            return 0;
        }
        let analytics = sluice_sql::Analytics::new(
            sluice_sql::Sources { lake: Some(lake), shards: vec![] },
            sluice_sql::QueryLimits::new(10, Duration::from_secs(30)),
        )
        .unwrap();
        let sql = format!("SELECT count(DISTINCT job_id) AS n FROM results WHERE job_id LIKE '{tag}-%'");
        count_json(&analytics, &sql).await["n"].as_i64().unwrap()
    };

    produce_results_to(&brokers, &prefix, "first", 0..400, false);
    let mut a = start_sink_with(&brokers, &prefix, 0, &lake_a, &[], settings);
    drained("sink a alone", Duration::from_secs(120)).await;
    let _b = start_sink_with(&brokers, &prefix, 0, &lake_b, &[], settings);
    // Until both members hold partitions: results produced now land in both.
    let started = Instant::now();
    for round in 0.. {
        assert!(started.elapsed() < Duration::from_secs(120), "sink b never got partitions");
        produce_results_to(&brokers, &prefix, "second", round * 100..(round + 1) * 100, false);
        drained("both sinks", Duration::from_secs(120)).await;
        if rows(lake_a.clone(), "second").await > 0 && rows(lake_b.clone(), "second").await > 0 {
            break;
        }
    }

    a.0.kill().unwrap(); // SIGKILL: no leave-group; only the session timeout can drop it
    a.0.wait().unwrap();
    let killed = Instant::now();
    produce_results_to(&brokers, &prefix, "third", 0..400, false);
    // librdkafka's default session timeout alone is 45 s.
    drained("after the kill", Duration::from_secs(35)).await;
    let took = killed.elapsed();
    println!("sink group: the survivor committed every partition {:.1} s after the SIGKILL", took.as_secs_f64());
    assert_eq!(rows(lake_b.clone(), "third").await, 400, "every result after the kill is in the survivor's lake");
}

/// A sink whose destination is ahead of its group's committed offsets (its
/// commits were lost: one that fails in a rebalance is not repeated) reads
/// those records again, skips them as durable, and commits past them. Before,
/// it skipped them and committed nothing, and the partition's lag stayed
/// until new records came (seen as "both sinks: lag 50 after 120s" in the
/// test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_commits_past_records_its_destination_already_holds() {
    let prefix = unique_prefix("sinkahead");
    let broker = sluice_pipeline::kafka::EmbeddedBroker::start().unwrap();
    let results = format!("{prefix}.results");
    for topic in [results.clone(), format!("{prefix}.dlq")] {
        broker.create_topic(&topic, 4).unwrap();
    }
    let brokers = broker.bootstrap().to_owned();
    let lake = scratch(&prefix).join("lake");
    let group = format!("{prefix}.sink-0.lake");
    let probe = sluice_pipeline::kafka::LagProbe::new(&brokers, &group, &results).unwrap();
    let lag_reaches = |want: i64, within: Duration| {
        let probe = &probe;
        async move {
            let started = Instant::now();
            loop {
                let lag = probe.lag().await.unwrap_or(i64::MAX);
                if lag == want {
                    return;
                }
                assert!(started.elapsed() < within, "lag {lag}, not {want}, after {within:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    produce_results_to(&brokers, &prefix, "ahead", 0..200, false);
    let sink = start_sink_with(&brokers, &prefix, 0, &lake, &[], "");
    lag_reaches(0, Duration::from_secs(60)).await;
    // Gracefully: it leaves the group, so the group has no member.
    unsafe { libc::kill(sink.0.id() as i32, libc::SIGTERM) };
    let mut sink = sink;
    sink.0.wait().unwrap();
    python(
        ["commit", "--brokers", &brokers, "--topic", &results, "--group", &group, "--offset", "0"]
            .map(str::to_owned)
            .to_vec(),
        String::new(),
    )
    .await;
    lag_reaches(200, Duration::from_secs(10)).await;

    // librdkafka's mock cluster keeps the committing consumer in the group
    // until its session (45 s) times out, though it left: the sink is
    // assigned its partitions after that.
    let _sink = start_sink_with(&brokers, &prefix, 0, &lake, &[], "");
    lag_reaches(0, Duration::from_secs(180)).await;
    let analytics = sluice_sql::Analytics::new(
        sluice_sql::Sources { lake: Some(lake), shards: vec![] },
        sluice_sql::QueryLimits::new(10, Duration::from_secs(30)),
    )
    .unwrap();
    let counted = count_json(
        &analytics,
        "SELECT count(*) AS n, count(DISTINCT job_id) AS d FROM results WHERE job_id LIKE 'ahead-%'",
    )
    .await;
    assert_eq!((counted["n"].as_i64(), counted["d"].as_i64()), (Some(200), Some(200)), "nothing written twice");
}

/// A PostgreSQL shard is stopped for 10 s while results keep coming: the
/// sink retries (committing nothing), catches up when it returns, and every
/// result ends in its own shard exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_shard_down_for_10s_loses_and_repeats_nothing() {
    let prefix = unique_prefix("pgdown");
    let shards =
        vec![fresh_pg_database(0, &format!("{prefix}_a")).await, fresh_pg_database(1, &format!("{prefix}_b")).await];
    let brokers = env("SLUICE_TEST_BROKERS");
    produce_results(&brokers, &prefix, "pg", 0..2000);
    let mut h = Harness::start_role(
        prefix.clone(),
        Role::Sink,
        true,
        json!({"sinks": {"lake": "", "shards": shards.clone(), "flush_rows": 500, "retry_max_ms": 1000}}),
    )
    .await;
    let set = sluice_sql::ShardSet::open(&shards, sluice_sql::ShardStrategy::Jump, Duration::from_secs(2)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while set.count(0).await.unwrap().0 + set.count(1).await.unwrap().0 < 2000 {
        assert!(Instant::now() < deadline, "the first 2000 did not land");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    pgctl(1, "stop");
    let down_at = Instant::now();
    produce_results(&brokers, &prefix, "pg", 2000..5000);
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    let during = set.count(0).await.unwrap().0;
    pgctl(1, "start");
    println!("pgdown: shard 1 down {:.1} s; shard 0 held {during} rows meanwhile", down_at.elapsed().as_secs_f64());

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (a, b) = (set.count(0).await.unwrap(), set.count(1).await);
        if let Ok(b) = b
            && a.0 + b.0 >= 5000
        {
            break;
        }
        assert!(Instant::now() < deadline, "did not catch up: {a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.stop().await;
    let strategy = sluice_sql::ShardStrategy::Jump;
    let now = chrono::Utc::now();
    let mut seen = 0;
    for i in 0..2 {
        let (rows, distinct) = set.count(i).await.unwrap();
        assert_eq!(rows, distinct, "no duplicates in shard {i}");
        for id in set.job_ids(i).await.unwrap() {
            assert_eq!(strategy.shard_of(&id, now, 2), i, "{id} is in its own shard, not re-routed");
            seen += 1;
        }
    }
    assert_eq!(seen, 5000, "nothing lost");
    set.close().await;
}

/// Workers and sinks serve no REST API, but `/healthz`, `/readyz` and
/// `/metrics` for Kubernetes probes and Prometheus: readiness names what is
/// missing, and the worker's metrics show the batches it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_sinks_answer_health_readiness_and_metrics() {
    let prefix = unique_prefix("ops");
    let mut worker = Harness::start_role(prefix.clone(), Role::Worker, true, json!({})).await;
    assert!(worker.http.starts_with("http://127.0.0.1:"), "the worker listens: {}", worker.http);
    assert_eq!(worker.get("/healthz").await, (200, json!({"status": "ok"})));
    let (code, ready) = worker.get("/readyz").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!((ready["kafka"].as_str(), ready["store"].as_str()), (Some("ok"), Some("ok")), "{ready}");
    assert_eq!(ready["models"], json!({MODEL: "ok"}));
    let (code, body) = worker.get("/v1/jobs/x").await;
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("no_route")), "no REST API here: {body}");

    // Jobs through a gateway of the same prefix show up in the worker's metrics.
    let mut gw = Harness::start_role(prefix.clone(), Role::Gateway, true, json!({})).await;
    for i in 0..3 {
        let body = json!({"job_id": format!("ops-{i}"), "model": MODEL, "input": {"text": format!("metrics {i}")}});
        assert_eq!(gw.post(body.to_string()).await.0, 202);
    }
    for i in 0..3 {
        assert_eq!(gw.wait_done(&format!("ops-{i}")).await["status"], "succeeded");
    }
    let r = worker.client.get(format!("{}/metrics", worker.http)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for name in ["sluice_batch_size", "sluice_inference_seconds", "sluice_jobs_completed_total"] {
        assert!(text.lines().any(|l| l.starts_with(name)), "{name} in /metrics:\n{text}");
    }
    // Every exported metric is described, with the catalog's text.
    let typed: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    assert!(typed.len() >= 10, "{typed:?}");
    for name in typed {
        let declared = sluice_schemas::metrics::ALL.iter().find(|m| m.name == name);
        let declared = declared.unwrap_or_else(|| panic!("{name} is exported but not in the catalog"));
        let help = format!("# HELP {name} {}", declared.help);
        assert!(text.lines().any(|l| l == help), "{name} has no HELP line with its description:\n{text}");
    }
    gw.stop().await;
    worker.stop().await;

    // A sink with one shard that answers and one that does not.
    let dir = scratch(&prefix);
    std::fs::create_dir_all(dir.join("lake")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = format!("postgres://sluice:secret@127.0.0.1:{port}/nowhere");
    let sinks = json!({"sinks": {
        "lake": dir.join("lake"),
        "shards": [format!("sqlite:{}/shard-0.db", dir.display()), down],
    }});
    let mut sink = Harness::start_role(prefix.clone(), Role::Sink, true, sinks).await;
    assert_eq!(sink.get("/healthz").await.0, 200);
    let (code, ready) = sink.get("/readyz").await;
    assert_eq!(code, 503, "{ready}");
    assert_eq!((ready["status"].as_str(), ready["kafka"].as_str()), (Some("not_ready"), Some("ok")), "{ready}");
    assert_eq!(ready["lake"], "ok");
    assert_eq!(ready["shards"][0]["status"], "ok", "{ready}");
    assert_ne!(ready["shards"][1]["status"], "ok", "{ready}");
    assert!(!ready.to_string().contains("secret"), "no password in the report: {ready}");
    sink.stop().await;
}

/// Jobs run through the real model, land in both sinks, and `POST /v1/sql`
/// answers over them: per tenant, read-only, in JSON, CSV and Arrow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_http_sees_only_the_callers_rows_and_refuses_writes() {
    use reqwest::Method;
    let prefix = unique_prefix("sqlhttp");
    let mut extra = keys_config();
    extra["sinks"] = json!({
        "lake": scratch(&prefix).join("lake"),
        "shards": (0..2).map(|i| format!("sqlite:{}/shard-{i}.db", scratch(&prefix).display())).collect::<Vec<_>>(),
        "flush_interval_ms": 200,
    });
    let mut h = Harness::start_with(prefix, true, extra).await;
    let job =
        |id: String| json!({"job_id": id, "model": MODEL, "input": {"text": "analytics over results"}}).to_string();
    for (key, n) in [("acme-key", 6), ("globex-key", 3)] {
        for i in 0..n {
            let (code, _, body) = h.call(Method::POST, "/v1/jobs", Some(key), Some(job(format!("{key}-{i}")))).await;
            assert_eq!(code, 202, "{body}");
        }
    }
    let sql = |q: &str| json!({"query": q}).to_string();
    let count = "SELECT count(*) AS n, count(DISTINCT tenant) AS t, min(tenant) AS tenant FROM ";
    let deadline = Instant::now() + Duration::from_secs(120);
    for (key, tenant, n) in [("acme-key", "acme", 6), ("globex-key", "globex", 3)] {
        for table in ["results", "shards"] {
            loop {
                let (code, _, body) =
                    h.call(Method::POST, "/v1/sql", Some(key), Some(sql(&format!("{count}{table}")))).await;
                assert_eq!(code, 200, "{body}");
                if body["rows"][0]["n"] == n {
                    assert_eq!(body["rows"][0], json!({"n": n, "t": 1, "tenant": tenant}), "{table}");
                    assert_eq!(body["truncated"], false);
                    break;
                }
                assert!(body["rows"][0]["n"].as_i64().unwrap() < n, "{tenant} sees more than its rows: {body}");
                assert!(Instant::now() < deadline, "{tenant}'s results never reached {table}: {body}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    // A latency answer from the lake, as a user would ask it.
    let q = "SELECT model, count(*) AS jobs, max(inference_ms) >= 0 AS timed FROM results GROUP BY model";
    let (code, _, body) = h.call(Method::POST, "/v1/sql", Some("acme-key"), Some(sql(q))).await;
    assert_eq!((code, body["rows"][0].clone()), (200, json!({"model": MODEL, "jobs": 6, "timed": true})), "{body}");

    for (q, status, code) in [
        ("DROP TABLE results", 403, "read_only"),
        ("CREATE TABLE x AS SELECT 1", 403, "read_only"),
        ("INSERT INTO results SELECT * FROM results", 403, "read_only"),
        ("SELEC 1", 400, "invalid_sql"),
        ("SELECT * FROM lake", 400, "invalid_sql"),
    ] {
        let (got, _, body) = h.call(Method::POST, "/v1/sql", Some("acme-key"), Some(sql(q))).await;
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{q}: {body}");
    }
    let (got, _, body) = h.call(Method::POST, "/v1/sql", None, Some(sql("SELECT 1"))).await;
    assert_eq!((got, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    let spoof = json!({"query": "SELECT count(*) FROM results", "tenant": "globex"}).to_string();
    let (got, _, body) = h.call(Method::POST, "/v1/sql", Some("acme-key"), Some(spoof)).await;
    assert_eq!((got, body["error"]["code"].as_str()), (403, Some("tenant_mismatch")));
    let (got, _, body) = h.call(Method::POST, "/v1/sql", Some("acme-key"), Some("{}".into())).await;
    assert_eq!((got, body["error"]["code"].as_str()), (400, Some("invalid_json")));

    for (format, content_type) in [("csv", "text/csv"), ("arrow", "application/vnd.apache.arrow.stream")] {
        let body = json!({"query": "SELECT job_id FROM shards ORDER BY job_id", "format": format}).to_string();
        let r = h.client.post(format!("{}/v1/sql", h.http)).bearer_auth("acme-key").body(body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with(content_type));
        let bytes = r.bytes().await.unwrap();
        if format == "csv" {
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            assert_eq!(text.lines().collect::<Vec<_>>()[..2], ["job_id", "acme-key-0"]);
            assert_eq!(text.lines().count(), 7);
        } else {
            let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes.to_vec()), None).unwrap();
            assert_eq!(reader.map(|b| b.unwrap().num_rows()).sum::<usize>(), 6);
        }
    }
    h.stop().await;
}
