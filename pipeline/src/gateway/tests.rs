//! The router and the generated document, checked against each other over
//! HTTP; the statuses the document and README name, against [`ApiError`]'s.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::*;
use crate::config::Config;
use crate::shutdown;
use tokio::net::TcpListener;

/// `(path, method)` of every operation in `doc`, methods in lower case.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("the document has paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("a path item is an object");
            item.keys().filter(|k| METHODS.contains(&k.as_str())).map(move |m| (path.clone(), m.clone()))
        })
        .collect()
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn document() -> Value {
    serde_json::to_value(openapi()).expect("the document serialises")
}

/// A gateway in open mode on port 0: in-process store, no models, no SQL,
/// and a Kafka producer that never reaches a broker (no request here gets
/// that far except `/readyz`, which reports Kafka down).
async fn serve_gateway() -> (String, shutdown::Trigger, tokio::task::JoinHandle<std::io::Result<()>>) {
    serve_gateway_with(serde_json::json!({})).await
}

/// [`serve_gateway`] with configuration overrides.
async fn serve_gateway_with(
    overrides: Value,
) -> (String, shutdown::Trigger, tokio::task::JoinHandle<std::io::Result<()>>) {
    serve_gateway_over(overrides, None).await
}

/// [`serve_gateway_with`], answering `POST /v1/sql` over the lake in `lake`.
async fn serve_gateway_over(
    overrides: Value,
    lake: Option<&std::path::Path>,
) -> (String, shutdown::Trigger, tokio::task::JoinHandle<std::io::Result<()>>) {
    let cfg = Config::load(None, overrides).expect("the configuration loads");
    let producer = crate::kafka::Producer::new("127.0.0.1:1", "gateway-test", Duration::from_millis(200))
        .expect("a producer is made without connecting");
    let models = std::env::temp_dir().join(format!("sluice-gateway-test-{}", std::process::id()));
    std::fs::create_dir_all(&models).expect("temp dir");
    let catalog = ModelCatalog::load(sluice_workers::ModelRepository::new(&models), Vec::new()).expect("empty catalog");
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let store = Store::memory(&cfg.store());
    let ops = Ops::new(metrics, producer.clone()).with_store(store.clone());
    let mut gateway = Gateway::new(producer, store, Arc::new(catalog), GatewayConfig::from_config(&cfg), ops);
    if let Some(lake) = lake {
        let sources = sluice_sql::Sources { lake: Some(lake.to_path_buf()), shards: vec![] };
        gateway = gateway.with_analytics(Arc::new(Analytics::new(sources, cfg.query_limits()).expect("analytics")));
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let base = format!("http://{}", listener.local_addr().expect("bound"));
    let (trigger, shutdown) = shutdown::channel();
    let server = tokio::spawn(crate::http::serve(listener, gateway.router(), shutdown));
    (base, trigger, server)
}

/// Every documented operation is routed (it answers neither 405 nor
/// `no_route`), and on a documented path no undocumented method is routed
/// (405). With the routes declared once for both (see `routes`), nothing
/// else can be routed; this checks that the declaration holds together, and
/// that `/openapi.json` serves exactly [`openapi`].
#[tokio::test]
async fn every_documented_route_is_routed_and_no_other_method_is() {
    let doc = document();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")), "OpenAPI 3.1: {}", doc["openapi"]);
    let documented = operations(&doc);
    assert!(documented.len() >= 11, "the document describes the routes: {documented:?}");

    let (base, trigger, server) = serve_gateway().await;
    let client = reqwest::Client::new();
    let call = |method: &str, path: &str| {
        let concrete = path.replace("{id}", "no-such-id");
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
        let request = client.request(method, format!("{base}{concrete}")).body("{}");
        async move {
            let response = request.send().await.expect("the gateway answers");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    let paths: BTreeSet<&String> = documented.iter().map(|(p, _)| p).collect();
    for path in paths {
        for method in METHODS {
            let (status, body) = call(method, path).await;
            if documented.contains(&(path.clone(), method.to_owned())) {
                assert_ne!(status, 405, "{method} {path} is documented, so it is routed");
                assert_ne!(body["error"]["code"], "no_route", "{method} {path} is documented, so it is routed");
            } else {
                assert_eq!(status, 405, "{method} {path} is not documented, so it is not routed: {body}");
                assert_eq!(body["error"]["code"], "method_not_allowed", "{method} {path}: {body}");
            }
        }
    }
    assert_eq!(call("get", "/v1/no-such-route").await.1["error"]["code"], "no_route");
    let served = client.get(format!("{base}/openapi.json")).send().await.expect("served");
    assert_eq!(served.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(served.json::<Value>().await.expect("JSON"), doc, "the served document is the generated one");

    trigger.fire();
    server.await.expect("the server task ends").expect("the server stops cleanly");
}

/// Each error response of the document is a status [`ApiError`] answers
/// with, and refers to the one error body schema.
#[test]
fn every_error_response_of_the_document_is_an_api_error() {
    let statuses = ApiError::statuses();
    let doc = document();
    let shared = &doc["components"]["responses"];
    for (path, method) in operations(&doc) {
        let responses = doc["paths"][&path][&method]["responses"].as_object().expect("responses");
        assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path} documents its success");
        for (status, response) in responses {
            let code: u16 = status.parse().expect("a numeric status");
            if code < 400 {
                continue;
            }
            assert!(statuses.contains(&code), "{method} {path}: {code} is not a status of ApiError ({statuses:?})");
            if path == "/readyz" {
                continue; // the readiness report, not an ApiError
            }
            let reference = response["$ref"].as_str().expect("error responses are shared components");
            let name = reference.trim_start_matches("#/components/responses/");
            assert_eq!(name, format!("E{code}"), "{method} {path}");
            let schema = &shared[name]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(schema, "#/components/schemas/ErrorBody", "{name}");
        }
    }
    let body = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(body["required"], serde_json::json!(["error"]), "{body}");
}

/// The document keeps what the hand-written one said: security, the
/// open operational routes, the job submission's optional fields.
#[test]
fn the_document_states_security_and_what_the_gateway_fills_in() {
    let doc = document();
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(
        (schemes["apiKey"]["in"].as_str(), schemes["apiKey"]["name"].as_str()),
        (Some("header"), Some("X-API-Key"))
    );
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}, {"apiKey": []}, {}]));
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(doc["paths"][open]["get"]["security"], serde_json::json!([{}]), "{open} needs no key");
    }
    let schemas = &doc["components"]["schemas"];
    let required = |name: &str| -> BTreeSet<String> {
        let list = schemas[name]["required"].as_array().unwrap_or_else(|| panic!("{name} has required fields"));
        list.iter().map(|v| v.as_str().expect("a field name").to_owned()).collect()
    };
    assert_eq!(required("JobSubmission"), ["input", "model"].map(String::from).into());
    for name in ["JobResult", "Input", "Tensor", "Output", "JobStatus", "ErrorCode", "Batch", "SqlQuery", "SqlAnswer"] {
        assert!(schemas.get(name).is_some(), "{name} is a component");
    }
    let wait = &doc["paths"]["/v1/jobs/{id}"]["get"]["parameters"];
    assert!(wait.as_array().expect("parameters").iter().any(|p| p["name"] == "wait" && p["in"] == "query"), "{wait}");
}

