use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{BatchLine, Callback, ErrorCode};

/// Size limits of JobRequest v1. `schemas/json/job-request.v1.schema.json`
/// states the same numbers; the contract tests keep them equal.
/// The metadata entry that marks a search's own query job (`POST
/// /v1/search` with a `text`): such jobs are never results of a search.
pub const SEARCH_QUERY_MARK: (&str, &str) = ("sluice.search", "query");

pub mod limits {
    /// Longest `job_id`, in characters.
    pub const JOB_ID_CHARS: usize = 128;
    /// Longest `tenant`, in characters.
    pub const TENANT_CHARS: usize = 64;
    /// Longest `model` name, in characters.
    pub const MODEL_CHARS: usize = 64;
    /// Longest `model_version`, in characters.
    pub const MODEL_VERSION_CHARS: usize = 32;
    /// Longest `input.text`, in characters. Models usually accept far less
    /// (see their `max_input_chars`); this is the contract's ceiling.
    pub const TEXT_CHARS: usize = 262_144;
    /// Most named tensors in `input.tensors`.
    pub const TENSORS: usize = 16;
    /// Most dimensions of one tensor.
    pub const TENSOR_RANK: usize = 8;
    /// Longest tensor name, in characters.
    pub const TENSOR_NAME_CHARS: usize = 128;
    /// Largest `ttl_ms`: seven days.
    pub const TTL_MS: u64 = 7 * 24 * 3600 * 1000;
    /// Most `metadata` entries.
    pub const METADATA_ENTRIES: usize = 32;
    /// Longest `metadata` key, in characters.
    pub const METADATA_KEY_CHARS: usize = 64;
    /// Longest `metadata` value, in characters.
    pub const METADATA_VALUE_CHARS: usize = 1024;
}

/// One inference job, as published to `<prefix>.jobs.<model>` (JSON value,
/// key = `job_id`). Schema: `schemas/json/job-request.v1.schema.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Client-chosen or gateway-made (UUIDv7) id; also the Kafka key, so that
    /// every effect of a job can be keyed by it and a replay changes nothing.
    pub job_id: String,
    /// Who owns the job; results are only ever shown to this tenant.
    pub tenant: String,
    /// Name of the model (and of its jobs topic).
    pub model: String,
    /// Pin a model version; the serving version is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// What to run the model on.
    pub input: Input,
    /// Scheduling lane.
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// Absolute deadline: not started by then means `expired`.
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// Relative deadline, counted from `submitted_at` (or the Kafka timestamp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Free-form labels, echoed in the result.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// When the producer submitted the job; queue time is measured from here.
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<DateTime<Utc>>,
    /// Where to POST the result when the job finishes ([`crate::callback`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    /// The batch this job is a line of (set by the gateway, [`crate::batch`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchLine>,
}

/// The model input: exactly one of `text` or `tensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawInput", into = "RawInput")]
pub enum Input {
    /// `{"text": "..."}` for text models (embeddings, classification).
    Text(String),
    /// `{"tensors": {"name": {dtype, shape, data}}}` for generic tensor models.
    Tensors(BTreeMap<String, Tensor>),
}

/// The JSON shape of [`Input`]; kept private so that "exactly one of" is a
/// property of the Rust type, not of every caller.
#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(description = "Exactly one of `text` (text models) or `tensors` (generic tensor models).")
)]
#[serde(deny_unknown_fields)]
struct RawInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tensors: Option<BTreeMap<String, Tensor>>,
}

impl TryFrom<RawInput> for Input {
    type Error = &'static str;
    fn try_from(raw: RawInput) -> Result<Self, Self::Error> {
        match (raw.text, raw.tensors) {
            (Some(text), None) => Ok(Input::Text(text)),
            (None, Some(tensors)) => Ok(Input::Tensors(tensors)),
            _ => Err("input must have exactly one of `text` or `tensors`"),
        }
    }
}

impl From<Input> for RawInput {
    fn from(input: Input) -> Self {
        match input {
            Input::Text(text) => RawInput { text: Some(text), tensors: None },
            Input::Tensors(t) => RawInput { text: None, tensors: Some(t) },
        }
    }
}

/// [`Input`] is described by its JSON shape, [`RawInput`], with the
/// "exactly one of" that the Rust type enforces stated as one property.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Input {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::Schema;
        let mut schema = <RawInput as utoipa::PartialSchema>::schema();
        if let RefOr::T(Schema::Object(object)) = &mut schema {
            object.min_properties = Some(1);
            object.max_properties = Some(1);
        }
        schema
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Input {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <RawInput as utoipa::ToSchema>::schemas(schemas);
    }
}

