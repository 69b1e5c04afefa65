//! Wiring: builds the stages a role needs from a [`Config`] and runs them
//! until stopped. `sluice up` is [`Role::Up`]: everything in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_schemas::topics;
use sluice_workers::{ModelCatalog, ModelPool, ModelRepository, WorkerError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use sluice_sql::shards::redact;
use sluice_sql::{Analytics, Lake, LakeError, QueryError, ShardError, ShardSet, Sources};

use crate::config::Config;
use crate::gateway::Gateway;
use crate::kafka::{self, Consumer, EmbeddedBroker, KafkaError, Producer};
use crate::ops::Ops;
use crate::shutdown::{self, Trigger};
use crate::sinks::{self, LakeSink, ShardSink, SinkHooks};
use crate::store::{Store, StoreError};
use crate::telemetry;
use crate::worker::{SharedTracker, Worker};

/// Which stages run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Gateway + workers (+ embedded broker and in-process store when no
    /// external ones are configured).
    Up,
    /// Workers only.
    Worker,
    /// Gateway only.
    Gateway,
    /// The results sinks only (lake and/or shards).
    Sink,
}

/// Why Sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0} is required for this command (flag or SLUICE__ variable)")]
    Missing(&'static str),
    #[error("no model to serve in {0} (export one with `make models`)")]
    NoModels(PathBuf),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] WorkerError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Analytics(#[from] QueryError),
}

/// A running Sluice; [`Sluice::stop`] shuts it down in order.
pub struct Sluice {
    /// Where this process's HTTP listens: the REST API (gateway roles) or
    /// `/healthz`, `/readyz` and `/metrics` (`worker`, `sink`; see [`crate::ops`]).
    pub http_addr: Option<SocketAddr>,
    /// `bootstrap.servers` in use.
    pub bootstrap: String,
    /// Where Kafka clients connect: `bootstrap`, or `kafka.embedded_listen`
    /// for the embedded broker when that was free.
    pub kafka_clients: String,
    /// Whether the broker is the embedded, in-memory one.
    pub embedded_broker: bool,
    /// What backs the results store.
    pub store_kind: &'static str,
    /// Served models: name → versions.
    pub models: Vec<(String, String)>,
    /// The results lake this process writes or queries.
    pub lake: Option<PathBuf>,
    /// The SQL shards this process writes or queries (passwords hidden).
    pub shards: Vec<String>,
    trigger: Trigger,
    tasks: Vec<JoinHandle<()>>,
    /// Dropped last: the stages talk to it until they have stopped.
    broker: Option<EmbeddedBroker>,
}

