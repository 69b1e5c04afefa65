//! End-to-end tests with real components: a Kafka-protocol broker (tansu,
//! started by `make test`), real Redis, the real MiniLM model through ONNX
//! Runtime, and a Kafka client that is not Sluice (Python confluent-kafka,
//! `tests/support/kafka_client.py`).
//!
//! Each test runs a whole Sluice in-process on port 0 with its own topic and
//! key prefix, so tests do not see each other's data.
//!
//! Environment (set by `make test`): SLUICE_TEST_BROKERS, SLUICE_TEST_REDIS,
//! SLUICE_TEST_PG (PostgreSQL clusters) and SLUICE_TEST_PGCTL (stops and
//! starts them), SLUICE_TEST_PYTHON, SLUICE_MODEL_REPO, ORT_DYLIB_PATH.
//! SLUICE_TEST_WORKER_LOG sets `RUST_LOG` of the `sluice worker` processes
//! the fault tests start (default `warn`).
//!
//! Shared by every end-to-end test binary (`worker`, `faults`, `gateway`,
//! `sinks`, `search`); each uses part of it.

#![allow(dead_code, unused_imports)] // A prelude and helpers: each binary uses part of them.

pub use serde_json::{Value, json};
pub use sluice_pipeline::app::{Role, Sluice};
pub use sluice_pipeline::config::Config;
pub use std::io::Write;
pub use std::path::PathBuf;
pub use std::process::{Command, Stdio};
pub use std::sync::Arc;
pub use std::sync::atomic::{AtomicUsize, Ordering};
pub use std::time::{Duration, Instant};

pub const MODEL: &str = "all-minilm-l6-v2";

pub const EXAMPLE: [f64; 5] = [0.0676569, 0.0634959, 0.0487131, 0.0793050, 0.0374481];

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through `make test`"))
}

