//! `/v1/jobs`: submit (one job or an array), read (with long-poll), cancel.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_schemas::{ErrorCode, JobRequest, JobResult, JobStatus, headers, topics, valid_job_id};
use tokio::sync::{mpsc, oneshot};

use super::auth::Caller;
use super::openapi::{E400, E401, E403, E404, E409, E413, E422, E429, E500, E503, Submission};
use super::{ApiError, Gateway};
use crate::shutdown::Shutdown;
use crate::store::{Cancel, Create};

/// The answer for a job that was just queued.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Accepted {
    job_id: String,
    /// Always `queued`.
    status: JobStatus,
    model: String,
    /// Where to read the job (`GET`, with `?wait=` to long-poll).
    poll_url: String,
}

/// The answer to an array: one entry per item, in order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AcceptedJobs {
    /// An `Accepted` for a job just queued; the job's record (a `JobResult`
    /// with `poll_url`) for a client-given `job_id` that exists already.
    #[schema(value_type = Vec<Object>)]
    jobs: Vec<Value>,
}

/// The 202 answer of `POST /v1/jobs`: for one job, or for an array.
#[derive(utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // a description only: the handler builds the two shapes
pub(super) enum Submitted {
    One(Accepted),
    Many(AcceptedJobs),
}

/// `POST /v1/jobs`: one job (an object) or several (an array, all checked
/// before any is accepted). A job whose client-given `job_id` exists already
/// is not submitted again: its current record is returned (200).
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "submitJobs",
    summary = "Submit one job (an object) or several (an array; all are checked before any is accepted)",
    request_body(content = Submission, content_type = "application/json"),
    responses(
        (status = 202, body = Submitted, description = "Accepted: queued. One job: its id and poll URL (Location header too). An array: {\"jobs\": [...]}.",
            headers(("Location" = String, description = "The poll URL (one job only)"))),
        (status = 200, body = JobResult, description = "A job with this client-given job_id exists already: its current record, with `poll_url` (nothing is submitted again).",
            headers(("Location" = String, description = "The poll URL"))),
        (status = 400, response = E400),
        (status = 401, response = E401),
        (status = 403, response = E403),
        (status = 409, response = E409),
        (status = 413, response = E413),
        (status = 422, response = E422),
        (status = 429, response = E429),
        (status = 500, response = E500),
        (status = 503, response = E503),
    ),
)]
pub(super) async fn submit(
    State(gw): State<Gateway>,
    headers_in: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = gw.keys.authenticate(&headers_in)?;
    let _slot = gw.admit()?;
    let body = body.map_err(|e| gw.body_error(e, gw.cfg.max_body_bytes))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody("a JSON object, or an array of them"));
    }
    let value: Value = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let (items, single) = match value {
        Value::Array(items) => (items, false),
        v @ Value::Object(_) => (vec![v], true),
        _ => {
            return Err(ApiError::Invalid {
                code: ErrorCode::SchemaViolation,
                message: "expected a JSON object, or an array of them".into(),
            });
        }
    };
    if items.is_empty() {
        return Err(ApiError::Invalid { code: ErrorCode::SchemaViolation, message: "the array is empty".into() });
    }
    if items.len() > gw.cfg.max_items_per_request {
        return Err(ApiError::TooManyItems { given: items.len(), limit: gw.cfg.max_items_per_request });
    }
    let mut jobs = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let job = gw.prepare(item, &caller, None).map_err(|e| at_index(e, single, i))?;
        jobs.push(job);
    }
    gw.check_flow(&jobs)?;
    // After the rate limit: a flood of submissions resolves no names.
    gw.check_callbacks(&jobs).await?;

    let traceparent = headers_in.get(headers::TRACEPARENT).map(|v| v.as_bytes().to_vec());
    let mut answers = Vec::with_capacity(jobs.len());
    for job in &jobs {
        answers.push(gw.accept(job, &caller, traceparent.as_deref()).await?);
    }
    if single {
        let (created, body) = answers.pop().expect("one job");
        let status = if created { StatusCode::ACCEPTED } else { StatusCode::OK };
        let location = body["poll_url"].as_str().unwrap_or_default().to_owned();
        return Ok((status, [(header::LOCATION, location)], Json(body)).into_response());
    }
    let jobs: Vec<Value> = answers.into_iter().map(|(_, body)| body).collect();
    Ok((StatusCode::ACCEPTED, Json(AcceptedJobs { jobs })).into_response())
}

