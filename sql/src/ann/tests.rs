use std::collections::HashSet;

use chrono::{TimeZone, Utc};
use sluice_schemas::results_table::ResultRow;

use super::*;

const MODEL: &str = "m";
const DIMS: usize = 16;

/// A deterministic pseudo-random unit vector per seed.
fn vector(seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..DIMS)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.into_iter().map(|a| a / n).collect()
}

fn row(tenant: &str, id: &str, seed: u64, offset: i64) -> ResultRow {
    let finished = Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap() + chrono::Duration::seconds(offset);
    ResultRow {
        job_id: id.to_owned(),
        tenant: tenant.to_owned(),
        model: MODEL.into(),
        model_version: Some("1".into()),
        status: "succeeded",
        error_code: None,
        error_message: None,
        queued_ms: None,
        inference_ms: None,
        batch_size: None,
        input_tokens: None,
        worker_id: None,
        submitted_at: None,
        finished_at: finished,
        embedding: Some(vector(seed)),
        output_json: None,
        metadata: [("n".to_owned(), (seed % 4).to_string())].into(),
        kafka_partition: 0,
        kafka_offset: offset,
    }
}

/// Commits `rows` as consecutive offsets of `partition` from `first`, in
/// flushes of `per_flush`.
fn commit(lake: &Lake, partition: i32, first: i64, rows: &[ResultRow], per_flush: usize) -> i64 {
    let mut at = first;
    for chunk in rows.chunks(per_flush) {
        let last = at + chunk.len() as i64 - 1;
        lake.commit("r", partition, at, last, chunk).unwrap();
        at = last + 1;
    }
    at
}

fn key(tenant: &str) -> IndexKey {
    IndexKey { tenant: tenant.into(), model: MODEL.into(), version: "1".into() }
}

fn config() -> IndexConfig {
    IndexConfig { skip_marked: Some(("sluice.search".into(), "query".into())), ..IndexConfig::default() }
}

/// The ids `index` holds for `tenant`, asking for every one of them.
fn everything(index: &VectorIndex, tenant: &str) -> Vec<String> {
    let found = index.search(&key(tenant), &vector(0), 1000, &Filter::default()).unwrap();
    found.hits.into_iter().map(|h| h.job_id).collect()
}

fn assert_each_once(ids: &[String], expected: usize) {
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "an id twice");
    assert_eq!(ids.len(), expected);
}

#[test]
fn approximate_neighbours_are_the_exact_ones_and_only_the_callers() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let acme: Vec<ResultRow> = (0..600).map(|i| row("acme", &format!("a{i}"), i, i as i64)).collect();
    let globex: Vec<ResultRow> = (0..300).map(|i| row("globex", &format!("g{i}"), 10_000 + i, i as i64)).collect();
    commit(&lake, 0, 0, &acme, 100);
    commit(&lake, 1, 0, &globex, 70);
    let index = VectorIndex::open(lake, config()).unwrap();
    let done = index.refresh().unwrap();
    assert_eq!((done.manifests, done.vectors), (6 + 5, 900));

    let mut hits = 0;
    for q in 0..50u64 {
        let query = vector(50_000 + q);
        let mut exact: Vec<(f32, &str)> = acme
            .iter()
            .map(|r| (r.embedding.as_ref().unwrap().iter().zip(&query).map(|(a, b)| a * b).sum(), r.job_id.as_str()))
            .collect();
        exact.sort_by(|a, b| b.0.total_cmp(&a.0));
        let truth: HashSet<&str> = exact[..10].iter().map(|e| e.1).collect();
        let found = index.search(&key("acme"), &query, 10, &Filter::default()).unwrap();
        assert_eq!(found.indexed, 600);
        assert_eq!(found.hits.len(), 10);
        assert!(found.hits.iter().all(|h| h.job_id.starts_with('a')), "only acme's: {:?}", found.hits);
        assert!(found.hits.windows(2).all(|w| w[0].score >= w[1].score), "nearest first");
        assert!((found.hits[0].score - exact[0].0).abs() < 1e-4, "scores are cosines");
        hits += found.hits.iter().filter(|h| truth.contains(h.job_id.as_str())).count();
    }
    assert!(hits as f64 / 500.0 >= 0.95, "recall@10 {}", hits as f64 / 500.0);

    // globex's own vector, searched as acme: never globex's job.
    let theirs = globex[7].embedding.clone().unwrap();
    let found = index.search(&key("acme"), &theirs, 1000, &Filter::default()).unwrap();
    assert!(found.hits.iter().all(|h| h.job_id.starts_with('a')));
    let found = index.search(&key("globex"), &theirs, 1, &Filter::default()).unwrap();
    assert_eq!(found.hits[0].job_id, "g7");
    assert!(found.hits[0].score > 0.9999);
    // Nothing of another version or tenant exists to be searched.
    let other = IndexKey { version: "2".into(), ..key("acme") };
    assert!(index.search(&other, &theirs, 10, &Filter::default()).unwrap().hits.is_empty());
    assert!(index.search(&key("initech"), &theirs, 10, &Filter::default()).unwrap().hits.is_empty());
    match index.search(&key("acme"), &[1.0, 0.0], 10, &Filter::default()) {
        Err(IndexError::Dimensions { got: 2, dims: DIMS, .. }) => {}
        other => panic!("a 2-dimension query: {other:?}"),
    }
}

