use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::request::{check_ident, limits, rfc3339_opt};
use crate::{BatchLine, Callback, ErrorCode, JobRequest, Tensor};

/// Lifecycle of a job (OpenAI Batch semantics):
/// `queued → running → succeeded | failed | expired | cancelled`.
/// A terminal status never changes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Expired,
        JobStatus::Cancelled,
    ];

    /// Succeeded, failed, expired or cancelled: nothing will change it.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    /// Whether a record in state `self` may be overwritten by one in `next`.
    ///
    /// Moves only forward; a terminal record is never overwritten, and
    /// re-writing the same non-terminal state (a replay) is allowed.
    pub fn may_become(self, next: JobStatus) -> bool {
        match self {
            JobStatus::Queued => true,
            JobStatus::Running => next != JobStatus::Queued,
            _ => false,
        }
    }

    /// The wire spelling, e.g. `"succeeded"`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Expired => "expired",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job failed: a stable code and a message for humans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
}

/// What a succeeded job produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Output {
    /// `{"embedding": [f32, ...]}`: a sentence embedding.
    Embedding(Vec<f32>),
    /// `{"tensors": {"name": {dtype, shape, data}}}`: a generic model's outputs.
    Tensors(BTreeMap<String, Tensor>),
}

impl Output {
    /// Where the first NaN or infinity is (`output.embedding[3]`,
    /// `output.tensors.y.data[0]`), if any. JSON cannot carry them.
    pub fn non_finite(&self) -> Option<String> {
        match self {
            Output::Embedding(v) => v.iter().position(|x| !x.is_finite()).map(|i| format!("output.embedding[{i}]")),
            Output::Tensors(t) => t.iter().find_map(|(name, t)| {
                t.data.iter().position(|x| !x.is_finite()).map(|i| format!("output.tensors.{name}.data[{i}]"))
            }),
        }
    }
}

/// Where the job's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// From submission (or the Kafka timestamp) to the start of its batch.
    pub queued_ms: u64,
    /// Wall time of the batch's forward pass (shared by the whole batch).
    pub inference_ms: u64,
    /// Jobs in the batch this job ran in.
    pub batch_size: u32,
    /// Tokens of this job's input after truncation.
    pub input_tokens: u32,
}

/// The record of a job: what the results store holds for `GET /v1/jobs/{id}`
/// and what finished jobs publish to `<prefix>.results`.
/// Schema: `schemas/json/job-result.v1.schema.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobResult {
    pub job_id: String,
    pub tenant: String,
    pub model: String,
    /// The model version that ran the job (absent until one has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    pub status: JobStatus,
    /// Present exactly when `status` is `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
    /// Present exactly when `status` is `failed` (and for `expired`, why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    /// The worker that ran (or rejected) the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<DateTime<Utc>>,
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The request's metadata, echoed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The request's callback, echoed: where the notifier delivers this
    /// record when it is terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    /// The request's batch line, echoed: the notifier counts a batch's
    /// finished lines by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchLine>,
}

impl JobResult {
    /// The record as JSON. The buffer is sized for the output up front (a
    /// float takes at most 16 bytes), so an embedding of 384 floats is
    /// written into one allocation instead of doubling through six copies.
    pub fn encode(&self) -> String {
        let floats = match &self.output {
            Some(Output::Embedding(v)) => v.len(),
            Some(Output::Tensors(t)) => t.values().map(|t| t.data.len() + t.shape.len()).sum(),
            None => 0,
        };
        let mut buf = Vec::with_capacity(1024 + 16 * floats);
        serde_json::to_writer(&mut buf, self).expect("JobResult serialises. This is a bug.");
        String::from_utf8(buf).expect("serde_json writes UTF-8")
    }

    /// A `queued` record for a request that was just accepted.
    pub fn queued(req: &JobRequest) -> JobResult {
        JobResult {
            job_id: req.job_id.clone(),
            tenant: req.tenant.clone(),
            model: req.model.clone(),
            model_version: None,
            status: JobStatus::Queued,
            output: None,
            error: None,
            timings: None,
            worker_id: None,
            submitted_at: req.submitted_at,
            started_at: None,
            finished_at: None,
            metadata: req.metadata.clone(),
            callback: req.callback.clone(),
            batch: req.batch.clone(),
        }
    }

    /// A terminal `failed` record for a job rejected before inference, or
    /// whose inference failed.
    pub fn failed(
        job_id: String,
        tenant: String,
        model: String,
        code: ErrorCode,
        message: String,
        now: DateTime<Utc>,
    ) -> JobResult {
        JobResult {
            job_id,
            tenant,
            model,
            model_version: None,
            status: JobStatus::Failed,
            output: None,
            error: Some(JobError { code, message }),
            timings: None,
            worker_id: None,
            submitted_at: None,
            started_at: None,
            finished_at: Some(now),
            metadata: BTreeMap::new(),
            callback: None,
            batch: None,
        }
    }

