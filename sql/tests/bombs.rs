//! Issue 10, item 2: SQL that would allocate without bound is refused with
//! `resources_exhausted` naming the bound, before it allocates, and the
//! process's peak memory stays far under what the queries asked for. Its
//! own test binary, so that the peak (`VmHWM`) is this file's alone.

use std::time::{Duration, Instant};

use sluice_sql::{Analytics, QueryError, QueryLimits, Scope, Sources};

/// Peak resident memory of this process so far, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn analytics(dir: &std::path::Path) -> Analytics {
    let limits = QueryLimits {
        max_query_memory_bytes: 64 << 20,
        max_total_memory_bytes: 128 << 20,
        max_expression_bytes: 16 << 20,
        ..QueryLimits::new(1000, Duration::from_secs(60))
    };
    Analytics::new(Sources { lake: Some(dir.to_path_buf()), shards: vec![] }, limits).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_bombs_are_refused_before_they_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let analytics = analytics(dir.path());
    let before = peak_rss();
    // Each asks for gigabytes; each must be refused, naming the bound.
    let doubling: String = {
        let mut q = "WITH l0 AS (SELECT repeat('x', 1000000) AS s)".to_owned();
        for i in 1..=13 {
            q.push_str(&format!(", l{i} AS (SELECT s || s AS s FROM l{})", i - 1));
        }
        q + " SELECT length(s) FROM l13"
    };
    let bombs = [
        ("SELECT length(repeat('x', 2000000000))", "sql.max_expression_bytes"),
        ("SELECT length(repeat(repeat('x', 100000), 100000))", "sql.max_expression_bytes"),
        ("SELECT length(lpad('x', 2000000000, 'yz'))", "sql.max_expression_bytes"),
        ("SELECT cardinality(range(1, 2000000000))", "sql.max_expression_bytes"),
        (
            "SELECT cardinality(generate_series(TIMESTAMP '1970-01-01 00:00:00', TIMESTAMP '2200-01-01 00:00:00', INTERVAL '1 second'))",
            "sql.max_expression_bytes",
        ),
        ("SELECT cardinality(array_repeat(1, 2000000000))", "sql.max_expression_bytes"),
        ("SELECT length(replace(repeat('x', 1000000), 'x', repeat('y', 1000)))", "sql.max_expression_bytes"),
        ("SELECT length(regexp_replace(repeat('x', 100000), 'x', repeat('y', 1000), 'g'))", "sql.max_expression_bytes"),
        ("SELECT length(concat(repeat('x', 9000000), repeat('x', 9000000)))", "sql.max_expression_bytes"),
        (doubling.as_str(), "sql.max_expression_bytes"),
        ("SELECT cardinality(array_agg(value)) FROM range(1, 200000000)", "sql.max_query_memory_bytes"),
        ("SELECT value FROM range(1, 200000000) ORDER BY value DESC LIMIT 100000000", "sql.max_query_memory_bytes"),
    ];
    for (sql, bound) in bombs {
        let started = Instant::now();
        match analytics.query(sql, &Scope::All).await {
            Err(QueryError::TooBig(m)) => assert!(m.contains(bound), "{sql}: {m}"),
            other => panic!("{sql}: expected TooBig naming {bound}, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{sql}: took {:?}", started.elapsed());
    }
    let grew = peak_rss().saturating_sub(before);
    println!("peak RSS grew by {} MiB over {} bombs", grew >> 20, bombs.len());
    // The bounds: 128 MiB for every pool together, 16 MiB per expression;
    // the bombs asked for 2 GB and more each.
    assert!(grew < 512 << 20, "peak RSS grew by {} MiB", grew >> 20);

    // What stays under the bounds still runs, with SQL's meaning.
    let a = analytics
        .query(
            "SELECT 'a' || 'b' AS ab, CAST(NULL AS VARCHAR) || 'b' AS n, length(repeat('x', 1000) || 'y') AS l",
            &Scope::All,
        )
        .await
        .unwrap();
    assert_eq!(a.to_json_rows().unwrap(), serde_json::json!([{"ab": "ab", "l": 1001}]));
    let a = analytics.query("SELECT 'a' || 'b'", &Scope::All).await.unwrap();
    assert_eq!(a.schema.field(0).name(), "Utf8(\"a\") || Utf8(\"b\")", "the column keeps the operator's name");
    let a = analytics
        .query("SELECT cardinality(range(1, 1001)) AS r, count(*) AS n FROM range(1, 100001)", &Scope::All)
        .await
        .unwrap();
    assert_eq!(a.to_json_rows().unwrap(), serde_json::json!([{"r": 1000, "n": 100000}]));
}
