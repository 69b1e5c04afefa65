//! End-to-end tests with real components: a Kafka-protocol broker (tansu,
//! started by `make test`), real Redis, the real MiniLM model through ONNX
//! Runtime, and a Kafka client that is not Sluice (Python confluent-kafka,
//! `tests/support/kafka_client.py`).
//!
//! Each test runs a whole Sluice in-process on port 0 with its own topic and
//! key prefix, so tests do not see each other's data.
//!
//! Environment (set by `make test`): SLUICE_TEST_BROKERS, SLUICE_TEST_REDIS,
//! SLUICE_TEST_PYTHON, SLUICE_MODEL_REPO, ORT_DYLIB_PATH.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_pipeline::{Config, Role, Sluice};

const MODEL: &str = "all-minilm-l6-v2";
const EXAMPLE: [f64; 5] = [0.0676569, 0.0634959, 0.0487131, 0.0793050, 0.0374481];

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through `make test`"))
}

fn unique_prefix(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_000;
    format!("t{}-{}-{}-{name}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), nanos)
}

struct Harness {
    sluice: Option<Sluice>,
    http: String,
    brokers: String,
    prefix: String,
    client: reqwest::Client,
}

/// `external`: real broker and Redis; otherwise the embedded broker and
/// in-process store of `sluice up`.
fn config(prefix: &str, external: bool, extra: Value) -> Config {
    let mut overrides = json!({
        "kafka": {"topic_prefix": prefix, "partitions": 2},
        "store": {"key_prefix": format!("{prefix}:")},
        "models": {"repository": env("SLUICE_MODEL_REPO")},
        "gateway": {"listen": "127.0.0.1:0", "max_body_bytes": 65536},
        "worker": {"commit_interval_ms": 100, "id": format!("{prefix}-worker")},
        "engine": {"max_wait_ms": 2},
    });
    if external {
        overrides["kafka"]["brokers"] = json!(env("SLUICE_TEST_BROKERS"));
        overrides["store"]["redis"] = json!(env("SLUICE_TEST_REDIS"));
    }
    merge(&mut overrides, extra);
    Config::load(None, overrides).expect("test config")
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

impl Harness {
    async fn start(name: &str, external: bool) -> Harness {
        let prefix = unique_prefix(name);
        Self::start_with(prefix, external, json!({})).await
    }

    async fn start_with(prefix: String, external: bool, extra: Value) -> Harness {
        let sluice = Sluice::start(config(&prefix, external, extra), Role::Up).await.expect("sluice starts");
        Harness {
            http: format!("http://{}", sluice.http_addr.expect("gateway listens")),
            brokers: sluice.bootstrap.clone(),
            sluice: Some(sluice),
            prefix,
            client: reqwest::Client::new(),
        }
    }

    async fn stop(&mut self) {
        if let Some(s) = self.sluice.take() {
            s.stop().await;
        }
    }

    fn jobs_topic(&self) -> String {
        format!("{}.jobs.{MODEL}", self.prefix)
    }

    /// Publishes records with confluent-kafka; returns their (partition, offset).
    async fn produce(&self, topic: &str, partition: Option<i32>, records: Vec<Value>) -> Vec<(i32, i64)> {
        let mut args =
            vec!["produce".to_owned(), "--brokers".into(), self.brokers.clone(), "--topic".into(), topic.into()];
        if let Some(p) = partition {
            args.extend(["--partition".into(), p.to_string()]);
        }
        let input: String = records.iter().map(|r| format!("{r}\n")).collect();
        python(args, input)
            .await
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (v["partition"].as_i64().unwrap() as i32, v["offset"].as_i64().unwrap())
            })
            .collect()
    }

    /// Reads up to `count` records of `topic` from the beginning.
    async fn consume(&self, topic: &str, count: usize, timeout_s: u64) -> Vec<Value> {
        let args = vec![
            "consume".to_owned(),
            "--brokers".into(),
            self.brokers.clone(),
            "--topic".into(),
            topic.into(),
            "--count".into(),
            count.to_string(),
            "--timeout".into(),
            timeout_s.to_string(),
        ];
        python(args, String::new()).await.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    async fn committed(&self, group: &str, topic: &str) -> Value {
        let args = vec![
            "committed".to_owned(),
            "--brokers".into(),
            self.brokers.clone(),
            "--group".into(),
            group.into(),
            "--topic".into(),
            topic.into(),
        ];
        serde_json::from_str(python(args, String::new()).await.trim()).unwrap()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(format!("{}{path}", self.http)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, body: impl Into<reqwest::Body>) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self.client.post(format!("{}/v1/jobs", self.http)).body(body).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls the job until it is terminal.
    async fn wait_done(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (code, body) = self.get(&format!("/v1/jobs/{id}")).await;
            if code == 200 && !matches!(body["status"].as_str(), Some("queued" | "running")) {
                return body;
            }
            assert!(Instant::now() < deadline, "job {id} not finished in time: {code} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn python(args: Vec<String>, stdin: String) -> String {
    tokio::task::spawn_blocking(move || {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/kafka_client.py");
        let mut child = Command::new(env("SLUICE_TEST_PYTHON"))
            .arg(script)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python runs");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kafka_client.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

fn job(id: &str, text: &str) -> Value {
    json!({"job_id": id, "tenant": "acme", "model": MODEL, "input": {"text": text}})
}

fn record(key: Option<&str>, value: String) -> Value {
    json!({"key": key, "value": value, "headers": {"tenant": "acme", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}})
}

fn assert_example_embedding(body: &Value) {
    let emb = body["output"]["embedding"].as_array().unwrap_or_else(|| panic!("no embedding in {body}"));
    assert_eq!(emb.len(), 384);
    for (i, want) in EXAMPLE.iter().enumerate() {
        let got = emb[i].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "dim {i}: {got} vs published {want}");
    }
}

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

    // The result also went to the results topic, keyed by job id.
    let results = h.consume(&format!("{}.results", h.prefix), 1, 30).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["key"], "ext-1");
    assert_eq!(results[0]["headers"]["tenant"], "acme");
    let published: Value = serde_json::from_str(results[0]["value"].as_str().unwrap()).unwrap();
    assert_eq!(published["status"], "succeeded");
    assert_example_embedding(&published);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_with_codes_and_the_partition_keeps_moving() {
    let mut h = Harness::start("poison", true).await;
    let no_model = json!({"job_id": "no-model-1", "tenant": "acme", "input": {"text": "x"}});
    let bad_records = [
        (Some("bad-json"), "{\"job_id\": \"bad-json\", ".to_owned(), "invalid_json"),
        (Some("no-model-1"), no_model.to_string(), "schema_violation"),
        (Some("unknown-model-1"), json!({"job_id": "unknown-model-1", "tenant": "acme", "model": "gpt-9", "input": {"text": "x"}}).to_string(), "unknown_model"),
        (Some("too-long-1"), job("too-long-1", &"word ".repeat(4000)).to_string(), "input_too_long"),
        (Some("tensor-1"), json!({"job_id": "tensor-1", "tenant": "acme", "model": MODEL, "input": {"tensors": {"x": {"dtype": "int64", "shape": [1], "data": [1]}}}}).to_string(), "invalid_input"),
        (None, String::new(), "invalid_json"),
    ];
    let mut records: Vec<Value> = bad_records.iter().map(|(k, v, _)| record(*k, v.clone())).collect();
    // Not bad input, but too late: expires without inference or dead letter.
    let mut late = job("late-1", "This is an example sentence");
    late["deadline"] = json!("2020-01-01T00:00:00Z");
    records.push(record(Some("late-1"), late.to_string()));
    records.push(record(Some("after-bad-1"), job("after-bad-1", "This is an example sentence").to_string()));
    // Everything on one partition: the good job sits behind the bad ones.
    let positions = h.produce(&h.jobs_topic(), Some(0), records).await;

    let good = h.wait_done("after-bad-1").await;
    assert_eq!(good["status"], "succeeded", "{good}");
    assert_example_embedding(&good);

    for (id, code) in [
        ("no-model-1", "schema_violation"),
        ("unknown-model-1", "unknown_model"),
        ("too-long-1", "input_too_long"),
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
    // Unreadable JSON has no job id to fail.
    assert_eq!(h.get("/v1/jobs/bad-json").await.0, 404);

    let dlq = h.consume(&format!("{}.dlq", h.prefix), bad_records.len(), 30).await;
    assert_eq!(dlq.len(), bad_records.len(), "{dlq:?}");
    for (i, (key, value, code)) in bad_records.iter().enumerate() {
        let d = dlq
            .iter()
            .find(|d| d["headers"]["sluice.source.offset"].as_str() == Some(positions[i].1.to_string().as_str()))
            .unwrap_or_else(|| panic!("no dead letter for offset {}: {dlq:?}", positions[i].1));
        assert_eq!(d["key"].as_str(), *key);
        assert_eq!(d["value"].as_str().unwrap(), value, "original bytes kept");
        assert_eq!(d["headers"]["sluice.error.code"], *code);
        assert_eq!(d["headers"]["sluice.source.topic"], h.jobs_topic());
        assert_eq!(d["headers"]["sluice.source.partition"], "0");
        assert_eq!(d["headers"]["tenant"], "acme", "original headers kept");
        assert!(!d["headers"]["sluice.error.message"].as_str().unwrap().is_empty());
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_accepts_jobs_and_answers_every_bad_request_with_a_json_error() {
    let mut h = Harness::start("rest", true).await;

    let (code, headers, body) =
        h.post(json!({"model": MODEL, "input": {"text": "This is an example sentence"}}).to_string()).await;
    assert_eq!(code, 202, "{body}");
    let id = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7, "gateway ids are UUIDv7");
    assert_eq!(body["poll_url"], format!("/v1/jobs/{id}"));
    assert_eq!(headers["location"], format!("/v1/jobs/{id}"));
    let done = h.wait_done(&id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["tenant"], "default");
    assert_example_embedding(&done);
    assert!(done["submitted_at"].is_string());

    let (code, _, body) = h.post(json!({"job_id": "client-chosen-1", "tenant": "acme", "model": MODEL, "input": {"text": "hi"}, "metadata": {"doc": "7"}}).to_string()).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["job_id"], "client-chosen-1");
    let done = h.wait_done("client-chosen-1").await;
    assert_eq!(done["metadata"]["doc"], "7");
    assert_eq!(done["tenant"], "acme");

    let long_text = "word ".repeat(4000);
    let cases: Vec<(String, u16, &str, &str)> = vec![
        (String::new(), 400, "invalid_json", "empty"),
        ("{\"model\":".into(), 400, "invalid_json", "not valid JSON"),
        ("[1, 2]".into(), 422, "schema_violation", "expected a JSON object"),
        (json!({"input": {"text": "x"}}).to_string(), 422, "schema_violation", "missing field `model`"),
        (
            json!({"model": MODEL, "input": {"text": "x"}, "temperature": 1}).to_string(),
            422,
            "schema_violation",
            "unknown field `temperature`",
        ),
        (
            json!({"model": MODEL, "input": {"text": ""}}).to_string(),
            422,
            "schema_violation",
            "input.text: must not be empty",
        ),
        (
            json!({"model": MODEL, "input": {"text": 5}}).to_string(),
            422,
            "schema_violation",
            "input.text: invalid type",
        ),
        (json!({"model": "gpt-9", "input": {"text": "x"}}).to_string(), 422, "unknown_model", "gpt-9"),
        (json!({"model": MODEL, "input": {"text": long_text}}).to_string(), 422, "input_too_long", "at most 16384"),
        (
            json!({"model": MODEL, "input": {"tensors": {"x": {"dtype": "int64", "shape": [1], "data": [1]}}}})
                .to_string(),
            422,
            "invalid_input",
            "text model",
        ),
        ("x".repeat(70_000), 413, "payload_too_large", "65536"),
    ];
    for (body, want_status, want_code, want_msg) in cases {
        let (code, _, resp) = h.post(body.clone()).await;
        let snippet: String = body.chars().take(60).collect();
        assert_eq!(code, want_status, "{snippet}: {resp}");
        assert_eq!(resp["error"]["code"], want_code, "{snippet}: {resp}");
        let msg = resp["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want_msg), "{snippet}: message {msg:?} lacks {want_msg:?}");
    }

    let (code, body) = h.get("/v1/jobs/does-not-exist").await;
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (code, body) = h.get("/v1/nothing-here").await;
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("no_route")));
    assert_eq!(h.get("/healthz").await.0, 200);
    let (code, body) = h.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["kafka"], "ok");
    assert_eq!(body["store"], "ok");
    let metrics = h.client.get(format!("{}/metrics", h.http)).send().await.unwrap().text().await.unwrap();
    for name in
        ["sluice_jobs_submitted_total", "sluice_jobs_completed_total", "sluice_batch_size", "sluice_inference_seconds"]
    {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
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
    assert_eq!(results.iter().filter(|r| r["key"] == "dup-1").count(), 1, "one result published: {results:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_resumes_from_committed_offsets_without_losing_jobs() {
    let prefix = unique_prefix("restart");
    let mut h = Harness::start_with(prefix.clone(), true, json!({})).await;
    let n = 120;
    let records: Vec<Value> = (0..n)
        .map(|i| {
            record(Some(&format!("r-{i}")), job(&format!("r-{i}"), &format!("restart test sentence {i}")).to_string())
        })
        .collect();
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