/// README's table of error statuses (`| status | code(s) | when |`) names
/// exactly the statuses [`ApiError`] answers with, and each code on the row
/// of its status.
#[test]
fn the_readme_lists_exactly_the_statuses_and_codes_of_api_error() {
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let table = readme
        .split_once("| status | code(s) | when |")
        .expect("README has the table of error statuses")
        .1
        .lines()
        .skip(2) // the rest of the header line, and the separator
        .take_while(|l| l.starts_with('|'));
    let mut rows: BTreeMap<u16, String> = BTreeMap::new();
    for line in table {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let status = cells[1].parse().unwrap_or_else(|_| panic!("a status in the first column: {line}"));
        assert!(rows.insert(status, cells[2].to_owned()).is_none(), "{status} appears once");
    }
    let statuses: BTreeSet<u16> = rows.keys().copied().collect();
    assert_eq!(statuses, ApiError::statuses(), "README's statuses are ApiError's");
    for e in ApiError::examples() {
        let (status, code) = e.status_and_code();
        let row = &rows[&status.as_u16()];
        assert!(row.contains(&format!("`{code}`")), "README's {status} row names `{code}`: {row}");
    }
}

/// `POST /v1/batches` answers an unauthenticated caller before reading its
/// body: headers announcing 32 MB and no body at all get a 401 at once
/// (were the body read first, the gateway would wait for those bytes).
#[tokio::test]
async fn a_batch_upload_is_authenticated_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let key = serde_json::json!({"tenant": "t1", "sha256": auth::hash_key("k1")});
    let (base, trigger, server) = serve_gateway_with(serde_json::json!({"gateway": {"api_keys": [key]}})).await;
    let addr = base.trim_start_matches("http://");
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /v1/batches HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-ndjson\r\n\
             Content-Length: 33554432\r\n{auth}\r\n"
        );
        conn.write_all(head.as_bytes()).await.expect("send the head, never the body");
        let mut answer = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
            .await
            .expect("answered without the body")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{auth:?}: {answer}");
    }
    trigger.fire();
    let _ = server.await;
}