/// One named tensor, row-major (a model input in a JobRequest, an output in a JobResult).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions; their product must equal `data.len()` (checked by the worker).
    pub shape: Vec<u64>,
    /// Elements, row-major.
    pub data: Vec<f64>,
}

/// Element types accepted in [`Tensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DType {
    Float32,
    Float64,
    Int32,
    Int64,
}

/// Scheduling lane of a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }
}

/// Why bytes could not become a [`JobRequest`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    /// [`ErrorCode::InvalidJson`] or [`ErrorCode::SchemaViolation`].
    pub code: ErrorCode,
    /// What is wrong and where (a field path where there is one).
    pub message: String,
    /// The `job_id`, when one could still be read, so that the job can be
    /// marked `failed` for the client who polls it.
    pub job_id: Option<String>,
}

impl JobRequest {
    /// Decodes and validates a JobRequest v1 from JSON bytes.
    ///
    /// Errors name the offending field (`input.text: invalid type: ...`,
    /// `unknown field \`foo\``), and carry the job id when it was readable.
    pub fn decode(bytes: &[u8]) -> Result<JobRequest, DecodeError> {
        // Fast path: straight into the struct. Only a record that fails here
        // pays for the tree and the path tracking that name the bad field.
        if let Ok(request) = serde_json::from_slice::<JobRequest>(bytes)
            && request.validate().is_ok()
        {
            return Ok(request);
        }
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| DecodeError {
            code: ErrorCode::InvalidJson,
            message: if bytes.iter().all(u8::is_ascii_whitespace) {
                "empty message: expected a JSON object".to_owned()
            } else {
                format!("not valid JSON: {e}")
            },
            job_id: None,
        })?;
        Self::from_value(value)
    }

    /// Validates an already parsed JSON value as a JobRequest v1.
    pub fn from_value(value: serde_json::Value) -> Result<JobRequest, DecodeError> {
        let job_id = value.get("job_id").and_then(|v| v.as_str()).filter(|id| valid_job_id(id)).map(str::to_owned);
        let violation =
            |message: String| DecodeError { code: ErrorCode::SchemaViolation, message, job_id: job_id.clone() };
        if !value.is_object() {
            return Err(violation(format!("expected a JSON object, found {}", json_kind(&value))));
        }
        let request: JobRequest = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            violation(if path == "." { inner.to_string() } else { format!("{path}: {inner}") })
        })?;
        request.validate().map_err(violation)?;
        Ok(request)
    }

    /// Checks the rules that serde types alone do not express. Mirrors the
    /// JSON Schema: patterns, lengths, ranges, mutually exclusive fields.
    pub fn validate(&self) -> Result<(), String> {
        check_ident("job_id", &self.job_id, limits::JOB_ID_CHARS, ":")?;
        check_ident("tenant", &self.tenant, limits::TENANT_CHARS, "")?;
        check_ident("model", &self.model, limits::MODEL_CHARS, "")?;
        if let Some(v) = &self.model_version {
            check_ident("model_version", v, limits::MODEL_VERSION_CHARS, "")?;
        }
        match &self.input {
            Input::Text(text) => {
                let n = text.chars().count();
                if n == 0 {
                    return Err("input.text: must not be empty".into());
                }
                if n > limits::TEXT_CHARS {
                    return Err(format!("input.text: {n} characters, at most {} allowed", limits::TEXT_CHARS));
                }
            }
            Input::Tensors(tensors) => {
                if tensors.is_empty() || tensors.len() > limits::TENSORS {
                    return Err(format!("input.tensors: {} tensors, expected 1 to {}", tensors.len(), limits::TENSORS));
                }
                for (name, t) in tensors {
                    let ok = (1..=limits::TENSOR_NAME_CHARS).contains(&name.chars().count())
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.:/-".contains(c));
                    if !ok {
                        return Err(format!(
                            "input.tensors: invalid tensor name {name:?} (1 to {} of A-Z a-z 0-9 _ . : / -)",
                            limits::TENSOR_NAME_CHARS
                        ));
                    }
                    if t.shape.len() > limits::TENSOR_RANK {
                        return Err(format!(
                            "input.tensors.{name}.shape: rank {} exceeds {}",
                            t.shape.len(),
                            limits::TENSOR_RANK
                        ));
                    }
                }
            }
        }
        if let Some(ttl) = self.ttl_ms
            && !(1..=limits::TTL_MS).contains(&ttl)
        {
            return Err(format!("ttl_ms: {ttl} is outside 1..={}", limits::TTL_MS));
        }
        if self.deadline.is_some() && self.ttl_ms.is_some() {
            return Err("give either `deadline` or `ttl_ms`, not both".into());
        }
        if self.metadata.len() > limits::METADATA_ENTRIES {
            return Err(format!(
                "metadata: {} entries, at most {} allowed",
                self.metadata.len(),
                limits::METADATA_ENTRIES
            ));
        }
        for (k, v) in &self.metadata {
            if !(1..=limits::METADATA_KEY_CHARS).contains(&k.chars().count()) {
                return Err(format!("metadata: key {k:?} must be 1 to {} characters", limits::METADATA_KEY_CHARS));
            }
            if v.chars().count() > limits::METADATA_VALUE_CHARS {
                return Err(format!("metadata.{k}: value longer than {} characters", limits::METADATA_VALUE_CHARS));
            }
        }
        if let Some(c) = &self.callback {
            c.validate()?;
        }
        if let Some(b) = &self.batch {
            b.validate()?;
        }
        Ok(())
    }

    /// What the job asks for, as a hex SHA-256: every field (the callback too) but who
    /// (`tenant`, `job_id`) and when (`submitted_at`, which the gateway
    /// stamps on every submission). A retried submission of the same job
    /// has the same digest; another request under a used job id has
    /// another (every map is ordered, so the bytes are stable).
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let asked = (
            &self.model,
            &self.model_version,
            &self.input,
            &self.priority,
            self.deadline.map(|d| d.timestamp_millis()),
            self.ttl_ms,
            &self.metadata,
        );
        let mut bytes = serde_json::to_vec(&asked).expect("a JobRequest serialises. This is a bug.");
        // Appended only when present: digests of jobs without a callback
        // stay what they were before callbacks existed.
        if let Some(c) = &self.callback {
            bytes.extend(serde_json::to_vec(c).expect("a Callback serialises. This is a bug."));
        }
        if let Some(b) = &self.batch {
            bytes.extend(serde_json::to_vec(b).expect("a BatchLine serialises. This is a bug."));
        }
        Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The instant after which the job must not start: `deadline`, or
    /// `ttl_ms` after `submitted_at` (or after `fallback_start`, typically the
    /// Kafka record's timestamp, for producers that omit `submitted_at`).
    pub fn expires_at(&self, fallback_start: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
        if let Some(d) = self.deadline {
            return Some(d);
        }
        let ttl = self.ttl_ms?;
        let start = self.submitted_at.or(fallback_start)?;
        Some(start + chrono::Duration::milliseconds(ttl.min(i64::MAX as u64) as i64))
    }

    /// The input text, for text models.
    pub fn text(&self) -> Option<&str> {
        match &self.input {
            Input::Text(t) => Some(t),
            Input::Tensors(_) => None,
        }
    }
}

