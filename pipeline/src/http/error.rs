//! The HTTP API's errors and their one mapping to HTTP: the only place an
//! HTTP status or an API error code is chosen.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sluice_schemas::{ErrorCode, JobStatus};
use sluice_sql::{IndexError, QueryError};

use crate::kafka::KafkaError;
use crate::retry::Retryable;
use crate::store::StoreError;

/// Everything a gateway request can fail with. The body is always
/// `{"error": {"code": "...", "message": "..."}}` with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is empty: expected {0}")]
    EmptyBody(&'static str),
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body did not arrive within {0:?} (gateway.upload_timeout_ms)")]
    BodyTimeout(Duration),
    #[error("{given} items in one request; at most {limit} are accepted")]
    TooManyItems { given: usize, limit: usize },
    /// A job that fails validation; carries the job-level error code
    /// (`schema_violation`, `unknown_model`, `input_too_long`, ...).
    #[error("{message}")]
    Invalid { code: ErrorCode, message: String },
    #[error("missing or unknown API key (send `Authorization: Bearer <key>` or `X-API-Key`)")]
    Unauthorized,
    #[error("the job names tenant {given:?}, but the API key belongs to another tenant")]
    TenantMismatch { given: String },
    #[error(
        "job id {0:?} is already used by another of your requests (another body); the same request gets its job, another needs a new job_id"
    )]
    JobIdInUse(String),
    #[error("no job with id {0:?}")]
    NotFound(String),
    #[error("no batch with id {0:?}")]
    BatchNotFound(String),
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("{method} is not allowed on {path} (see /openapi.json for its methods)")]
    MethodNotAllowed { method: String, path: String },
    #[error("the job has already finished ({0}); a finished job is never changed")]
    Finished(JobStatus),
    #[error("rate limit of tenant {tenant:?} exceeded; retry in {}s", secs(*retry_after))]
    RateLimited { tenant: String, retry_after: Duration },
    #[error("overloaded: {why}; retry in {}s", secs(*retry_after))]
    Overloaded { why: String, retry_after: Duration },
    #[error("job queue unavailable: {0}")]
    Kafka(#[from] KafkaError),
    #[error("results store unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("SQL analytics is not configured on this gateway (sinks.lake or sinks.shards)")]
    SqlNotConfigured,
    #[error(transparent)]
    Sql(#[from] QueryError),
    #[error("the search index failed: {0}")]
    Search(#[from] IndexError),
    #[error("callback {url:?} refused: {why}")]
    CallbackRefused { url: String, why: String },
    #[error("callbacks are not configured on this deployment (callbacks.signing_key)")]
    CallbacksNotConfigured,
}

/// The body of every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable and machine-readable (`not_found`, `rate_limited`, ...): see
    /// README's table of statuses and codes.
    code: &'static str,
    /// For humans; may change between versions.
    message: String,
}

fn secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

impl ApiError {
    /// `(HTTP status, stable code)` — the only place either is decided.
    pub(crate) fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::EmptyBody(_) | ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            ApiError::TooManyItems { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_items"),
            ApiError::Invalid { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code.as_str()),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::TenantMismatch { .. } => (StatusCode::FORBIDDEN, "tenant_mismatch"),
            ApiError::JobIdInUse(_) => (StatusCode::CONFLICT, "job_id_in_use"),
            ApiError::NotFound(_) | ApiError::BatchNotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::NoRoute(_) => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Finished(_) => (StatusCode::CONFLICT, "job_finished"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::Kafka(e) if e.is_retryable() => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Store(StoreError::Unavailable(_)) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Kafka(_) | ApiError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::SqlNotConfigured => (StatusCode::NOT_IMPLEMENTED, "sql_not_configured"),
            ApiError::Sql(e) => match e {
                QueryError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_sql"),
                QueryError::ReadOnly(_) => (StatusCode::FORBIDDEN, "read_only"),
                QueryError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "query_timeout"),
                QueryError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                QueryError::Execution(_) | QueryError::Setup(_) => (StatusCode::INTERNAL_SERVER_ERROR, "query_failed"),
                // Never fits: a bigger query will not either.
                QueryError::TooBig(_) => (StatusCode::UNPROCESSABLE_ENTITY, "resources_exhausted"),
                // Fits, once the queries running now are done.
                QueryError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "resources_exhausted"),
            },
            // A query vector of the wrong size is caught before the index
            // is asked (search.rs); what remains is the index's own failure.
            ApiError::Search(_) => (StatusCode::INTERNAL_SERVER_ERROR, "search_failed"),
            ApiError::CallbackRefused { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "callback_refused"),
            ApiError::CallbacksNotConfigured => (StatusCode::NOT_IMPLEMENTED, "callbacks_not_configured"),
        }
    }

    /// One error of every kind, and of every status and code a kind can
    /// have: what README's table and the OpenAPI document are checked
    /// against.
    #[cfg(test)]
    pub(crate) fn examples() -> Vec<ApiError> {
        let produce = |retryable| KafkaError::Produce { topic: "t".into(), message: "m".into(), retryable };
        let invalid = |code| ApiError::Invalid { code, message: "m".into() };
        let wait = Duration::from_secs(1);
        let all = vec![
            ApiError::EmptyBody("a body"),
            ApiError::InvalidJson("m".into()),
            ApiError::PayloadTooLarge(1),
            ApiError::BodyTimeout(wait),
            ApiError::TooManyItems { given: 2, limit: 1 },
            // The job-level codes the gateway answers with (see jobs.rs,
            // batches.rs and the catalog's check).
            invalid(ErrorCode::InvalidJson),
            invalid(ErrorCode::SchemaViolation),
            invalid(ErrorCode::UnknownModel),
            invalid(ErrorCode::InvalidInput),
            invalid(ErrorCode::InputTooLong),
            ApiError::Unauthorized,
            ApiError::TenantMismatch { given: "t".into() },
            ApiError::JobIdInUse("j".into()),
            ApiError::NotFound("j".into()),
            ApiError::BatchNotFound("b".into()),
            ApiError::NoRoute("/".into()),
            ApiError::MethodNotAllowed { method: "PUT".into(), path: "/".into() },
            ApiError::Finished(JobStatus::Succeeded),
            ApiError::RateLimited { tenant: "t".into(), retry_after: wait },
            ApiError::Overloaded { why: "m".into(), retry_after: wait },
            ApiError::Kafka(produce(true)),
            ApiError::Kafka(produce(false)),
            ApiError::Store(StoreError::Unavailable("m".into())),
            ApiError::Store(StoreError::Corrupt { job_id: "j".into(), message: "m".into() }),
            ApiError::SqlNotConfigured,
            ApiError::Sql(QueryError::Invalid("m".into())),
            ApiError::Sql(QueryError::ReadOnly("m".into())),
            ApiError::Sql(QueryError::Timeout(wait)),
            ApiError::Sql(QueryError::Unavailable("m".into())),
            ApiError::Sql(QueryError::Execution("m".into())),
            ApiError::Sql(QueryError::Setup("m".into())),
            ApiError::Sql(QueryError::TooBig("m".into())),
            ApiError::Sql(QueryError::Busy("m".into())),
            ApiError::Search(IndexError::Native("m".into())),
            ApiError::CallbackRefused { url: "u".into(), why: "m".into() },
            ApiError::CallbacksNotConfigured,
        ];
        for e in &all {
            // No wildcard: a new variant does not compile until it is
            // matched here, and then given examples above.
            match e {
                ApiError::EmptyBody(_)
                | ApiError::InvalidJson(_)
                | ApiError::PayloadTooLarge(_)
                | ApiError::BodyTimeout(_)
                | ApiError::TooManyItems { .. }
                | ApiError::Invalid { .. }
                | ApiError::Unauthorized
                | ApiError::TenantMismatch { .. }
                | ApiError::JobIdInUse(_)
                | ApiError::NotFound(_)
                | ApiError::BatchNotFound(_)
                | ApiError::NoRoute(_)
                | ApiError::MethodNotAllowed { .. }
                | ApiError::Finished(_)
                | ApiError::RateLimited { .. }
                | ApiError::Overloaded { .. }
                | ApiError::Kafka(_)
                | ApiError::Store(_)
                | ApiError::SqlNotConfigured
                | ApiError::Sql(_)
                | ApiError::Search(_)
                | ApiError::CallbackRefused { .. }
                | ApiError::CallbacksNotConfigured => {}
            }
        }
        all
    }

    /// Every HTTP status an `ApiError` answers with.
    #[cfg(test)]
    pub(crate) fn statuses() -> std::collections::BTreeSet<u16> {
        ApiError::examples().iter().map(|e| e.status_and_code().0.as_u16()).collect()
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after, .. } | ApiError::Overloaded { retry_after, .. } => Some(*retry_after),
            _ if self.status_and_code().0 == StatusCode::SERVICE_UNAVAILABLE => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(%status, code, error = %self, "request failed");
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            metrics::counter!(sluice_schemas::metrics::RATE_LIMITED.name).increment(1);
        }
        let retry_after = self.retry_after();
        let body = ErrorBody { error: ErrorDetail { code, message: self.to_string() } };
        let mut resp = (status, Json(body)).into_response();
        if let Some(d) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs(d)));
        }
        resp
    }
}
