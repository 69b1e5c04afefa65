use std::time::Duration;

use chrono::Utc;
use sluice_schemas::{JobResult, headers};
use sluice_sql::Lake;

use super::LakeSink;
use crate::kafka::Record;
use crate::sinks::tests::record;
use crate::sinks::{Batch, Destination, decode};

/// A result published again (after a worker crash between the topic's
/// acknowledgement and the published mark) lands in the lake once: a
/// marked record whose job the lake holds, or that repeats one earlier in
/// the same flush, is not landed; a marked record of a job the lake does
/// not hold is (a first publish can be marked too), and so is another
/// tenant's job of the same id and finish.
#[tokio::test]
async fn a_result_published_twice_lands_in_the_lake_once() {
    let dir = std::env::temp_dir().join(format!("sluice-sink-repeats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut sink = LakeSink { lake: Lake::open(&dir).expect("lake"), run_suffix: None, flagged: Default::default() };
    let at = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 6, 12, 0, 0).unwrap();
    let code = sluice_schemas::ErrorCode::Internal;
    let rec_of = |tenant: &str, job: &str, offset: i64, repeated: bool| {
        let r = JobResult::failed(job.into(), tenant.into(), "m".into(), code, "x".into(), at);
        let mut rec = Record { offset, ..record(&r) };
        if repeated {
            rec.headers.push((headers::MAYBE_REPEATED.to_owned(), b"1".to_vec()));
        }
        rec
    };
    let rec = |job: &str, offset: i64, repeated: bool| rec_of("t", job, offset, repeated);
    let flush = |records: Vec<Record>| {
        let mut batch = Batch::default();
        for r in &records {
            batch.push(r, decode(r));
        }
        batch
    };
    sink.flush(&flush(vec![rec("a", 0, false), rec("b", 1, false)])).await.expect("first flush");
    let mut second = vec![rec("a", 2, true), rec("c", 3, true), rec("c", 4, true), rec("d", 5, false)];
    // The id `b` used again by a job that finished later, its send retried: it lands.
    let mut reused = rec("b", 6, true);
    let mut later = JobResult::decode(&reused.payload).expect("a result");
    later.finished_at = Some(at + chrono::Duration::minutes(5));
    reused.payload = serde_json::to_vec(&later).expect("serialises");
    second.push(reused);
    // Another tenant's `a`, finished at the same time, marked: not a repeat.
    second.push(rec_of("u", "a", 7, true));
    sink.flush(&flush(second)).await.expect("second flush");

    let sources = sluice_sql::Sources { lake: Some(dir.clone()), shards: vec![] };
    let analytics = sluice_sql::Analytics::new(sources, sluice_sql::QueryLimits::new(100, Duration::from_secs(30)))
        .expect("analytics");
    let sql = "SELECT tenant, job_id, count(*) AS n, min(kafka_offset) AS at FROM results \
               GROUP BY tenant, job_id ORDER BY tenant, job_id";
    let answer = analytics.query(sql, &sluice_sql::Scope::All).await.expect("query");
    assert_eq!(
        answer.to_json_rows().expect("rows"),
        serde_json::json!([
            {"tenant": "t", "job_id": "a", "n": 1, "at": 0},
            {"tenant": "t", "job_id": "b", "n": 2, "at": 1},
            {"tenant": "t", "job_id": "c", "n": 1, "at": 3},
            {"tenant": "t", "job_id": "d", "n": 1, "at": 5},
            {"tenant": "u", "job_id": "a", "n": 1, "at": 7},
        ])
    );
    // The offsets are all covered: a replay of either flush lands nothing.
    let manifest = sink.lake.last_manifest("t.results", 0).expect("manifest").expect("one");
    assert_eq!((manifest.first_offset, manifest.last_offset, manifest.rows), (2, 7, 4));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two workers race to publish one stored record (a rebalance moved a job
/// whose result was published but not yet marked): the marked copy can
/// reach the topic first. Its unmarked original after it, in the same
/// flush or a later one, is the repeat and does not land; an unmarked
/// result of another job, or of the same job finished at another time,
/// does.
#[tokio::test]
async fn an_original_that_follows_its_marked_copy_lands_once() {
    let dir = std::env::temp_dir().join(format!("sluice-sink-reversed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut sink = LakeSink { lake: Lake::open(&dir).expect("lake"), run_suffix: None, flagged: Default::default() };
    let at = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 7, 9, 4, 2).unwrap();
    let rec = |job: &str, offset: i64, repeated: bool, minutes: i64| {
        let r = JobResult::failed(
            job.into(),
            "t".into(),
            "m".into(),
            sluice_schemas::ErrorCode::Internal,
            "x".into(),
            at + chrono::Duration::minutes(minutes),
        );
        let mut rec = Record { offset, ..record(&r) };
        if repeated {
            rec.headers.push((headers::MAYBE_REPEATED.to_owned(), b"1".to_vec()));
        }
        rec
    };
    let flush = |records: Vec<Record>| {
        let mut batch = Batch::default();
        for r in &records {
            batch.push(r, decode(r));
        }
        batch
    };
    // In one flush: e's marked copy, then its original.
    sink.flush(&flush(vec![rec("e", 0, true, 0), rec("e", 1, false, 0), rec("f", 2, true, 0)]))
        .await
        .expect("first flush");
    // In a later flush: f's original, g, and f again as a later run of the id.
    sink.flush(&flush(vec![rec("f", 3, false, 0), rec("g", 4, false, 0), rec("f", 5, false, 7)]))
        .await
        .expect("second flush");

    let sources = sluice_sql::Sources { lake: Some(dir.clone()), shards: vec![] };
    let analytics = sluice_sql::Analytics::new(sources, sluice_sql::QueryLimits::new(100, Duration::from_secs(30)))
        .expect("analytics");
    let sql = "SELECT job_id, count(*) AS n, min(kafka_offset) AS at FROM results GROUP BY job_id ORDER BY job_id";
    let answer = analytics.query(sql, &sluice_sql::Scope::All).await.expect("query");
    assert_eq!(
        answer.to_json_rows().expect("rows"),
        serde_json::json!([
            {"job_id": "e", "n": 1, "at": 0},
            {"job_id": "f", "n": 2, "at": 2},
            {"job_id": "g", "n": 1, "at": 4},
        ])
    );
    let _ = std::fs::remove_dir_all(&dir);
}