/// Issue 10, item 13: in open mode, a query that names no tenant sees
/// `gateway.default_tenant`'s rows, not every tenant's, unless the operator
/// set `sql.open_mode_all_tenants`. Item 2: a query past the SQL memory
/// bounds answers 422 `resources_exhausted`, naming the bound.
#[tokio::test]
async fn open_mode_sql_sees_the_default_tenant_unless_every_tenant_is_configured() {
    let lake = std::env::temp_dir().join(format!("sluice-gateway-sql-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&lake);
    let finished = chrono::Utc::now();
    let rows: Vec<_> = ["default", "default", "other", "other", "other"]
        .iter()
        .enumerate()
        .map(|(i, tenant)| sluice_schemas::results_table::ResultRow {
            job_id: format!("job-{i}"),
            tenant: (*tenant).into(),
            model: "sigmoid".into(),
            model_version: Some("1".into()),
            status: "succeeded",
            error_code: None,
            error_message: None,
            queued_ms: Some(1),
            inference_ms: Some(1),
            batch_size: Some(1),
            input_tokens: None,
            worker_id: None,
            submitted_at: Some(finished),
            finished_at: finished,
            embedding: None,
            output_json: None,
            metadata: Default::default(),
            kafka_partition: 0,
            kafka_offset: i as i64,
        })
        .collect();
    sluice_sql::Lake::open(&lake).expect("lake").commit("t.results", 0, 0, 4, &rows).expect("commit");
    let client = reqwest::Client::new();
    for (all, unnamed) in [(false, 2), (true, 5)] {
        let (base, trigger, server) =
            serve_gateway_over(serde_json::json!({"sql": {"open_mode_all_tenants": all}}), Some(&lake)).await;
        let sql = |body: Value| {
            let (client, url) = (client.clone(), format!("{base}/v1/sql"));
            async move {
                let r = client.post(url).json(&body).send().await.expect("the gateway answers");
                (r.status().as_u16(), r.json::<Value>().await.expect("a JSON body"))
            }
        };
        let count = "SELECT count(*) AS n FROM results";
        let (status, body) = sql(serde_json::json!({"query": count})).await;
        assert_eq!((status, &body["rows"][0]["n"]), (200, &Value::from(unnamed)), "all tenants: {all}: {body}");
        let (status, body) = sql(serde_json::json!({"query": count, "tenant": "other"})).await;
        assert_eq!((status, &body["rows"][0]["n"]), (200, &Value::from(3)), "{body}");
        let (status, body) = sql(serde_json::json!({"query": "SELECT length(repeat('x', 2000000000)) AS n"})).await;
        assert_eq!((status, body["error"]["code"].as_str()), (422, Some("resources_exhausted")), "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("sql.max_expression_bytes"), "{message}");
        trigger.fire();
        server.await.expect("the server task").expect("the server");
    }
    let _ = std::fs::remove_dir_all(&lake);
}

/// Issue 10, item 3: a batch upload whose body never finishes arriving is
/// cut off at `gateway.upload_timeout_ms` (408 `body_timeout`), and while
/// it is read it holds one of `gateway.max_concurrent_uploads`: the next
/// upload is refused (503) instead of buffering too. After the cut-off the
/// slot is free again.
#[tokio::test]
async fn a_stalled_batch_upload_is_cut_off_and_uploads_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // 10 s: room for the probe below to see the slot taken on a busy machine.
    let overrides = serde_json::json!({"gateway": {"upload_timeout_ms": 10000, "max_concurrent_uploads": 1}});
    let (base, trigger, server) = serve_gateway_with(overrides).await;
    let mut stalled = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.expect("connect");
    stalled
        .write_all(b"POST /v1/batches HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n{\"model\": ")
        .await
        .expect("send the head and 10 bytes");
    let client = reqwest::Client::new();
    let upload = || async {
        let r = client.post(format!("{base}/v1/batches")).body("").send().await.expect("the gateway answers");
        (r.status().as_u16(), r.json::<Value>().await.expect("a JSON error"))
    };
    // Until the stalled upload's handler holds the one slot, an empty
    // upload gets its own answer (400); from then on, 503.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let (status, body) = upload().await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 400, "{body}");
        assert!(std::time::Instant::now() < deadline, "the stalled upload never took the slot");
        tokio::task::yield_now().await;
    };
    assert_eq!(refused["error"]["code"], "overloaded", "{refused}");
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("batch uploads")), "{refused}");
    let mut answer = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stalled.read(&mut chunk).await.expect("read the answer");
            answer.extend_from_slice(&chunk[..n]);
            if n == 0 || String::from_utf8_lossy(&answer).contains("upload_timeout_ms") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("the stalled upload is answered");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout") && answer.contains("gateway.upload_timeout_ms"), "{answer}");
    let (status, body) = upload().await;
    assert_eq!(status, 400, "the slot is free again: {body}");
    trigger.fire();
    server.await.expect("the server task").expect("the server");
}

