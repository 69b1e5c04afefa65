//! `/v1/batches`: a JSONL file of jobs in, one id out; progress by status;
//! results streamed back as JSONL, each line with its `custom_id`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_schemas::{BatchLine, ErrorCode, JobRequest, JobResult, JobStatus};

use super::openapi::{E400, E401, E403, E404, E408, E413, E422, E429, E500, E503};
use super::{ApiError, Gateway};

const KIND: &str = "batch";

/// What [`Gateway::accept`] answered for one line.
type Accepted = Result<(bool, Value), ApiError>;

/// What the store keeps of a batch.
#[derive(Debug, Serialize, Deserialize)]
struct BatchDoc {
    id: String,
    tenant: String,
    created_at: DateTime<Utc>,
    lines: Vec<Line>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    custom_id: String,
    job_id: String,
}

/// The answer to `POST /v1/batches`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BatchAccepted {
    id: String,
    /// Always `in_progress`.
    status: BatchState,
    /// Lines in the batch.
    total: usize,
    /// Lines that could not be queued (Kafka refused them): already `failed`.
    not_queued: usize,
    poll_url: String,
    results_url: String,
    /// The `callback` asked for: where `batch.completed` is delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    callback: Option<String>,
}

/// The query of `POST /v1/batches`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateQuery {
    /// Where to POST `batch.completed` (the batch's lines counted by
    /// status, signed like a job's callback) once every line has finished.
    /// Same rules as a job's `callback.url`; needs `callbacks.signing_key`.
    #[param(max_length = 2048)]
    callback: Option<String>,
}

/// `in_progress` until every line is finished, then `completed`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum BatchState {
    InProgress,
    Completed,
}

/// The answer to `GET /v1/batches/{id}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Batch)]
pub(super) struct BatchStatus {
    id: String,
    tenant: String,
    created_at: DateTime<Utc>,
    status: BatchState,
    total: usize,
    /// Lines by job status (every status present, zero or not).
    #[schema(value_type = BTreeMap<String, usize>)]
    counts: BTreeMap<&'static str, usize>,
    /// Lines whose records are past their TTL in the store.
    missing: usize,
    results_url: String,
}

/// The `{id}` of `/v1/batches/{id}`: a batch of another tenant is a 404.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct BatchId {
    /// The batch's id (`batch_...`).
    id: String,
}