/// True when `id` is a well-formed job id: 1 to 128 of `A-Z a-z 0-9 . _ : -`.
pub fn valid_job_id(id: &str) -> bool {
    check_ident("job_id", id, limits::JOB_ID_CHARS, ":").is_ok()
}

/// True when `tenant` is a well-formed tenant: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_tenant(tenant: &str) -> bool {
    check_ident("tenant", tenant, limits::TENANT_CHARS, "").is_ok()
}

pub(crate) fn check_ident(field: &str, value: &str, max: usize, extra: &str) -> Result<(), String> {
    let n = value.chars().count();
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' || extra.contains(c);
    if n == 0 || n > max || !value.chars().all(allowed) {
        return Err(format!(
            "{field}: {value:?} is not 1 to {max} characters of A-Z a-z 0-9 . _ -{}",
            extra.chars().map(|c| format!(" {c}")).collect::<String>()
        ));
    }
    Ok(())
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// RFC 3339 timestamps, strictly (chrono's default `FromStr` is laxer than
/// the JSON Schema `date-time` format).
pub(crate) mod rfc3339_opt {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        DateTime::parse_from_rfc3339(&s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not an RFC 3339 date-time ({e})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<JobRequest, DecodeError> {
        JobRequest::decode(s.as_bytes())
    }

    #[test]
    fn the_digest_is_what_is_asked_not_who_or_when() {
        let req = |src: &str| decode(src).unwrap();
        let a = req(r#"{"job_id":"j1","tenant":"t","model":"m","input":{"text":"hi"},"metadata":{"b":"2","a":"1"}}"#);
        let same = req(
            r#"{"metadata":{"a":"1","b":"2"},"job_id":"j2","tenant":"u","model":"m","input":{"text":"hi"},"submitted_at":"2026-01-01T00:00:00Z"}"#,
        );
        assert_eq!(a.digest(), same.digest(), "ids, tenants, clocks and key order are not the request");
        assert_eq!(a.digest().len(), 64);
        for other in [
            r#"{"job_id":"j1","tenant":"t","model":"m","input":{"text":"hi!"},"metadata":{"b":"2","a":"1"}}"#,
            r#"{"job_id":"j1","tenant":"t","model":"m","input":{"text":"hi"},"metadata":{"b":"3","a":"1"}}"#,
            r#"{"job_id":"j1","tenant":"t","model":"m","model_version":"1","input":{"text":"hi"},"metadata":{"b":"2","a":"1"}}"#,
            r#"{"job_id":"j1","tenant":"t","model":"m","input":{"text":"hi"},"priority":"high","metadata":{"b":"2","a":"1"}}"#,
        ] {
            assert_ne!(a.digest(), req(other).digest(), "{other}");
        }
    }

    #[test]
    fn minimal_text_job() {
        let r = decode(r#"{"job_id":"j1","tenant":"t","model":"m","input":{"text":"hi"}}"#).unwrap();
        assert_eq!(r.text(), Some("hi"));
        assert_eq!(r.priority, Priority::Normal);
    }

    #[test]
    fn errors_name_the_field_and_keep_the_job_id() {
        let e = decode(r#"{"job_id":"j1","tenant":"t","model":"m","input":{"text":5}}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::SchemaViolation);
        assert!(e.message.starts_with("input.text: invalid type: integer `5`"), "{}", e.message);
        assert_eq!(e.job_id.as_deref(), Some("j1"));

        let e = decode(r#"{"job_id":"j2","tenant":"t","input":{"text":"x"}}"#).unwrap_err();
        assert_eq!(e.message, "missing field `model`");
        assert_eq!(e.job_id.as_deref(), Some("j2"));

        let e = decode(r#"{"job_id":"j3","tenant":"t","model":"m","input":{"text":"x"},"colour":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{}", e.message);
    }

    #[test]
    fn invalid_json_and_empty_messages() {
        let e = decode("{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        assert_eq!(e.job_id, None);
        let e = decode("  ").unwrap_err();
        assert_eq!(e.message, "empty message: expected a JSON object");
        let e = decode("[1]").unwrap_err();
        assert_eq!(e.code, ErrorCode::SchemaViolation);
        assert_eq!(e.message, "expected a JSON object, found an array");
    }

    #[test]
    fn unreadable_job_id_is_not_reported() {
        let e = decode(r#"{"job_id":"has space","tenant":"t","model":"m","input":{"text":"x"}}"#).unwrap_err();
        assert_eq!(e.job_id, None);
        assert!(e.message.starts_with("job_id:"), "{}", e.message);
    }

    #[test]
    fn ttl_counts_from_submission_or_fallback() {
        let r = decode(
            r#"{"job_id":"j","tenant":"t","model":"m","input":{"text":"x"},"ttl_ms":1500,"submitted_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(r.expires_at(None).unwrap().to_rfc3339(), "2026-01-01T00:00:01.500+00:00");
        let mut r2 = r.clone();
        r2.submitted_at = None;
        assert_eq!(r2.expires_at(None), None);
        let fallback = "2026-01-02T00:00:00Z".parse().unwrap();
        assert_eq!(r2.expires_at(Some(fallback)).unwrap().to_rfc3339(), "2026-01-02T00:00:01.500+00:00");
    }

    #[test]
    fn round_trips() {
        let src = r#"{"job_id":"j","tenant":"t","model":"m","input":{"tensors":{"x":{"dtype":"float32","shape":[1,2],"data":[1.0,2.0]}}},"priority":"high","deadline":"2026-01-01T00:00:00.000Z","metadata":{"k":"v"}}"#;
        let r = decode(src).unwrap();
        let again = decode(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(r, again);
    }
}
