//! The `sluice` command.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};
use sluice_pipeline::app::{Role, Sluice};
use sluice_pipeline::config::Config;
use sluice_pipeline::{shutdown, telemetry};

// Many small allocations on several threads (records, JSON, batches):
// mimalloc's per-thread heaps instead of glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice: asynchronous AI inference over Kafka.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see pipeline/config/default.toml for every key).
    #[arg(long, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: gateway and workers, plus an embedded
    /// broker and an in-process store unless --brokers / --redis are given.
    Up(RunArgs),
    /// Workers only: consume jobs, run inference, write results.
    Worker(RunArgs),
    /// The REST gateway only.
    Gateway(RunArgs),
    /// The results sinks only: results topic → Parquet lake and/or SQL shards.
    Sink(RunArgs),
    /// The notifier only: completion callbacks (signed webhooks) for the
    /// jobs that ask for them.
    Notifier(RunArgs),
    /// Run a read-only SQL query over the lake (`results`) and the shards (`shards`).
    Sql(SqlArgs),
    /// Print the effective configuration (all layers merged) as JSON.
    Config(RunArgs),
    /// Publish jobs from a JSONL file (one JobRequest per line) to Kafka.
    Publish(PublishArgs),
    /// Wait for a job through the REST API and print its record.
    Poll(PollArgs),
    /// The stored jobs nearest a text, through the REST API (POST /v1/search).
    Search(SearchArgs),
    /// Print the REST API's OpenAPI 3.1 document (what `GET /openapi.json` serves).
    Openapi,
    /// Print the SHA-256 of an API key, as `gateway.api_keys` wants it.
    HashKey {
        /// The key (read from standard input when absent, so it stays out of
        /// the shell history).
        key: Option<String>,
    },
}

#[derive(Args)]
struct PublishArgs {
    /// JSONL file: one job per line; job_id, tenant and submitted_at may be left out.
    file: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "SLUICE__KAFKA__BROKERS")]
    brokers: Option<String>,
    /// Topic prefix.
    #[arg(long, env = "SLUICE__KAFKA__TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// Tenant of lines that name none.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Jobs per second (default: as fast as the broker takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

#[derive(Args)]
struct SqlArgs {
    /// The query, e.g. "SELECT model, count(*) FROM results GROUP BY model".
    query: String,
    /// Root of the Parquet results lake.
    #[arg(long, env = "SLUICE__SINKS__LAKE")]
    lake: Option<PathBuf>,
    /// A SQL shard URL (sqlite:<path> or postgres://…); repeat in shard order.
    #[arg(long = "shard", env = "SLUICE_SHARDS", value_delimiter = ',')]
    shards: Vec<String>,
    /// Only this tenant's rows.
    #[arg(long)]
    tenant: Option<String>,
    /// Output: a text table, JSON rows, or CSV.
    #[arg(long, default_value = "table", value_parser = ["table", "json", "csv"])]
    format: String,
}

