//! The REST gateway: accepts jobs into Kafka and serves their records from
//! the results store. Each route is declared once, in `routes`: the
//! handler's `#[utoipa::path]` attribute names its method, path, parameters,
//! body and every status it answers, and `utoipa_axum` builds both the
//! router and the OpenAPI 3.1 document ([`openapi`], served at
//! `/openapi.json`) from that one list.
//!
//! [`serve`] takes its listener and a shutdown signal, so tests bind port 0
//! and drive it end to end.

mod auth;
mod batches;
mod callbacks;
mod jobs;
mod limits;
mod openapi;
mod search;
mod sql;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sluice_sql::{Analytics, VectorIndex};
use sluice_workers::ModelCatalog;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

pub use crate::config::ApiKey;
use crate::config::Config;
pub use crate::http::ApiError;
use crate::ops::Ops;
pub use auth::hash_key;
use jobs::Waiters;
use limits::{Backlog, RateLimits};

use crate::kafka::{LagProbe, Producer};
use crate::notifier::{Policy, Refusal};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// The OpenAPI 3.1 document of the REST API, generated from the same
/// declarations as the router (see [`Gateway::router`]).
pub fn openapi() -> utoipa::openapi::OpenApi {
    // The batch body limit is a layer of the router, not part of the document.
    routes(DefaultBodyLimit::disable()).split_for_parts().1
}

/// Every route, declared once: each `routes!` adds the handlers to the
/// router and their `#[utoipa::path]` descriptions to the document.
fn routes(batch_limit: DefaultBodyLimit) -> OpenApiRouter<Gateway> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(jobs::submit))
        .routes(routes!(jobs::read, jobs::cancel))
        .routes(routes!(batches::create).layer(batch_limit))
        .routes(routes!(batches::status))
        .routes(routes!(batches::results))
        .routes(routes!(sql::query))
        .routes(routes!(search::search))
        .routes(routes!(callbacks::secret))
        .routes(routes!(crate::ops::healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
}

/// `GET /readyz` of the gateway: Kafka and the results store answer.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    operation_id = "readyz",
    summary = "Kafka and the results store answer",
    security(()),
    responses(
        (status = 200, body = Object, description = "ready; the body names each check's outcome"),
        (status = 503, body = Object, description = "not ready; the body says which dependency failed"),
    ),
)]
async fn readyz(State(gw): State<Gateway>) -> Response {
    gw.ops.ready().await
}

/// `GET /metrics`: the process's Prometheus text.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    operation_id = "metrics",
    summary = "Prometheus metrics (sluice_*)",
    security(()),
    responses((status = 200, body = String, content_type = "text/plain", description = "Prometheus text format")),
)]
async fn metrics(State(gw): State<Gateway>) -> Response {
    gw.ops.metrics()
}

/// `GET /openapi.json`: [`openapi`], made once.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    operation_id = "openapi",
    summary = "This document",
    security(()),
    responses((status = 200, body = Object, description = "OpenAPI 3.1")),
)]
async fn openapi_json() -> Response {
    static DOCUMENT: LazyLock<String> =
        LazyLock::new(|| openapi().to_pretty_json().expect("the OpenAPI document serialises. This is a bug."));
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT.as_str()).into_response()
}

/// Settings of the gateway (see `config/default.toml` for each).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub topic_prefix: String,
    pub default_tenant: String,
    pub max_body_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_items_per_request: usize,
    pub max_batch_lines: usize,
    /// Batch uploads whose bodies are being read at once (503 beyond), and
    /// the longest one body may take to arrive (408).
    pub max_concurrent_uploads: usize,
    pub upload_timeout: Duration,
    pub max_in_flight: usize,
    pub max_backlog: i64,
    pub backlog_poll: Duration,
    pub max_wait: Duration,
    pub max_waiters: usize,
    pub max_waiters_per_tenant: usize,
    pub rate_per_second: u32,
    pub rate_burst: u32,
    pub api_keys: Vec<ApiKey>,
    /// Longest SQL text of `POST /v1/sql`, and most queries running at once.
    pub max_query_bytes: usize,
    pub max_concurrent_queries: usize,
    /// Open mode (no API keys): a query that names no tenant sees every
    /// tenant's rows only when this is set; otherwise `default_tenant`'s.
    pub open_mode_sql_all_tenants: bool,
    /// How often the approximate search indexes apply new lake flushes.
    pub index_refresh: Duration,
    /// Where callbacks may go; why none may (callbacks off, or an invalid
    /// `callbacks.allow_networks`).
    pub callbacks: Result<Arc<Policy>, Refusal>,
    /// `callbacks.signing_key`: tenants' secrets are derived from it.
    pub callback_signing_key: String,
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
    /// `/healthz`, `/readyz` (what this process depends on) and `/metrics`.
    ops: Ops,
    /// `POST /v1/sql`, when the lake or shards are configured.
    analytics: Option<Arc<Analytics>>,
    /// The approximate indexes of `POST /v1/search`, when the lake is
    /// configured and `search.index` is on.
    index: Option<Arc<VectorIndex>>,
    /// Bound on SQL queries and searches running at once; past it, 503.
    sql_slots: Arc<Semaphore>,
    /// `max_concurrent_uploads` slots.
    upload_slots: Arc<Semaphore>,
}