fn at_index(e: ApiError, single: bool, i: usize) -> ApiError {
    match e {
        ApiError::Invalid { code, message } if !single => {
            ApiError::Invalid { code, message: format!("[{i}]: {message}") }
        }
        other => other,
    }
}

impl Gateway {
    /// A job from a request item: checked, tenant from the API key (or the
    /// body in open mode), id made when absent, clock of the gateway.
    pub(super) fn prepare(&self, item: Value, caller: &Caller, job_id: Option<String>) -> Result<JobRequest, ApiError> {
        let Value::Object(mut obj) = item else {
            return Err(ApiError::Invalid {
                code: ErrorCode::SchemaViolation,
                message: "expected a JSON object".into(),
            });
        };
        if obj.contains_key("batch") {
            // A batch's lines are counted by it: only the gateway says
            // which batch a job is a line of.
            return Err(ApiError::Invalid {
                code: ErrorCode::SchemaViolation,
                message: "`batch` is set by the gateway on the lines of POST /v1/batches".into(),
            });
        }
        match (&caller.tenant, obj.get("tenant")) {
            (Some(t), Some(Value::String(given))) if given != t => {
                return Err(ApiError::TenantMismatch { given: given.clone() });
            }
            (Some(t), _) => {
                obj.insert("tenant".into(), Value::String(t.clone()));
            }
            (None, _) => {
                obj.entry("tenant").or_insert_with(|| Value::String(self.cfg.default_tenant.clone()));
            }
        }
        if let Some(id) = job_id {
            obj.insert("job_id".into(), Value::String(id));
        }
        obj.entry("job_id").or_insert_with(|| Value::String(uuid::Uuid::now_v7().to_string()));
        // The gateway's clock starts the queue time, whatever the client claims.
        obj.insert("submitted_at".into(), Value::String(Utc::now().to_rfc3339()));
        let req = JobRequest::from_value(Value::Object(obj))
            .map_err(|e| ApiError::Invalid { code: e.code, message: e.message })?;
        self.catalog.check(&req).map_err(|(code, message)| ApiError::Invalid { code, message })?;
        Ok(req)
    }

    /// Rate limits (per tenant, one cell per job) and backlog (per model).
    pub(super) fn check_flow(&self, jobs: &[JobRequest]) -> Result<(), ApiError> {
        let mut per_tenant: BTreeMap<&str, usize> = BTreeMap::new();
        for j in jobs {
            *per_tenant.entry(j.tenant.as_str()).or_default() += 1;
            self.backlog.check(&j.model)?;
        }
        for (tenant, n) in per_tenant {
            self.limits.check(tenant, n)?;
        }
        Ok(())
    }

    /// Produces the job to its topic, then records it as `queued`; an
    /// existing job with the same id is returned instead. Returns (new?,
    /// answer).
    ///
    /// Kafka holds a job's first durable copy: the job is recorded only once
    /// its topic has acknowledged it, so nothing is ever left `queued` that
    /// will not run (a failed produce, a client that hangs up mid-request, a
    /// gateway that dies between the two). The worker writes the job's
    /// records whether or not the `queued` one is there, and a `queued` write
    /// that comes after the worker's changes nothing (a create writes only
    /// where there is no record). Two submissions of one new id that race
    /// both reach Kafka; the store's conditional writes make the job run to
    /// one result, as for any redelivered record.
    pub(super) async fn accept(
        &self,
        req: &JobRequest,
        caller: &Caller,
        traceparent: Option<&[u8]>,
    ) -> Result<(bool, Value), ApiError> {
        // Job ids are per tenant: in open mode a job of another tenant than
        // the default one is read with `?tenant=`.
        let poll_url = match &caller.tenant {
            None if req.tenant != self.cfg.default_tenant => format!("/v1/jobs/{}?tenant={}", req.job_id, req.tenant),
            _ => format!("/v1/jobs/{}", req.job_id),
        };
        let digest = req.digest();
        if let Some(existing) = self.store.get_meta(&req.tenant, &req.job_id).await? {
            // The same request again is answered with its job; another
            // request under a used id is refused (the job is unchanged).
            if existing.digest.as_ref().is_some_and(|d| *d != digest) {
                return Err(ApiError::JobIdInUse(req.job_id.clone()));
            }
            let mut body = serde_json::to_value(&existing.record).expect("JobResult serialises. This is a bug.");
            body["poll_url"] = json!(poll_url);
            return Ok((false, body));
        }
        let payload = serde_json::to_vec(req).expect("JobRequest serialises. This is a bug.");
        let mut hdrs: Vec<(&str, &[u8])> = vec![(headers::TENANT, req.tenant.as_bytes())];
        if let Some(tp) = traceparent {
            hdrs.push((headers::TRACEPARENT, tp));
        }
        let topic = topics::jobs(&self.cfg.topic_prefix, &req.model);
        // Nothing is written before this succeeds: a client may retry the id.
        self.producer.send(&topic, Some(req.job_id.as_bytes()), &payload, &hdrs).await?;
        match self.store.create(&JobResult::queued(req), &digest).await {
            // The worker, or a retry of the same submission, wrote first.
            Ok(Create::Created | Create::Exists(_)) => {}
            // Another request of this tenant took the id since the read:
            // that job is unchanged, and the worker dead-letters this record
            // (`job_id_in_use`).
            Ok(Create::Reused(_)) => return Err(ApiError::JobIdInUse(req.job_id.clone())),
            // The job is in Kafka and will run; its first record is the worker's.
            Err(e) => tracing::warn!(job_id = %req.job_id, error = %e, "job accepted without its queued record"),
        }
        metrics::counter!(sluice_schemas::metrics::JOBS_SUBMITTED.name, "model" => req.model.clone()).increment(1);
        let accepted =
            Accepted { job_id: req.job_id.clone(), status: JobStatus::Queued, model: req.model.clone(), poll_url };
        Ok((true, serde_json::to_value(accepted).expect("Accepted serialises. This is a bug.")))
    }
}