#[derive(Args)]
struct PollArgs {
    /// The job id.
    id: String,
    #[command(flatten)]
    api: ApiArgs,
    /// Give up after this many seconds (an unknown id is looked for until then:
    /// a job published to Kafka has no record until a worker picks it up).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// Where the REST API is, and who calls it.
#[derive(Args)]
struct ApiArgs {
    /// Base URL of the REST API.
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (when the gateway requires one).
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Whose jobs (job ids are per tenant): open mode only; the gateway's
    /// default tenant when absent, the key's tenant with an API key.
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Args)]
struct SearchArgs {
    /// The text to search with (embedded by --model through the job path).
    text: String,
    /// The model whose embeddings are searched.
    #[arg(long, default_value = "all-minilm-l6-v2")]
    model: String,
    /// How many neighbours.
    #[arg(long, short, default_value_t = 10)]
    k: usize,
    /// Only jobs with this metadata entry (KEY=VALUE; repeat for several).
    #[arg(long = "where", value_name = "KEY=VALUE")]
    filters: Vec<String>,
    /// Scan every stored vector instead of asking the approximate index.
    #[arg(long)]
    exact: bool,
    #[command(flatten)]
    api: ApiArgs,
    /// Print the answer as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Kafka bootstrap servers (empty with `up`: embedded broker).
    #[arg(long, env = "SLUICE__KAFKA__BROKERS")]
    brokers: Option<String>,
    /// Redis URL of the results store (empty with `up`: in-process store).
    #[arg(long, env = "SLUICE__STORE__REDIS")]
    redis: Option<String>,
    /// Model repository directory.
    #[arg(long, env = "SLUICE__MODELS__REPOSITORY")]
    models: Option<PathBuf>,
    /// Address of the REST API (port 0 picks a free port).
    #[arg(long, env = "SLUICE__GATEWAY__LISTEN")]
    listen: Option<String>,
    /// Address of /healthz, /readyz and /metrics of `worker` and `sink`
    /// (port 0 picks a free port; empty: none).
    #[arg(long, env = "SLUICE__OPS__LISTEN")]
    ops_listen: Option<String>,
    /// Topic prefix.
    #[arg(long, env = "SLUICE__KAFKA__TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// Root of the Parquet results lake (sinks write it, the gateway queries it).
    #[arg(long, env = "SLUICE__SINKS__LAKE")]
    lake: Option<PathBuf>,
    /// A SQL shard URL (sqlite:<path> or postgres://…); repeat in shard order.
    #[arg(long = "shard", env = "SLUICE_SHARDS", value_delimiter = ',')]
    shards: Vec<String>,
    /// Write the addresses in use to this file (JSON) once ready.
    #[arg(long, env = "SLUICE_READY_FILE")]
    ready_file: Option<PathBuf>,
}

