//! Property tests of the JobRequest decoder, which reads every record a
//! worker consumes and every body the gateway accepts: for arbitrary bytes,
//! arbitrary JSON, and valid requests with one field replaced by arbitrary
//! JSON, it never panics, answers the same twice, and fails only with the
//! codes a dead letter may carry for undecodable input (`invalid_json` when
//! the bytes are not JSON, `schema_violation` otherwise); what it accepts
//! validates and survives a round trip.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use sluice_schemas::{ErrorCode, JobRequest};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        // Strings that look like the fields' own values.
        prop_oneof![
            Just("all-minilm-l6-v2"),
            Just("acme"),
            Just("2026-12-06T12:00:00Z"),
            Just("high"),
            Just("float32"),
            Just("")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("job_id".to_owned()),
                    Just("tenant".to_owned()),
                    Just("model".to_owned()),
                    Just("input".to_owned()),
                    Just("text".to_owned()),
                    Just("tensors".to_owned()),
                    Just("shape".to_owned()),
                    Just("data".to_owned()),
                    Just("dtype".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn valid() -> Value {
    json!({
        "job_id": "job-1",
        "tenant": "acme",
        "model": "all-minilm-l6-v2",
        "input": {"text": "a sentence"},
        "priority": "high",
        "ttl_ms": 60000,
        "metadata": {"source": "test"},
    })
}

/// Decodes twice: the answers must agree (codes are stable).
fn decode(bytes: &[u8]) -> Result<JobRequest, (ErrorCode, Option<String>)> {
    let first = JobRequest::decode(bytes).map_err(|e| (e.code, e.job_id));
    let second = JobRequest::decode(bytes).map_err(|e| (e.code, e.job_id));
    assert_eq!(first, second, "decoding is deterministic");
    first
}

fn accepted_round_trips(req: &JobRequest) {
    assert_eq!(req.validate(), Ok(()));
    let bytes = serde_json::to_vec(req).expect("a JobRequest encodes");
    assert_eq!(JobRequest::decode(&bytes).map_err(|e| e.message).as_ref(), Ok(req), "round trip");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_are_refused_with_a_stable_code(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let is_json = serde_json::from_slice::<Value>(&bytes).is_ok();
        match decode(&bytes) {
            Ok(req) => accepted_round_trips(&req),
            Err((code, _)) if !is_json => prop_assert_eq!(code, ErrorCode::InvalidJson),
            Err((code, _)) => prop_assert_eq!(code, ErrorCode::SchemaViolation),
        }
    }

    #[test]
    fn arbitrary_json_is_accepted_valid_or_refused_as_a_schema_violation(value in any_json()) {
        let bytes = serde_json::to_vec(&value).expect("a Value encodes");
        match decode(&bytes) {
            Ok(req) => accepted_round_trips(&req),
            Err((code, _)) => prop_assert_eq!(code, ErrorCode::SchemaViolation),
        }
    }

    #[test]
    fn a_valid_request_with_one_field_replaced_keeps_its_job_id_when_refused(
        field in prop_oneof![
            Just("job_id"), Just("tenant"), Just("model"), Just("model_version"), Just("input"),
            Just("priority"), Just("deadline"), Just("ttl_ms"), Just("metadata"), Just("submitted_at"),
            Just("unknown_field"),
        ],
        replacement in any_json(),
    ) {
        let mut v = valid();
        v[field] = replacement;
        let bytes = serde_json::to_vec(&v).expect("a Value encodes");
        match decode(&bytes) {
            Ok(req) => accepted_round_trips(&req),
            Err((code, job_id)) => {
                prop_assert_eq!(code, ErrorCode::SchemaViolation);
                if field != "job_id" {
                    // The job can still be marked failed for whoever polls it.
                    prop_assert_eq!(job_id.as_deref(), Some("job-1"));
                }
            }
        }
    }

    #[test]
    fn tensor_inputs_of_any_shape_decode_or_are_refused_without_a_panic(
        shape in prop::collection::vec(prop_oneof![0u64..8, any::<u64>()], 0..12),
        data in prop::collection::vec(any::<f64>().prop_filter("finite", |f| f.is_finite()), 0..16),
        dtype in prop_oneof![Just("float32"), Just("float64"), Just("int32"), Just("int64"), Just("int8")],
        name in prop_oneof![Just("x".to_owned()), ".{0,70}"],
    ) {
        let mut v = valid();
        v["input"] = json!({"tensors": {name: {"dtype": dtype, "shape": shape, "data": data}}});
        let bytes = serde_json::to_vec(&v).expect("a Value encodes");
        match decode(&bytes) {
            Ok(req) => accepted_round_trips(&req),
            Err((code, job_id)) => {
                prop_assert_eq!(code, ErrorCode::SchemaViolation);
                prop_assert_eq!(job_id.as_deref(), Some("job-1"));
            }
        }
    }
}