/// The query of `GET /v1/jobs/{id}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadQuery {
    /// Seconds to wait for the job to finish (long-poll; capped by
    /// `gateway.max_wait_secs`).
    #[param(minimum = 0, maximum = 3600)]
    wait: Option<f64>,
    /// Whose job: job ids are per tenant. Open mode only (default
    /// `gateway.default_tenant`); with an API key it may only name the
    /// key's tenant.
    #[param(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    tenant: Option<String>,
}

/// The query of `DELETE /v1/jobs/{id}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct CancelQuery {
    /// Whose job, as for `GET /v1/jobs/{id}`.
    #[param(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    tenant: Option<String>,
}

/// The `{id}` of `/v1/jobs/{id}`: an unknown or malformed id is a 404.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct JobId {
    /// The job's id.
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    id: String,
}

/// `GET /v1/jobs/{id}[?wait=SECONDS]`: the job's record; with `wait`, held
/// until the job finishes or the time is up (woken by a completion notice,
/// not by polling). An id with no record yet (a job published straight to
/// Kafka) is waited for too, and is a 404 only when the time is up.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "getJob",
    summary = "A job's status and result; `wait` holds the request until the job finishes (long-poll)",
    params(JobId, ReadQuery),
    responses(
        (status = 200, body = JobResult, description = "The job's record"),
        (status = 401, response = E401),
        (status = 403, response = E403),
        (status = 404, response = E404),
        (status = 422, response = E422),
        (status = 429, response = E429),
        (status = 500, response = E500),
        (status = 503, response = E503),
    ),
)]
pub(super) async fn read(
    State(gw): State<Gateway>,
    headers_in: HeaderMap,
    Path(JobId { id }): Path<JobId>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<JobResult>, ApiError> {
    let caller = gw.keys.authenticate(&headers_in)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid {
        code: ErrorCode::SchemaViolation,
        message: format!("query: {}", e.body_text()),
    })?;
    let wait = q.wait.unwrap_or(0.0);
    if !(0.0..=3600.0).contains(&wait) {
        return Err(ApiError::Invalid {
            code: ErrorCode::SchemaViolation,
            message: format!("wait: {wait} is not a number of seconds between 0 and {}", gw.cfg.max_wait.as_secs()),
        });
    }
    let wait = Duration::from_secs_f64(wait).min(gw.cfg.max_wait);
    let tenant = caller.acting_for(q.tenant, &gw.cfg.default_tenant)?;
    if !valid_job_id(&id) {
        return Err(ApiError::NotFound(id));
    }
    gw.record_within(&tenant, &id, caller.tenant.as_deref(), wait).await.map(Json)
}

