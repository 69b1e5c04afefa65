use serde::{Deserialize, Serialize};

/// Why a job failed. These strings are a stable contract: they appear in
/// `JobResult.error.code`, in the `sluice.error.code` header of dead-letter
/// records and in metric labels. Add codes; never rename or reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The Kafka value (or HTTP body) is not JSON.
    InvalidJson,
    /// JSON, but not a valid JobRequest v1 (missing or unknown field, wrong type, bad id).
    SchemaViolation,
    /// No model (or model version) of that name is served.
    UnknownModel,
    /// The input does not fit the model's task (e.g. tensors sent to a text model).
    InvalidInput,
    /// The input is longer than the model accepts.
    InputTooLong,
    /// The job's deadline passed before inference could start.
    DeadlineExceeded,
    /// The inference engine failed on this job's batch.
    InferenceFailed,
    /// A bug or an unexpected condition inside Sluice.
    Internal,
    /// The record's `sluice.tenant` header and its body name different
    /// tenants.
    TenantMismatch,
    /// The tenant already has a job with this id for another request (a
    /// different body, [`crate::JobRequest::digest`]); that job is unchanged.
    JobIdInUse,
}

impl ErrorCode {
    /// Every code, in declaration order (for docs, metrics and tests).
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::InvalidJson,
        ErrorCode::SchemaViolation,
        ErrorCode::UnknownModel,
        ErrorCode::InvalidInput,
        ErrorCode::InputTooLong,
        ErrorCode::DeadlineExceeded,
        ErrorCode::InferenceFailed,
        ErrorCode::Internal,
        ErrorCode::TenantMismatch,
        ErrorCode::JobIdInUse,
    ];

    /// The wire spelling, e.g. `"invalid_json"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::SchemaViolation => "schema_violation",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::InputTooLong => "input_too_long",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::InferenceFailed => "inference_failed",
            ErrorCode::Internal => "internal",
            ErrorCode::TenantMismatch => "tenant_mismatch",
            ErrorCode::JobIdInUse => "job_id_in_use",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_str_matches_serde_spelling() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
    }
}