#[test]
fn filters_failures_query_jobs_and_reused_ids() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let mut rows: Vec<ResultRow> = (0..40).map(|i| row("acme", &format!("a{i}"), i, i as i64)).collect();
    rows[3].status = "failed";
    rows[3].embedding = None;
    rows[4].metadata.insert("sluice.search".into(), "query".into());
    // a7 again, later, with another vector: it replaces the first.
    rows.push(ResultRow { embedding: Some(vector(999)), ..row("acme", "a7", 7, 40) });
    // a8 repeated exactly (a replay that the lake kept): once.
    rows.push(row("acme", "a8", 8, 8));
    commit(&lake, 0, 0, &rows, 15);
    let index = VectorIndex::open(lake, config()).unwrap();
    index.refresh().unwrap();

    let ids = everything(&index, "acme");
    assert_each_once(&ids, 38);
    assert!(!ids.contains(&"a3".to_owned()) && !ids.contains(&"a4".to_owned()), "{ids:?}");
    let found = index.search(&key("acme"), &vector(7), 1, &Filter::default()).unwrap();
    assert_ne!(found.hits[0].job_id, "a7", "a7's first vector was replaced");
    let found = index.search(&key("acme"), &vector(999), 1, &Filter::default()).unwrap();
    assert_eq!(found.hits[0].job_id, "a7");

    let only = Filter { metadata: [("n".to_owned(), "1".to_owned())].into(), ..Filter::default() };
    let found = index.search(&key("acme"), &vector(0), 100, &only).unwrap();
    assert!(!found.hits.is_empty());
    assert!(found.hits.iter().all(|h| h.metadata["n"] == "1"), "{:?}", found.hits);
    let t0 = Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap().timestamp_millis();
    let window =
        Filter { finished_after_ms: Some(t0 + 10_000), finished_before_ms: Some(t0 + 20_000), ..Filter::default() };
    let mut found: Vec<String> =
        index.search(&key("acme"), &vector(0), 100, &window).unwrap().hits.into_iter().map(|h| h.job_id).collect();
    found.sort();
    let mut expected: Vec<String> = (10..20).map(|i| format!("a{i}")).collect();
    expected.sort();
    assert_eq!(found, expected);
}

#[test]
fn a_reopened_index_resumes_from_its_snapshot_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let first: Vec<ResultRow> = (0..300).map(|i| row("acme", &format!("a{i}"), i, i as i64)).collect();
    let next = commit(&lake, 0, 0, &first, 50);
    let index = VectorIndex::open(lake.clone(), config()).unwrap();
    index.refresh().unwrap();
    assert!(index.persist().unwrap());
    drop(index);

    let second: Vec<ResultRow> = (300..500).map(|i| row("acme", &format!("a{i}"), i, i as i64)).collect();
    commit(&lake, 0, next, &second, 50);
    let index = VectorIndex::open(lake.clone(), config()).unwrap();
    assert_eq!(index.stats().loaded, 300, "the snapshot was loaded, not rebuilt");
    let done = index.refresh().unwrap();
    assert_eq!(done.vectors, 200, "only what landed after the snapshot");
    assert_each_once(&everything(&index, "acme"), 500);

    // A writer killed mid-snapshot leaves a temporary directory; one killed
    // between its snapshot and CURRENT leaves an orphan. Neither is read.
    std::fs::create_dir_all(dir.path().join("_index/.tmp-snap-9999999999999-dead")).unwrap();
    std::fs::create_dir_all(dir.path().join("_index/snap-9999999999999-dead")).unwrap();
    let index = VectorIndex::open(lake.clone(), config()).unwrap();
    assert_eq!(index.stats().loaded, 300);
    index.refresh().unwrap();
    assert_each_once(&everything(&index, "acme"), 500);
    assert!(index.persist().unwrap());

    // No usable snapshot: rebuilt from the whole commit log.
    std::fs::write(dir.path().join("_index/CURRENT"), "snap-gone").unwrap();
    let index = VectorIndex::open(lake, config()).unwrap();
    assert_eq!(index.stats().loaded, 0);
    assert_eq!(index.refresh().unwrap().vectors, 500);
    assert_each_once(&everything(&index, "acme"), 500);
}

#[test]
fn a_flush_not_yet_published_waits_and_the_memory_bound_holds() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let rows: Vec<ResultRow> = (0..60).map(|i| row("acme", &format!("a{i}"), i, i as i64)).collect();
    commit(&lake, 0, 0, &rows[..30], 30);
    commit(&lake, 0, 30, &rows[30..], 30);
    // The second flush is committed but its file not yet renamed in.
    let published =
        dir.path().join("results/model=m/date=2026-12-01/part-r-0-00000000000000000030-00000000000000000059.parquet");
    let aside = dir.path().join("aside.parquet");
    std::fs::rename(&published, &aside).unwrap();
    let index = VectorIndex::open(lake.clone(), config()).unwrap();
    assert_eq!(index.refresh().unwrap().vectors, 30);
    assert_eq!(index.refresh().unwrap().vectors, 0, "still waiting");
    std::fs::rename(&aside, &published).unwrap();
    assert_eq!(index.refresh().unwrap().vectors, 30);
    assert_each_once(&everything(&index, "acme"), 60);

    let small = IndexConfig { max_vectors: 45, ..config() };
    std::fs::remove_dir_all(dir.path().join("_index")).unwrap();
    let index = VectorIndex::open(lake, small).unwrap();
    assert_eq!(index.refresh().unwrap().vectors, 30, "the second flush would pass 45");
    let stats = index.stats();
    assert!(stats.full);
    assert_eq!(stats.vectors, 30);
    assert_eq!(everything(&index, "acme").len(), 30, "still searchable");
}