impl Gateway {
    /// The record of `tenant`'s job `id`, waiting up to `wait` for it to
    /// finish (no wait: as it is now). 404 when there is none at the end.
    /// `caller_tenant` is the API key's, for the per-tenant long-poll bound.
    pub(super) async fn record_within(
        &self,
        tenant: &str,
        id: &str,
        caller_tenant: Option<&str>,
        wait: Duration,
    ) -> Result<JobResult, ApiError> {
        let key = topics::job_key(tenant, id);
        // Register before reading, so a completion between the two is not
        // missed. The slot is freed when `waiter` is dropped, on every way out
        // (an answer, a store error, the client going away).
        let waiter = if wait.is_zero() {
            None
        } else {
            Some(Waiters::register(&self.waiters, &key, caller_tenant).map_err(|full| match full {
                Full::Total => ApiError::Overloaded {
                    why: "too many long-polls in progress".into(),
                    retry_after: Duration::from_secs(1),
                },
                Full::Tenant(tenant) => ApiError::RateLimited { tenant, retry_after: Duration::from_secs(1) },
            })?)
        };
        let found = |r: Option<JobResult>| r.ok_or_else(|| ApiError::NotFound(id.to_owned()));
        let record = found(self.store.get(tenant, id).await?);
        let Some(mut waiter) = waiter else { return record };
        let rx = waiter.rx.take().expect("a new waiter holds its receiver");
        let finished = |r: &Result<JobResult, ApiError>| matches!(r, Ok(r) if r.status.is_terminal());
        let record = match record {
            // A job published straight to Kafka has no record until a worker
            // finishes it: an unknown id is waited for like an unfinished job
            // (and is a 404 only when the wait ends).
            r if !finished(&r) => {
                // Woken by the job's completion notice; notices are best effort,
                // so the store is also read again every RECHECK.
                // Only this tenant's job wakes it: the notice names the job key.
                let deadline = tokio::time::Instant::now() + wait;
                tokio::pin!(rx);
                let mut woken = false;
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if woken {
                        tokio::time::sleep(left.min(RECHECK)).await;
                    } else {
                        woken = tokio::time::timeout(left.min(RECHECK), &mut rx).await.is_ok();
                    }
                    let now = found(self.store.get(tenant, id).await?);
                    if finished(&now) || left <= RECHECK {
                        break now;
                    }
                }
            }
            other => other,
        };
        drop(waiter);
        record
    }
}

/// `DELETE /v1/jobs/{id}`: cancels a job that has not finished.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    operation_id = "cancelJob",
    summary = "Cancel a job that has not finished",
    params(JobId, CancelQuery),
    responses(
        (status = 200, body = JobResult, description = "Cancelled: the job's record"),
        (status = 401, response = E401),
        (status = 403, response = E403),
        (status = 404, response = E404),
        (status = 409, response = E409),
        (status = 422, response = E422),
        (status = 500, response = E500),
        (status = 503, response = E503),
    ),
)]
pub(super) async fn cancel(
    State(gw): State<Gateway>,
    headers_in: HeaderMap,
    Path(JobId { id }): Path<JobId>,
    query: Result<Query<CancelQuery>, QueryRejection>,
) -> Result<Json<JobResult>, ApiError> {
    let caller = gw.keys.authenticate(&headers_in)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid {
        code: ErrorCode::SchemaViolation,
        message: format!("query: {}", e.body_text()),
    })?;
    let tenant = caller.acting_for(q.tenant, &gw.cfg.default_tenant)?;
    if !valid_job_id(&id) {
        return Err(ApiError::NotFound(id));
    }
    match gw.store.cancel(&tenant, &id).await? {
        Cancel::Cancelled(record) => {
            metrics::counter!(sluice_schemas::metrics::JOBS_CANCELLED.name, "model" => record.model.clone())
                .increment(1);
            Ok(Json(record))
        }
        Cancel::Finished(record) => Err(ApiError::Finished(record.status)),
        Cancel::NotFound => Err(ApiError::NotFound(id)),
    }
}

/// How often a long-poll reads the store again while it waits (a missed
/// completion notice costs at most this much).
const RECHECK: Duration = Duration::from_secs(2);

/// One registered long-poll: (token, its caller's tenant, wake-up).
type Entry = (u64, Option<String>, oneshot::Sender<()>);

#[derive(Default)]
struct Registry {
    /// By job key (`<tenant>/<job_id>`), as completion notices name jobs.
    by_id: HashMap<String, Vec<Entry>>,
    total: usize,
    /// Long-polls by the tenant of their API key (none in open mode).
    per_tenant: HashMap<String, usize>,
}

impl Registry {
    fn forget(&mut self, tenant: Option<&String>) {
        self.total -= 1;
        if let Some(t) = tenant
            && let Some(n) = self.per_tenant.get_mut(t)
        {
            *n -= 1;
            if *n == 0 {
                self.per_tenant.remove(t);
            }
        }
    }
}

