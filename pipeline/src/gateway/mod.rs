//! The REST gateway: accepts jobs into Kafka and serves their records from
//! the results store.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/jobs` | validate, produce to `<prefix>.jobs.<model>`, record `queued`, answer 202 |
//! | `GET /v1/jobs/{id}` | the job's record (status, result), or 404 |
//! | `DELETE /v1/jobs/{id}` | cancel a job that has not finished (409 if it has) |
//! | `GET /healthz` | the process is alive |
//! | `GET /readyz` | Kafka and the results store answer |
//! | `GET /metrics` | Prometheus text |
//!
//! [`serve`] takes its listener and a shutdown signal, so tests bind port 0
//! and drive it end to end.

mod error;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use sluice_schemas::{ErrorCode, JobRequest, JobResult, headers, topics, valid_job_id};
use sluice_workers::ModelCatalog;
use tokio::net::TcpListener;

pub use error::ApiError;

use crate::kafka::Producer;
use crate::shutdown::Shutdown;
use crate::store::{Cancel, Store};

/// Settings of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Topic prefix shared with the workers.
    pub topic_prefix: String,
    /// Tenant of jobs that name none (until API keys map keys to tenants).
    pub default_tenant: String,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Gateway {
    producer: Producer,
    store: Store,
    /// Served models: requests for others get `unknown_model`, and inputs
    /// are checked against the model's limits before they reach Kafka.
    catalog: Arc<ModelCatalog>,
    cfg: Arc<GatewayConfig>,
    metrics: PrometheusHandle,
}

impl Gateway {
    pub fn new(
        producer: Producer,
        store: Store,
        catalog: Arc<ModelCatalog>,
        cfg: GatewayConfig,
        metrics: PrometheusHandle,
    ) -> Gateway {
        Gateway { producer, store, catalog, cfg: Arc::new(cfg), metrics }
    }

    /// The HTTP routes.
    pub fn router(self) -> Router {
        let limit = self.cfg.max_body_bytes;
        Router::new()
            .route("/v1/jobs", post(submit_job))
            .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
            .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
            .route("/readyz", get(ready))
            .route("/metrics", get(prometheus))
            .fallback(|uri: Uri| async move { ApiError::NoRoute(uri.path().to_owned()) })
            .layer(DefaultBodyLimit::max(limit))
            .with_state(self)
    }
}

/// Serves `router` on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, router: Router, mut shutdown: Shutdown) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.wait().await }).await
}

async fn submit_job(
    State(gw): State<Gateway>,
    headers_in: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(gw.cfg.max_body_bytes)
        } else {
            ApiError::InvalidJson(e.body_text())
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody);
    }
    let mut value: Value = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Some(obj) = value.as_object_mut() else {
        return Err(ApiError::Invalid { code: ErrorCode::SchemaViolation, message: "expected a JSON object".into() });
    };
    obj.entry("job_id").or_insert_with(|| Value::String(uuid::Uuid::now_v7().to_string()));
    obj.entry("tenant").or_insert_with(|| Value::String(gw.cfg.default_tenant.clone()));
    // The gateway's clock starts the queue time, whatever the client claims.
    obj.insert("submitted_at".into(), Value::String(Utc::now().to_rfc3339()));
    let req = JobRequest::from_value(value).map_err(|e| ApiError::Invalid { code: e.code, message: e.message })?;

    gw.catalog.check(&req).map_err(|(code, message)| ApiError::Invalid { code, message })?;

    let payload = serde_json::to_vec(&req).expect("JobRequest serialises. This is a bug.");
    let mut hdrs: Vec<(&str, &[u8])> = vec![(headers::TENANT, req.tenant.as_bytes())];
    if let Some(tp) = headers_in.get(headers::TRACEPARENT) {
        hdrs.push((headers::TRACEPARENT, tp.as_bytes()));
    }
    let topic = topics::jobs(&gw.cfg.topic_prefix, &req.model);
    gw.producer.send(&topic, Some(req.job_id.as_bytes()), &payload, &hdrs).await?;
    // Once in Kafka the job is accepted; the `queued` record is for polling
    // and may lose the race against a fast worker, which the store resolves.
    if let Err(e) = gw.store.put(&JobResult::queued(&req)).await {
        tracing::warn!(job_id = %req.job_id, error = %e, "job accepted but its queued record was not stored");
    }
    metrics::counter!("sluice_jobs_submitted_total", "model" => req.model.clone()).increment(1);

    let poll_url = format!("/v1/jobs/{}", req.job_id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, poll_url.clone())],
        Json(json!({"job_id": req.job_id, "status": "queued", "model": req.model, "poll_url": poll_url})),
    )
        .into_response())
}

async fn get_job(State(gw): State<Gateway>, Path(id): Path<String>) -> Result<Json<JobResult>, ApiError> {
    if !valid_job_id(&id) {
        return Err(ApiError::NotFound(id));
    }
    gw.store.get(&id).await?.map(Json).ok_or(ApiError::NotFound(id))
}

async fn cancel_job(State(gw): State<Gateway>, Path(id): Path<String>) -> Result<Json<JobResult>, ApiError> {
    if !valid_job_id(&id) {
        return Err(ApiError::NotFound(id));
    }
    match gw.store.cancel(&id).await? {
        Cancel::Cancelled(record) => {
            metrics::counter!("sluice_jobs_cancelled_total", "model" => record.model.clone()).increment(1);
            Ok(Json(record))
        }
        Cancel::Finished(record) => Err(ApiError::Finished(record.status)),
        Cancel::NotFound => Err(ApiError::NotFound(id)),
    }
}

async fn ready(State(gw): State<Gateway>) -> Response {
    let (kafka, store) = tokio::join!(gw.producer.ping(), gw.store.ping());
    let ok = kafka.is_ok() && store.is_ok();
    let show = |r: Result<(), String>| r.err().unwrap_or_else(|| "ok".into());
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "kafka": show(kafka.map_err(|e| e.to_string())),
        "store": show(store.map_err(|e| e.to_string())),
    });
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn prometheus(State(gw): State<Gateway>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], gw.metrics.render())
}
