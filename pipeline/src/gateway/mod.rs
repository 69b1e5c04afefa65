//! The REST gateway: accepts jobs into Kafka and serves their records from
//! the results store. Routes are listed once, in [`ROUTES`]-order in
//! [`Gateway::router`], and described in `openapi.json` (served at
//! `/openapi.json`; a test keeps the two equal).
//!
//! [`serve`] takes its listener and a shutdown signal, so tests bind port 0
//! and drive it end to end.

mod auth;
mod batches;
mod error;
mod jobs;
mod limits;
mod sql;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::routing::{MethodRouter, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use sluice_sql::Analytics;
use sluice_workers::ModelCatalog;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::ops::Ops;
pub use auth::{ApiKey, hash_key};
pub use error::ApiError;
use jobs::Waiters;
use limits::{Backlog, RateLimits};

use crate::kafka::{LagProbe, Producer};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// The OpenAPI 3.1 description of the routes (also committed as a file).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route: path and methods. The router is built from this list, and
/// the OpenAPI document must describe exactly these.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/v1/jobs", &["post"]),
    ("/v1/jobs/{id}", &["get", "delete"]),
    ("/v1/batches", &["post"]),
    ("/v1/batches/{id}", &["get"]),
    ("/v1/batches/{id}/results", &["get"]),
    ("/v1/sql", &["post"]),
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/metrics", &["get"]),
    ("/openapi.json", &["get"]),
];

/// Settings of the gateway (see `config/default.toml` for each).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub topic_prefix: String,
    pub default_tenant: String,
    pub max_body_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_items_per_request: usize,
    pub max_batch_lines: usize,
    pub max_in_flight: usize,
    pub max_backlog: i64,
    pub backlog_poll: Duration,
    pub max_wait: Duration,
    pub max_waiters: usize,
    pub rate_per_second: u32,
    pub rate_burst: u32,
    pub api_keys: Vec<ApiKey>,
    /// Longest SQL text of `POST /v1/sql`, and most queries running at once.
    pub max_query_bytes: usize,
    pub max_concurrent_queries: usize,
}

/// Shared state of the handlers (cheap to clone).
#[derive(Clone)]
pub struct Gateway {
    producer: Producer,
    store: Store,
    /// Served models: requests for others get `unknown_model`, and inputs
    /// are checked against the model's limits before they reach Kafka.
    catalog: Arc<ModelCatalog>,
    keys: Arc<auth::ApiKeys>,
    limits: Arc<RateLimits>,
    backlog: Arc<Backlog>,
    /// Bound on submissions being handled at once; past it, 503.
    in_flight: Arc<Semaphore>,
    waiters: Arc<Waiters>,
    cfg: Arc<GatewayConfig>,
    /// `/healthz`, `/readyz` (Kafka and the store) and `/metrics`.
    ops: Ops,
    /// `POST /v1/sql`, when the lake or shards are configured.
    analytics: Option<Arc<Analytics>>,
    /// Bound on SQL queries running at once; past it, 503.
    sql_slots: Arc<Semaphore>,
}

impl Gateway {
    pub fn new(
        producer: Producer,
        store: Store,
        catalog: Arc<ModelCatalog>,
        cfg: GatewayConfig,
        metrics: PrometheusHandle,
    ) -> Gateway {
        if cfg.api_keys.is_empty() {
            tracing::warn!("no API keys configured: the gateway is OPEN (any caller, any tenant)");
        }
        Gateway {
            ops: Ops::new(metrics, producer.clone()).with_store(store.clone()),
            producer,
            store,
            catalog,
            keys: Arc::new(auth::ApiKeys::new(&cfg.api_keys)),
            limits: Arc::new(RateLimits::new(cfg.rate_per_second, cfg.rate_burst, &cfg.api_keys)),
            backlog: Backlog::new(cfg.max_backlog),
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            waiters: Arc::new(Waiters::new(cfg.max_waiters)),
            sql_slots: Arc::new(Semaphore::new(cfg.max_concurrent_queries.max(1))),
            cfg: Arc::new(cfg),
            analytics: None,
        }
    }

