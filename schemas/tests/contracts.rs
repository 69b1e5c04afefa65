//! Every example under `schemas/examples/` is checked twice: against the JSON
//! Schema (with a real validator, formats on) and against the Rust types. The
//! two must agree on every file, and invalid examples must fail with the code
//! and message recorded in `expected-errors.json`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_schemas::{ErrorCode, JobRequest, JobResult, limits};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn validator(schema_file: &str) -> jsonschema::Validator {
    let schema: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root().join("json").join(schema_file)).unwrap()).unwrap();
    jsonschema::options().should_validate_formats(true).build(&schema).expect("schema compiles")
}

fn examples(kind: &str, validity: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("examples").join(kind).join(validity);
    let mut out: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    out.sort();
    assert!(out.len() >= 5, "too few examples in {}", dir.display());
    out
}

#[derive(Deserialize)]
struct Expected {
    #[serde(default)]
    code: Option<ErrorCode>,
    message_contains: String,
}

fn expected(kind: &str) -> BTreeMap<String, Expected> {
    serde_json::from_slice(&fs::read(root().join("examples").join(kind).join("expected-errors.json")).unwrap()).unwrap()
}

fn schema_errors(v: &jsonschema::Validator, bytes: &[u8]) -> Option<Vec<String>> {
    let instance: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some(v.iter_errors(&instance).map(|e| format!("{} at {}", e, e.instance_path())).collect())
}

#[test]
fn valid_job_requests_pass_schema_and_types() {
    let v = validator("job-request.v1.schema.json");
    for (name, bytes) in examples("job-request", "valid") {
        let errs = schema_errors(&v, &bytes).expect("valid example is JSON");
        assert!(errs.is_empty(), "{name}: schema rejects a valid example: {errs:?}");
        let req = JobRequest::decode(&bytes).unwrap_or_else(|e| panic!("{name}: types reject a valid example: {e}"));
        // Serialising and decoding again is lossless and still schema-valid.
        let again = serde_json::to_vec(&req).unwrap();
        assert_eq!(JobRequest::decode(&again).unwrap(), req, "{name}");
        assert!(schema_errors(&v, &again).unwrap().is_empty(), "{name}: re-serialised form");
    }
}

#[test]
fn invalid_job_requests_fail_schema_and_types_precisely() {
    let v = validator("job-request.v1.schema.json");
    let expected = expected("job-request");
    let files = examples("job-request", "invalid");
    assert_eq!(
        files.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        expected.keys().cloned().collect::<Vec<_>>(),
        "every invalid example has an expected error and vice versa"
    );
    for (name, bytes) in files {
        let want = &expected[&name];
        match schema_errors(&v, &bytes) {
            Some(errs) => assert!(!errs.is_empty(), "{name}: schema accepts an invalid example"),
            None => assert_eq!(want.code, Some(ErrorCode::InvalidJson), "{name} is not JSON"),
        }
        let err = JobRequest::decode(&bytes).expect_err(&name);
        assert_eq!(Some(err.code), want.code, "{name}: {err}");
        assert!(
            err.message.contains(&want.message_contains),
            "{name}: message {:?} lacks {:?}",
            err.message,
            want.message_contains
        );
    }
}

#[test]
fn valid_job_results_pass_schema_and_types() {
    let v = validator("job-result.v1.schema.json");
    for (name, bytes) in examples("job-result", "valid") {
        let errs = schema_errors(&v, &bytes).unwrap();
        assert!(errs.is_empty(), "{name}: {errs:?}");
        let r = JobResult::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let again = serde_json::to_vec(&r).unwrap();
        assert!(schema_errors(&v, &again).unwrap().is_empty(), "{name}: re-serialised form");
        assert_eq!(JobResult::decode(&again).unwrap(), r);
    }
}

