//! The operational endpoints of every process: `GET /healthz` (the process
//! is alive), `GET /readyz` (what it depends on answers) and `GET /metrics`
//! (Prometheus text), for Kubernetes probes and Prometheus scrapes. The
//! processes that serve no REST API (`sluice worker`, `sluice sink`) serve
//! [`Ops::router`] on their own listener; the gateway serves the same three
//! routes among its own.
//!
//! Readiness of a gateway: Kafka and the results store answer. Of a worker:
//! the same, and no served
//! model's circuit breaker is open (an open breaker holds its jobs back in
//! Kafka). Of a sink: Kafka answers, the lake's directory exists and every
//! shard answers `SELECT 1`. A process running several stages (`sluice up`)
//! has one `Ops` holding the checks of them all. Each check is bounded by
//! [`CHECK_TIMEOUT`], so a probe never hangs on a dead dependency.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Map, Value, json};
use sluice_sql::ShardSet;
use sluice_workers::{BreakerState, ModelPool};

use crate::http::ApiError;
use crate::kafka::Producer;
use crate::notifier;
use crate::store::Store;

/// Longest one readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a process's readiness depends on.
#[derive(Clone)]
pub struct Ops {
    metrics: PrometheusHandle,
    /// Answers metadata requests while Kafka is reachable.
    kafka: Producer,
    store: Option<Store>,
    pool: Option<ModelPool>,
    lake: Option<PathBuf>,
    shards: Option<Arc<ShardSet>>,
    notifier: Option<Arc<notifier::Health>>,
}

impl Ops {
    pub fn new(metrics: PrometheusHandle, kafka: Producer) -> Ops {
        Ops { metrics, kafka, store: None, pool: None, lake: None, shards: None, notifier: None }
    }

    /// The results store counts too (gateway, worker).
    pub fn with_store(mut self, store: Store) -> Ops {
        self.store = Some(store);
        self
    }

    /// The served models' circuit breakers count too (worker).
    pub fn with_models(mut self, pool: ModelPool) -> Ops {
        self.pool = Some(pool);
        self
    }

    /// A sink: its lake and shards count too.
    pub fn with_sinks(mut self, lake: Option<PathBuf>, shards: Option<Arc<ShardSet>>) -> Ops {
        self.lake = lake;
        self.shards = shards;
        self
    }

    /// The three routes, and `no_route` for anything else.
    /// Reports the notifier (not ready once its consumer loop has stopped).
    pub fn with_notifier(mut self, health: Arc<notifier::Health>) -> Ops {
        self.notifier = Some(health);
        self
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(|State(ops): State<Ops>| async move { ops.ready().await }))
            .route("/metrics", get(|State(ops): State<Ops>| async move { ops.metrics() }))
            .fallback(|uri: Uri| async move { ApiError::NoRoute(uri.path().to_owned()) })
            .with_state(self)
    }

    /// `GET /readyz`: 200 when every check passes, else 503; the body names
    /// each check's outcome.
    pub async fn ready(&self) -> Response {
        let (ok, body) = self.readiness().await;
        let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (status, Json(body)).into_response()
    }

    /// `GET /metrics`: the process's Prometheus text.
    pub fn metrics(&self) -> Response {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], self.metrics.render()).into_response()
    }

    /// Runs every check, all at once (so a probe takes at most
    /// [`CHECK_TIMEOUT`]); `(ready, report)`.
    pub async fn readiness(&self) -> (bool, Value) {
        let kafka = bounded(async { self.kafka.ping().await.map_err(|e| e.to_string()) });
        let store = async {
            match &self.store {
                Some(s) => Some(bounded(async { s.ping().await.map_err(|e| e.to_string()) }).await),
                None => None,
            }
        };
        let shards = async {
            let Some(set) = &self.shards else { return Vec::new() };
            let pings = (0..set.len()).map(|i| bounded(async move { set.ping(i).await.map_err(|e| e.to_string()) }));
            set.urls().into_iter().zip(futures::future::join_all(pings).await).collect()
        };
        let (kafka, store, shards) = tokio::join!(kafka, store, shards);

        let mut ok = true;
        let mut report = Map::new();
        let mut word = |r: Result<(), String>| {
            ok &= r.is_ok();
            json!(r.err().unwrap_or_else(|| "ok".into()))
        };
        report.insert("kafka".into(), word(kafka));
        if let Some(r) = store {
            report.insert("store".into(), word(r));
        }
        if let Some(lake) = &self.lake {
            let r = if lake.is_dir() { Ok(()) } else { Err(format!("{} is not a directory", lake.display())) };
            report.insert("lake".into(), word(r));
        }
        if self.shards.is_some() {
            let each: Vec<Value> = shards
                .into_iter()
                .enumerate()
                .map(|(i, (url, r))| json!({"shard": i, "url": url, "status": word(r)}))
                .collect();
            report.insert("shards".into(), Value::Array(each));
        }
        if let Some(health) = &self.notifier {
            let (running, report_) = health.report();
            ok &= running;
            report.insert("notifier".into(), report_);
        }
        if let Some(pool) = &self.pool {
            let mut models = Map::new();
            for name in pool.models() {
                let state = pool.health(&name);
                ok &= matches!(state, Some(BreakerState::Closed | BreakerState::HalfOpen));
                let word = match state {
                    Some(BreakerState::Closed) => "ok",
                    Some(BreakerState::HalfOpen) => "probing",
                    Some(BreakerState::Open) => "breaker_open",
                    None => "not_loaded",
                };
                models.insert(name, json!(word));
            }
            report.insert("models".into(), Value::Object(models));
        }
        report.insert("status".into(), json!(if ok { "ready" } else { "not_ready" }));
        (ok, Value::Object(report))
    }
}

async fn bounded(check: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())))
}

/// `GET /healthz`: answering at all is the answer.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    operation_id = "healthz",
    summary = "The process is alive",
    security(()),
    responses((status = 200, body = Object, description = "ok: `{\"status\": \"ok\"}`")),
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dependency_that_never_answers_fails_its_check_after_the_timeout() {
        let started = tokio::time::Instant::now();
        let r = bounded(std::future::pending()).await;
        assert_eq!(r, Err("no answer within 2 s".to_owned()));
        assert_eq!(started.elapsed(), CHECK_TIMEOUT);
        assert_eq!(bounded(async { Err("refused".to_owned()) }).await, Err("refused".to_owned()));
        assert_eq!(bounded(async { Ok(()) }).await, Ok(()));
    }
}
