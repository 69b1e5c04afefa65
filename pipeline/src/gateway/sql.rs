//! `POST /v1/sql`: read-only SQL over the results lake and the shards.
//!
//! A caller with an API key sees only its tenant's rows (the tables are
//! views through a tenant filter; see `sluice_sql::analytics`). In open
//! mode (no keys) a query sees the tenant its body names, else
//! `gateway.default_tenant`'s rows, or every tenant's only where the
//! operator set `sql.open_mode_all_tenants`. At most `sql.max_concurrent` queries run at once (503 past it);
//! each is bounded by `sql.timeout_ms`, `sql.max_rows` and the memory bounds
//! of `sql.max_*_bytes` (422 or 503 `resources_exhausted`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_sql::Scope;

use super::openapi::{E400, E401, E403, E413, E422, E500, E501, E503, E504};
use super::{ApiError, Gateway};

/// The request body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = SqlQuery)]
#[serde(deny_unknown_fields)]
pub(super) struct SqlRequest {
    /// One SELECT (or WITH … SELECT, EXPLAIN) statement; at most
    /// `sql.max_query_bytes` bytes.
    query: String,
    #[serde(default)]
    format: Format,
    /// Open mode only: the tenant whose rows the query sees (default:
    /// `gateway.default_tenant`, or every tenant where
    /// `sql.open_mode_all_tenants` is set). With an API key it must be the
    /// key's tenant.
    #[serde(default)]
    tenant: Option<String>,
}

/// How the rows come back.
#[derive(Debug, Default, Deserialize, Clone, Copy, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum Format {
    #[default]
    Json,
    Csv,
    Arrow,
}

/// The JSON answer (`"format": "json"`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = SqlAnswer)]
pub(super) struct SqlAnswer {
    columns: Vec<Column>,
    /// One object per row, keyed by column name.
    #[schema(value_type = Vec<Object>)]
    rows: Value,
    row_count: usize,
    /// More rows existed than `sql.max_rows`.
    truncated: bool,
    elapsed_ms: u64,
}

/// A column of a [`SqlAnswer`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Column {
    name: String,
    /// The Arrow data type, e.g. `Utf8`, `Int64`.
    #[serde(rename = "type")]
    data_type: String,
}

/// `POST /v1/sql`: a read-only query, answered as JSON, CSV or Arrow IPC.
#[utoipa::path(
    post,
    path = "/v1/sql",
    tag = "sql",
    operation_id = "querySql",
    summary = "Run a read-only SQL query over the results lake (`results`) and the SQL shards (`shards`)",
    description = "DataFusion SQL. Statements that write (DDL, DML, COPY, SET) are refused with 403 `read_only`. A caller with an API key sees only its tenant's rows; in open mode the body names `tenant` (default: `gateway.default_tenant`; every tenant only where `sql.open_mode_all_tenants` is set). Answers are cut at `sql.max_rows` rows (`truncated`, and the `Sluice-Truncated` header) and queries stop at `sql.timeout_ms` (504 `query_timeout`).",
    request_body = SqlRequest,
    responses(
        (status = 200, description = "The answer, in the requested format",
            headers(("Sluice-Truncated" = String, description = "`true` when rows were cut at `sql.max_rows`, else `false`")),
            content(
                (SqlAnswer = "application/json"),
                (String = "text/csv"),
                (String = "application/vnd.apache.arrow.stream"),
            )),
        (status = 400, response = E400),
        (status = 401, response = E401),
        (status = 403, response = E403),
        (status = 413, response = E413),
        (status = 422, response = E422),
        (status = 500, response = E500),
        (status = 501, response = E501),
        (status = 503, response = E503),
        (status = 504, response = E504),
    ),
)]
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
        (None, None) if gw.cfg.open_mode_sql_all_tenants => Scope::All,
        (None, None) => Scope::Tenant(gw.cfg.default_tenant.clone()),
    };
    let _slot = gw.sql_slots.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded {
        why: format!("{} SQL queries are running", gw.cfg.max_concurrent_queries),
        retry_after: std::time::Duration::from_secs(1),
    })?;
    let answer = analytics.query(&req.query, &scope).await?;
    metrics::histogram!(sluice_schemas::metrics::SQL_QUERY_SECONDS.name).record(answer.elapsed.as_secs_f64());
    let truncated = HeaderValue::from_static(if answer.truncated { "true" } else { "false" });
    let mut resp = match req.format {
        Format::Json => Json(SqlAnswer {
            columns: answer
                .schema
                .fields()
                .iter()
                .map(|f| Column { name: f.name().clone(), data_type: f.data_type().to_string() })
                .collect(),
            rows: answer.to_json_rows()?,
            row_count: answer.rows,
            truncated: answer.truncated,
            elapsed_ms: answer.elapsed.as_millis() as u64,
        })
        .into_response(),
        Format::Csv => ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], answer.to_csv()?).into_response(),
        Format::Arrow => {
            ([(header::CONTENT_TYPE, "application/vnd.apache.arrow.stream")], answer.to_arrow_ipc()?).into_response()
        }
    };
    resp.headers_mut().insert("sluice-truncated", truncated);
    Ok(resp)
}