impl Sluice {
    /// Starts the stages of `role`.
    pub async fn start(cfg: Config, role: Role) -> Result<Sluice, StartError> {
        let metrics = telemetry::prometheus();
        let (trigger, shutdown) = shutdown::channel();
        let mut tasks = Vec::new();

        // Broker.
        let broker = if cfg.kafka.brokers.is_empty() {
            if role != Role::Up {
                return Err(StartError::Missing("kafka.brokers (--brokers)"));
            }
            Some(EmbeddedBroker::start()?)
        } else {
            None
        };
        let bootstrap = broker.as_ref().map_or(cfg.kafka.brokers.clone(), |b| b.bootstrap().to_owned());
        let mut kafka_clients = bootstrap.clone();
        if broker.is_some() && !cfg.kafka.embedded_listen.is_empty() {
            let mut sd = shutdown.clone();
            let stop = async move { sd.wait().await };
            match kafka::forward_bootstrap(&cfg.kafka.embedded_listen, bootstrap.clone(), stop).await {
                Ok(addr) => kafka_clients = addr.to_string(),
                Err(e) => tracing::warn!(
                    listen = %cfg.kafka.embedded_listen,
                    error = %e,
                    "cannot accept Kafka clients there (kafka.embedded_listen); they can use {bootstrap}"
                ),
            }
        }

        // Models: engines for workers, a catalog (no sessions) for the gateway.
        let runs_workers = matches!(role, Role::Up | Role::Worker);
        let runs_gateway = matches!(role, Role::Up | Role::Gateway);
        let runs_sinks = matches!(role, Role::Up | Role::Sink);
        let (lake_dir, shard_urls) = sink_targets(&cfg, role);
        if role == Role::Sink && lake_dir.is_none() && shard_urls.is_empty() {
            return Err(StartError::Missing("sinks.lake or sinks.shards (--lake / --shard)"));
        }
        let serve = cfg.models.serve.clone();
        let pool = if runs_workers {
            let repo = ModelRepository::new(&cfg.models.repository);
            let pool = ModelPool::start(repo, serve.clone(), cfg.engine()).await?;
            tasks.push(pool.spawn_watcher(cfg.poll_interval()));
            Some(pool)
        } else {
            None
        };
        let catalog = if runs_gateway {
            let repo = ModelRepository::new(&cfg.models.repository);
            let catalog = Arc::new(
                tokio::task::spawn_blocking(move || ModelCatalog::load(repo, serve))
                    .await
                    .expect("catalog loading does not panic. This is a bug.")?,
            );
            let (c, every, mut sd) = (catalog.clone(), cfg.poll_interval(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = sd.wait() => return,
                    }
                    let c = c.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || c.refresh()).await {
                        tracing::warn!(error = %e, "model catalog refresh failed");
                    }
                }
            }));
            Some(catalog)
        } else {
            None
        };
        let names: Vec<String> = match (&pool, &catalog) {
            (Some(p), _) => p.models(),
            (None, Some(c)) => c.names(),
            (None, None) => Vec::new(),
        };
        if names.is_empty() && role != Role::Sink {
            return Err(StartError::NoModels(cfg.models.repository.clone()));
        }

        // Topics.
        let prefix = &cfg.kafka.topic_prefix;
        let mut topic_names: Vec<String> = names.iter().map(|m| topics::jobs(prefix, m)).collect();
        topic_names.extend([topics::results(prefix), topics::dlq(prefix)]);
        match &broker {
            Some(b) => {
                for t in &topic_names {
                    b.create_topic(t, cfg.kafka.embedded_partitions)?;
                }
            }
            None => kafka::ensure_topics(&bootstrap, &topic_names, cfg.kafka.partitions, cfg.kafka.replication).await?,
        }

        // Results store.
        let store = if role == Role::Sink {
            Store::memory(&cfg.store()) // unused: sinks read the results topic
        } else if cfg.store.redis.is_empty() {
            if role != Role::Up {
                return Err(StartError::Missing("store.redis (--redis)"));
            }
            Store::memory(&cfg.store())
        } else {
            Store::redis(&cfg.store.redis, &cfg.store()).await?
        };

        let worker_cfg = cfg.worker();
        let mut ops = None;

        // Workers: one consumer group per model.
        if let Some(pool) = &pool {
            let producer = Producer::with_max_message_bytes(
                &bootstrap,
                &worker_cfg.worker_id,
                cfg.publish_timeout(),
                cfg.kafka.max_message_bytes,
            )?;
            ops = Some(Ops::new(metrics.clone(), producer.clone()).with_store(store.clone()).with_models(pool.clone()));
            for name in &names {
                let group = format!("{prefix}.workers.{name}");
                let tracker = Arc::new(SharedTracker::default());
                let consumer = Consumer::with_timeouts(
                    &bootstrap,
                    &worker_cfg.worker_id,
                    &group,
                    &[topics::jobs(prefix, name)],
                    tracker.clone(),
                    Some(cfg.worker_group_timeouts()),
                )?;
                let worker = Worker {
                    consumer,
                    tracker,
                    producer: producer.clone(),
                    store: store.clone(),
                    pool: pool.clone(),
                    model: name.clone(),
                    cfg: worker_cfg.clone(),
                };
                let (sd, model) = (shutdown.clone(), name.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = worker.run(sd).await {
                        tracing::error!(model, error = %e, "worker stopped");
                    }
                }));
            }
        }

        // Sinks: one consumer group each on the results topic.
        let mut shard_set = None;
        if runs_sinks {
            let results = topics::results(prefix);
            if let Some(dir) = &lake_dir {
                let lake = Lake::open(dir)?;
                let hooks = Arc::new(SinkHooks::default());
                let consumer = Consumer::with_timeouts(
                    &bootstrap,
                    "sluice-sink-lake",
                    &format!("{}.lake", cfg.sink_group()),
                    std::slice::from_ref(&results),
                    hooks.clone(),
                    Some(cfg.sink_group_timeouts()),
                )?;
                let run_suffix = broker.as_ref().map(|_| chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f").to_string());
                let (sink, sd, c) = (LakeSink { lake, run_suffix }, shutdown.clone(), cfg.sink());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = sinks::run(consumer, hooks, sink, c, sd).await {
                        tracing::error!(error = %e, "lake sink stopped");
                    }
                }));
            }
            if !shard_urls.is_empty() {
                let strategy = cfg.shard_strategy().map_err(StartError::Config)?;
                let timeout = Duration::from_millis(cfg.sinks.shard_timeout_ms.max(1));
                let set = Arc::new(ShardSet::open(&shard_urls, strategy, timeout)?);
                shard_set = Some(set.clone());
                let hooks = Arc::new(SinkHooks::default());
                let consumer = Consumer::with_timeouts(
                    &bootstrap,
                    "sluice-sink-shards",
                    &format!("{}.shards", cfg.sink_group()),
                    &[results],
                    hooks.clone(),
                    Some(cfg.sink_group_timeouts()),
                )?;
                let (sink, sd, c) = (ShardSink::new(set), shutdown.clone(), cfg.sink());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = sinks::run(consumer, hooks, sink, c, sd).await {
                        tracing::error!(error = %e, "shard sink stopped");
                    }
                }));
            }
        }

        if runs_sinks && !runs_workers {
            let probe = Producer::new(&bootstrap, "sluice-sink-probe", cfg.produce_timeout())?;
            ops = Some(Ops::new(metrics.clone(), probe).with_sinks(lake_dir.clone(), shard_set.clone()));
        }

        // The ops listener of processes without the REST API.
        let mut http_addr = None;
        if let (Some(ops), false) = (ops, runs_gateway)
            && !cfg.ops.listen.is_empty()
        {
            let addr = cfg.ops.listen.clone();
            let listener =
                TcpListener::bind(&addr).await.map_err(|source| StartError::Listen { addr: addr.clone(), source })?;
            http_addr = listener.local_addr().ok();
            let (router, sd) = (ops.router(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::http::serve(listener, router, sd).await {
                    tracing::error!(error = %e, "ops listener stopped");
                }
            }));
        }

        // Gateway.
        if let Some(catalog) = catalog {
            let addr = cfg.gateway.listen.clone();
            let listener =
                TcpListener::bind(&addr).await.map_err(|source| StartError::Listen { addr: addr.clone(), source })?;
            http_addr = listener.local_addr().ok();
            let producer = Producer::with_max_message_bytes(
                &bootstrap,
                "sluice-gateway",
                cfg.produce_timeout(),
                cfg.kafka.max_message_bytes,
            )?;
            let mut gateway = Gateway::new(producer, store.clone(), catalog, cfg.gateway(), metrics.clone());
            if lake_dir.is_some() || !shard_urls.is_empty() {
                let sources = Sources { lake: lake_dir.clone(), shards: shard_urls.clone() };
                gateway = gateway.with_analytics(Arc::new(Analytics::new(sources, cfg.query_limits())?));
            }
            tasks.extend(gateway.spawn_background(&bootstrap, shutdown.clone()));
            let router = gateway.router();
            let sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::http::serve(listener, router, sd).await {
                    tracing::error!(error = %e, "gateway stopped");
                }
            }));
        }

        // Histogram upkeep for the Prometheus recorder.
        let mut sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => metrics.run_upkeep(),
                    _ = sd.wait() => return,
                }
            }
        }));

        Ok(Sluice {
            http_addr,
            bootstrap,
            kafka_clients,
            embedded_broker: broker.is_some(),
            store_kind: if role == Role::Sink { "none (sinks read the results topic)" } else { store.describe() },
            models: match &pool {
                Some(p) => p
                    .versions()
                    .into_iter()
                    .map(|(n, all, default)| (n, format!("{} (default {default})", all.join(", "))))
                    .collect(),
                None => names.iter().map(|n| (n.clone(), "catalog only".to_owned())).collect(),
            },
            lake: lake_dir,
            shards: shard_set.map_or_else(|| shard_urls.iter().map(|u| redact(u)).collect(), |s| s.urls()),
            trigger,
            tasks,
            broker,
        })
    }

    /// Stops reading new work, drains what is in flight, commits, and
    /// returns when every stage has stopped.
    pub async fn stop(mut self) {
        self.trigger.fire();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        drop(self.broker.take());
    }
}

/// The lake and shards a role writes (sinks) or queries (gateway). `sluice
/// up` defaults to a local lake and two SQLite shards under `./data`.
pub fn sink_targets(cfg: &Config, role: Role) -> (Option<PathBuf>, Vec<String>) {
    let s = &cfg.sinks;
    let mut lake = (!s.lake.is_empty()).then(|| PathBuf::from(&s.lake));
    let mut shards = s.shards.clone();
    if role == Role::Up && s.up_local_defaults && lake.is_none() && shards.is_empty() {
        lake = Some(PathBuf::from("data/lake"));
        if shards.is_empty() {
            shards = (0..2).map(|i| format!("sqlite:data/shards/shard-{i}.db")).collect();
        }
    }
    (lake, shards)
}
