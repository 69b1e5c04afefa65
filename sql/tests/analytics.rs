//! Analytics over a fixed dataset written through the real lake and shard
//! writers: the golden queries in `sql/analytics/` must give their committed
//! answers from the lake *and* from the shards; statements that write are
//! refused; a tenant sees only its rows; limits hold.
//!
//! The shards are two SQLite files, plus one fresh database on each
//! PostgreSQL cluster in `SLUICE_TEST_PG` (comma-separated URLs without a
//! database) when set (`make test` sets it). Re-bless the golden files after an intended change with
//! `SLUICE_BLESS=1 cargo test -p sluice-sql --test analytics`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use sluice_schemas::results_table::ResultRow;
use sluice_sql::{Analytics, Lake, QueryError, QueryLimits, Scope, ShardSet, ShardStrategy, Sources};

const MODELS: [&str; 2] = ["all-minilm-l6-v2", "logreg-iris"];
const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

/// 240 results over three hours of 2026-01-15, deterministic.
fn dataset() -> Vec<ResultRow> {
    let start = Utc.with_ymd_and_hms(2026, 1, 15, 10, 0, 0).unwrap();
    (0..240i64)
        .map(|i| {
            let (status, code) = if i % 17 == 0 {
                ("failed", Some("input_too_long"))
            } else if i % 23 == 0 {
                ("failed", Some("inference_failed"))
            } else if i % 29 == 0 {
                ("expired", Some("deadline_exceeded"))
            } else {
                ("succeeded", None)
            };
            let ran = status == "succeeded";
            let finished = start + chrono::Duration::seconds(i * 45);
            ResultRow {
                job_id: format!("job-{i:04}"),
                tenant: TENANTS[((i * 7) % 11 % 4) as usize].into(),
                model: MODELS[usize::from(i % 3 == 0)].into(),
                model_version: Some("1".into()),
                status,
                error_code: code,
                error_message: code.map(|c| format!("{c} on job {i}")),
                queued_ms: Some((i * 37) % 500),
                inference_ms: ran.then_some(5 + (i * 13) % 40),
                batch_size: ran.then_some([1, 2, 4, 8, 16, 32][(i % 6) as usize]),
                input_tokens: Some(5 + i % 50),
                worker_id: Some(format!("worker-{}", i % 2)),
                submitted_at: Some(finished - chrono::Duration::milliseconds((i * 37) % 500 + 50)),
                finished_at: finished,
                embedding: (ran && i % 3 != 0).then(|| vec![0.1, 0.2, 0.3]),
                output_json: None,
                metadata: [("doc".to_owned(), format!("doc-{i}"))].into(),
                kafka_partition: (i % 3) as i32,
                kafka_offset: i / 3,
            }
        })
        .collect()
}

async fn shard_urls(dir: &Path) -> Vec<String> {
    let mut urls: Vec<String> = (0..2).map(|i| format!("sqlite:{}/shard-{i}.db", dir.display())).collect();
    if let Ok(pg) = std::env::var("SLUICE_TEST_PG") {
        for cluster in pg.split(',').filter(|s| !s.is_empty()) {
            urls.push(fresh_pg_database(cluster).await);
        }
    }
    urls
}

/// A new, empty database on a PostgreSQL cluster.
async fn fresh_pg_database(cluster: &str) -> String {
    use sqlx::Connection;
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!("golden_{}_{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut c = sqlx::PgConnection::connect(&format!("{cluster}/postgres")).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"))).execute(&mut c).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut c).await.unwrap();
    format!("{cluster}/{name}")
}

/// Writes the dataset through the lake (one commit per Kafka partition and
/// 20 offsets) and the shards (jump hash), as the sinks would.
async fn load(dir: &Path) -> Sources {
    let rows = dataset();
    let lake = Lake::open(dir.join("lake")).unwrap();
    for p in 0..3 {
        let mine: Vec<ResultRow> = rows.iter().filter(|r| r.kafka_partition == p).cloned().collect();
        for chunk in mine.chunks(20) {
            let (first, last) = (chunk[0].kafka_offset, chunk[chunk.len() - 1].kafka_offset);
            lake.commit("golden.results", p, first, last, chunk).unwrap();
        }
    }
    let urls = shard_urls(dir).await;
    let shards = ShardSet::open(&urls, ShardStrategy::Jump, Duration::from_secs(3)).unwrap();
    let mut per_shard = vec![Vec::new(); shards.len()];
    for r in &rows {
        per_shard[shards.route(r)].push(r);
    }
    for (i, rows) in per_shard.iter().enumerate() {
        shards.upsert(i, rows).await.unwrap();
        // A replay writes nothing.
        assert_eq!(shards.upsert(i, rows).await.unwrap(), 0);
    }
    shards.close().await;
    Sources { lake: Some(dir.join("lake")), shards: urls }
}