/// `POST /v1/batches`: every line is a job (as for `POST /v1/jobs`) plus a
/// `custom_id` unique within the batch. All lines are checked before any is
/// accepted; errors name the line.
#[utoipa::path(
    post,
    path = "/v1/batches",
    tag = "batches",
    operation_id = "createBatch",
    summary = "Submit a JSONL file of jobs, each line with a custom_id",
    params(CreateQuery),
    request_body(
        content = String,
        content_type = "application/x-ndjson",
        description = "One JobSubmission per line, plus `custom_id` (1-64 characters, unique in the batch); no job_id. At most `gateway.max_batch_lines` lines and `gateway.max_batch_bytes` bytes."
    ),
    responses(
        (status = 202, body = BatchAccepted, description = "Accepted",
            headers(("Location" = String, description = "The batch's poll URL"))),
        (status = 400, response = E400),
        (status = 401, response = E401),
        (status = 403, response = E403),
        (status = 408, response = E408),
        (status = 413, response = E413),
        (status = 422, response = E422),
        (status = 429, response = E429),
        (status = 500, response = E500),
        (status = 503, response = E503),
    ),
)]
pub(super) async fn create(
    State(gw): State<Gateway>,
    query: Result<Query<CreateQuery>, QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    // Who is asking, and whether there is room, before a byte of the body
    // (up to `max_batch_bytes`) is read: an unauthenticated or refused
    // caller makes the gateway buffer nothing.
    let caller = gw.keys.authenticate(request.headers())?;
    let Query(CreateQuery { callback }) = query.map_err(|e| ApiError::Invalid {
        code: ErrorCode::SchemaViolation,
        message: format!("query: {}", e.body_text()),
    })?;
    let _slot = gw.admit()?;
    let upload = gw.upload_slots.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded {
        why: format!("{} batch uploads are being read", gw.cfg.max_concurrent_uploads),
        retry_after: Duration::from_secs(1),
    })?;
    let headers_in = request.headers().clone();
    let limit = gw.cfg.upload_timeout;
    let body = tokio::time::timeout(limit, Bytes::from_request(request, &gw))
        .await
        .map_err(|_| ApiError::BodyTimeout(limit))?
        .map_err(|e| gw.body_error(e, gw.cfg.max_batch_bytes))?;
    drop(upload);
    let text = std::str::from_utf8(&body).map_err(|e| ApiError::InvalidJson(format!("not UTF-8: {e}")))?;
    let lines: Vec<(usize, &str)> =
        text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty()).collect();
    if lines.is_empty() {
        return Err(ApiError::EmptyBody("JSONL: one job per line"));
    }
    if lines.len() > gw.cfg.max_batch_lines {
        return Err(ApiError::TooManyItems { given: lines.len(), limit: gw.cfg.max_batch_lines });
    }
    let id = format!("batch_{}", uuid::Uuid::now_v7().simple());
    let mut seen = HashSet::new();
    let mut jobs = Vec::with_capacity(lines.len());
    let mut doc_lines = Vec::with_capacity(lines.len());
    for (n, line) in &lines {
        let at = |message: String| ApiError::Invalid {
            code: ErrorCode::SchemaViolation,
            message: format!("line {n}: {message}"),
        };
        let mut value: Value = serde_json::from_str(line).map_err(|e| ApiError::Invalid {
            code: ErrorCode::InvalidJson,
            message: format!("line {n}: not valid JSON: {e}"),
        })?;
        let Some(obj) = value.as_object_mut() else { return Err(at("expected a JSON object".into())) };
        let custom_id = match obj.remove("custom_id") {
            Some(Value::String(c)) if (1..=64).contains(&c.chars().count()) => c,
            Some(_) => return Err(at("custom_id must be a string of 1 to 64 characters".into())),
            None => return Err(at("missing field `custom_id`".into())),
        };
        if !seen.insert(custom_id.clone()) {
            return Err(at(format!("custom_id {custom_id:?} appears twice")));
        }
        if obj.contains_key("job_id") {
            return Err(at("job ids of batch lines are made by the gateway; use custom_id".into()));
        }
        let job_id = format!("{id}-{n}");
        let job = gw.prepare(value, &caller, Some(job_id.clone())).map_err(|e| match e {
            ApiError::Invalid { code, message } => ApiError::Invalid { code, message: format!("line {n}: {message}") },
            other => other,
        })?;
        doc_lines.push(Line { custom_id, job_id });
        jobs.push(job);
    }
    // Every line knows its batch: the notifier counts them by it.
    let total = jobs.len() as u32;
    for (index, job) in jobs.iter_mut().enumerate() {
        let line = BatchLine { id: id.clone(), index: index as u32, total, callback_url: callback.clone() };
        line.validate().map_err(|message| ApiError::Invalid { code: ErrorCode::SchemaViolation, message })?;
        job.batch = Some(line);
    }
    gw.check_flow(&jobs)?;
    gw.check_callbacks(&jobs).await?;
    let tenant = jobs[0].tenant.clone();
    if jobs.iter().any(|j| j.tenant != tenant) {
        return Err(ApiError::Invalid {
            code: ErrorCode::SchemaViolation,
            message: "all lines of a batch belong to one tenant".into(),
        });
    }
    let doc = BatchDoc { id: id.clone(), tenant, created_at: Utc::now(), lines: doc_lines };
    gw.store.put_doc(KIND, &id, &serde_json::to_string(&doc).expect("BatchDoc serialises. This is a bug.")).await?;

    // Jobs go out concurrently; one that cannot be queued fails on its own
    // line instead of failing lines already accepted.
    let traceparent = headers_in.get(sluice_schemas::headers::TRACEPARENT).map(|v| v.as_bytes().to_vec());
    let total = jobs.len();
    let callback = jobs[0].batch.as_ref().and_then(|b| b.callback_url.clone());
    let outcomes: Vec<(JobRequest, Accepted)> = {
        let (gw, caller) = (gw.clone(), caller.clone());
        stream::iter(jobs)
            .map(move |job| {
                let (gw, caller, tp) = (gw.clone(), caller.clone(), traceparent.clone());
                async move {
                    let r = gw.accept(&job, &caller, tp.as_deref()).await;
                    (job, r)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await
    };
    let mut unqueued = 0;
    for (job, outcome) in outcomes {
        let Err(e) = outcome else { continue };
        unqueued += 1;
        let mut failed = JobResult::failed(
            job.job_id.clone(),
            job.tenant.clone(),
            job.model.clone(),
            ErrorCode::Internal,
            format!("could not be queued: {e}"),
            Utc::now(),
        );
        failed.metadata = job.metadata.clone();
        failed.callback = job.callback.clone();
        failed.batch = job.batch.clone();
        match gw.store.put(&failed).await {
            Ok(crate::store::Put::Written) => {}
            // The job has a record of its own after all: its result, not
            // this one, is the line's.
            Ok(_) => continue,
            Err(e) => tracing::warn!(job_id = %job.job_id, error = %e, "batch line neither queued nor failed"),
        }
        // On the results topic too, as a worker's failure would be: the
        // lake lands it, and the notifier counts the line (and delivers its
        // callback). Kafka may refuse this as it refused the job: then the
        // batch's completion waits for a line that never finishes.
        let json = serde_json::to_vec(&failed).expect("JobResult serialises. This is a bug.");
        let key = sluice_schemas::topics::job_key(&failed.tenant, &failed.job_id);
        let topic = sluice_schemas::topics::results(&gw.cfg.topic_prefix);
        let hdrs = [(sluice_schemas::headers::TENANT, failed.tenant.as_bytes())];
        if let Err(e) = gw.producer.send(&topic, Some(key.as_bytes()), &json, &hdrs).await {
            tracing::error!(job_id = %job.job_id, error = %e, "a batch line that could not be queued could not be published as failed either: its batch will not be announced complete");
        }
    }
    metrics::counter!(sluice_schemas::metrics::BATCHES_SUBMITTED.name).increment(1);
    let body = BatchAccepted {
        poll_url: format!("/v1/batches/{id}"),
        results_url: format!("/v1/batches/{id}/results"),
        id,
        status: BatchState::InProgress,
        total,
        not_queued: unqueued,
        callback,
    };
    let location = body.poll_url.clone();
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(body)).into_response())
}