impl GatewayConfig {
    pub fn from_config(cfg: &Config) -> GatewayConfig {
        let g = &cfg.gateway;
        GatewayConfig {
            topic_prefix: cfg.kafka.topic_prefix.clone(),
            default_tenant: g.default_tenant.clone(),
            max_body_bytes: g.max_body_bytes,
            max_batch_bytes: g.max_batch_bytes,
            max_items_per_request: g.max_items_per_request,
            max_batch_lines: g.max_batch_lines,
            max_concurrent_uploads: g.max_concurrent_uploads,
            upload_timeout: Duration::from_millis(g.upload_timeout_ms.max(1)),
            max_in_flight: g.max_in_flight,
            max_backlog: g.max_backlog,
            backlog_poll: Duration::from_millis(g.backlog_poll_ms.max(50)),
            max_wait: Duration::from_secs(g.max_wait_secs),
            max_waiters: g.max_waiters,
            max_waiters_per_tenant: g.max_waiters_per_tenant,
            rate_per_second: g.rate_per_second,
            rate_burst: g.rate_burst,
            api_keys: g.api_keys.clone(),
            max_query_bytes: cfg.sql.max_query_bytes,
            max_concurrent_queries: cfg.sql.max_concurrent,
            open_mode_sql_all_tenants: cfg.sql.open_mode_all_tenants,
            index_refresh: cfg.index_refresh_interval(),
            callbacks: match cfg.callbacks.signing_key.as_str() {
                "" => Err(Refusal::Off),
                _ => Policy::from_config(&cfg.callbacks).map(Arc::new).map_err(Refusal::Invalid),
            },
            callback_signing_key: cfg.callbacks.signing_key.clone(),
        }
    }
}

impl Gateway {
    pub fn new(producer: Producer, store: Store, catalog: Arc<ModelCatalog>, cfg: GatewayConfig, ops: Ops) -> Gateway {
        if cfg.api_keys.is_empty() {
            tracing::warn!("no API keys configured: the gateway is OPEN (any caller, any tenant)");
        }
        Gateway {
            ops,
            producer,
            store,
            catalog,
            keys: Arc::new(auth::ApiKeys::new(&cfg.api_keys)),
            limits: Arc::new(RateLimits::new(cfg.rate_per_second, cfg.rate_burst, &cfg.api_keys)),
            backlog: Backlog::new(cfg.max_backlog),
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            waiters: Arc::new(Waiters::new(cfg.max_waiters, cfg.max_waiters_per_tenant)),
            sql_slots: Arc::new(Semaphore::new(cfg.max_concurrent_queries.max(1))),
            upload_slots: Arc::new(Semaphore::new(cfg.max_concurrent_uploads.max(1))),
            cfg: Arc::new(cfg),
            analytics: None,
            index: None,
        }
    }

    /// Answers `POST /v1/search` from `index` unless a search asks for
    /// `exact`, and keeps `index` refreshed (see [`Gateway::spawn_background`]).
    pub fn with_index(mut self, index: Arc<VectorIndex>) -> Gateway {
        self.index = Some(index);
        self
    }

    /// Serves `POST /v1/sql` with `analytics`.
    pub fn with_analytics(mut self, analytics: Arc<Analytics>) -> Gateway {
        self.analytics = Some(analytics);
        self
    }

    /// The HTTP routes: those of [`openapi`], `method_not_allowed` for
    /// another method on one of their paths, and `no_route` for anything
    /// else. Bodies are bounded by `max_body_bytes` (`max_batch_bytes` for
    /// `POST /v1/batches`).
    pub fn router(self) -> Router {
        let (router, _) = routes(DefaultBodyLimit::max(self.cfg.max_batch_bytes)).split_for_parts();
        router
            .fallback(|uri: Uri| async move { ApiError::NoRoute(uri.path().to_owned()) })
            .method_not_allowed_fallback(|method: axum::http::Method, uri: Uri| async move {
                ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_owned() }
            })
            .layer(DefaultBodyLimit::max(self.cfg.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(self.clone(), count_responses))
            .with_state(self)
    }

    /// Background work: backlog sampling per model, long-poll wake-ups,
    /// pruning idle rate limiters, refreshing the search index. Ends at
    /// shutdown.
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
        if let Some(index) = self.index.clone() {
            tasks.push(tokio::spawn(search::keep_index(index, self.cfg.index_refresh, shutdown.clone())));
        }
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

/// Counts every answer under `/v1` by the caller's tenant and status code
/// (`sluice_gateway_responses_total`): what a dashboard shows as 202s, 429s
/// and 503s per tenant. The tenant label has a bounded set of values
/// ([`auth::ApiKeys::tenant_label`]).
async fn count_responses(
    State(gw): State<Gateway>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let tenant = gw.keys.tenant_label(req.headers());
    let response = next.run(req).await;
    let code = response.status().as_str().to_owned();
    metrics::counter!(sluice_schemas::metrics::GATEWAY_RESPONSES.name, "tenant" => tenant, "code" => code).increment(1);
    response
}

#[cfg(test)]
mod tests;