fn limits() -> QueryLimits {
    QueryLimits::new(10_000, Duration::from_secs(60))
}

fn analytics_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("analytics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_queries_answer_the_same_from_the_lake_and_from_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let analytics = Analytics::new(load(dir.path()).await, limits()).unwrap();
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let mut names: Vec<PathBuf> = std::fs::read_dir(analytics_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "the example queries are there");
    for path in names {
        let sql = std::fs::read_to_string(&path).unwrap();
        let from_lake = analytics.query(&sql, &Scope::All).await.unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let on_shards = sql.replace("FROM results", "FROM shards");
        let from_shards =
            analytics.query(&on_shards, &Scope::All).await.unwrap_or_else(|e| panic!("{path:?} on shards: {e}"));
        let expected_path = path.with_extension("expected");
        let got = from_lake.to_table();
        if bless {
            std::fs::write(&expected_path, format!("{got}\n")).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{expected_path:?} is missing: run with SLUICE_BLESS=1 once"));
        assert_eq!(got.trim_end(), expected.trim_end(), "{path:?} from the lake");
        assert_eq!(from_shards.to_table(), got, "{path:?}: the shards disagree with the lake");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_agree_and_every_job_is_in_exactly_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let analytics = Analytics::new(load(dir.path()).await, limits()).unwrap();
    let one = |a: &sluice_sql::Answer| a.to_json_rows().unwrap()[0].clone();
    let lake = analytics.query("SELECT count(*) AS n, count(DISTINCT job_id) AS d FROM results", &Scope::All).await;
    let shards = analytics.query("SELECT count(*) AS n, count(DISTINCT job_id) AS d FROM shards", &Scope::All).await;
    assert_eq!(one(&lake.unwrap()), serde_json::json!({"n": 240, "d": 240}));
    assert_eq!(one(&shards.unwrap()), serde_json::json!({"n": 240, "d": 240}));
    // Partition columns come from the directories.
    let parts = analytics
        .query("SELECT model, date, count(*) AS n FROM results GROUP BY model, date ORDER BY model", &Scope::All)
        .await
        .unwrap();
    assert_eq!(
        parts.to_json_rows().unwrap(),
        serde_json::json!([
            {"model": "all-minilm-l6-v2", "date": "2026-01-15", "n": 160},
            {"model": "logreg-iris", "date": "2026-01-15", "n": 80},
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_write_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let sources = load(dir.path()).await;
    let analytics = Analytics::new(sources, limits()).unwrap();
    let out = dir.path().join("copied.csv");
    for sql in [
        "CREATE TABLE t AS SELECT 1".to_owned(),
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'".to_owned(),
        "DROP TABLE results".to_owned(),
        "INSERT INTO results SELECT * FROM results".to_owned(),
        "DELETE FROM shards".to_owned(),
        format!("COPY (SELECT * FROM results) TO '{}'", out.display()),
        "SET datafusion.execution.batch_size = 1".to_owned(),
        "CREATE VIEW v AS SELECT 1".to_owned(),
    ] {
        match analytics.query(&sql, &Scope::All).await {
            Err(QueryError::ReadOnly(msg)) => assert!(!msg.is_empty()),
            // Statements DataFusion cannot even plan are refused too.
            Err(QueryError::Invalid(msg)) => assert!(!msg.is_empty(), "{sql}"),
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
    assert!(!out.exists(), "COPY wrote nothing");
    let n = analytics.query("SELECT count(*) AS n FROM results", &Scope::All).await.unwrap();
    assert_eq!(n.to_json_rows().unwrap()[0]["n"], 240, "nothing was dropped");
    assert!(matches!(
        analytics.query("SELECT nope FROM results", &Scope::All).await,
        Err(QueryError::Invalid(m)) if m.contains("nope")
    ));
}

/// A shard that cannot be reached fails only the queries that name
/// `shards`, with `unavailable` naming the shard (and not its password),
/// within a bound of its own; `results` answers meanwhile, and `shards`
/// answers again once the shard is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreachable_shard_fails_only_the_queries_that_name_shards() {
    let dir = tempfile::tempdir().unwrap();
    let sources = load(dir.path()).await;
    let count = |a: sluice_sql::Answer| a.to_json_rows().unwrap()[0]["n"].clone();

    // A PostgreSQL shard that accepts connections and never answers.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = black_hole.local_addr().unwrap().port();
    let mut urls = sources.shards.clone();
    urls.push(format!("postgres://sluice:hunter2@127.0.0.1:{port}/results"));
    let down = urls.len() - 1;
    let analytics =
        std::sync::Arc::new(Analytics::new(Sources { lake: sources.lake.clone(), shards: urls }, limits()).unwrap());
    let waiting = {
        let a = analytics.clone();
        tokio::spawn(async move { a.query("SELECT count(*) AS n FROM shards", &Scope::All).await })
    };
    let acme = Scope::Tenant("acme".into());
    let lake = analytics.query("SELECT count(*) AS n FROM results", &Scope::All).await.unwrap();
    assert_eq!(count(lake), 240);
    let acme_rows = dataset().iter().filter(|r| r.tenant == "acme").count();
    assert_eq!(count(analytics.query("SELECT count(*) AS n FROM results", &acme).await.unwrap()), acme_rows);
    // A table of the query's own called `shards` is not the shards.
    let cte = "WITH shards AS (SELECT job_id FROM results) SELECT count(*) AS n FROM shards";
    assert_eq!(count(analytics.query(cte, &Scope::All).await.unwrap()), 240);
    assert!(!waiting.is_finished(), "the lake's queries did not wait for the shard's connection");
    for answer in [waiting.await.unwrap(), analytics.query("SELECT job_id FROM shards LIMIT 1", &acme).await] {
        match answer {
            Err(QueryError::Unavailable(m)) => {
                assert!(m.contains(&format!("shard {down}")) && m.contains(&port.to_string()), "{m}");
                assert!(!m.contains("hunter2"), "the password is redacted: {m}");
            }
            other => panic!("expected unavailable, got {:?}", other.map(|a| a.to_table())),
        }
    }
    drop(black_hole);

    // A SQLite shard that cannot be opened (its path is a directory), then can.
    let blocked = dir.path().join("blocked.db");
    std::fs::create_dir(&blocked).unwrap();
    let mut urls = sources.shards.clone();
    urls.push(format!("sqlite:{}", blocked.display()));
    let analytics = Analytics::new(Sources { lake: sources.lake.clone(), shards: urls }, limits()).unwrap();
    let refused = analytics.query("SELECT count(*) AS n FROM shards", &Scope::All).await;
    assert!(matches!(refused, Err(QueryError::Unavailable(_))), "{:?}", refused.map(|a| a.to_table()));
    assert_eq!(count(analytics.query("SELECT count(*) AS n FROM results", &Scope::All).await.unwrap()), 240);
    std::fs::remove_dir(&blocked).unwrap();
    let back = analytics.query("SELECT count(*) AS n FROM shards", &Scope::All).await.unwrap();
    assert_eq!(count(back), 240, "the shard is back (empty), the others hold every row");
}

/// A TCP forwarder to `to` whose `cut` closes its port and every connection
/// through it: a database host that goes away.
struct Forwarder {
    port: u16,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Forwarder {
    async fn start(to: String) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let t = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = to.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                t.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        Forwarder { port, tasks }
    }

    fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// A PostgreSQL shard that goes away after the first query planned over it
/// answers `unavailable` (naming the shard) within the shard pool's bound,
/// not the query failure the shard reader gives after its own 30 s; the lake
/// still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_goes_away_after_planning_is_unavailable_at_once() {
    let cluster = std::env::var("SLUICE_TEST_PG").expect("SLUICE_TEST_PG: PostgreSQL clusters (make test sets it)");
    let cluster = cluster.split(',').next().unwrap().to_owned();
    let url = fresh_pg_database(&cluster).await;
    let (base, db) = url.rsplit_once('/').unwrap();
    let (_, hostport) = base.rsplit_once('@').unwrap_or(("", base.trim_start_matches("postgres://")));
    let forwarder = Forwarder::start(hostport.to_owned()).await;
    let via = format!("postgres://sluice@127.0.0.1:{}/{db}", forwarder.port);
    let dir = tempfile::tempdir().unwrap();
    let sources = load(dir.path()).await;
    let mut urls = sources.shards.clone();
    urls.push(via);
    let down = urls.len() - 1;
    let analytics = Analytics::new(Sources { lake: sources.lake.clone(), shards: urls }, limits()).unwrap();
    let count = |a: sluice_sql::Answer| a.to_json_rows().unwrap()[0]["n"].clone();
    assert_eq!(count(analytics.query("SELECT count(*) AS n FROM shards", &Scope::All).await.unwrap()), 240);

    forwarder.cut();
    let started = std::time::Instant::now();
    match analytics.query("SELECT count(*) AS n FROM shards", &Scope::All).await {
        Err(QueryError::Unavailable(m)) => assert!(m.contains(&format!("shard {down}")), "{m}"),
        other => panic!("expected unavailable, got {:?}", other.map(|a| a.to_table())),
    }
    // The pool's 3 s acquire bound, not the shard reader's 30 s.
    assert!(started.elapsed() < Duration::from_secs(20), "answered after {:?}", started.elapsed());
    assert_eq!(count(analytics.query("SELECT count(*) AS n FROM results", &Scope::All).await.unwrap()), 240);
}

/// Issue 10, item 9: a job id used again once the store has forgotten its
/// first job (the lake lands both results) lands its later result in the
/// shards too, instead of being dropped as a repeat; a replay of either
/// result, or both in one write, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_used_again_lands_its_later_result_in_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let urls = shard_urls(dir.path()).await;
    let shards = ShardSet::open(&urls, ShardStrategy::Jump, Duration::from_secs(3)).unwrap();
    let first = ResultRow { job_id: "again".into(), tenant: "acme".into(), ..dataset()[1].clone() };
    let mut later = first.clone();
    later.status = "failed";
    later.error_code = Some("inference_failed");
    later.finished_at = first.finished_at + chrono::Duration::days(2);
    later.kafka_offset = first.kafka_offset + 1000;
    for i in 0..shards.len() {
        assert_eq!(shards.upsert(i, &[&first]).await.unwrap(), 1, "shard {i}");
        assert_eq!(shards.upsert(i, &[&later]).await.unwrap(), 1, "shard {i}: the later result replaces the first");
        assert_eq!(shards.upsert(i, &[&first]).await.unwrap(), 0, "shard {i}: a replay of the first");
        assert_eq!(shards.upsert(i, &[&later, &first, &later]).await.unwrap(), 0, "shard {i}: replays in one write");
        assert_eq!(shards.count(i).await.unwrap(), (1, 1), "shard {i}");
    }
    shards.close().await;
    let analytics = Analytics::new(Sources { lake: None, shards: urls }, limits()).unwrap();
    let rows = analytics.query("SELECT tenant, status, error_code FROM shards", &Scope::All).await.unwrap();
    let want = serde_json::json!({"tenant": "acme", "status": "failed", "error_code": "inference_failed"});
    let got = rows.to_json_rows().unwrap();
    assert!(got.as_array().unwrap().iter().all(|r| *r == want) && !got.as_array().unwrap().is_empty(), "{got}");
}

/// Issue 10, item 12: job ids are per tenant. Two tenants' jobs of one id
/// are two rows, neither replaces the other, and a shard made before ids
/// were per tenant (only migration 0001, rows in it) is migrated in place:
/// its rows stay, and its key becomes (`tenant`, `job_id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_jobs_of_one_id_are_two_rows_and_old_shards_migrate() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let urls = shard_urls(dir.path()).await;
    let acme = ResultRow { job_id: "same-id".into(), tenant: "acme".into(), ..dataset()[1].clone() };
    let mut globex = acme.clone();
    globex.tenant = "globex".into();
    globex.status = "failed";
    globex.error_code = Some("inference_failed");
    // Every shard starts as the old schema, holding acme's row (finished
    // after every replay below, so they change nothing).
    for url in &urls {
        let insert = "INSERT INTO results (job_id, tenant, model, status, finished_at_ms, kafka_offset) \
                      VALUES ('same-id', 'acme', 'm', 'succeeded', 4102444800000, 1)";
        if url.starts_with("sqlite:") {
            let mut c = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc")).await.unwrap();
            sqlx::raw_sql(include_str!("../migrations/sqlite/0001_results.sql")).execute(&mut c).await.unwrap();
            sqlx::raw_sql(insert).execute(&mut c).await.unwrap();
        } else {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::raw_sql(include_str!("../migrations/postgres/0001_results.sql")).execute(&mut c).await.unwrap();
            sqlx::raw_sql(insert).execute(&mut c).await.unwrap();
        }
    }
    let shards = ShardSet::open(&urls, ShardStrategy::Jump, Duration::from_secs(3)).unwrap();
    for i in 0..shards.len() {
        assert_eq!(shards.count(i).await.unwrap(), (1, 1), "shard {i}: the old row is kept");
        assert_eq!(shards.upsert(i, &[&globex]).await.unwrap(), 1, "shard {i}: globex's job of the same id lands");
        assert_eq!(shards.upsert(i, &[&acme, &globex]).await.unwrap(), 0, "shard {i}: replays write nothing");
        assert_eq!(shards.count(i).await.unwrap(), (2, 1), "shard {i}: two rows, one job id");
    }
    shards.close().await;
    let analytics = Analytics::new(Sources { lake: None, shards: urls.clone() }, limits()).unwrap();
    for (tenant, status) in [("acme", "succeeded"), ("globex", "failed")] {
        let rows = analytics
            .query("SELECT status FROM shards WHERE job_id = 'same-id'", &Scope::Tenant(tenant.into()))
            .await
            .unwrap();
        let got = rows.to_json_rows().unwrap();
        assert_eq!(got.as_array().unwrap().len(), urls.len(), "{tenant}: {got}");
        assert!(got.as_array().unwrap().iter().all(|r| r["status"] == status), "{tenant}: {got}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_only_its_own_rows_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let analytics = Analytics::new(load(dir.path()).await, limits()).unwrap();
    let acme = Scope::Tenant("acme".into());
    let expected = dataset().iter().filter(|r| r.tenant == "acme").count();
    for table in ["results", "shards"] {
        let a = analytics
            .query(&format!("SELECT count(*) AS n, count(DISTINCT tenant) AS t FROM {table}"), &acme)
            .await
            .unwrap();
        assert_eq!(a.to_json_rows().unwrap()[0], serde_json::json!({"n": expected, "t": 1}), "{table}");
        for filter in ["tenant = 'globex'", "tenant <> 'acme'", "tenant = 'globex' OR tenant <> 'acme'"] {
            let q = format!("SELECT count(*) AS n FROM {table} WHERE {filter}");
            let other = analytics.query(&q, &acme).await.unwrap_or_else(|e| panic!("{q}: {e}"));
            assert_eq!(other.to_json_rows().unwrap()[0]["n"], 0, "{q}: another tenant's rows are invisible");
            let all = analytics.query(&q, &Scope::All).await.unwrap_or_else(|e| panic!("{q}: {e}"));
            assert!(all.to_json_rows().unwrap()[0]["n"].as_i64().unwrap() > 0, "{q}: unscoped, they are there");
        }
    }
    // The unscoped tables behind the views cannot be named.
    for sql in ["SELECT * FROM lake", "SELECT * FROM shard_0", "SELECT * FROM information_schema.tables"] {
        assert!(matches!(analytics.query(sql, &acme).await, Err(QueryError::Invalid(_))), "{sql}");
    }
}

/// Issue 10, item 1. A scoped caller's expressions never run on another
/// tenant's rows: an expression that fails on one chosen row used to answer
/// "does globex's job x exist" (and, with a second condition, read its
/// values), one bit per query. It now fails only on the caller's own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_probe_another_tenants_rows_with_an_expression_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    let analytics = Analytics::new(load(dir.path()).await, limits()).unwrap();
    let acme = Scope::Tenant("acme".into());
    let rows = dataset();
    let theirs = &rows.iter().find(|r| r.tenant == "globex").unwrap().job_id;
    let own = &rows.iter().find(|r| r.tenant == "acme").unwrap().job_id;
    let acme_rows = rows.iter().filter(|r| r.tenant == "acme").count();
    let probe = |table: &str, id: &str, also: &str| {
        format!(
            "SELECT count(*) AS n FROM {table} \
             WHERE CASE WHEN job_id = '{id}'{also} THEN CAST(job_id AS BIGINT) ELSE 0 END = 0"
        )
    };
    for table in ["results", "shards"] {
        for (id, also) in [(theirs.as_str(), ""), ("no-such-job", ""), (theirs, " AND queued_ms >= 0")] {
            let q = probe(table, id, also);
            let a = analytics.query(&q, &acme).await.unwrap_or_else(|e| panic!("{q}: {e}"));
            assert_eq!(a.to_json_rows().unwrap()[0]["n"], acme_rows, "{q}");
            // The probe is real: unscoped, the same query fails on that row
            // (in the lake; SQLite shards cast 'job-…' to 0 instead).
            if id == theirs && table == "results" {
                assert!(analytics.query(&q, &Scope::All).await.is_err(), "{q} unscoped");
            }
        }
        // On the caller's own rows the expression still runs (and fails).
        let q = probe(table, own, "");
        assert!(matches!(analytics.query(&q, &acme).await, Err(QueryError::Execution(_))), "{q}");
        // Plain filters still narrow the tenant's rows.
        let q = format!("SELECT count(*) AS n FROM {table} WHERE job_id = '{own}' OR job_id = '{theirs}'");
        assert_eq!(analytics.query(&q, &acme).await.unwrap().to_json_rows().unwrap()[0]["n"], 1, "{q}");
    }
    // EXPLAIN ANALYZE shows neither the lake's files, nor the shards, nor
    // the row counts of the scans under the tenant filter.
    let lake = dir.path().join("lake").display().to_string();
    for table in ["results", "shards"] {
        for explain in ["EXPLAIN", "EXPLAIN ANALYZE", "EXPLAIN VERBOSE"] {
            let q = format!("{explain} SELECT count(*) FROM {table} WHERE queued_ms >= 0");
            let text = analytics.query(&q, &acme).await.unwrap_or_else(|e| panic!("{q}: {e}")).to_table();
            // A row count is `…rows=N`; a bare `=N` also matches timings
            // such as `elapsed_compute=240.1µs`.
            for secret in [lake.as_str(), ".parquet", ".db", "shard_", "postgres", &format!("rows={}", rows.len())] {
                assert!(!text.contains(secret), "{q} shows {secret:?}:\n{text}");
            }
            assert!(text.contains("TenantScan: tenant=acme"), "{q}:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_and_time_are_bounded_and_every_format_renders() {
    let dir = tempfile::tempdir().unwrap();
    let sources = load(dir.path()).await;
    let few = Analytics::new(sources.clone(), QueryLimits::new(7, Duration::from_secs(60))).unwrap();
    let a = few.query("SELECT job_id, finished_at FROM results ORDER BY job_id", &Scope::All).await.unwrap();
    assert_eq!((a.rows, a.truncated), (7, true));
    let json = a.to_json_rows().unwrap();
    assert_eq!(json.as_array().unwrap().len(), 7);
    assert_eq!(json[0]["job_id"], "job-0000");
    let csv = String::from_utf8(a.to_csv().unwrap()).unwrap();
    assert!(csv.starts_with("job_id,finished_at\njob-0000,2026-01-15T10:00:00"), "{csv}");
    assert_eq!(csv.lines().count(), 8);
    let ipc = a.to_arrow_ipc().unwrap();
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None).unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 7);

    let slow = Analytics::new(sources, QueryLimits::new(10, Duration::from_millis(50))).unwrap();
    let cross = "SELECT count(*) FROM results a, results b, results c WHERE a.queued_ms + b.queued_ms > c.queued_ms";
    assert!(matches!(slow.query(cross, &Scope::All).await, Err(QueryError::Timeout(_))));
}
