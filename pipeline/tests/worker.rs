//! End-to-end tests of the worker stage: jobs from a Kafka client that is not
//! Sluice (or REST) through the real model to the store and the results
//! topic; bad input dead-lettered with codes; redelivery, replay and restart
//! changing nothing; cancellation; the inference cache; the in-flight bounds;
//! the circuit breaker.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_by_another_kafka_client_is_pollable_with_the_published_embedding() {
    let mut h = Harness::start("kafka-path", true).await;
    let positions = h
        .produce(
            &h.jobs_topic(),
            None,
            vec![record(Some("ext-1"), job("ext-1", "This is an example sentence").to_string())],
        )
        .await;
    assert_eq!(positions.len(), 1);

    let body = h.wait_done("ext-1").await;
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_example_embedding(&body);
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["model_version"], "1");
    assert_eq!(body["worker_id"], format!("{}-worker", h.prefix));
    assert_eq!(body["timings"]["input_tokens"], 7);
    assert!(body["timings"]["batch_size"].as_u64().unwrap() >= 1);
    assert!(body["started_at"].is_string() && body["finished_at"].is_string());

    // The result also went to the results topic, keyed by tenant and job id.
    let results = h.consume(&format!("{}.results", h.prefix), 1, 30).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["key"], "acme/ext-1");
    assert_eq!(results[0]["headers"]["tenant"], "acme");
    let published: Value = serde_json::from_str(results[0]["value"].as_str().unwrap()).unwrap();
    assert_eq!(published["status"], "succeeded");
    assert_example_embedding(&published);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_with_codes_and_the_partition_keeps_moving() {
    let mut h = Harness::start("poison", true).await;
    // Another tenant's job; a record below uses its id (issue 10, items 7 and 12).
    h.post(json!({"job_id": "owned-1", "tenant": "globex", "model": MODEL, "input": {"text": "mine"}}).to_string())
        .await;
    let owned = h.wait_done("owned-1?tenant=globex").await;
    assert_eq!((owned["tenant"].as_str(), owned["status"].as_str()), (Some("globex"), Some("succeeded")));
    let no_model = json!({"job_id": "no-model-1", "tenant": "acme", "input": {"text": "x"}});
    let mut other_version = job("version-1", "x");
    other_version["model_version"] = json!("9");
    let mut not_utf8 = job("utf-1", "x").to_string().into_bytes();
    let at = not_utf8.len() - 4;
    not_utf8[at] = 0xff;
    let bad_records: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        (Some("bad-json"), b"{\"job_id\": \"bad-json\", ".to_vec(), "invalid_json"),
        (Some("utf-1"), not_utf8, "invalid_json"),
        (Some("no-model-1"), no_model.to_string().into_bytes(), "schema_violation"),
        (Some("unknown-model-1"), json!({"job_id": "unknown-model-1", "tenant": "acme", "model": "gpt-9", "input": {"text": "x"}}).to_string().into_bytes(), "unknown_model"),
        (Some("version-1"), other_version.to_string().into_bytes(), "unknown_model"),
        (Some("too-long-1"), job("too-long-1", &"word ".repeat(4000)).to_string().into_bytes(), "input_too_long"),
        // Over JobRequest's 262,144 characters of text.
        (Some("huge-1"), job("huge-1", &"x".repeat(262_145)).to_string().into_bytes(), "schema_violation"),
        (Some("tensor-1"), json!({"job_id": "tensor-1", "tenant": "acme", "model": MODEL, "input": {"tensors": {"x": {"dtype": "int64", "shape": [1], "data": [1]}}}}).to_string().into_bytes(), "invalid_input"),
        // The header (acme) and the body disagree on the tenant.
        (Some("mismatch-1"), json!({"job_id": "mismatch-1", "tenant": "globex", "model": MODEL, "input": {"text": "x"}}).to_string().into_bytes(), "tenant_mismatch"),
        (None, Vec::new(), "invalid_json"),
    ];
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut records: Vec<Value> = bad_records
        .iter()
        .map(|(k, v, _)| {
            let mut r = record(*k, String::new());
            r.as_object_mut().unwrap().remove("value");
            r["value_hex"] = json!(hex(v));
            r
        })
        .collect();
    // Not bad input, but too late: expires without inference or dead letter.
    let mut late = job("late-1", "This is an example sentence");
    late["deadline"] = json!("2020-01-01T00:00:00Z");
    records.push(record(Some("late-1"), late.to_string()));
    // Acme's own job of the id globex uses: another job, which runs.
    records.push(record(Some("owned-1"), job("owned-1", "This is an example sentence").to_string()));
    records.push(record(Some("after-bad-1"), job("after-bad-1", "This is an example sentence").to_string()));
    // Everything on one partition: the good job sits behind the bad ones.
    let positions = h.produce(&h.jobs_topic(), Some(0), records).await;

    let good = h.wait_done("after-bad-1").await;
    assert_eq!(good["status"], "succeeded", "{good}");
    assert_example_embedding(&good);

    for (id, code) in [
        ("no-model-1", "schema_violation"),
        ("unknown-model-1", "unknown_model"),
        ("version-1", "unknown_model"),
        ("too-long-1", "input_too_long"),
        ("huge-1", "schema_violation"),
        ("tensor-1", "invalid_input"),
    ] {
        let body = h.wait_done(id).await;
        assert_eq!(body["status"], "failed", "{id}: {body}");
        assert_eq!(body["error"]["code"], code, "{id}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(body["tenant"], "acme");
    }
    let late = h.wait_done("late-1").await;
    assert_eq!(late["status"], "expired", "{late}");
    assert_eq!(late["error"]["code"], "deadline_exceeded");
    assert!(late.get("output").is_none() && late.get("timings").is_none(), "no inference ran: {late}");
    let body = h.wait_done("no-model-1").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("missing field `model`"), "{body}");
    let body = h.wait_done("version-1").await;
    assert!(body["error"]["message"].as_str().unwrap().contains("version `9`"), "{body}");
    // Unreadable JSON has no job id to fail.
    assert_eq!(h.get("/v1/jobs/bad-json").await.0, 404);
    assert_eq!(h.get("/v1/jobs/utf-1").await.0, 404);

    let dlq = h.consume(&format!("{}.dlq", h.prefix), bad_records.len(), 30).await;
    assert_eq!(dlq.len(), bad_records.len(), "{dlq:?}");
    for (i, (key, value, code)) in bad_records.iter().enumerate() {
        let d = dlq
            .iter()
            .find(|d| d["headers"]["sluice.source.offset"].as_str() == Some(positions[i].1.to_string().as_str()))
            .unwrap_or_else(|| panic!("no dead letter for offset {}: {dlq:?}", positions[i].1));
        assert_eq!(d["key"].as_str(), *key);
        assert_eq!(d["value_hex"].as_str().unwrap(), hex(value), "original bytes kept");
        assert_eq!(d["headers"]["sluice.error.code"], *code, "{key:?}");
        assert_eq!(d["headers"]["sluice.source.topic"], h.jobs_topic());
        assert_eq!(d["headers"]["sluice.source.partition"], "0");
        assert_eq!(d["headers"]["tenant"], "acme", "original headers kept");
        assert!(!d["headers"]["sluice.error.message"].as_str().unwrap().is_empty());
    }
    // Neither tenant's job record is written for a record whose tenant is
    // in doubt.
    assert_eq!(h.get("/v1/jobs/mismatch-1").await.0, 404);
    assert_eq!(h.get("/v1/jobs/mismatch-1?tenant=globex").await.0, 404);
    // Acme's `owned-1` ran as acme's job; globex's is unchanged.
    let acmes = h.wait_done("owned-1").await;
    assert_eq!((acmes["tenant"].as_str(), acmes["status"].as_str()), (Some("acme"), Some("succeeded")), "{acmes}");
    assert_example_embedding(&acmes);
    assert_eq!(h.get("/v1/jobs/owned-1?tenant=globex").await.1, owned, "another tenant's record changed nothing");

    // Acme's id used again for another request: dead-lettered
    // `job_id_in_use`, and the job stays as it was.
    let reused = record(Some("after-bad-1"), job("after-bad-1", "another text under a used id").to_string());
    let at = h.produce(&h.jobs_topic(), Some(0), vec![reused]).await[0].1.to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let dlq = h.consume(&format!("{}.dlq", h.prefix), bad_records.len() + 1, 5).await;
        if let Some(d) = dlq.into_iter().find(|d| d["headers"]["sluice.source.offset"].as_str() == Some(at.as_str())) {
            break d;
        }
        assert!(Instant::now() < deadline, "no dead letter for the reused id");
    };
    assert_eq!(dead["headers"]["sluice.error.code"], "job_id_in_use", "{dead}");
    assert_eq!(h.wait_done("after-bad-1").await, good, "the job under the id is unchanged");
    h.stop().await;
}

