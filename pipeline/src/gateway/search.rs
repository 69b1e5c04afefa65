//! `POST /v1/search`: the stored jobs nearest a query, by cosine similarity
//! of their embeddings: approximate, from the caller's HNSW index
//! (`sluice_sql::ann`, kept fresh by [`keep_index`]), or with `"exact":
//! true` (or when `search.index` is off) from a scan of the lake with
//! `cosine_similarity` (`sluice_sql::vectors`). The index follows the lake,
//! so both see a result once its lake flush committed; the index after its
//! next refresh too.
//!
//! The query is a `vector`, or a `text` that is embedded through the normal
//! job path: a `high` priority job of the caller's tenant, batched with the
//! others, rate-limited like any submission, waited for up to
//! `gateway.max_wait_secs`. Such query jobs carry the metadata
//! `sluice.search = query` and are never results of a search.
//!
//! Only the caller's tenant's jobs are searched (the same scope as
//! `POST /v1/sql`), and only those of one model version: the one named, else
//! the text's embedding's, else the model's default. Vectors of another
//! length are a clear error, never a silent comparison.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_schemas::SEARCH_QUERY_MARK as QUERY_MARK;
use sluice_schemas::{ErrorCode, Output};
use sluice_sql::Scope;
use sluice_sql::ann::{Filter, IndexError, IndexKey, VectorIndex};

use super::openapi::{E400, E401, E403, E413, E422, E429, E500, E501, E503, E504};
use super::{ApiError, Gateway};
use crate::shutdown::Shutdown;

/// Most neighbours one search returns.
pub const MAX_K: usize = 1000;
/// Longest query vector.
pub const MAX_DIMENSIONS: usize = 8192;

/// A search.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The model whose embeddings are searched.
    pub model: String,
    /// The version whose embeddings are searched (default: the text's
    /// embedding's, or the model's default version).
    #[serde(default)]
    pub model_version: Option<String>,
    /// A text, embedded by `model` through the job path.
    #[serde(default)]
    pub text: Option<String>,
    /// A query vector, of the model's dimensions.
    #[serde(default)]
    pub vector: Option<Vec<f32>>,
    /// How many neighbours (1 to 1000; default 10).
    #[serde(default = "default_k")]
    pub k: usize,
    #[serde(default)]
    pub filter: SearchFilter,
    /// Scan every stored vector instead of asking the approximate index
    /// (slower; sees results the index has not applied yet).
    #[serde(default)]
    pub exact: bool,
    /// Open mode only: whose jobs (default `gateway.default_tenant`).
    #[serde(default)]
    pub tenant: Option<String>,
}

fn default_k() -> usize {
    10
}

/// Which jobs may be neighbours.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchFilter {
    /// Metadata entries a neighbour must have, all of them.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Finished at or after this time (RFC 3339).
    #[serde(default)]
    pub finished_after: Option<DateTime<Utc>>,
    /// Finished before this time (RFC 3339).
    #[serde(default)]
    pub finished_before: Option<DateTime<Utc>>,
}

/// The neighbours, nearest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SearchAnswer {
    pub model: String,
    pub model_version: String,
    pub results: Vec<Neighbour>,
    /// Whether the answer is exact (a scan) or approximate (the index).
    pub exact: bool,
    /// Approximate answers: vectors in the caller's index of this model
    /// version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub indexed: Option<usize>,
    /// The query's embedding job, for a text query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_job_id: Option<String>,
    pub elapsed_ms: u64,
}

/// One neighbour.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Neighbour {
    pub job_id: String,
    /// Cosine similarity to the query, -1 to 1.
    pub score: f64,
    pub metadata: BTreeMap<String, String>,
    #[schema(value_type = Option<String>)]
    pub finished_at: Option<Value>,
}

