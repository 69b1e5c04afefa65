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

use crate::config::Config;
use crate::gateway::Gateway;
use crate::kafka::{self, Consumer, EmbeddedBroker, KafkaError, Producer};
use crate::shutdown::{self, Trigger};
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
}

/// A running Sluice; [`Sluice::stop`] shuts it down in order.
pub struct Sluice {
    /// Where the REST API listens (gateway roles).
    pub http_addr: Option<SocketAddr>,
    /// `bootstrap.servers` in use.
    pub bootstrap: String,
    /// Whether the broker is the embedded, in-memory one.
    pub embedded_broker: bool,
    /// What backs the results store.
    pub store_kind: &'static str,
    /// Served models: name → versions.
    pub models: Vec<(String, String)>,
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

        // Models: engines for workers, a catalog (no sessions) for the gateway.
        let runs_workers = matches!(role, Role::Up | Role::Worker);
        let runs_gateway = matches!(role, Role::Up | Role::Gateway);
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
        if names.is_empty() {
            return Err(StartError::NoModels(cfg.models.repository.clone()));
        }

        // Topics.
        let prefix = &cfg.kafka.topic_prefix;
        let mut topic_names: Vec<String> = names.iter().map(|m| topics::jobs(prefix, m)).collect();
        topic_names.extend([topics::results(prefix), topics::dlq(prefix)]);
        match &broker {
            Some(b) => {
                for t in &topic_names {
                    b.create_topic(t, cfg.kafka.partitions)?;
                }
            }
            None => kafka::ensure_topics(&bootstrap, &topic_names, cfg.kafka.partitions, cfg.kafka.replication).await?,
        }

        // Results store.
        let store = if cfg.store.redis.is_empty() {
            if role != Role::Up {
                return Err(StartError::Missing("store.redis (--redis)"));
            }
            Store::memory(&cfg.store())
        } else {
            Store::redis(&cfg.store.redis, &cfg.store()).await?
        };

        let worker_cfg = cfg.worker();

        // Workers: one consumer group per model.
        if let Some(pool) = &pool {
            let producer = Producer::new(&bootstrap, &worker_cfg.worker_id, cfg.publish_timeout())?;
            for name in &names {
                let group = format!("{prefix}.workers.{name}");
                let tracker = Arc::new(SharedTracker::default());
                let consumer = Consumer::new(
                    &bootstrap,
                    &worker_cfg.worker_id,
                    &group,
                    &[topics::jobs(prefix, name)],
                    tracker.clone(),
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

        // Gateway.
        let mut http_addr = None;
        if let Some(catalog) = catalog {
            let addr = cfg.gateway.listen.clone();
            let listener =
                TcpListener::bind(&addr).await.map_err(|source| StartError::Listen { addr: addr.clone(), source })?;
            http_addr = listener.local_addr().ok();
            let producer = Producer::new(&bootstrap, "sluice-gateway", cfg.produce_timeout())?;
            let gateway = Gateway::new(producer, store.clone(), catalog, cfg.gateway(), metrics.clone());
            tasks.extend(gateway.spawn_background(&bootstrap, shutdown.clone()));
            let router = gateway.router();
            let sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::gateway::serve(listener, router, sd).await {
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
            embedded_broker: broker.is_some(),
            store_kind: store.describe(),
            models: match &pool {
                Some(p) => p
                    .versions()
                    .into_iter()
                    .map(|(n, all, default)| (n, format!("{} (default {default})", all.join(", "))))
                    .collect(),
                None => names.iter().map(|n| (n.clone(), "catalog only".to_owned())).collect(),
            },
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
