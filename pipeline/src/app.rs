//! Wiring: builds the stages a role needs from a [`Config`] and runs them
//! until stopped. `sluice up` is [`Role::Up`]: everything in one process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sluice_schemas::topics;
use sluice_workers::{InferenceHandle, ModelRepository, ModelVersion, WorkerError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::kafka::{self, Consumer, EmbeddedBroker, KafkaError, Producer};
use crate::shutdown::{self, Trigger};
use crate::store::{Store, StoreError};
use crate::telemetry;

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
    /// Served models, name → version.
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

        // Models.
        let repo = ModelRepository::new(&cfg.models.repository);
        let versions = load_models(repo, cfg.models.serve.clone()).await?;
        if versions.is_empty() {
            return Err(StartError::NoModels(cfg.models.repository.clone()));
        }

        // Topics.
        let prefix = &cfg.kafka.topic_prefix;
        let mut names: Vec<String> = versions.keys().map(|m| topics::jobs(prefix, m)).collect();
        names.extend([topics::results(prefix), topics::dlq(prefix)]);
        match &broker {
            Some(b) => {
                for t in &names {
                    b.create_topic(t, cfg.kafka.partitions)?;
                }
            }
            None => kafka::ensure_topics(&bootstrap, &names, cfg.kafka.partitions, cfg.kafka.replication).await?,
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
        let producer = Producer::new(&bootstrap, &worker_cfg.worker_id, cfg.produce_timeout())?;

        // Workers: one consumer group and one engine per model.
        if matches!(role, Role::Up | Role::Worker) {
            for (name, version) in &versions {
                let engine = InferenceHandle::start(version.clone(), cfg.engine()).await?;
                let group = format!("{prefix}.workers.{name}");
                let consumer = Consumer::new(&bootstrap, &worker_cfg.worker_id, &group, &[topics::jobs(prefix, name)])?;
                let engines = HashMap::from([(name.clone(), engine)]);
                let (p, s, c, sd) = (producer.clone(), store.clone(), worker_cfg.clone(), shutdown.clone());
                let model = name.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = crate::worker::run(consumer, p, s, engines, c, sd).await {
                        tracing::error!(model, error = %e, "worker stopped");
                    }
                }));
            }
        }

        // Gateway.
        let mut http_addr = None;
        if matches!(role, Role::Up | Role::Gateway) {
            let addr = cfg.gateway.listen.clone();
            let listener =
                TcpListener::bind(&addr).await.map_err(|source| StartError::Listen { addr: addr.clone(), source })?;
            http_addr = listener.local_addr().ok();
            let router =
                Gateway::new(producer.clone(), store.clone(), versions.clone(), cfg.gateway(), metrics.clone())
                    .router();
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
            models: versions.iter().map(|(n, v)| (n.clone(), v.spec.version.clone())).collect(),
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

/// The newest verified version of each model to serve (file hashing runs on
/// the blocking pool).
async fn load_models(repo: ModelRepository, serve: Vec<String>) -> Result<HashMap<String, ModelVersion>, WorkerError> {
    tokio::task::spawn_blocking(move || {
        let names = if serve.is_empty() { repo.model_names()? } else { serve };
        names.into_iter().map(|n| Ok((n.clone(), repo.latest(&n)?))).collect()
    })
    .await
    .expect("model loading does not panic. This is a bug.")
}
