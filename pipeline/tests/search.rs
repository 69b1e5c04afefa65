//! End-to-end tests of `POST /v1/search` and its approximate index: the
//! nearest jobs of the caller's tenant only, exact and approximate in
//! agreement, and an index that survives a SIGKILL of the process building
//! it with nothing missing and nothing twice.

mod support;

use support::*;

/// Issue 12: `POST /v1/search` finds a tenant's nearest stored jobs by
/// their embeddings, with their metadata, and never another tenant's; a
/// text query's own embedding job is never a result; bad searches get clear
/// errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_the_callers_nearest_jobs_with_their_metadata() {
    use reqwest::Method;
    let prefix = unique_prefix("search");
    let mut extra = keys_config();
    extra["sinks"] = json!({"lake": scratch(&prefix).join("lake"), "flush_interval_ms": 200});
    let mut h = Harness::start_with(prefix, true, extra).await;
    let docs = [
        ("d-cat", "The cat sat on the warm windowsill all afternoon."),
        ("d-rust", "Rust's borrow checker rejects data races at compile time."),
        ("d-rain", "Heavy rain is expected across the north this weekend."),
    ];
    // acme stores three documents; globex stores the cat sentence too.
    for (id, text) in docs {
        let job =
            json!({"job_id": id, "model": MODEL, "input": {"text": text}, "metadata": {"doc": id, "source": "kb"}});
        let (code, _, body) = h.call(Method::POST, "/v1/jobs", Some("acme-key"), Some(job.to_string())).await;
        assert_eq!(code, 202, "{body}");
    }
    let theirs = json!({"job_id": "g-cat", "model": MODEL, "input": {"text": docs[0].1}, "metadata": {"doc": "g-cat"}});
    assert_eq!(h.call(Method::POST, "/v1/jobs", Some("globex-key"), Some(theirs.to_string())).await.0, 202);
    let count = json!({"query": "SELECT count(*) AS n FROM results"}).to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (key, n) in [("acme-key", 3), ("globex-key", 1)] {
        loop {
            let (_, _, body) = h.call(Method::POST, "/v1/sql", Some(key), Some(count.clone())).await;
            if body["rows"][0]["n"] == n {
                break;
            }
            assert!(Instant::now() < deadline, "{key}'s jobs never reached the lake: {body}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // The approximate index follows the lake: it holds them after its next
    // refresh.
    let mut unit = vec![0.0f32; 384];
    unit[0] = 1.0;
    for (key, n) in [("acme-key", 3), ("globex-key", 1)] {
        let probe = json!({"model": MODEL, "vector": unit, "k": 10}).to_string();
        loop {
            let (code, _, body) = h.call(Method::POST, "/v1/search", Some(key), Some(probe.clone())).await;
            assert_eq!(code, 200, "{body}");
            if body["indexed"] == n {
                assert_eq!(body["exact"], false);
                break;
            }
            assert!(Instant::now() < deadline, "{key}'s index never held {n} vectors: {body}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    let search = |body: serde_json::Value| body.to_string();
    let q = search(json!({"model": MODEL, "text": "a kitten dozing in the sun by the window", "k": 3}));
    let (code, _, body) = h.call(Method::POST, "/v1/search", Some("acme-key"), Some(q.clone())).await;
    assert_eq!(code, 200, "{body}");
    let ids: Vec<&str> = body["results"].as_array().unwrap().iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    assert_eq!(ids[0], "d-cat", "the nearest document first: {body}");
    // The exact scan agrees with the index.
    let exact =
        search(json!({"model": MODEL, "text": "a kitten dozing in the sun by the window", "k": 3, "exact": true}));
    let (code, _, scanned) = h.call(Method::POST, "/v1/search", Some("acme-key"), Some(exact)).await;
    assert_eq!(code, 200, "{scanned}");
    assert_eq!(scanned["exact"], true);
    let scanned_ids: Vec<&str> =
        scanned["results"].as_array().unwrap().iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    assert_eq!(scanned_ids, ids, "exact {scanned} vs approximate {body}");
    assert_eq!(scanned["results"][0]["metadata"], body["results"][0]["metadata"]);
    assert_eq!(ids.len(), 3, "only acme's three documents, not the query itself nor globex's: {body}");
    assert_eq!(body["results"][0]["metadata"], json!({"doc": "d-cat", "source": "kb"}), "{body}");
    assert_eq!(body["model_version"], "1");
    let scores: Vec<f64> = body["results"].as_array().unwrap().iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "nearest first: {scores:?}");
    // Searching again: the first query's embedding job is not a result.
    let (_, _, again) = h.call(Method::POST, "/v1/search", Some("acme-key"), Some(q)).await;
    assert_eq!(again["results"].as_array().unwrap().len(), 3, "{again}");

    // globex finds only its own cat; a metadata filter narrows acme's.
    for exact in [false, true] {
        let same = search(json!({"model": MODEL, "text": docs[0].1, "k": 10, "exact": exact}));
        let (code, _, body) = h.call(Method::POST, "/v1/search", Some("globex-key"), Some(same)).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["results"].as_array().unwrap().len(), 1, "{body}");
        assert_eq!(body["results"][0]["job_id"], "g-cat");
        assert!(body["results"][0]["score"].as_f64().unwrap() > 0.999, "the same text: {body}");
    }
    let filtered =
        search(json!({"model": MODEL, "text": "weather", "k": 5, "filter": {"metadata": {"doc": "d-rust"}}}));
    let (_, _, body) = h.call(Method::POST, "/v1/search", Some("acme-key"), Some(filtered)).await;
    let ids: Vec<&str> = body["results"].as_array().unwrap().iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["d-rust"], "{body}");

    // The same from the command line.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["search", "a kitten dozing in the sun", "-k", "2", "--url", &h.http, "--api-key", "acme-key"])
        .args(["--where", "source=kb", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["results"][0]["job_id"], "d-cat", "{answer}");
    assert_eq!(answer["results"].as_array().unwrap().len(), 2, "{answer}");

    for (body, status, code) in [
        (json!({"model": MODEL, "vector": [0.1, 0.2, 0.3]}), 422, "schema_violation"),
        (json!({"model": MODEL, "text": "x", "k": 0}), 422, "schema_violation"),
        (json!({"model": MODEL}), 422, "schema_violation"),
        (json!({"model": "nope", "text": "x"}), 422, "unknown_model"),
        (json!({"model": MODEL, "text": "x", "model_version": "2", "tenant": "globex"}), 403, "tenant_mismatch"),
    ] {
        let (got, _, answer) = h.call(Method::POST, "/v1/search", Some("acme-key"), Some(search(body.clone()))).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{body}: {answer}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    }
    h.stop().await;
}

/// The index survives a SIGKILL of the gateway that builds it: restarted,
/// it loads its last snapshot, applies only the lake flushes after it, and
/// ends holding every indexable result of the lake exactly once (checked
/// key by key against the lake's own rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_survives_a_sigkill_of_its_builder_with_nothing_missing_or_twice() {
    let prefix = unique_prefix("annkill");
    let brokers = env("SLUICE_TEST_BROKERS");
    let dir = scratch(&prefix);
    let lake = dir.join("lake");
    // Results land in the lake through a sink process (a flush every 300 ms
    // per partition); the gateway indexes them, snapshotting every 300
    // vectors.
    produce_results(&brokers, &prefix, "a", 0..3000);
    let _sink = start_sink_with(&brokers, &prefix, 1, &lake, &[], "");
    let start_gateway = |n: usize| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.join(format!("gateway-{n}.toml"));
        let toml = format!(
            "[kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\npartitions = 4\n\
             [store]\nredis = \"{}\"\nkey_prefix = \"{prefix}:\"\n\
             [models]\nrepository = \"{}\"\nserve = [\"{MODEL}\"]\n\
             [gateway]\nlisten = \"127.0.0.1:{port}\"\n\
             [sinks]\nlake = {:?}\n\
             [search]\nrefresh_interval_ms = 100\npersist_every_vectors = 300\npersist_interval_ms = 1000\n",
            env("SLUICE_TEST_REDIS"),
            env("SLUICE_MODEL_REPO"),
            lake.display().to_string(),
        );
        std::fs::write(&config, toml).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["gateway", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("sluice gateway starts");
        (KillOnDrop(child), format!("http://127.0.0.1:{port}"))
    };
    let client = reqwest::Client::new();
    // `indexed` of tenant-1's all-minilm-l6-v2 graph (the synthetic results
    // have 3-number embeddings; tenant-0's of that model all failed), once
    // the gateway answers.
    let indexed = |url: String| {
        let client = client.clone();
        async move {
            let body = json!({"model": MODEL, "vector": [0.25, -0.5, 0.5], "k": 5, "tenant": "tenant-1"});
            let answer = client.post(format!("{url}/v1/search")).json(&body).send().await.ok()?;
            let answer: serde_json::Value = answer.json().await.ok()?;
            answer["indexed"].as_u64()
        }
    };

    let current = lake.join("_index/CURRENT");
    let (mut gateway, url) = start_gateway(1);
    let deadline = Instant::now() + Duration::from_secs(180);
    while !current.exists() {
        assert!(Instant::now() < deadline, "no snapshot was ever written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // More results land while it indexes; it is killed mid-way.
    produce_results(&brokers, &prefix, "b", 3000..6000);
    while indexed(url.clone()).await.unwrap_or(0) < 350 {
        assert!(Instant::now() < deadline, "the index never grew");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = indexed(url.clone()).await.unwrap_or(0);
    gateway.0.kill().unwrap(); // SIGKILL
    gateway.0.wait().unwrap();
    let snapshot = std::fs::read_to_string(&current).unwrap();
    println!("search index: SIGKILL with {before} of tenant-1's vectors indexed; CURRENT = {snapshot}");
    produce_results(&brokers, &prefix, "c", 6000..8000);

    // The lake's own answer: every indexable result, per (tenant, version).
    let analytics = sluice_sql::Analytics::new(
        sluice_sql::Sources { lake: Some(lake.clone()), shards: vec![] },
        sluice_sql::QueryLimits::new(100_000, Duration::from_secs(60)),
    )
    .unwrap();
    loop {
        let n = count_json(&analytics, "SELECT count(*) AS n FROM results").await;
        if n["n"] == 8000 {
            break;
        }
        assert!(Instant::now() < deadline, "the sink never landed 8000 results: {n}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let lake_ids = analytics
        .query(
            "SELECT tenant, model, model_version, job_id FROM results \
             WHERE status = 'succeeded' AND embedding IS NOT NULL",
            &sluice_sql::Scope::All,
        )
        .await
        .unwrap()
        .to_json_rows()
        .unwrap();
    let mut expected: std::collections::BTreeMap<sluice_sql::IndexKey, Vec<String>> = Default::default();
    for r in lake_ids.as_array().unwrap() {
        let text = |c: &str| r[c].as_str().unwrap().to_owned();
        let key = sluice_sql::IndexKey { tenant: text("tenant"), model: text("model"), version: text("model_version") };
        expected.entry(key).or_default().push(text("job_id"));
    }
    let tenant1 = sluice_sql::IndexKey { tenant: "tenant-1".into(), model: MODEL.into(), version: "1".into() };
    let tenant1 = expected[&tenant1].len() as u64;

    let (gateway, url) = start_gateway(2);
    while indexed(url.clone()).await != Some(tenant1) {
        assert!(Instant::now() < deadline, "the restarted index never caught up to {tenant1}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGTERM: the last snapshot; then read what it holds, key by key.
    let mut gateway = gateway;
    unsafe { libc::kill(gateway.0.id() as i32, libc::SIGTERM) };
    gateway.0.wait().unwrap();
    let index = sluice_sql::VectorIndex::open(sluice_sql::Lake::open(&lake).unwrap(), Default::default()).unwrap();
    assert_eq!(index.stats().loaded, expected.values().map(Vec::len).sum::<usize>());
    assert_eq!(expected.len(), 9, "5 tenants × 2 models, but tenant-0's all-minilm-l6-v2 jobs all failed");
    for (key, mut ids) in expected {
        let tenant = format!("{}/{}", key.tenant, key.model);
        let mut held = index.job_ids(&key);
        let n = held.len();
        held.sort();
        held.dedup();
        assert_eq!(held.len(), n, "{tenant}: a job twice");
        ids.sort();
        let missing: Vec<&String> = ids.iter().filter(|i| held.binary_search(i).is_err()).take(5).collect();
        let extra: Vec<&String> = held.iter().filter(|i| ids.binary_search(i).is_err()).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{tenant}: the index holds {} jobs, the lake {}; missing {missing:?}, not in the lake {extra:?}",
            held.len(),
            ids.len()
        );
    }
}