/// A job is recorded only once its topic holds it: a client that hangs up
/// while the produce waits, or a produce that fails, leaves no record (a
/// retry of the id is a new submission, not a `queued` job that never runs).
/// Once Kafka has it, the job is `queued` and a retry answers its record;
/// another request under its id is refused with `job_id_in_use`.
/// Another tenant's job of the same id is another job (issue 10, item 12):
/// accepted as new, and acme's is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_recorded_only_once_its_topic_holds_it() {
    use crate::kafka::{EmbeddedBroker, Producer};
    use auth::Caller;
    let cfg = Config::load(None, serde_json::json!({})).expect("the configuration loads");
    let store = Store::memory(&cfg.store());
    let models = std::env::temp_dir().join(format!("sluice-gateway-test-{}", std::process::id()));
    std::fs::create_dir_all(&models).expect("temp dir");
    let catalog =
        Arc::new(ModelCatalog::load(sluice_workers::ModelRepository::new(&models), Vec::new()).expect("empty catalog"));
    let gateway = |producer: Producer| {
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
        let ops = Ops::new(metrics, producer.clone()).with_store(store.clone());
        Gateway::new(producer, store.clone(), catalog.clone(), GatewayConfig::from_config(&cfg), ops)
    };
    let job = |id: &str, tenant: &str| {
        let v = serde_json::json!({"job_id": id, "tenant": tenant, "model": "m", "input": {"text": "x"}});
        sluice_schemas::JobRequest::from_value(v).expect("a valid request")
    };
    let acme = Caller { tenant: Some("acme".into()) };

    // No broker answers: the client gives up after 200 ms, mid-produce.
    let nowhere = gateway(Producer::new("127.0.0.1:1", "t", Duration::from_secs(5)).expect("a producer"));
    let j1 = job("j1", "acme");
    let hung_up = tokio::time::timeout(Duration::from_millis(200), nowhere.accept(&j1, &acme, None));
    assert!(hung_up.await.is_err(), "the produce cannot finish without a broker");
    assert!(store.get("acme", "j1").await.expect("the store answers").is_none(), "nothing recorded for j1");
    // The produce times out: an error, and still nothing recorded.
    let failing = gateway(Producer::new("127.0.0.1:1", "t", Duration::from_millis(300)).expect("a producer"));
    assert!(failing.accept(&job("j1", "acme"), &acme, None).await.is_err());
    assert!(store.get("acme", "j1").await.expect("the store answers").is_none(), "nothing recorded for j1");

    let broker = EmbeddedBroker::start().expect("the embedded broker starts");
    let topic = sluice_schemas::topics::jobs(&GatewayConfig::from_config(&cfg).topic_prefix, "m");
    broker.create_topic(&topic, 1).expect("topic");
    let working = gateway(Producer::new(broker.bootstrap(), "t", Duration::from_secs(10)).expect("a producer"));
    let (created, body) = working.accept(&job("j1", "acme"), &acme, None).await.expect("accepted");
    assert!(created, "{body}");
    let stored = store.get("acme", "j1").await.expect("the store answers").expect("recorded once produced");
    assert_eq!((stored.status, stored.tenant.as_str()), (sluice_schemas::JobStatus::Queued, "acme"));
    let (created, body) = working.accept(&job("j1", "acme"), &acme, None).await.expect("answered");
    assert!(!created && body["status"] == "queued", "a retry gets the record: {body}");
    // Another request under the same id is refused; the job is unchanged.
    let mut other = job("j1", "acme");
    other.input = sluice_schemas::Input::Text("another text".into());
    let reused = working.accept(&other, &acme, None).await;
    assert!(matches!(reused, Err(ApiError::JobIdInUse(_))), "{:?}", reused.map(|(_, b)| b));
    assert_eq!(store.get("acme", "j1").await.expect("the store answers"), Some(stored.clone()));
    let globex = Caller { tenant: Some("globex".into()) };
    let (created, body) = working.accept(&job("j1", "globex"), &globex, None).await.expect("accepted");
    assert!(created && body["poll_url"] == "/v1/jobs/j1", "globex's own new job: {body}");
    let held = store.get("acme", "j1").await.expect("the store answers").expect("still there");
    assert_eq!(held.tenant, "acme");
    let theirs = store.get("globex", "j1").await.expect("the store answers").expect("recorded");
    assert_eq!((theirs.status, theirs.tenant.as_str()), (sluice_schemas::JobStatus::Queued, "globex"));
    // In open mode, a job of another tenant than the default one is polled
    // with `?tenant=`.
    let open = Caller { tenant: None };
    let (_, body) = working.accept(&job("j2", "globex"), &open, None).await.expect("accepted");
    assert_eq!(body["poll_url"], "/v1/jobs/j2?tenant=globex");
}