impl RunArgs {
    /// The flags that were given, as a partial config.
    fn overrides(&self) -> Value {
        let mut kafka = Map::new();
        let mut store = Map::new();
        let mut models = Map::new();
        let mut gateway = Map::new();
        if let Some(b) = &self.brokers {
            kafka.insert("brokers".into(), json!(b));
        }
        if let Some(p) = &self.topic_prefix {
            kafka.insert("topic_prefix".into(), json!(p));
        }
        if let Some(r) = &self.redis {
            store.insert("redis".into(), json!(r));
        }
        if let Some(m) = &self.models {
            models.insert("repository".into(), json!(m));
        }
        if let Some(l) = &self.listen {
            gateway.insert("listen".into(), json!(l));
        }
        let mut sinks = Map::new();
        if let Some(l) = &self.lake {
            sinks.insert("lake".into(), json!(l));
        }
        if !self.shards.is_empty() {
            sinks.insert("shards".into(), json!(self.shards));
        }
        let mut ops = Map::new();
        if let Some(l) = &self.ops_listen {
            ops.insert("listen".into(), json!(l));
        }
        json!({"kafka": kafka, "store": store, "models": models, "gateway": gateway, "sinks": sinks, "ops": ops})
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logging();
    let cli = Cli::parse();
    let (role, args) = match &cli.command {
        Command::Up(a) => (Role::Up, a),
        Command::Worker(a) => (Role::Worker, a),
        Command::Gateway(a) => (Role::Gateway, a),
        Command::Sink(a) => (Role::Sink, a),
        Command::Notifier(a) => (Role::Notifier, a),
        Command::Sql(a) => return sql(cli.config.as_deref(), a).await,
        Command::Config(a) => {
            let mut cfg = Config::load(cli.config.as_deref(), a.overrides()).context("invalid configuration")?;
            if !cfg.callbacks.signing_key.is_empty() {
                cfg.callbacks.signing_key = "(set; not shown)".into();
            }
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            return Ok(());
        }
        Command::Publish(a) => return publish(cli.config.as_deref(), a).await,
        Command::Poll(a) => return poll(a).await,
        Command::Search(a) => return search(a).await,
        Command::Openapi => {
            println!("{}", sluice_pipeline::gateway::openapi().to_pretty_json()?);
            return Ok(());
        }
        Command::HashKey { key } => {
            let key = match key {
                Some(k) => k.clone(),
                None => std::io::read_to_string(std::io::stdin())?.trim().to_owned(),
            };
            anyhow::ensure!(!key.is_empty(), "empty key");
            println!("{}", sluice_pipeline::gateway::hash_key(&key));
            return Ok(());
        }
    };
    let cfg = Config::load(cli.config.as_deref(), args.overrides()).context("invalid configuration")?;
    let cfg_partitions = cfg.kafka.embedded_partitions;
    let sluice = Sluice::start(cfg, role).await.context("cannot start sluice")?;

    if sluice.embedded_broker {
        eprintln!(
            "WARNING: embedded Kafka broker at {} — in memory, NOT durable; it holds at most {} MiB of backlog per \
             topic (5 MiB per partition, kafka.embedded_partitions) and drops the oldest jobs beyond that",
            sluice.kafka_clients,
            5 * cfg_partitions
        );
    } else {
        eprintln!("kafka: {}", sluice.bootstrap);
    }
    eprintln!("results store: {}", sluice.store_kind);
    for (m, v) in &sluice.models {
        eprintln!("serving model {m}: versions {v}");
    }
    if let Some(lake) = &sluice.lake {
        eprintln!("results lake: {}", lake.display());
    }
    for (i, s) in sluice.shards.iter().enumerate() {
        eprintln!("results shard {i}: {s}");
    }
    if let Some(addr) = sluice.http_addr {
        match role {
            Role::Up | Role::Gateway => eprintln!("REST API on http://{addr}"),
            Role::Worker | Role::Sink | Role::Notifier => {
                eprintln!("health and metrics on http://{addr} (/healthz, /readyz, /metrics)")
            }
        }
    }
    if let Some(path) = &args.ready_file {
        let ready = json!({
            "http": sluice.http_addr.map(|a| format!("http://{a}")),
            "bootstrap": sluice.bootstrap,
            "embedded_broker": sluice.embedded_broker,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&ready)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    shutdown::signal().await;
    eprintln!("shutting down: draining in-flight jobs");
    sluice.stop().await;
    Ok(())
}

async fn publish(config: Option<&std::path::Path>, a: &PublishArgs) -> anyhow::Result<()> {
    let mut kafka = Map::new();
    if let Some(b) = &a.brokers {
        kafka.insert("brokers".into(), json!(b));
    }
    if let Some(p) = &a.topic_prefix {
        kafka.insert("topic_prefix".into(), json!(p));
    }
    let cfg = Config::load(config, json!({ "kafka": kafka })).context("invalid configuration")?;
    anyhow::ensure!(!cfg.kafka.brokers.is_empty(), "--brokers (or SLUICE__KAFKA__BROKERS) is required");
    let (jobs, invalid) = sluice_pipeline::publish::read_jobs(&a.file, &a.tenant)?;
    for line in &invalid {
        eprintln!("skipped {line}");
    }
    let producer = sluice_pipeline::kafka::Producer::new(&cfg.kafka.brokers, "sluice-publish", cfg.produce_timeout())?;
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} jobs  {per_sec}  eta {eta}")
            .expect("static template"),
    );
    let summary =
        sluice_pipeline::publish::publish(jobs, &producer, &cfg.kafka.topic_prefix, a.rate, a.concurrency, |n| {
            bar.set_position(n)
        })
        .await;
    bar.finish_and_clear();
    for f in &summary.failed {
        eprintln!("failed {f}");
    }
    let secs = summary.elapsed.as_secs_f64().max(1e-9);
    println!(
        "published {} jobs in {:.2} s ({:.0}/s); {} invalid lines skipped; {} failed",
        summary.published,
        secs,
        summary.published as f64 / secs,
        invalid.len(),
        summary.failed.len()
    );
    anyhow::ensure!(summary.failed.is_empty(), "{} jobs were not published", summary.failed.len());
    Ok(())
}

async fn sql(config: Option<&std::path::Path>, a: &SqlArgs) -> anyhow::Result<()> {
    let mut sinks = Map::new();
    if let Some(l) = &a.lake {
        sinks.insert("lake".into(), json!(l));
    }
    if !a.shards.is_empty() {
        sinks.insert("shards".into(), json!(a.shards));
    }
    let cfg = Config::load(config, json!({ "sinks": sinks })).context("invalid configuration")?;
    let (lake, shards) = sluice_pipeline::app::sink_targets(&cfg, Role::Sink);
    anyhow::ensure!(
        lake.is_some() || !shards.is_empty(),
        "--lake or --shard (or sinks.lake / sinks.shards) is required"
    );
    let analytics = sluice_sql::Analytics::new(sluice_sql::Sources { lake, shards }, cfg.query_limits())?;
    let scope = a.tenant.clone().map_or(sluice_sql::Scope::All, sluice_sql::Scope::Tenant);
    let answer = analytics.query(&a.query, &scope).await?;
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&answer.to_json_rows()?)?),
        "csv" => print!("{}", String::from_utf8_lossy(&answer.to_csv()?)),
        _ => println!("{}", answer.to_table()),
    }
    eprintln!(
        "{} row(s){} in {:.0} ms",
        answer.rows,
        if answer.truncated { " (truncated)" } else { "" },
        answer.elapsed.as_secs_f64() * 1000.0
    );
    Ok(())
}