    /// Checks identifiers as JobRequest does (`model` and `model_version`
    /// name lake directories), that an embedding is finite (JSON has no NaN:
    /// it would be written as `null` and the record could not be read
    /// back), and the cross-field rules of the schema: `output` exactly when
    /// succeeded, `error` when failed, terminal records carry `finished_at`.
    pub fn validate(&self) -> Result<(), String> {
        check_ident("job_id", &self.job_id, limits::JOB_ID_CHARS, ":")?;
        check_ident("tenant", &self.tenant, limits::TENANT_CHARS, "")?;
        // As in JobRequest: sinks build lake directories from these.
        check_ident("model", &self.model, limits::MODEL_CHARS, "")?;
        if let Some(v) = &self.model_version {
            check_ident("model_version", v, limits::MODEL_VERSION_CHARS, "")?;
        }
        if let Some(at) = self.output.as_ref().and_then(Output::non_finite) {
            return Err(format!("{at} is not a finite number"));
        }
        let s = self.status;
        if (s == JobStatus::Succeeded) != self.output.is_some() {
            return Err(format!("status {s}: `output` must be present exactly when succeeded"));
        }
        if s == JobStatus::Failed && self.error.is_none() {
            return Err("status failed: `error` is required".into());
        }
        if !matches!(s, JobStatus::Failed | JobStatus::Expired | JobStatus::Cancelled) && self.error.is_some() {
            return Err(format!("status {s}: `error` is only allowed on failed, expired or cancelled jobs"));
        }
        if s.is_terminal() && self.finished_at.is_none() {
            return Err(format!("status {s}: `finished_at` is required"));
        }
        // The callback is not checked here: a result is landed whatever its
        // callback says, and the notifier refuses a bad one on its own
        // (a `callback_refused` dead letter).
        Ok(())
    }

    /// Parses and validates a JobResult from JSON bytes.
    pub fn decode(bytes: &[u8]) -> Result<JobResult, String> {
        let r: JobResult =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(bytes)).map_err(|e| {
                let path = e.path().to_string();
                if path == "." { e.into_inner().to_string() } else { format!("{path}: {}", e.into_inner()) }
            })?;
        r.validate()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10, item 11: `model` names a lake directory, and JSON has no
    /// NaN (it would be written as null and never read back).
    #[test]
    fn model_names_are_identifiers_and_outputs_are_finite() {
        let now = Utc::now();
        let ok = |model: &str| {
            let mut r = JobResult::failed("j".into(), "t".into(), model.into(), ErrorCode::Internal, "x".into(), now);
            r.model_version = Some("1".into());
            r
        };
        assert!(ok("all-minilm-l6-v2").validate().is_ok());
        for bad in ["../../etc", "a/b", "", "model=x", "a b", "..\\x"] {
            let e = ok(bad).validate().unwrap_err();
            assert!(e.starts_with("model:"), "{bad:?}: {e}");
        }
        let mut r = ok("m");
        r.model_version = Some("../1".into());
        assert!(r.validate().unwrap_err().starts_with("model_version:"));
        let mut r = ok("m");
        (r.status, r.error) = (JobStatus::Succeeded, None);
        r.output = Some(Output::Embedding(vec![0.5, f32::NAN]));
        assert_eq!(r.validate().unwrap_err(), "output.embedding[1] is not a finite number");
        let tensor = Tensor { dtype: crate::DType::Float32, shape: vec![2], data: vec![1.0, f64::INFINITY] };
        r.output = Some(Output::Tensors([("y".to_owned(), tensor)].into()));
        assert_eq!(r.validate().unwrap_err(), "output.tensors.y.data[1] is not a finite number");
        // Serialised, a NaN becomes null, which does not decode: this is why.
        r.output = Some(Output::Embedding(vec![f32::NAN]));
        assert!(JobResult::decode(&serde_json::to_vec(&r).unwrap()).is_err());
    }

    #[test]
    fn terminal_states_never_change() {
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                let allowed = from.may_become(to);
                if from.is_terminal() {
                    assert!(!allowed, "{from} -> {to}");
                }
                if from == JobStatus::Running && to == JobStatus::Queued {
                    assert!(!allowed);
                }
            }
        }
        assert!(JobStatus::Queued.may_become(JobStatus::Running));
        assert!(JobStatus::Running.may_become(JobStatus::Running));
        assert!(JobStatus::Running.may_become(JobStatus::Succeeded));
    }

    #[test]
    fn validate_cross_field_rules() {
        let now = Utc::now();
        let mut r = JobResult::failed("j".into(), "t".into(), "m".into(), ErrorCode::Internal, "x".into(), now);
        assert!(r.validate().is_ok());
        r.status = JobStatus::Succeeded;
        assert!(r.validate().unwrap_err().contains("output"));
        r.output = Some(Output::Embedding(vec![0.5]));
        assert!(r.validate().unwrap_err().contains("error"));
        r.error = None;
        assert!(r.validate().is_ok());
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(JobResult::decode(&json).unwrap(), r);
    }
}
