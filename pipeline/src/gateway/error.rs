//! The gateway's errors and their one mapping to HTTP.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_schemas::{ErrorCode, JobStatus};

use crate::kafka::KafkaError;
use crate::store::StoreError;

/// Everything a gateway request can fail with. The body is always
/// `{"error": {"code": "...", "message": "..."}}` with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is empty: expected a JSON object")]
    EmptyBody,
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    /// A job that fails validation; carries the job-level error code
    /// (`schema_violation`, `unknown_model`, `input_too_long`, ...).
    #[error("{message}")]
    Invalid { code: ErrorCode, message: String },
    #[error("no job with id {0:?}")]
    NotFound(String),
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("the job has already finished ({0}); a finished job is never changed")]
    Finished(JobStatus),
    #[error("job queue unavailable: {0}")]
    Kafka(#[from] KafkaError),
    #[error("results store unavailable: {0}")]
    Store(#[from] StoreError),
}

impl ApiError {
    /// `(HTTP status, stable code)` — the only place either is decided.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::EmptyBody | ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Invalid { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code.as_str()),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::NoRoute(_) => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::Finished(_) => (StatusCode::CONFLICT, "job_finished"),
            ApiError::Kafka(e) if e.is_retryable() => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Store(StoreError::Unavailable(_)) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Kafka(_) | ApiError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(%status, code, error = %self, "request failed");
        }
        let mut resp = (status, Json(json!({"error": {"code": code, "message": self.to_string()}}))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