/// Long-polls waiting for jobs to finish. Bounded: at most `max` at once,
/// and at most `max_per_tenant` of one API key's tenant.
pub struct Waiters {
    registry: Mutex<Registry>,
    next: AtomicU64,
    max: usize,
    max_per_tenant: usize,
}

/// Why a long-poll was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    Total,
    Tenant(String),
}

/// A registered long-poll; dropping it frees its slot.
pub struct Waiter {
    waiters: Arc<Waiters>,
    id: String,
    token: u64,
    /// Woken when the job's completion notice arrives.
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut g = self.waiters.lock();
        if let Some(v) = g.by_id.get_mut(&self.id)
            && let Some(i) = v.iter().position(|(t, _, _)| *t == self.token)
        {
            let (_, tenant, _) = v.swap_remove(i);
            if v.is_empty() {
                g.by_id.remove(&self.id);
            }
            g.forget(tenant.as_ref());
        }
    }
}

impl Waiters {
    pub fn new(max: usize, max_per_tenant: usize) -> Waiters {
        Waiters { registry: Mutex::new(Registry::default()), next: AtomicU64::new(0), max, max_per_tenant }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a long-poll for `id` (a job key) by a caller of `tenant` (`None`: open
    /// mode), unless the total or the tenant's bound is reached.
    fn register(this: &Arc<Waiters>, id: &str, tenant: Option<&str>) -> Result<Waiter, Full> {
        let mut g = this.lock();
        if g.total >= this.max {
            return Err(Full::Total);
        }
        if let Some(t) = tenant {
            let n = g.per_tenant.entry(t.to_owned()).or_insert(0);
            if *n >= this.max_per_tenant {
                return Err(Full::Tenant(t.to_owned()));
            }
            *n += 1;
        }
        g.total += 1;
        let token = this.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        g.by_id.entry(id.to_owned()).or_default().push((token, tenant.map(str::to_owned), tx));
        Ok(Waiter { waiters: this.clone(), id: id.to_owned(), token, rx: Some(rx) })
    }

    /// Long-polls registered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().total
    }

    fn wake(&self, id: &str) {
        let mut g = self.lock();
        if let Some(waiters) = g.by_id.remove(id) {
            for (_, tenant, tx) in waiters {
                g.forget(tenant.as_ref());
                let _ = tx.send(());
            }
        }
    }

    /// Wakes waiters as completion notices arrive, until shutdown.
    pub async fn run(&self, mut notices: mpsc::Receiver<String>, mut shutdown: Shutdown) {
        loop {
            tokio::select! {
                id = notices.recv() => match id {
                    Some(id) => self.wake(&id),
                    None => return,
                },
                _ = shutdown.wait() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_poll_slot_is_freed_on_every_way_out_and_one_tenant_cannot_take_them_all() {
        let waiters = Arc::new(Waiters::new(4, 2));
        // Dropped without an answer (a store error, a client gone): freed.
        let gone = Waiters::register(&waiters, "a", Some("t1")).unwrap();
        assert_eq!(waiters.len(), 1);
        drop(gone);
        assert_eq!(waiters.len(), 0);
        // A tenant of a key gets at most its share; others still get slots.
        let t1 = [
            Waiters::register(&waiters, "a", Some("t1")).unwrap(),
            Waiters::register(&waiters, "b", Some("t1")).unwrap(),
        ];
        assert_eq!(Waiters::register(&waiters, "c", Some("t1")).err(), Some(Full::Tenant("t1".into())));
        let t2 = Waiters::register(&waiters, "a", Some("t2")).unwrap();
        let open = Waiters::register(&waiters, "d", None).unwrap();
        assert_eq!(Waiters::register(&waiters, "e", Some("t3")).err(), Some(Full::Total));
        // Woken by a completion notice, then dropped: freed once, not twice.
        let mut t2 = t2;
        let mut rx = t2.rx.take().unwrap();
        waiters.wake("a");
        assert!(rx.try_recv().is_ok(), "the waiter on `a` was woken");
        assert_eq!(waiters.len(), 2, "both waiters on `a` are gone: {}", waiters.len());
        drop(t1);
        drop(t2);
        drop(open);
        assert_eq!(waiters.len(), 0);
        let again: Vec<Waiter> =
            (0..2).map(|i| Waiters::register(&waiters, &i.to_string(), Some("t1")).unwrap()).collect();
        assert_eq!(again.len(), 2, "t1's slots came back");
    }
}
