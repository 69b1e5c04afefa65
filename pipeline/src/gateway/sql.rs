//! `POST /v1/sql`: read-only SQL over the results lake and the shards.
//!
//! A caller with an API key sees only its tenant's rows (the tables are
//! views through a tenant filter; see `sluice_sql::analytics`). In open
//! mode (no keys) a query sees every tenant's rows unless the body names
//! `tenant`. At most `sql.max_concurrent` queries run at once (503 past it);
//! each is bounded by `sql.timeout_ms` and `sql.max_rows`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sluice_sql::Scope;

use super::{ApiError, Gateway};

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    query: String,
    #[serde(default)]
    format: Format,
    /// Open mode only: restrict the query to this tenant's rows.
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Json,
    Csv,
    Arrow,
}

pub(super) async fn query(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = gw.keys.authenticate(&headers)?;
    let Some(analytics) = gw.analytics.clone() else {
        return Err(ApiError::SqlNotConfigured);
    };
    let body = body.map_err(|e| gw.body_error(e, gw.cfg.max_body_bytes))?;
    if body.is_empty() {
        return Err(ApiError::EmptyBody(r#"{"query": "SELECT ...", "format": "json|csv|arrow"}"#));
    }
    let req: SqlRequest = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    if req.query.len() > gw.cfg.max_query_bytes {
        return Err(ApiError::PayloadTooLarge(gw.cfg.max_query_bytes));
    }
    let scope = match (caller.tenant, req.tenant) {
        (Some(own), Some(named)) if own != named => return Err(ApiError::TenantMismatch { given: named }),
        (Some(own), _) => Scope::Tenant(own),
        (None, Some(named)) => Scope::Tenant(named),
        (None, None) => Scope::All,
    };
    let _slot = gw.sql_slots.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded {
        why: format!("{} SQL queries are running", gw.cfg.max_concurrent_queries),
        retry_after: std::time::Duration::from_secs(1),
    })?;
    let answer = analytics.query(&req.query, &scope).await?;
    metrics::histogram!("sluice_sql_query_seconds").record(answer.elapsed.as_secs_f64());
    let truncated = HeaderValue::from_static(if answer.truncated { "true" } else { "false" });
    let mut resp = match req.format {
        Format::Json => Json(json!({
            "columns": answer.schema.fields().iter().map(|f| json!({"name": f.name(), "type": f.data_type().to_string()})).collect::<Vec<_>>(),
            "rows": answer.to_json_rows()?,
            "row_count": answer.rows,
            "truncated": answer.truncated,
            "elapsed_ms": answer.elapsed.as_millis() as u64,
        }))
        .into_response(),
        Format::Csv => ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], answer.to_csv()?).into_response(),
        Format::Arrow => {
            ([(header::CONTENT_TYPE, "application/vnd.apache.arrow.stream")], answer.to_arrow_ipc()?).into_response()
        }
    };
    resp.headers_mut().insert("sluice-truncated", truncated);
    Ok(resp)
}