    /// Serves `POST /v1/sql` with `analytics`.
    pub fn with_analytics(mut self, analytics: Arc<Analytics>) -> Gateway {
        self.analytics = Some(analytics);
        self
    }

    /// The HTTP routes.
    pub fn router(self) -> Router {
        let batch_limit = DefaultBodyLimit::max(self.cfg.max_batch_bytes);
        let routes: Vec<(&str, MethodRouter<Gateway>)> = vec![
            ("/v1/jobs", post(jobs::submit)),
            ("/v1/jobs/{id}", get(jobs::read).delete(jobs::cancel)),
            ("/v1/batches", post(batches::create).layer(batch_limit)),
            ("/v1/batches/{id}", get(batches::status)),
            ("/v1/batches/{id}/results", get(batches::results)),
            ("/v1/sql", post(sql::query)),
            ("/healthz", get(crate::ops::healthz)),
            ("/readyz", get(|State(gw): State<Gateway>| async move { gw.ops.ready().await })),
            ("/metrics", get(|State(gw): State<Gateway>| async move { gw.ops.metrics() })),
            ("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) })),
        ];
        debug_assert_eq!(
            routes.iter().map(|r| r.0).collect::<Vec<_>>(),
            ROUTES.iter().map(|r| r.0).collect::<Vec<_>>()
        );
        let limit = self.cfg.max_body_bytes;
        let mut router = Router::new();
        for (path, route) in routes {
            router = router.route(path, route);
        }
        router
            .fallback(|uri: Uri| async move { ApiError::NoRoute(uri.path().to_owned()) })
            .layer(DefaultBodyLimit::max(limit))
            .with_state(self)
    }

    /// Background work: backlog sampling per model, long-poll wake-ups,
    /// pruning idle rate limiters. Ends at shutdown.
    pub fn spawn_background(&self, brokers: &str, shutdown: Shutdown) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let probes: Vec<(String, LagProbe)> = self
            .catalog
            .names()
            .into_iter()
            .filter_map(|m| {
                let group = format!("{}.workers.{m}", self.cfg.topic_prefix);
                let topic = sluice_schemas::topics::jobs(&self.cfg.topic_prefix, &m);
                LagProbe::new(brokers, &group, &topic).ok().map(|p| (m, p))
            })
            .collect();
        tasks.push(tokio::spawn(self.backlog.clone().run(probes, self.cfg.backlog_poll, shutdown.clone())));
        let (waiters, notices, sd) = (self.waiters.clone(), self.store.completions(), shutdown.clone());
        tasks.push(tokio::spawn(async move { waiters.run(notices, sd).await }));
        let (limits, mut sd) = (self.limits.clone(), shutdown);
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => limits.prune(),
                    _ = sd.wait() => return,
                }
            }
        }));
        tasks
    }

    /// A slot among the submissions handled at once, or 503.
    fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded {
            why: format!("{} submissions are being handled", self.cfg.max_in_flight),
            retry_after: Duration::from_secs(1),
        })
    }

    fn body_error(&self, e: BytesRejection, limit: usize) -> ApiError {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::InvalidJson(e.body_text())
        }
    }
}

/// Serves `router` on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, router: Router, mut shutdown: Shutdown) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.wait().await }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed OpenAPI document describes exactly the routes.
    #[test]
    fn openapi_lists_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.1")), Some(true));
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys().filter(|k| *k != "parameters") {
                documented.push((path.clone(), method.clone()));
            }
        }
        documented.sort();
        let mut routed: Vec<(String, String)> =
            ROUTES.iter().flat_map(|(p, ms)| ms.iter().map(move |m| (p.to_string(), m.to_string()))).collect();
        routed.sort();
        assert_eq!(documented, routed);
    }
}
