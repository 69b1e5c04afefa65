//! Exact vector search in SQL over the real lake: the nearest jobs of a
//! query vector come back in order with their metadata, only from the
//! caller's tenant, and lake files written before `metadata` existed still
//! answer (with NULL metadata).

use std::time::Duration;

use arrow::array::RecordBatch;
use chrono::{TimeZone, Utc};
use parquet::arrow::ArrowWriter;
use sluice_schemas::results_table::{ResultRow, lake_schema};
use sluice_sql::{Analytics, Lake, QueryError, QueryLimits, Scope, Sources};

const MODEL: &str = "all-minilm-l6-v2";

/// Unit vectors at angles 0°, 10°, …, 170°, one job each, alternately of
/// acme and globex; the metadata names the angle.
fn rows() -> Vec<ResultRow> {
    let finished = Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap();
    (0..18i64)
        .map(|i| {
            let a = (i as f32 * 10.0).to_radians();
            ResultRow {
                job_id: format!("v-{i}"),
                tenant: if i % 2 == 0 { "acme" } else { "globex" }.into(),
                model: MODEL.into(),
                model_version: Some("1".into()),
                status: "succeeded",
                error_code: None,
                error_message: None,
                queued_ms: Some(1),
                inference_ms: Some(1),
                batch_size: Some(1),
                input_tokens: Some(3),
                worker_id: Some("w".into()),
                submitted_at: Some(finished),
                finished_at: finished,
                embedding: Some(vec![a.cos(), a.sin()]),
                output_json: None,
                metadata: [("angle".to_owned(), format!("{}", i * 10))].into(),
                kafka_partition: 0,
                kafka_offset: i,
            }
        })
        .collect()
}

fn analytics(dir: &std::path::Path) -> Analytics {
    let lake = Lake::open(dir).unwrap();
    lake.commit("search.results", 0, 0, 17, &rows()).unwrap();
    let sources = Sources { lake: Some(dir.to_path_buf()), shards: vec![] };
    Analytics::new(sources, QueryLimits::new(1000, Duration::from_secs(30))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nearest_jobs_of_the_callers_tenant_come_first_with_their_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let analytics = analytics(dir.path());
    // The query vector points at 45°: acme's nearest are 40°, 60° and 20°
    // (5°, 15° and 25° off); globex's 50°, 30° and 70°.
    let q = "SELECT job_id, metadata['angle'] AS angle, cosine_similarity(embedding, [0.70710678, 0.70710678]) AS score \
             FROM results WHERE model = 'all-minilm-l6-v2' ORDER BY score DESC LIMIT 3";
    let acme = analytics.query(q, &Scope::Tenant("acme".into())).await.unwrap().to_json_rows().unwrap();
    let angles: Vec<&str> = acme.as_array().unwrap().iter().map(|r| r["angle"].as_str().unwrap()).collect();
    assert_eq!(angles, ["40", "60", "20"], "{acme}");
    let top = acme[0]["score"].as_f64().unwrap();
    assert!((top - 5f64.to_radians().cos()).abs() < 1e-6, "{acme}");

    let globex = analytics.query(q, &Scope::Tenant("globex".into())).await.unwrap().to_json_rows().unwrap();
    let angles: Vec<&str> = globex.as_array().unwrap().iter().map(|r| r["angle"].as_str().unwrap()).collect();
    assert_eq!(angles, ["50", "30", "70"], "globex sees only its own vectors: {globex}");

    // However it asks, a tenant never scores another tenant's vectors.
    let probe = "SELECT count(*) AS n FROM results WHERE l2_distance(embedding, [1.0, 0.0]) < 0.01";
    let n = analytics.query(probe, &Scope::Tenant("globex".into())).await.unwrap().to_json_rows().unwrap();
    assert_eq!(n[0]["n"], 0, "0° is acme's: {n}");
    let n = analytics.query(probe, &Scope::Tenant("acme".into())).await.unwrap().to_json_rows().unwrap();
    assert_eq!(n[0]["n"], 1, "{n}");

    // A vector of another length is the caller's mistake, said as such.
    let wrong = "SELECT cosine_similarity(embedding, [1.0, 0.0, 0.0]) AS s FROM results";
    match analytics.query(wrong, &Scope::Tenant("acme".into())).await {
        Err(QueryError::Invalid(m)) => assert!(m.contains(sluice_sql::vectors::MISMATCH), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_files_from_before_metadata_still_answer() {
    let dir = tempfile::tempdir().unwrap();
    let analytics = analytics(dir.path());
    // A file as the lake wrote it before the `metadata` column.
    let old = rows().into_iter().take(2).map(|r| ResultRow { job_id: format!("old-{}", r.job_id), ..r }).collect();
    let current = batch(old);
    let keep: Vec<usize> =
        (0..current.num_columns()).filter(|&i| current.schema().field(i).name() != "metadata").collect();
    let before = current.project(&keep).unwrap();
    let path = dir.path().join(format!("results/model={MODEL}/date=2026-12-01/from-before-metadata.parquet"));
    let mut w = ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), before.schema(), None).unwrap();
    w.write(&before).unwrap();
    w.close().unwrap();

    let q = "SELECT job_id, metadata IS NULL AS none, metadata['angle'] IS NULL AS no_angle, \
             cosine_similarity(embedding, [1.0, 0.0]) AS score FROM results WHERE job_id LIKE 'old-%' ORDER BY job_id";
    let rows = analytics.query(q, &Scope::Tenant("acme".into())).await.unwrap().to_json_rows().unwrap();
    assert_eq!(
        rows,
        serde_json::json!([{"job_id": "old-v-0", "none": true, "no_angle": true, "score": 1.0}]),
        "{rows}"
    );
}

/// The lake's record batch of `rows`, built as the lake writer does.
fn batch(rows: Vec<ResultRow>) -> RecordBatch {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    lake.commit("b.results", 0, 0, rows.len() as i64 - 1, &rows).unwrap();
    let file = walk(dir.path()).into_iter().find(|p| p.extension().is_some_and(|e| e == "parquet")).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap())
            .unwrap()
            .build()
            .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(b.schema().fields().len(), lake_schema().fields().len());
    b
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