/// `POST /v1/search`.
#[utoipa::path(
    post,
    path = "/v1/search",
    tag = "search",
    operation_id = "search",
    summary = "The k stored jobs nearest a text or a vector (cosine similarity; approximate, or exact on request), of the caller's tenant",
    request_body(content = SearchRequest, content_type = "application/json"),
    responses(
        (status = 200, body = SearchAnswer, description = "The neighbours, nearest first"),
        (status = 400, response = E400),
        (status = 401, response = E401),
        (status = 403, response = E403),
        (status = 413, response = E413),
        (status = 422, response = E422),
        (status = 429, response = E429),
        (status = 500, response = E500),
        (status = 501, response = E501),
        (status = 503, response = E503),
        (status = 504, response = E504),
    ),
)]
pub(super) async fn search(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SearchAnswer>, ApiError> {
    let started = Instant::now();
    let caller = gw.keys.authenticate(&headers)?;
    let Some(analytics) = gw.analytics.clone() else {
        return Err(ApiError::SqlNotConfigured);
    };
    let body = body.map_err(|e| gw.body_error(e, gw.cfg.max_body_bytes))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody(r#"{"model": "...", "text": "..." | "vector": [...], "k": 10}"#));
    }
    let req: SearchRequest = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let invalid = |message: String| ApiError::Invalid { code: ErrorCode::SchemaViolation, message };
    if !(1..=MAX_K).contains(&req.k) {
        return Err(invalid(format!("k: {} is not between 1 and {MAX_K}", req.k)));
    }
    if !gw.catalog.names().contains(&req.model) {
        return Err(ApiError::Invalid {
            code: ErrorCode::UnknownModel,
            message: format!("model {:?} is not served here", req.model),
        });
    }
    let tenant = caller.acting_for(req.tenant.clone(), &gw.cfg.default_tenant)?;

    let (vector, version, query_job_id) = match (req.text, req.vector) {
        (Some(text), None) => {
            let (v, version, id) = embed(&gw, &caller, &tenant, &req.model, req.model_version.clone(), text).await?;
            (v, version, Some(id))
        }
        (None, Some(v)) => {
            if v.is_empty() || v.len() > MAX_DIMENSIONS || !v.iter().all(|x| x.is_finite()) {
                return Err(invalid(format!("vector: 1 to {MAX_DIMENSIONS} finite numbers")));
            }
            let version = match req.model_version.clone() {
                Some(v) => v,
                None => gw
                    .catalog
                    .default_version(&req.model)
                    .ok_or_else(|| invalid(format!("model_version: {} has no default version; name one", req.model)))?,
            };
            (v, version, None)
        }
        _ => return Err(invalid("give either `text` or `vector`".into())),
    };
    if let Some(named) = &req.model_version
        && *named != version
    {
        return Err(invalid(format!(
            "model_version: the query was embedded by version {version}, not {named}: vectors of two versions are not comparable"
        )));
    }

    let _slot = gw.sql_slots.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded {
        why: format!("{} SQL queries and searches are running", gw.cfg.max_concurrent_queries),
        retry_after: std::time::Duration::from_secs(1),
    })?;
    if let (Some(index), false) = (gw.index.clone(), req.exact) {
        let key = IndexKey { tenant, model: req.model.clone(), version: version.clone() };
        let filter = Filter {
            metadata: req.filter.metadata,
            finished_after_ms: req.filter.finished_after.map(|t| t.timestamp_millis()),
            finished_before_ms: req.filter.finished_before.map(|t| t.timestamp_millis()),
        };
        let k = req.k;
        let found = tokio::task::spawn_blocking(move || index.search(&key, &vector, k, &filter))
            .await
            .map_err(|e| IndexError::Native(format!("the search task: {e}")))?
            .map_err(|e| match e {
                IndexError::Dimensions { .. } => invalid(format!("vector: {e}")),
                e => ApiError::Search(e),
            })?;
        metrics::counter!(sluice_schemas::metrics::SEARCHES.name, "mode" => "approximate").increment(1);
        let results = found
            .hits
            .into_iter()
            .map(|h| Neighbour {
                job_id: h.job_id,
                score: f64::from(h.score),
                metadata: h.metadata,
                finished_at: h
                    .finished_at_ms
                    .and_then(DateTime::<Utc>::from_timestamp_millis)
                    .map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))),
            })
            .collect();
        return Ok(Json(SearchAnswer {
            model: req.model,
            model_version: version,
            results,
            exact: false,
            indexed: Some(found.indexed),
            query_job_id,
            elapsed_ms: started.elapsed().as_millis() as u64,
        }));
    }
    let sql = neighbours_sql(&req.model, &version, &vector, req.k, &req.filter);
    let answer = analytics.query(&sql, &Scope::Tenant(tenant)).await.map_err(|e| match e {
        // The statement is ours; what can be wrong in it is the caller's vector.
        sluice_sql::QueryError::Invalid(m) => invalid(format!("vector: {m}")),
        e => ApiError::Sql(e),
    })?;
    let rows = answer.to_json_rows()?;
    let results = rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Neighbour {
            job_id: r["job_id"].as_str().unwrap_or_default().to_owned(),
            score: r["score"].as_f64().unwrap_or(f64::NAN),
            metadata: serde_json::from_value(r.get("metadata").cloned().unwrap_or(json!({}))).unwrap_or_default(),
            finished_at: r.get("finished_at").cloned(),
        })
        .collect();
    metrics::counter!(sluice_schemas::metrics::SEARCHES.name, "mode" => "exact").increment(1);
    Ok(Json(SearchAnswer {
        model: req.model,
        model_version: version,
        results,
        exact: true,
        indexed: None,
        query_job_id,
        elapsed_ms: started.elapsed().as_millis() as u64,
    }))
}