async fn load(gw: &Gateway, headers_in: &HeaderMap, id: &str) -> Result<BatchDoc, ApiError> {
    let caller = gw.keys.authenticate(headers_in)?;
    let raw = gw.store.get_doc(KIND, id).await?.ok_or_else(|| ApiError::BatchNotFound(id.to_owned()))?;
    let doc: BatchDoc = serde_json::from_str(&raw).map_err(|e| {
        ApiError::Store(crate::store::StoreError::Corrupt { job_id: id.to_owned(), message: e.to_string() })
    })?;
    if !caller.may_see(&doc.tenant) {
        return Err(ApiError::BatchNotFound(id.to_owned()));
    }
    Ok(doc)
}

/// `GET /v1/batches/{id}`: counts by status and the batch's state
/// (`in_progress` until every line is finished, then `completed`).
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    tag = "batches",
    operation_id = "getBatch",
    summary = "Counts by status and the batch's state",
    params(BatchId),
    responses(
        (status = 200, body = BatchStatus, description = "The batch"),
        (status = 401, response = E401),
        (status = 404, response = E404),
        (status = 500, response = E500),
        (status = 503, response = E503),
    ),
)]
pub(super) async fn status(
    State(gw): State<Gateway>,
    headers_in: HeaderMap,
    Path(BatchId { id }): Path<BatchId>,
) -> Result<Json<BatchStatus>, ApiError> {
    let doc = load(&gw, &headers_in, &id).await?;
    let ids: Vec<String> = doc.lines.iter().map(|l| l.job_id.clone()).collect();
    let mut counts: BTreeMap<&str, usize> = JobStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    let mut missing = 0;
    for r in gw.store.get_many(&doc.tenant, &ids).await? {
        match r {
            Some(r) => *counts.entry(r.status.as_str()).or_default() += 1,
            None => missing += 1,
        }
    }
    let open = counts["queued"] + counts["running"];
    Ok(Json(BatchStatus {
        results_url: format!("/v1/batches/{}/results", doc.id),
        id: doc.id,
        tenant: doc.tenant,
        created_at: doc.created_at,
        status: if open == 0 { BatchState::Completed } else { BatchState::InProgress },
        total: doc.lines.len(),
        counts,
        missing,
    }))
}

/// `GET /v1/batches/{id}/results`: one JSONL line per batch line, in order,
/// with `custom_id`, status and output or error (unfinished lines too, so a
/// client sees what is still open).
#[utoipa::path(
    get,
    path = "/v1/batches/{id}/results",
    tag = "batches",
    operation_id = "getBatchResults",
    summary = "One JSONL line per batch line: custom_id, job_id, status, output or error",
    params(BatchId),
    responses(
        (status = 200, body = String, content_type = "application/x-ndjson",
            description = "JSONL, one line per batch line in order: custom_id, job_id, status (`unknown` past the store's TTL), model_version, output or error"),
        (status = 401, response = E401),
        (status = 404, response = E404),
        (status = 500, response = E500),
        (status = 503, response = E503),
    ),
)]
pub(super) async fn results(
    State(gw): State<Gateway>,
    headers_in: HeaderMap,
    Path(BatchId { id }): Path<BatchId>,
) -> Result<Response, ApiError> {
    let doc = load(&gw, &headers_in, &id).await?;
    let store = gw.store.clone();
    let tenant = doc.tenant.clone();
    let chunks: Vec<Vec<Line>> = {
        let mut lines = doc.lines.into_iter().peekable();
        let mut out = Vec::new();
        while lines.peek().is_some() {
            out.push(lines.by_ref().take(500).collect());
        }
        out
    };
    let body = stream::iter(chunks).then(move |chunk| {
        let (store, tenant) = (store.clone(), tenant.clone());
        async move {
            let ids: Vec<String> = chunk.iter().map(|l| l.job_id.clone()).collect();
            let records = store.get_many(&tenant, &ids).await.map_err(std::io::Error::other)?;
            let mut out = String::new();
            for (line, record) in chunk.iter().zip(records) {
                let mut v = json!({"custom_id": line.custom_id, "job_id": line.job_id});
                match record {
                    Some(r) => {
                        v["status"] = json!(r.status);
                        if let Some(version) = r.model_version {
                            v["model_version"] = json!(version);
                        }
                        if let Some(o) = r.output {
                            v["output"] = json!(o);
                        }
                        if let Some(e) = r.error {
                            v["error"] = json!(e);
                        }
                    }
                    None => v["status"] = json!("unknown"),
                }
                out.push_str(&v.to_string());
                out.push('\n');
            }
            Ok::<_, std::io::Error>(Bytes::from(out))
        }
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response())
}