async fn search(a: &SearchArgs) -> anyhow::Result<()> {
    let mut metadata = serde_json::Map::new();
    for f in &a.filters {
        let (k, v) = f.split_once('=').with_context(|| format!("--where {f:?}: expected KEY=VALUE"))?;
        metadata.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    let mut body = serde_json::json!({
        "model": a.model, "text": a.text, "k": a.k, "filter": {"metadata": metadata}, "exact": a.exact,
    });
    if let Some(t) = &a.api.tenant {
        body["tenant"] = Value::String(t.clone());
    }
    let mut req = reqwest::Client::new().post(format!("{}/v1/search", a.api.url.trim_end_matches('/'))).json(&body);
    if let Some(k) = &a.api.api_key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.context("cannot reach the REST API")?;
    let status = resp.status();
    let answer: Value = resp.json().await.context("the REST API did not answer JSON")?;
    if !status.is_success() {
        eprintln!("{}", serde_json::to_string_pretty(&answer)?);
        std::process::exit(2);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let how = match answer["indexed"].as_u64() {
        Some(n) => format!("approximate, {n} indexed"),
        None => "exact".to_owned(),
    };
    println!("{} version {} ({how}, {} ms):", answer["model"], answer["model_version"], answer["elapsed_ms"]);
    for n in answer["results"].as_array().into_iter().flatten() {
        let meta: Vec<String> = n["metadata"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        println!(
            "  {:.4}  {}  {}",
            n["score"].as_f64().unwrap_or(f64::NAN),
            n["job_id"].as_str().unwrap_or_default(),
            meta.join(" ")
        );
    }
    Ok(())
}

async fn poll(a: &PollArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.timeout);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now()).as_secs().min(60);
        let mut req = client
            .get(format!("{}/v1/jobs/{}", a.api.url.trim_end_matches('/'), a.id))
            .query(&[("wait", left)])
            .timeout(std::time::Duration::from_secs(left + 10));
        if let Some(k) = &a.api.api_key {
            req = req.bearer_auth(k);
        }
        if let Some(t) = &a.api.tenant {
            req = req.query(&[("tenant", t)]);
        }
        let resp = req.send().await.context("cannot reach the REST API")?;
        let status = resp.status();
        let body: Value = resp.json().await.context("the REST API did not answer JSON")?;
        if status == reqwest::StatusCode::NOT_FOUND && std::time::Instant::now() < deadline {
            // Jobs published straight to Kafka have no record until a worker
            // picks them up: keep looking until the timeout.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            continue;
        }
        if !status.is_success() {
            eprintln!("{}", serde_json::to_string_pretty(&body)?);
            std::process::exit(2);
        }
        let state = body["status"].as_str().unwrap_or_default().to_owned();
        if !matches!(state.as_str(), "queued" | "running") {
            println!("{}", serde_json::to_string_pretty(&body)?);
            std::process::exit(if state == "succeeded" { 0 } else { 1 });
        }
        if std::time::Instant::now() >= deadline {
            eprintln!("job {} still {state} after {} s", a.id, a.timeout);
            std::process::exit(2);
        }
    }
}