#[test]
fn invalid_job_results_fail_schema_and_types() {
    let v = validator("job-result.v1.schema.json");
    let expected = expected("job-result");
    let files = examples("job-result", "invalid");
    assert_eq!(files.len(), expected.len());
    for (name, bytes) in files {
        let errs = schema_errors(&v, &bytes).unwrap();
        assert!(!errs.is_empty(), "{name}: schema accepts an invalid example");
        let err = JobResult::decode(&bytes).expect_err(&name);
        assert!(err.contains(&expected[&name].message_contains), "{name}: {err}");
    }
}

/// The numbers in the schema are the numbers in `limits`.
#[test]
fn schema_limits_match_rust_limits() {
    let s: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root().join("json/job-request.v1.schema.json")).unwrap()).unwrap();
    let p = &s["properties"];
    let text = &p["input"]["properties"]["text"];
    assert_eq!(text["maxLength"], limits::TEXT_CHARS);
    assert_eq!(p["ttl_ms"]["maximum"], limits::TTL_MS);
    assert_eq!(p["metadata"]["maxProperties"], limits::METADATA_ENTRIES);
    assert_eq!(p["metadata"]["propertyNames"]["maxLength"], limits::METADATA_KEY_CHARS);
    assert_eq!(p["metadata"]["additionalProperties"]["maxLength"], limits::METADATA_VALUE_CHARS);
    assert_eq!(p["input"]["properties"]["tensors"]["maxProperties"], limits::TENSORS);
    assert_eq!(s["$defs"]["tensor"]["properties"]["shape"]["maxItems"], limits::TENSOR_RANK);
    let pat = |v: &serde_json::Value| v["pattern"].as_str().unwrap().to_owned();
    assert!(pat(&s["$defs"]["job_id"]).ends_with(&format!("{{1,{}}}$", limits::JOB_ID_CHARS)));
    assert!(pat(&p["tenant"]).ends_with(&format!("{{1,{}}}$", limits::TENANT_CHARS)));
    assert!(pat(&p["model"]).ends_with(&format!("{{1,{}}}$", limits::MODEL_CHARS)));
    assert!(pat(&p["model_version"]).ends_with(&format!("{{1,{}}}$", limits::MODEL_VERSION_CHARS)));
    let batch = &s["$defs"]["batch"]["properties"];
    assert_eq!(batch["total"]["maximum"], sluice_schemas::batch::MAX_LINES);
    assert!(pat(&batch["id"]).ends_with(&format!("{{1,{}}}$", sluice_schemas::batch::ID_CHARS)));
    assert_eq!(batch["callback_url"]["maxLength"], sluice_schemas::callback::URL_CHARS);
}

/// Limits are enforced at the edge, one past the limit, by both sides.
#[test]
fn boundary_lengths_agree() {
    let v = validator("job-request.v1.schema.json");
    for (field, max) in [("job_id", limits::JOB_ID_CHARS), ("tenant", limits::TENANT_CHARS)] {
        for (len, ok) in [(max, true), (max + 1, false)] {
            let mut doc = serde_json::json!({"job_id": "j", "tenant": "t", "model": "m", "input": {"text": "x"}});
            doc[field] = serde_json::Value::String("a".repeat(len));
            let bytes = serde_json::to_vec(&doc).unwrap();
            assert_eq!(schema_errors(&v, &bytes).unwrap().is_empty(), ok, "{field} len {len}");
            assert_eq!(JobRequest::decode(&bytes).is_ok(), ok, "{field} len {len}");
        }
    }
    for (len, ok) in [(limits::TEXT_CHARS, true), (limits::TEXT_CHARS + 1, false)] {
        // multi-byte characters: limits count characters, not bytes
        let doc = serde_json::json!({"job_id": "j", "tenant": "t", "model": "m", "input": {"text": "é".repeat(len)}});
        let bytes = serde_json::to_vec(&doc).unwrap();
        assert_eq!(schema_errors(&v, &bytes).unwrap().is_empty(), ok, "text len {len}");
        assert_eq!(JobRequest::decode(&bytes).is_ok(), ok, "text len {len}");
    }
}