pub fn unique_prefix(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_000;
    format!("t{}-{}-{}-{name}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), nanos)
}

pub struct Harness {
    pub sluice: Option<Sluice>,
    pub http: String,
    pub brokers: String,
    pub prefix: String,
    pub client: reqwest::Client,
}

/// `external`: real broker and Redis; otherwise the embedded broker and
/// in-process store of `sluice up`.
pub fn config(prefix: &str, external: bool, extra: Value) -> Config {
    let mut overrides = json!({
        "kafka": {"topic_prefix": prefix, "partitions": 2},
        "store": {"key_prefix": format!("{prefix}:")},
        "models": {"repository": env("SLUICE_MODEL_REPO"), "serve": [MODEL], "poll_interval_ms": 300},
        // Job ids are per tenant: REST jobs that name no tenant, and reads
        // that name none, are acme's, the tenant of the Kafka records below.
        "gateway": {"listen": "127.0.0.1:0", "max_body_bytes": 65536, "default_tenant": "acme"},
        "ops": {"listen": "127.0.0.1:0"},
        "worker": {"commit_interval_ms": 100, "id": format!("{prefix}-worker")},
        "engine": {"max_wait_ms": 2},
        // Sinks only where a test asks for them (tansu has enough to do).
        "sinks": {"up_local_defaults": false},
    });
    if external {
        overrides["kafka"]["brokers"] = json!(env("SLUICE_TEST_BROKERS"));
        overrides["store"]["redis"] = json!(env("SLUICE_TEST_REDIS"));
    }
    merge(&mut overrides, extra);
    Config::load(None, overrides).expect("test config")
}

/// A directory of this test's own (lake, SQLite shards, configs).
pub fn scratch(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("sluice-e2e").join(prefix);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tansu (and a Redis) of one test's own, started by
/// `deploy/local/services.sh` and stopped on drop. For tests that fetch
/// hundreds of thousands of records: tansu 0.6's fetch costs CPU in
/// proportion to everything its SQLite storage holds (measured: ~15,000
/// records/s into a fresh broker, ~1,800/s once the suite's earlier tests
/// have stored ~220,000 records, with tansu at 100% of a core), and a
/// saturated tansu answers group heartbeats late enough to expire
/// members. On the shared broker such a test would depend on what ran
/// before it.
pub struct OwnServices {
    pub dir: PathBuf,
    pub brokers: String,
}

impl OwnServices {
    pub fn start(prefix: &str) -> OwnServices {
        let dir = scratch(prefix).join("services");
        let out = Command::new(services_script()).args(["start"]).arg(&dir).env("PG_CLUSTERS", "0").output().unwrap();
        assert!(out.status.success(), "services.sh start: {}", String::from_utf8_lossy(&out.stderr));
        let env = std::fs::read_to_string(dir.join("env")).unwrap();
        let brokers = env
            .lines()
            .find_map(|l| l.strip_prefix("export SLUICE_TEST_BROKERS="))
            .expect("services.sh writes SLUICE_TEST_BROKERS")
            .to_owned();
        OwnServices { dir, brokers }
    }
}

impl Drop for OwnServices {
    fn drop(&mut self) {
        let _ = Command::new(services_script()).arg("stop").arg(&self.dir).output();
    }
}

pub fn services_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/services.sh")
}

pub fn merge(a: &mut Value, b: Value) {
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
    pub async fn start(name: &str, external: bool) -> Harness {
        let prefix = unique_prefix(name);
        Self::start_with(prefix, external, json!({})).await
    }

    pub async fn start_with(prefix: String, external: bool, extra: Value) -> Harness {
        Self::start_role(prefix, Role::Up, external, extra).await
    }

    pub async fn start_role(prefix: String, role: Role, external: bool, extra: Value) -> Harness {
        let sluice = Sluice::start(config(&prefix, external, extra), role).await.expect("sluice starts");
        Harness {
            http: sluice.http_addr.map(|a| format!("http://{a}")).unwrap_or_default(),
            brokers: sluice.bootstrap.clone(),
            sluice: Some(sluice),
            prefix,
            client: reqwest::Client::new(),
        }
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.sluice.take() {
            s.stop().await;
        }
    }

    pub fn jobs_topic(&self) -> String {
        format!("{}.jobs.{MODEL}", self.prefix)
    }

    /// Publishes records with confluent-kafka; returns their (partition, offset).
    pub async fn produce(&self, topic: &str, partition: Option<i32>, records: Vec<Value>) -> Vec<(i32, i64)> {
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
    pub async fn consume(&self, topic: &str, count: usize, timeout_s: u64) -> Vec<Value> {
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

    pub async fn committed(&self, group: &str, topic: &str) -> Value {
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

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(format!("{}{path}", self.http)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, body: impl Into<reqwest::Body>) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self.client.post(format!("{}/v1/jobs", self.http)).body(body).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    /// Any request, with an optional API key.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<String>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.http));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls the job until it is terminal.
    pub async fn wait_done(&self, id: &str) -> Value {
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

/// Runs the test Kafka client (`tests/support/kafka_client.py`) with
/// `args` and `stdin`; its standard output. Every record a test puts on
/// Kafka, and every one it reads back, goes through it.
pub fn kafka_client(args: &[String], stdin: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/kafka_client.py");
    let mut child = Command::new(env("SLUICE_TEST_PYTHON"))
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kafka_client.py {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// [`kafka_client`], off the async runtime's threads.
pub async fn python(args: Vec<String>, stdin: String) -> String {
    tokio::task::spawn_blocking(move || kafka_client(&args, &stdin)).await.unwrap()
}

pub fn job(id: &str, text: &str) -> Value {
    json!({"job_id": id, "tenant": "acme", "model": MODEL, "input": {"text": text}})
}

/// `n` text jobs `<id>-0..n`, as Kafka records keyed by job id.
pub fn numbered_jobs(id: &str, n: usize, text: &str) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let job_id = format!("{id}-{i}");
            record(Some(&job_id), job(&job_id, &format!("{text} {i}")).to_string())
        })
        .collect()
}

pub fn record(key: Option<&str>, value: String) -> Value {
    json!({"key": key, "value": value, "headers": {"tenant": "acme", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}})
}

pub fn assert_example_embedding(body: &Value) {
    let emb = body["output"]["embedding"].as_array().unwrap_or_else(|| panic!("no embedding in {body}"));
    assert_eq!(emb.len(), 384);
    for (i, want) in EXAMPLE.iter().enumerate() {
        let got = emb[i].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "dim {i}: {got} vs published {want}");
    }
}

pub async fn delete(h: &Harness, id: &str) -> (u16, Value) {
    let r = h.client.delete(format!("{}/v1/jobs/{id}", h.http)).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

pub async fn metrics_text(h: &Harness) -> String {
    h.client.get(format!("{}/metrics", h.http)).send().await.unwrap().text().await.unwrap()
}

/// The value of a Prometheus sample whose line starts with `prefix` (0 if absent).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Waits until `topic` holds a record keyed `key`; returns its value.
pub async fn wait_for_record(h: &Harness, topic: &str, key: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records = h.consume(topic, 1000, 3).await;
        if let Some(r) = records.iter().find(|r| r["key"] == key) {
            return serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
        }
        assert!(Instant::now() < deadline, "no record {key} on {topic}");
    }
}

/// A `sluice worker` process (the real binary), configured by a file.
pub struct WorkerProcess {
    pub child: std::process::Child,
    pub _config: PathBuf,
}

impl WorkerProcess {
    pub fn start(prefix: &str, extra_toml: &str) -> WorkerProcess {
        WorkerProcess::start_on(&env("SLUICE_TEST_BROKERS"), prefix, extra_toml)
    }

    /// A worker on the broker at `brokers`.
    pub fn start_on(brokers: &str, prefix: &str, extra_toml: &str) -> WorkerProcess {
        let config = std::env::temp_dir().join(format!("{prefix}.toml"));
        let toml = format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 4\n\
             [store]\nredis = \"{}\"\nkey_prefix = \"{prefix}:\"\n\
             [ops]\nlisten = \"127.0.0.1:0\"\n\
             [models]\nrepository = \"{}\"\nserve = [\"{MODEL}\"]\n{extra_toml}",
            brokers,
            env("SLUICE_TEST_REDIS"),
            env("SLUICE_MODEL_REPO"),
        );
        std::fs::write(&config, toml).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["worker", "--config"])
            .arg(&config)
            .env("RUST_LOG", std::env::var("SLUICE_TEST_WORKER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("sluice worker starts");
        WorkerProcess { child, _config: config }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn terminate(mut self) {
        // SIGTERM: the graceful path.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Statuses of `ids` in the results store, read directly from Redis.
pub async fn statuses(store: &sluice_pipeline::store::Store, ids: &[String]) -> Vec<Option<String>> {
    let records = store.get_many("acme", ids).await.unwrap();
    records.into_iter().map(|r| r.map(|r| r.status.as_str().to_owned())).collect()
}

pub async fn redis_store(prefix: &str) -> sluice_pipeline::store::Store {
    let cfg = sluice_pipeline::store::StoreConfig {
        ttl: Duration::from_secs(3600),
        memory_capacity: 1,
        key_prefix: format!("{prefix}:"),
        cache_ttl: Duration::ZERO,
        cache_capacity: 1,
    };
    sluice_pipeline::store::Store::redis(&env("SLUICE_TEST_REDIS"), &cfg).await.unwrap()
}

pub fn keys_config() -> Value {
    let hash = |k: &str| sluice_pipeline::gateway::hash_key(k);
    json!({"gateway": {"api_keys": [
        {"tenant": "acme", "sha256": hash("acme-key")},
        {"tenant": "globex", "sha256": hash("globex-key")},
        {"tenant": "noisy", "sha256": hash("noisy-key"), "rate_per_second": 5, "rate_burst": 5},
        {"tenant": "quiet", "sha256": hash("quiet-key"), "rate_per_second": 5, "rate_burst": 5},
    ]}})
}

/// Resident memory of this process (the harness runs Sluice in it), in bytes.
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// A new, empty database on a PostgreSQL cluster of `SLUICE_TEST_PG`.
pub async fn fresh_pg_database(cluster: usize, name: &str) -> String {
    use sqlx::Connection;
    let base = env("SLUICE_TEST_PG").split(',').nth(cluster).expect("enough PostgreSQL clusters").to_owned();
    let name = name.replace(['-', '.'], "_").to_lowercase();
    let mut c = sqlx::PgConnection::connect(&format!("{base}/postgres")).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\""))).execute(&mut c).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut c).await.unwrap();
    format!("{base}/{name}")
}

pub fn pgctl(cluster: usize, action: &str) {
    let out = Command::new(env("SLUICE_TEST_PGCTL")).args([&cluster.to_string(), action]).output().unwrap();
    assert!(out.status.success(), "pgctl {cluster} {action}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Publishes `n` synthetic results (ids `<tag>-<i>`, as workers write them)
/// to `<prefix>.results`, creating it with 4 partitions if needed.
pub fn produce_results(brokers: &str, prefix: &str, tag: &str, range: std::ops::Range<usize>) {
    produce_results_to(brokers, prefix, tag, range, true)
}

/// [`produce_results`]; `create`: create the topic first (the embedded
/// broker's topics are created through it, not by Kafka's admin API).
pub fn produce_results_to(brokers: &str, prefix: &str, tag: &str, range: std::ops::Range<usize>, create: bool) {
    let mut args: Vec<String> =
        ["produce-results", "--brokers", brokers, "--topic", &format!("{prefix}.results"), "--tag", tag]
            .map(String::from)
            .into();
    args.extend(["--lo".into(), range.start.to_string(), "--hi".into(), range.end.to_string()]);
    if create {
        args.push("--create".into());
    }
    kafka_client(&args, "");
}

/// A child process that is killed if the test ends first (a failed
/// assertion must not leave a sink consuming in the background).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `sluice sink` process in consumer group `<prefix>.sink-<run>`.
pub fn start_sink(brokers: &str, prefix: &str, run: usize, lake: &std::path::Path, shards: &[String]) -> KillOnDrop {
    // tansu 0.6, busy with the 100,000 records just produced, answers the
    // group coordinator's requests late (REQTMOUT); the default 10 s session
    // would expire live members over and over. This test is about replays
    // (each run is a new group), not about how soon a member is dropped.
    let patient = "session_timeout_ms = 45000\nmax_poll_interval_ms = 300000";
    start_sink_with(brokers, prefix, run, lake, shards, patient)
}

/// [`start_sink`] with more `[sinks]` settings (TOML lines).
pub fn start_sink_with(
    brokers: &str,
    prefix: &str,
    run: usize,
    lake: &std::path::Path,
    shards: &[String],
    extra: &str,
) -> KillOnDrop {
    let config = scratch(prefix).join(format!("sink-{}.toml", lake.file_name().unwrap().to_string_lossy()));
    let shards: Vec<String> = shards.iter().map(|s| format!("{s:?}")).collect();
    let toml = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 4\n\
         [ops]\nlisten = \"127.0.0.1:0\"\n\
         [sinks]\nlake = {:?}\nshards = [{}]\nflush_rows = 2500\nflush_interval_ms = 300\nretry_max_ms = 1000\n\
         consumer_group = \"{prefix}.sink-{run}\"\n{extra}\n",
        brokers,
        lake.display().to_string(),
        shards.join(", "),
    );
    std::fs::write(&config, toml).unwrap();
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["sink", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("sluice sink starts"),
    )
}

pub async fn count_json(analytics: &sluice_sql::Analytics, sql: &str) -> Value {
    analytics.query(sql, &sluice_sql::Scope::All).await.unwrap().to_json_rows().unwrap()[0].clone()
}
