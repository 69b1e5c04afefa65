//! Wiring: builds the stages a role needs from a [`Config`] and runs them
//! until stopped. `sluice up` is [`Role::Up`]: everything in one process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_schemas::topics;
use sluice_workers::{ModelCatalog, ModelPool, ModelRepository, WorkerError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use sluice_sql::shards::redact;
use sluice_sql::{Analytics, IndexConfig, IndexError, Lake, QueryError, Sources, VectorIndex};

use crate::config::Config;
use crate::gateway::{Gateway, GatewayConfig};
use crate::kafka::{self, Consumer, EmbeddedBroker, KafkaError, Producer};
use crate::notifier::{self, NotifierError};
use crate::ops::Ops;
use crate::shutdown::{self, Shutdown, Trigger};
use crate::sinks::{self, SinkError};
use crate::store::{Store, StoreError};
use crate::telemetry;
use crate::worker::{SharedTracker, Worker, WorkerConfig};

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
    /// The notifier only: completion callbacks.
    Notifier,
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
    #[error(transparent)]
    Analytics(#[from] QueryError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("the notifier: {0}")]
    Notifier(#[from] NotifierError),
    #[error("the search index: {0}")]
    Index(#[from] IndexError),
    #[error("the lake: {0}")]
    Lake(#[from] sluice_sql::LakeError),
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

/// The stages a [`Role`] runs in this process.
#[derive(Debug, Clone, Copy)]
struct Stages {
    workers: bool,
    gateway: bool,
    sinks: bool,
    notifier: bool,
}

impl Role {
    fn stages(self) -> Stages {
        let none = Stages { workers: false, gateway: false, sinks: false, notifier: false };
        match self {
            // The notifier too, when callbacks are on (see `Sluice::start`).
            Role::Up => Stages { workers: true, gateway: true, sinks: true, notifier: true },
            Role::Worker => Stages { workers: true, ..none },
            Role::Gateway => Stages { gateway: true, ..none },
            Role::Sink => Stages { sinks: true, ..none },
            Role::Notifier => Stages { notifier: true, ..none },
        }
    }
}

/// What every stage of one process shares.
struct Shared<'a> {
    cfg: &'a Config,
    bootstrap: &'a str,
    shutdown: &'a Shutdown,
}

impl Sluice {
    /// Starts the stages of `role`: each stage has its own `start_*` below;
    /// this only decides which run and builds what they share once (the
    /// broker, the topics, the results store, the readiness checks).
    pub async fn start(cfg: Config, role: Role) -> Result<Sluice, StartError> {
        let mut stages = role.stages();
        if role == Role::Up && cfg.callbacks.signing_key.is_empty() {
            // No key, no signed deliveries: the gateway refuses callbacks.
            stages.notifier = false;
        }
        if role == Role::Notifier && cfg.callbacks.signing_key.is_empty() {
            return Err(StartError::Missing("callbacks.signing_key (SLUICE__CALLBACKS__SIGNING_KEY)"));
        }
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
        let kafka_clients = match &broker {
            Some(_) if !cfg.kafka.embedded_listen.is_empty() => forward_clients(&cfg, &bootstrap, &shutdown).await,
            _ => bootstrap.clone(),
        };
        let shared = Shared { cfg: &cfg, bootstrap: &bootstrap, shutdown: &shutdown };

        // Models: engines for workers, a catalog (no sessions) for the gateway.
        let (lake_dir, shard_urls) = sink_targets(&cfg, role);
        if role == Role::Sink && lake_dir.is_none() && shard_urls.is_empty() {
            return Err(StartError::Missing("sinks.lake or sinks.shards (--lake / --shard)"));
        }
        let pool = if stages.workers {
            let repo = ModelRepository::new(&cfg.models.repository);
            let pool = ModelPool::start(repo, cfg.models.serve.clone(), cfg.engine()).await?;
            tasks.push(pool.spawn_watcher(cfg.poll_interval()));
            Some(pool)
        } else {
            None
        };
        let catalog = if stages.gateway { Some(load_catalog(&shared, &mut tasks).await?) } else { None };
        let names: Vec<String> = match (&pool, &catalog) {
            (Some(p), _) => p.models(),
            (None, Some(c)) => c.names(),
            (None, None) => Vec::new(),
        };
        if names.is_empty() && (stages.workers || stages.gateway) {
            return Err(StartError::NoModels(cfg.models.repository.clone()));
        }

        // Topics.
        let prefix = &cfg.kafka.topic_prefix;
        let mut topic_names: Vec<String> = names.iter().map(|m| topics::jobs(prefix, m)).collect();
        topic_names.extend([topics::results(prefix), topics::dlq(prefix)]);
        if stages.notifier {
            topic_names.push(topics::callbacks_dlq(prefix));
        }
        match &broker {
            Some(b) => {
                for t in &topic_names {
                    b.create_topic(t, cfg.kafka.embedded_partitions)?;
                }
            }
            None => kafka::ensure_topics(&bootstrap, &topic_names, cfg.kafka.partitions, cfg.kafka.replication).await?,
        }

        // Results store: the workers write it, the gateway reads it, the
        // notifier counts batches' lines in it; the sinks read the results
        // topic instead.
        let store = if !(stages.workers || stages.gateway || stages.notifier) {
            None
        } else if cfg.store.redis.is_empty() {
            if role != Role::Up {
                return Err(StartError::Missing("store.redis (--redis)"));
            }
            Some(Store::memory(&cfg.store()))
        } else {
            Some(Store::redis(&cfg.store.redis, &cfg.store()).await?)
        };

        // The stages.
        let worker_producer = match (&pool, &store) {
            (Some(pool), Some(store)) => Some(start_workers(&shared, pool, store, &names, &mut tasks)?),
            _ => None,
        };
        let shard_set = if stages.sinks {
            let shards = sinks::open_shards(&cfg, &shard_urls)?;
            let ctx = sinks::Context {
                cfg: &cfg,
                bootstrap: &bootstrap,
                shutdown: &shutdown,
                lake: lake_dir.as_deref(),
                shards: shards.clone(),
                run_suffix: broker.as_ref().map(|_| chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f").to_string()),
            };
            sinks::start(&ctx, &mut tasks)?;
            shards
        } else {
            None
        };

        let notifier = match stages.notifier {
            true => Some(notifier::start(
                &cfg,
                &bootstrap,
                store.clone().expect("the notifier has a store"),
                &shutdown,
                &mut tasks,
            )?),
            false => None,
        };

        // Readiness: one `Ops` over everything this process depends on.
        let gateway_producer = match stages.gateway {
            true => Some(Producer::with_max_message_bytes(
                &bootstrap,
                "sluice-gateway",
                cfg.produce_timeout(),
                cfg.kafka.max_message_bytes,
            )?),
            false => None,
        };
        let probe = match worker_producer.as_ref().or(gateway_producer.as_ref()) {
            Some(p) => p.clone(),
            None => Producer::new(&bootstrap, "sluice-probe", cfg.produce_timeout())?,
        };
        let mut ops = Ops::new(metrics.clone(), probe);
        if let Some(store) = &store {
            ops = ops.with_store(store.clone());
        }
        if let Some(pool) = &pool {
            ops = ops.with_models(pool.clone());
        }
        if stages.sinks {
            ops = ops.with_sinks(lake_dir.clone(), shard_set.clone());
        }
        if let Some(health) = notifier {
            ops = ops.with_notifier(health);
        }

        // HTTP: the REST API (with the ops routes among its own), or the ops
        // routes alone.
        let http_addr = match (catalog, gateway_producer, &store) {
            (Some(catalog), Some(producer), Some(store)) => {
                let analytics = (lake_dir.is_some() || !shard_urls.is_empty())
                    .then(|| {
                        Analytics::new(
                            Sources { lake: lake_dir.clone(), shards: shard_urls.clone() },
                            cfg.query_limits(),
                        )
                    })
                    .transpose()?;
                let mut gateway = Gateway::new(producer, store.clone(), catalog, GatewayConfig::from_config(&cfg), ops);
                if let (Some(lake), Some(index_cfg)) = (&lake_dir, cfg.index_config()) {
                    // The index speeds searches up; without it they are exact.
                    match open_index(lake, index_cfg).await {
                        Ok(index) => gateway = gateway.with_index(index),
                        Err(e) => tracing::error!(error = %e, "no approximate search index: every search is exact"),
                    }
                }
                Some(start_gateway(&shared, gateway, analytics, &mut tasks).await?)
            }
            _ if cfg.ops.listen.is_empty() => None,
            _ => Some(serve_on(&cfg.ops.listen, ops.router(), "ops listener", &shutdown, &mut tasks).await?),
        };

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
            store_kind: store.as_ref().map_or("none (this role reads the results topic)", |s| s.describe()),
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

/// Accepts Kafka clients of the embedded broker on `kafka.embedded_listen`;
/// where that address is taken, clients use the broker's own address.
async fn forward_clients(cfg: &Config, bootstrap: &str, shutdown: &Shutdown) -> String {
    let mut sd = shutdown.clone();
    let stop = async move { sd.wait().await };
    match kafka::forward_bootstrap(&cfg.kafka.embedded_listen, bootstrap.to_owned(), stop).await {
        Ok(addr) => addr.to_string(),
        Err(e) => {
            tracing::warn!(
                listen = %cfg.kafka.embedded_listen,
                error = %e,
                "cannot accept Kafka clients there (kafka.embedded_listen); they can use {bootstrap}"
            );
            bootstrap.to_owned()
        }
    }
}

/// The gateway's model catalog, refreshed every `models.poll_interval_ms`.
async fn load_catalog(sh: &Shared<'_>, tasks: &mut Vec<JoinHandle<()>>) -> Result<Arc<ModelCatalog>, StartError> {
    let (repo, serve) = (ModelRepository::new(&sh.cfg.models.repository), sh.cfg.models.serve.clone());
    let catalog = Arc::new(
        tokio::task::spawn_blocking(move || ModelCatalog::load(repo, serve))
            .await
            .expect("catalog loading does not panic. This is a bug.")?,
    );
    let (c, every, mut sd) = (catalog.clone(), sh.cfg.poll_interval(), sh.shutdown.clone());
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
    Ok(catalog)
}

/// The worker stage: one consumer group per served model, all publishing
/// through one producer, which is returned.
fn start_workers(
    sh: &Shared<'_>,
    pool: &ModelPool,
    store: &Store,
    models: &[String],
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Producer, StartError> {
    let (cfg, prefix) = (sh.cfg, &sh.cfg.kafka.topic_prefix);
    let worker_cfg = WorkerConfig::from_config(cfg);
    let producer = Producer::with_max_message_bytes(
        sh.bootstrap,
        &worker_cfg.worker_id,
        cfg.publish_timeout(),
        cfg.kafka.max_message_bytes,
    )?;
    for name in models {
        let tracker = Arc::new(SharedTracker::default());
        let consumer = Consumer::with_timeouts(
            sh.bootstrap,
            &worker_cfg.worker_id,
            &format!("{prefix}.workers.{name}"),
            &[topics::jobs(prefix, name)],
            tracker.clone(),
            Some(WorkerConfig::group_timeouts(cfg)),
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
        let (sd, model) = (sh.shutdown.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = worker.run(sd).await {
                tracing::error!(model, error = %e, "worker stopped");
            }
        }));
    }
    Ok(producer)
}

/// The approximate search indexes over `lake`, from their snapshot (read on
/// a blocking thread: it may be large).
async fn open_index(lake: &Path, cfg: IndexConfig) -> Result<Arc<VectorIndex>, StartError> {
    let lake = Lake::open(lake)?;
    let index = tokio::task::spawn_blocking(move || VectorIndex::open(lake, cfg))
        .await
        .map_err(|e| IndexError::Native(format!("opening the search index: {e}")))??;
    let stats = index.stats();
    tracing::info!(vectors = stats.loaded, graphs = stats.graphs, "search index opened");
    Ok(Arc::new(index))
}

/// The REST gateway (serving its `Ops`'s routes among its own) and its
/// background work. Returns where it listens.
async fn start_gateway(
    sh: &Shared<'_>,
    mut gateway: Gateway,
    analytics: Option<Analytics>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<SocketAddr, StartError> {
    if let Some(analytics) = analytics {
        gateway = gateway.with_analytics(Arc::new(analytics));
    }
    tasks.extend(gateway.spawn_background(sh.bootstrap, sh.shutdown.clone()));
    serve_on(&sh.cfg.gateway.listen, gateway.router(), "gateway", sh.shutdown, tasks).await
}

/// Binds `addr` and serves `router` on it until shutdown.
async fn serve_on(
    addr: &str,
    router: axum::Router,
    what: &'static str,
    shutdown: &Shutdown,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<SocketAddr, StartError> {
    let listener =
        TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr: addr.to_owned(), source })?;
    let local = listener.local_addr().map_err(|source| StartError::Listen { addr: addr.to_owned(), source })?;
    let sd = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = crate::http::serve(listener, router, sd).await {
            tracing::error!(error = %e, "{what} stopped");
        }
    }));
    Ok(local)
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