/// A result the broker refuses for good (larger than `max_message_bytes`:
/// librdkafka's MSG_SIZE_TOO_LARGE, which no retry fixes) does not hold its
/// partition: the job's record is dead-lettered with code `internal` and the
/// refusal, and the group commits past it. (Before, the worker retried the
/// send until shutdown and the partition's commits stopped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_broker_refuses_for_good_is_dead_lettered_and_the_partition_moves_on() {
    let prefix = unique_prefix("refused");
    // MiniLM's result (384 floats as JSON, about 8 KB) is over the bound;
    // the job records and their dead letters are well under it.
    let mut h = Harness::start_with(prefix.clone(), true, json!({"kafka": {"max_message_bytes": 4096}})).await;
    let n = 5;
    let mut records = numbered_jobs("refused", n, "a sentence whose embedding is too large to publish");
    // And a bad input that is itself over the bound: its own dead letter is
    // refused, which is counted and logged once (not retried as a second
    // dead letter), and the partition moves on past it too.
    records.push(record(Some("too-large-and-bad"), format!("{{\"not json {}", "x".repeat(6000))));
    // Counters are process-wide (other tests run in this process): deltas.
    let counts = |text: &str| {
        (
            metric(text, sluice_schemas::metrics::DEAD_LETTER_FAILURES.name),
            metric(text, sluice_schemas::metrics::DEAD_LETTERED.name),
        )
    };
    let before = counts(&metrics_text(&h).await);
    let positions = h.produce(&h.jobs_topic(), Some(0), records).await;
    let positions = &positions[..n];

    let dlq = h.consume(&format!("{prefix}.dlq"), n, 60).await;
    assert_eq!(dlq.len(), n, "every refused result is dead-lettered: {dlq:?}");
    for (_, offset) in positions {
        let d = dlq
            .iter()
            .find(|d| d["headers"]["sluice.source.offset"].as_str() == Some(offset.to_string().as_str()))
            .unwrap_or_else(|| panic!("no dead letter for offset {offset}: {dlq:?}"));
        assert_eq!(d["headers"]["sluice.error.code"], "internal");
        let message = d["headers"]["sluice.error.message"].as_str().unwrap();
        assert!(message.contains("publish result refused for good"), "{message}");
    }
    // The group commits past them: the partition is not held.
    let lag = sluice_pipeline::kafka::LagProbe::new(&h.brokers, &format!("{prefix}.workers.{MODEL}"), &h.jobs_topic())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lag.lag().await.unwrap_or(i64::MAX) != 0 {
        assert!(Instant::now() < deadline, "the jobs' offsets are never committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The result itself was stored before the send was refused: its
    // client can still read it; only the results topic (and so the lake
    // and shards) lacks it, which the dead letter records.
    let body = h.wait_done("refused-0").await;
    assert_eq!(body["status"], "succeeded", "{body}");
    let after = counts(&metrics_text(&h).await);
    assert_eq!(after.0 - before.0, 1.0, "one dead letter was refused, and counted once");
    assert_eq!(after.1 - before.1, n as f64, "the other dead letters were sent");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_job_changes_nothing() {
    let mut h = Harness::start("replay", true).await;
    let value = job("dup-1", "This is an example sentence").to_string();
    h.produce(&h.jobs_topic(), Some(0), vec![record(Some("dup-1"), value.clone())]).await;
    let first = h.wait_done("dup-1").await;
    assert_eq!(first["status"], "succeeded");

    // The same record again (a producer retry or a replay after a crash).
    let again = h.produce(&h.jobs_topic(), Some(0), vec![record(Some("dup-1"), value)]).await;
    let group = format!("{}.workers.{MODEL}", h.prefix);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed = h.committed(&group, &h.jobs_topic()).await;
        if committed["0"].as_i64().unwrap_or(-1) > again[0].1 {
            break;
        }
        assert!(Instant::now() < deadline, "duplicate never processed: {committed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = h.wait_done("dup-1").await;
    assert_eq!(after, first, "a finished job is never changed");
    let results = h.consume(&format!("{}.results", h.prefix), 10, 5).await;
    assert_eq!(results.iter().filter(|r| r["key"] == "acme/dup-1").count(), 1, "one result published: {results:?}");
    h.stop().await;
}

/// A worker that crashed after the results topic acknowledged a result but
/// before the store marked it published leaves a stored, unmarked record;
/// the record's replay publishes the result again, marked
/// `sluice.maybe-repeated` so that the lake sink checks it (a first publish
/// carries no mark). The crash is made by removing the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_published_again_after_a_crash_is_marked_as_a_possible_repeat() {
    let mut h = Harness::start("republish", true).await;
    let value = job("again-1", "This is an example sentence").to_string();
    h.produce(&h.jobs_topic(), Some(0), vec![record(Some("again-1"), value.clone())]).await;
    let first = h.wait_done("again-1").await;
    assert_eq!(first["status"], "succeeded");
    let results_topic = format!("{}.results", h.prefix);
    let published = wait_for_record(&h, &results_topic, "acme/again-1").await;

    let redis = redis::Client::open(env("SLUICE_TEST_REDIS")).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}:job:acme/again-1", h.prefix);
    let removed: i64 = redis::cmd("HDEL").arg(&key).arg("published").query_async(&mut conn).await.unwrap();
    assert_eq!(removed, 1, "the record was marked published");
    h.produce(&h.jobs_topic(), Some(0), vec![record(Some("again-1"), value)]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let results = loop {
        let results = h.consume(&results_topic, 10, 3).await;
        let mine: Vec<Value> = results.into_iter().filter(|r| r["key"] == "acme/again-1").collect();
        if mine.len() >= 2 {
            break mine;
        }
        assert!(Instant::now() < deadline, "the result was not published again: {mine:?}");
    };
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0]["headers"]["sluice.maybe-repeated"], Value::Null, "{}", results[0]);
    assert_eq!(results[1]["headers"]["sluice.maybe-repeated"], "1", "{}", results[1]);
    let again: Value = serde_json::from_str(results[1]["value"].as_str().unwrap()).unwrap();
    assert_eq!(again, published, "the same stored record");
    assert_eq!(h.wait_done("again-1").await, first, "a finished job is never changed");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_resumes_from_committed_offsets_without_losing_jobs() {
    let prefix = unique_prefix("restart");
    let mut h = Harness::start_with(prefix.clone(), true, json!({})).await;
    let n = 120;
    let records = numbered_jobs("r", n, "restart test sentence");
    h.produce(&h.jobs_topic(), None, records).await;
    // Stop while the backlog is being worked off.
    h.wait_done("r-0").await;
    h.stop().await;

    let mut h = Harness::start_with(prefix, true, json!({})).await;
    for i in 0..n {
        let body = h.wait_done(&format!("r-{i}")).await;
        assert_eq!(body["status"], "succeeded", "{body}");
    }
    let results = h.consume(&format!("{}.results", h.prefix), 2 * n, 10).await;
    let mut ids: Vec<&str> = results.iter().map(|r| r["key"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "every job has a published result");
    h.stop().await;
}

/// `sluice up` with nothing external: embedded broker, in-process store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_serves_kafka_and_rest_jobs() {
    let mut h = Harness::start("embedded", false).await;
    assert!(h.sluice.as_ref().unwrap().embedded_broker);
    assert!(h.brokers.starts_with("127.0.0.1:"));
    h.produce(
        &h.jobs_topic(),
        None,
        vec![record(Some("emb-1"), job("emb-1", "This is an example sentence").to_string())],
    )
    .await;
    let body = h.wait_done("emb-1").await;
    assert_example_embedding(&body);

    let (code, _, resp) =
        h.post(json!({"model": MODEL, "input": {"text": "This is an example sentence"}}).to_string()).await;
    assert_eq!(code, 202);
    let body = h.wait_done(resp["job_id"].as_str().unwrap()).await;
    assert_example_embedding(&body);

    h.produce(&h.jobs_topic(), None, vec![record(Some("emb-bad"), "not json".into())]).await;
    let dlq = h.consume(&format!("{}.dlq", h.prefix), 1, 30).await;
    assert_eq!(dlq[0]["headers"]["sluice.error.code"], "invalid_json");
    h.stop().await;
}

/// Cancelling: before any worker has seen the job, and while it waits in
/// the engine for its batch. Finished jobs cannot be cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_can_be_cancelled_until_they_finish() {
    let prefix = unique_prefix("cancel");
    // A gateway with no worker: jobs stay queued.
    let mut gw = Harness::start_role(prefix.clone(), Role::Gateway, true, json!({})).await;
    let (code, _, body) =
        gw.post(json!({"job_id": "c-1", "model": MODEL, "input": {"text": "cancel me"}}).to_string()).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(gw.get("/v1/jobs/c-1").await.1["status"], "queued");
    let (code, body) = delete(&gw, "c-1").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert!(body["finished_at"].is_string());
    let (code, body) = delete(&gw, "c-1").await;
    assert_eq!((code, body["error"]["code"].as_str()), (409, Some("job_finished")), "{body}");
    assert_eq!(delete(&gw, "never-submitted").await.0, 404);

    // A worker whose batches wait 3 s to fill: a job cancelled while it
    // waits in the engine never runs.
    let mut worker = Harness::start_role(
        prefix.clone(),
        Role::Worker,
        true,
        json!({"engine": {"max_wait_ms": 3000, "max_batch_size": 64}, "worker": {"running_status_after_ms": 0}}),
    )
    .await;
    let cancelled = wait_for_record(&worker, &format!("{prefix}.results"), "acme/c-1").await;
    assert_eq!(cancelled["status"], "cancelled", "the worker publishes the cancelled record: {cancelled}");
    assert!(cancelled.get("output").is_none());

    let dropped_before = metric(
        &metrics_text(&gw).await,
        "sluice_jobs_dropped_total{model=\"all-minilm-l6-v2/1\",reason=\"cancelled\"}",
    );
    let (code, _, _) = gw
        .post(json!({"job_id": "c-2", "model": MODEL, "input": {"text": "cancel me while batched"}}).to_string())
        .await;
    assert_eq!(code, 202);
    // `running` as soon as the worker has taken it (running_status_after_ms
    // is 0 here); it then waits in the engine's queue for its batch.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.get("/v1/jobs/c-2").await.1["status"] != "running" {
        assert!(Instant::now() < deadline, "c-2 never picked up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = delete(&gw, "c-2").await;
    assert_eq!(code, 200, "{body}");
    let published = wait_for_record(&worker, &format!("{prefix}.results"), "acme/c-2").await;
    assert_eq!(published["status"], "cancelled", "{published}");
    let done = gw.wait_done("c-2").await;
    assert_eq!(done["status"], "cancelled");
    assert!(done.get("output").is_none());
    let dropped_after = metric(
        &metrics_text(&gw).await,
        "sluice_jobs_dropped_total{model=\"all-minilm-l6-v2/1\",reason=\"cancelled\"}",
    );
    assert!(dropped_after > dropped_before, "the engine dropped the cancelled job before inference");

    // A finished job is never changed.
    let (_, _, body) =
        gw.post(json!({"job_id": "c-3", "model": MODEL, "input": {"text": "finish me"}}).to_string()).await;
    assert_eq!(body["job_id"], "c-3");
    worker.stop().await;
    let mut worker = Harness::start_role(prefix.clone(), Role::Worker, true, json!({})).await;
    assert_eq!(gw.wait_done("c-3").await["status"], "succeeded");
    let (code, body) = delete(&gw, "c-3").await;
    assert_eq!((code, body["error"]["code"].as_str()), (409, Some("job_finished")));
    assert_eq!(gw.get("/v1/jobs/c-3").await.1["status"], "succeeded");
    worker.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_inputs_are_served_from_the_inference_cache_of_their_tenant() {
    let mut h = Harness::start("cache", true).await;
    let body = |id: &str| json!({"job_id": id, "model": MODEL, "input": {"text": "cache this sentence"}}).to_string();
    h.post(body("k-1")).await;
    let first = h.wait_done("k-1").await;
    assert!(first["timings"]["batch_size"].as_u64().unwrap() >= 1, "ran inference: {first}");
    h.post(body("k-2")).await;
    let second = h.wait_done("k-2").await;
    assert_eq!(second["status"], "succeeded");
    assert_eq!(second["timings"]["batch_size"], 0, "served from the cache: {second}");
    assert_eq!(second["output"], first["output"]);
    assert!(metric(&metrics_text(&h).await, "sluice_cache_hits_total{model=\"all-minilm-l6-v2\"}") >= 1.0);
    // Another version is another cache entry.
    let pinned =
        json!({"job_id": "k-3", "model": MODEL, "model_version": "2", "input": {"text": "cache this sentence"}});
    h.post(pinned.to_string()).await;
    let third = h.wait_done("k-3").await;
    assert_eq!(third["model_version"], "2");
    assert!(third["timings"]["batch_size"].as_u64().unwrap() >= 1, "int8 version ran: {third}");
    assert_ne!(third["output"], first["output"]);
    // Another tenant's identical input is not served from the first
    // tenant's entry (a hit would tell it that the input was submitted).
    let other = json!({"job_id": "k-4", "tenant": "other", "model": MODEL, "input": {"text": "cache this sentence"}});
    h.post(other.to_string()).await;
    let fourth = h.wait_done("k-4?tenant=other").await;
    assert!(fourth["timings"]["batch_size"].as_u64().unwrap() >= 1, "ran inference for tenant other: {fourth}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_pauses_at_the_in_flight_bound_and_loses_nothing() {
    let prefix = unique_prefix("pause");
    let mut h = Harness::start_with(prefix, true, json!({"worker": {"max_in_flight": 4, "resume_below": 2}})).await;
    let n = 150;
    let records = numbered_jobs("p", n, "flow control sentence");
    h.produce(&h.jobs_topic(), None, records).await;
    for i in 0..n {
        assert_eq!(h.wait_done(&format!("p-{i}")).await["status"], "succeeded");
    }
    let pauses = metric(
        &metrics_text(&h).await,
        "sluice_partition_pauses_total{model=\"all-minilm-l6-v2\",reason=\"in_flight\"}",
    );
    assert!(pauses >= 1.0, "the consumer paused at 4 in flight ({pauses} pauses)");
    h.stop().await;
}

/// The in-flight byte bound holds records back like the count bound: with
/// room for about one record's bytes, the worker takes records one at a
/// time, and every job still finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_byte_bound_holds_big_records_back_and_loses_nothing() {
    let prefix = unique_prefix("bytes");
    let mut h = Harness::start_with(prefix, true, json!({"worker": {"max_in_flight_bytes": 100}})).await;
    let n = 40;
    let records = numbered_jobs("by", n, "a record of well over a hundred bytes, so that each one fills the bound");
    h.produce(&h.jobs_topic(), None, records).await;
    for i in 0..n {
        assert_eq!(h.wait_done(&format!("by-{i}")).await["status"], "succeeded");
    }
    let holds = metric(
        &metrics_text(&h).await,
        "sluice_partition_pauses_total{model=\"all-minilm-l6-v2\",reason=\"in_flight\"}",
    );
    assert!(holds >= (n / 2) as f64, "the byte bound held consumption back before most records ({holds} times)");
    h.stop().await;
}

/// A model whose inference keeps failing opens its breaker: the consumer
/// stops, no job is failed, and the jobs run once a fixed version arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_model_stops_consumption_and_fails_no_job() {
    let repo = std::env::temp_dir().join(format!("sluice-e2e-breaker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    let make = |version: &str, kind: &str| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../workers/scripts/make_test_models.py");
        let out = Command::new(env("SLUICE_TEST_PYTHON"))
            .arg(script)
            .args(["--out", repo.to_str().unwrap(), "--name", "flaky", "--version", version, "--kind", kind])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    make("1", "broken");
    let extra = json!({
        "models": {"repository": repo.to_str().unwrap(), "serve": ["flaky"]},
        "engine": {"breaker_min_batches": 3, "breaker_cool_down_ms": 600000},
        "worker": {"max_in_flight": 8, "resume_below": 4},
    });
    let mut h = Harness::start_with(unique_prefix("breaker"), true, extra).await;
    let topic = format!("{}.jobs.flaky", h.prefix);
    let n = 40;
    let records: Vec<Value> = (0..n)
        .map(|i| {
            let body = json!({"job_id": format!("b-{i}"), "tenant": "acme", "model": "flaky",
                "input": {"tensors": {"x": {"dtype": "float32", "shape": [1, 4], "data": [i, i, i, i]}}}});
            record(Some(&format!("b-{i}")), body.to_string())
        })
        .collect();
    h.produce(&topic, None, records).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = metrics_text(&h).await;
        let open = metric(&m, "sluice_breaker_state{model=\"flaky/1\"}") == 2.0;
        if open && metric(&m, "sluice_paused_partitions{model=\"flaky\"}") >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the breaker never opened and paused consumption");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen = 0;
    for i in 0..n {
        let (code, body) = h.get(&format!("/v1/jobs/b-{i}")).await;
        if code == 200 {
            seen += 1;
            assert_eq!(body["status"], "running", "no job fails while the model is unhealthy: {body}");
        }
    }
    assert!(seen <= 16, "consumption stopped near the in-flight bound: {seen} jobs picked up");

    make("2", "double");
    for i in 0..n {
        let body = h.wait_done(&format!("b-{i}")).await;
        assert_eq!(body["status"], "succeeded", "{body}");
        assert_eq!(body["model_version"], "2");
        assert_eq!(body["output"]["tensors"]["y"]["data"], json!(vec![2.0 * i as f64; 4]));
    }
    h.stop().await;
    std::fs::remove_dir_all(repo).unwrap();
}