/// Embeds `text` as a `high` priority job of `tenant` and waits for it:
/// (vector, model version, job id).
async fn embed(
    gw: &Gateway,
    caller: &super::auth::Caller,
    tenant: &str,
    model: &str,
    version: Option<String>,
    text: String,
) -> Result<(Vec<f32>, String, String), ApiError> {
    let mut item = json!({
        "tenant": tenant,
        "model": model,
        "input": {"text": text},
        "priority": "high",
        "metadata": {QUERY_MARK.0: QUERY_MARK.1},
    });
    if let Some(v) = version {
        item["model_version"] = json!(v);
    }
    let job = gw.prepare(item, caller, None)?;
    gw.check_flow(std::slice::from_ref(&job))?;
    gw.accept(&job, caller, None).await?;
    let record = gw.record_within(tenant, &job.job_id, caller.tenant.as_deref(), gw.cfg.max_wait).await?;
    match (record.status.is_terminal(), record.output, record.error) {
        (_, Some(Output::Embedding(v)), _) => Ok((v, record.model_version.unwrap_or_default(), job.job_id)),
        (true, _, Some(e)) => {
            Err(ApiError::Invalid { code: e.code, message: format!("the query's embedding: {}", e.message) })
        }
        // A model whose output is not an embedding (a tensor model): the
        // request names a model that cannot be searched.
        (true, _, None) => Err(ApiError::Invalid {
            code: ErrorCode::SchemaViolation,
            message: format!("model: {model} is not an embedding model (its output is not a vector to search with)"),
        }),
        (false, _, _) => Err(ApiError::Overloaded {
            why: format!("the query's embedding (job {}) did not finish within {:?}", job.job_id, gw.cfg.max_wait),
            retry_after: std::time::Duration::from_secs(1),
        }),
    }
}

/// Keeps `index` following the lake: a refresh every `every` (on a
/// blocking thread: inserting is CPU work), a last snapshot at shutdown.
/// A failed refresh is logged, counted and retried at the next tick.
pub(super) async fn keep_index(index: Arc<VectorIndex>, every: Duration, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => break,
        }
        let idx = index.clone();
        match tokio::task::spawn_blocking(move || idx.refresh()).await {
            Ok(Ok(done)) if done.vectors > 0 => {
                tracing::debug!(manifests = done.manifests, vectors = done.vectors, "search index refreshed")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                metrics::counter!(sluice_schemas::metrics::SEARCH_INDEX_REFRESH_ERRORS.name).increment(1);
                tracing::warn!(error = %e, "refreshing the search index failed; retrying");
            }
            Err(e) => tracing::error!(error = %e, "the search index refresh panicked"),
        }
        let stats = index.stats();
        metrics::gauge!(sluice_schemas::metrics::SEARCH_INDEX_VECTORS.name).set(stats.vectors as f64);
        metrics::gauge!(sluice_schemas::metrics::SEARCH_INDEX_FULL.name).set(if stats.full { 1.0 } else { 0.0 });
    }
    let idx = index.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || idx.persist()).await {
        metrics::counter!(sluice_schemas::metrics::SEARCH_INDEX_REFRESH_ERRORS.name).increment(1);
        tracing::warn!(error = %e, "the search index's last snapshot failed; the next start applies what it lacks");
    }
}

/// The statement of a search. Every caller-given string is a quoted
/// literal; the tenant scope is applied by the analytics session.
fn neighbours_sql(model: &str, version: &str, vector: &[f32], k: usize, filter: &SearchFilter) -> String {
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let vector = vector.iter().map(|x| format!("{:?}", f64::from(*x))).collect::<Vec<_>>().join(", ");
    let mut conditions = vec![
        format!("model = {}", lit(model)),
        format!("model_version = {}", lit(version)),
        "status = 'succeeded'".to_owned(),
        "embedding IS NOT NULL".to_owned(),
        format!("metadata[{}] IS NULL", lit(QUERY_MARK.0)),
    ];
    for (k, v) in &filter.metadata {
        conditions.push(format!("metadata[{}] = {}", lit(k), lit(v)));
    }
    if let Some(t) = filter.finished_after {
        conditions.push(format!("finished_at >= TIMESTAMP {}", lit(&t.to_rfc3339())));
    }
    if let Some(t) = filter.finished_before {
        conditions.push(format!("finished_at < TIMESTAMP {}", lit(&t.to_rfc3339())));
    }
    format!(
        "SELECT job_id, metadata, finished_at, cosine_similarity(embedding, [{vector}]) AS score \
         FROM results WHERE {} ORDER BY score DESC NULLS LAST, job_id LIMIT {k}",
        conditions.join(" AND ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_strings_are_literals_in_the_statement() {
        let filter = SearchFilter {
            metadata: [("source'; DROP".to_owned(), "x' OR '1'='1".to_owned())].into(),
            ..Default::default()
        };
        let sql = neighbours_sql("m", "1", &[0.5, -1.0], 3, &filter);
        assert!(sql.contains("metadata['source''; DROP'] = 'x'' OR ''1''=''1'"), "{sql}");
        assert!(sql.contains("cosine_similarity(embedding, [0.5, -1.0])"), "{sql}");
        assert!(sql.ends_with("LIMIT 3"), "{sql}");
    }
}
