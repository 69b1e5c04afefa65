//! The `sluice` command.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};
use sluice_pipeline::{Config, Role, Sluice, shutdown, telemetry};

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
    /// Print the effective configuration (all layers merged) as TOML-ish JSON.
    Config(RunArgs),
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
    /// Topic prefix.
    #[arg(long, env = "SLUICE__KAFKA__TOPIC_PREFIX")]
    topic_prefix: Option<String>,
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
        json!({"kafka": kafka, "store": store, "models": models, "gateway": gateway})
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
        Command::Config(a) => {
            let cfg = Config::load(cli.config.as_deref(), a.overrides()).context("invalid configuration")?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            return Ok(());
        }
    };
    let cfg = Config::load(cli.config.as_deref(), args.overrides()).context("invalid configuration")?;
    let sluice = Sluice::start(cfg, role).await.context("cannot start sluice")?;

    if sluice.embedded_broker {
        eprintln!("WARNING: embedded Kafka broker at {} — in memory, NOT durable", sluice.bootstrap);
    } else {
        eprintln!("kafka: {}", sluice.bootstrap);
    }
    eprintln!("results store: {}", sluice.store_kind);
    for (m, v) in &sluice.models {
        eprintln!("serving model {m}: versions {v}");
    }
    if let Some(addr) = sluice.http_addr {
        eprintln!("REST API on http://{addr}");
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
