//! The SQL shards: N databases (SQLite files or PostgreSQL URLs) each holding
//! a `results` table (`sql/migrations/<dialect>/`), written with batched,
//! idempotent multi-row upserts keyed by (`tenant`, `job_id`). A row's shard
//! is chosen by its `job_id` alone, so the two tenants' jobs of one id share
//! a shard, and rows written before ids were per tenant stay where they are.
//!
//! Which shard a row goes to is the [`ShardStrategy`]'s call; see
//! `sql/README.md` for the trade-offs between them.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_schemas::results_table::{ResultRow, SHARD_COLUMNS};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, QueryBuilder, SqlitePool};
use tokio::sync::OnceCell;

/// Rows per `INSERT` statement: 15 columns × 500 = 7,500 bind parameters,
/// under SQLite's 32,766 and PostgreSQL's 65,535.
const ROWS_PER_STATEMENT: usize = 500;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// What can go wrong with the shards.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("invalid shard configuration: {0}")]
    Config(String),
    #[error("shard {shard} ({url}): {source}")]
    Database { shard: usize, url: String, source: sqlx::Error },
    #[error("shard {shard} ({url}): migrations failed: {source}")]
    Migrate { shard: usize, url: String, source: sqlx::migrate::MigrateError },
}

impl ShardError {
    /// Whether retrying later can succeed (the shard is down or busy), as
    /// opposed to a problem with the data or the schema.
    pub fn is_retryable(&self) -> bool {
        match self {
            ShardError::Config(_) => false,
            ShardError::Migrate { source, .. } => match source {
                sqlx::migrate::MigrateError::Execute(e) => transient(e),
                _ => false,
            },
            ShardError::Database { source, .. } => transient(source),
        }
    }
}

fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: connection exception, operator intervention
            // (shutdown), insufficient resources, transaction rollback.
            // SQLite: BUSY (5), LOCKED (6).
            ["08", "57", "53", "40"].iter().any(|class| code.starts_with(class)) || code == "5" || code == "6"
        }
        _ => false,
    }
}

/// How a row's shard is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ShardStrategy {
    /// `hash(job_id) mod N`: even, but changing N moves almost every key.
    HashMod,
    /// Jump consistent hash (Lamping & Veach 2014): even, and growing from N
    /// to N+1 shards moves only 1/(N+1) of the keys. Shards can only be
    /// added at the end, never removed from the middle.
    Jump,
    /// By when the job finished: shard `i` holds `[boundaries[i-1],
    /// boundaries[i])`; needs N-1 ascending boundaries. Old shards go cold
    /// and can be archived; the newest takes every write.
    TimeRange { boundaries: Vec<DateTime<Utc>> },
}

impl ShardStrategy {
    /// Checks the strategy against a shard count.
    pub fn validate(&self, shards: usize) -> Result<(), ShardError> {
        if shards == 0 {
            return Err(ShardError::Config("at least one shard is needed".into()));
        }
        if let ShardStrategy::TimeRange { boundaries } = self {
            if boundaries.len() + 1 != shards {
                return Err(ShardError::Config(format!(
                    "time_range with {shards} shards needs {} boundaries, got {}",
                    shards - 1,
                    boundaries.len()
                )));
            }
            if boundaries.windows(2).any(|w| w[0] >= w[1]) {
                return Err(ShardError::Config("time_range boundaries must be strictly ascending".into()));
            }
        }
        Ok(())
    }

    /// The shard (in `0..shards`) of a row.
    pub fn shard_of(&self, job_id: &str, finished_at: DateTime<Utc>, shards: usize) -> usize {
        match self {
            ShardStrategy::HashMod => (key_hash(job_id) % shards as u64) as usize,
            ShardStrategy::Jump => jump_hash(key_hash(job_id), shards as u32) as usize,
            ShardStrategy::TimeRange { boundaries } => boundaries.partition_point(|b| *b <= finished_at),
        }
    }
}

/// A stable 64-bit hash of a key (the first 8 bytes of its SHA-256): the
/// same on every machine, release and architecture.
pub fn key_hash(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Jump consistent hash: the bucket in `0..buckets` for `key`.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "jump_hash needs at least one bucket");
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

struct Shard {
    /// For messages: the URL without its password.
    url: String,
    pool: Pool,
    migrated: OnceCell<()>,
}

/// The shards, connected lazily: a shard that is down at start-up only
/// fails the writes that go to it.
pub struct ShardSet {
    shards: Vec<Shard>,
    strategy: ShardStrategy,
}

/// Hides a URL's password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl ShardSet {
    /// Opens the shards. `sqlite:<path>` (created if missing) or
    /// `postgres://…` URLs; the order of `urls` is the shard numbering.
    pub fn open(urls: &[String], strategy: ShardStrategy, acquire_timeout: Duration) -> Result<ShardSet, ShardError> {
        strategy.validate(urls.len())?;
        let mut shards = Vec::with_capacity(urls.len());
        for url in urls {
            let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                let opts =
                    PgConnectOptions::from_str(url).map_err(|e| ShardError::Config(format!("{}: {e}", redact(url))))?;
                Pool::Postgres(
                    PgPoolOptions::new().max_connections(4).acquire_timeout(acquire_timeout).connect_lazy_with(opts),
                )
            } else if let Some(path) = url.strip_prefix("sqlite:") {
                let path = path.trim_start_matches("//");
                if let Some(dir) = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| ShardError::Config(format!("{url}: {e}")))?;
                }
                let opts = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(5));
                Pool::Sqlite(SqlitePoolOptions::new().max_connections(1).connect_lazy_with(opts))
            } else {
                return Err(ShardError::Config(format!(
                    "shard URL {} is neither sqlite:<path> nor postgres://",
                    redact(url)
                )));
            };
            shards.push(Shard { url: redact(url), pool, migrated: OnceCell::new() });
        }
        Ok(ShardSet { shards, strategy })
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard URLs, passwords hidden.
    pub fn urls(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.url.clone()).collect()
    }

    /// The shard a row belongs to.
    pub fn route(&self, row: &ResultRow) -> usize {
        self.strategy.shard_of(&row.job_id, row.finished_at, self.shards.len())
    }

    fn err(&self, shard: usize) -> impl FnOnce(sqlx::Error) -> ShardError + '_ {
        move |source| ShardError::Database { shard, url: self.shards[shard].url.clone(), source }
    }

    /// Applies the dialect's migrations to a shard (once per process).
    pub async fn migrate(&self, shard: usize) -> Result<(), ShardError> {
        let s = &self.shards[shard];
        s.migrated
            .get_or_try_init(|| async {
                let r = match &s.pool {
                    Pool::Sqlite(p) => SQLITE_MIGRATIONS.run(p).await,
                    Pool::Postgres(p) => POSTGRES_MIGRATIONS.run(p).await,
                };
                r.map_err(|source| ShardError::Migrate { shard, url: s.url.clone(), source })
            })
            .await
            .map(|_| ())
    }

    /// Writes rows to one shard in one transaction, one row per job
    /// (`tenant`, `job_id`: job ids are per tenant):
    /// a row whose job is already there replaces it only if it finished
    /// later (a job id used again once the store has forgotten its first
    /// job, as the lake keeps both), so a replay or a repeated result writes
    /// nothing. Returns how many rows were written.
    pub async fn upsert(&self, shard: usize, rows: &[&ResultRow]) -> Result<u64, ShardError> {
        self.migrate(shard).await?;
        // One statement may not touch a row twice: of a job's rows, the
        // latest (by finish, then offset) stands for it.
        let mut latest: std::collections::HashMap<(&str, &str), &ResultRow> = std::collections::HashMap::new();
        for r in rows {
            let slot = latest.entry((r.tenant.as_str(), r.job_id.as_str())).or_insert(r);
            if (r.finished_at, r.kafka_offset) > (slot.finished_at, slot.kafka_offset) {
                *slot = r;
            }
        }
        let rows: Vec<&ResultRow> = latest.into_values().collect();
        let rows = rows.as_slice();
        // Every column but the key (`job_id`, `tenant`).
        let update: Vec<String> = SHARD_COLUMNS[2..].iter().map(|c| format!("{c} = excluded.{c}")).collect();
        let on_conflict = format!(
            " ON CONFLICT (tenant, job_id) DO UPDATE SET {} WHERE excluded.finished_at_ms > results.finished_at_ms",
            update.join(", ")
        );
        let mut inserted = 0;
        macro_rules! write_rows {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.map_err(self.err(shard))?;
                for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                    let mut q = QueryBuilder::new(format!("INSERT INTO results ({}) ", SHARD_COLUMNS.join(", ")));
                    q.push_values(chunk, |mut b, r| {
                        b.push_bind(r.job_id.clone())
                            .push_bind(r.tenant.clone())
                            .push_bind(r.model.clone())
                            .push_bind(r.model_version.clone())
                            .push_bind(r.status)
                            .push_bind(r.error_code)
                            .push_bind(r.error_message.clone())
                            .push_bind(r.queued_ms)
                            .push_bind(r.inference_ms)
                            .push_bind(r.batch_size)
                            .push_bind(r.input_tokens)
                            .push_bind(r.worker_id.clone())
                            .push_bind(r.submitted_at.map(|t| t.timestamp_millis()))
                            .push_bind(r.finished_at.timestamp_millis())
                            .push_bind(r.kafka_offset);
                    });
                    q.push(&on_conflict);
                    inserted += q.build().execute(&mut *tx).await.map_err(self.err(shard))?.rows_affected();
                }
                tx.commit().await.map_err(self.err(shard))?;
            }};
        }
        match &self.shards[shard].pool {
            Pool::Sqlite(p) => write_rows!(p),
            Pool::Postgres(p) => write_rows!(p),
        }
        Ok(inserted)
    }

    /// Whether a shard answers `SELECT 1` (readiness checks).
    pub async fn ping(&self, shard: usize) -> Result<(), ShardError> {
        let sql = "SELECT 1";
        match &self.shards[shard].pool {
            Pool::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
            Pool::Postgres(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
        }
        .map_err(self.err(shard))
    }

    /// `(rows, distinct job_ids)` in one shard.
    pub async fn count(&self, shard: usize) -> Result<(i64, i64), ShardError> {
        self.migrate(shard).await?;
        let sql = "SELECT COUNT(*), COUNT(DISTINCT job_id) FROM results";
        match &self.shards[shard].pool {
            Pool::Sqlite(p) => sqlx::query_as(sql).fetch_one(p).await,
            Pool::Postgres(p) => sqlx::query_as(sql).fetch_one(p).await,
        }
        .map_err(self.err(shard))
    }

    /// The `job_id`s in one shard (for checks and tests).
    pub async fn job_ids(&self, shard: usize) -> Result<Vec<String>, ShardError> {
        self.migrate(shard).await?;
        let sql = "SELECT job_id FROM results";
        match &self.shards[shard].pool {
            Pool::Sqlite(p) => sqlx::query_scalar(sql).fetch_all(p).await,
            Pool::Postgres(p) => sqlx::query_scalar(sql).fetch_all(p).await,
        }
        .map_err(self.err(shard))
    }

    /// Closes every pool.
    pub async fn close(&self) {
        for s in &self.shards {
            match &s.pool {
                Pool::Sqlite(p) => p.close().await,
                Pool::Postgres(p) => p.close().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("job-{i}")).collect()
    }

    fn moved(strategy: &ShardStrategy, from: usize, to: usize) -> f64 {
        let now = Utc::now();
        let keys = keys(100_000);
        let moved = keys.iter().filter(|k| strategy.shard_of(k, now, from) != strategy.shard_of(k, now, to)).count();
        moved as f64 / keys.len() as f64
    }

    #[test]
    fn adding_a_shard_moves_one_in_n_plus_one_keys_with_jump_hash_and_most_with_hash_mod() {
        for n in [2, 4, 8] {
            let jump = moved(&ShardStrategy::Jump, n, n + 1);
            let ideal = 1.0 / (n + 1) as f64;
            assert!((jump - ideal).abs() < 0.01, "jump {n}->{}: moved {jump:.4}, ideal {ideal:.4}", n + 1);
            let modulo = moved(&ShardStrategy::HashMod, n, n + 1);
            assert!(modulo > 0.6, "hash-mod {n}->{}: moved only {modulo:.4}", n + 1);
        }
    }

    #[test]
    fn both_hashes_spread_keys_evenly() {
        let now = Utc::now();
        for strategy in [ShardStrategy::Jump, ShardStrategy::HashMod] {
            let mut counts = [0usize; 5];
            for k in keys(50_000) {
                counts[strategy.shard_of(&k, now, 5)] += 1;
            }
            for c in counts {
                assert!((c as f64 - 10_000.0).abs() < 400.0, "{strategy:?}: {counts:?}");
            }
        }
    }

    #[test]
    fn time_ranges_route_by_finish_time_and_are_checked() {
        let b = |d| Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0).unwrap();
        let s = ShardStrategy::TimeRange { boundaries: vec![b(10), b(20)] };
        s.validate(3).unwrap();
        assert_eq!(s.shard_of("x", b(1), 3), 0);
        assert_eq!(s.shard_of("x", b(10), 3), 1, "a boundary starts its shard");
        assert_eq!(s.shard_of("x", b(25), 3), 2);
        assert!(s.validate(2).is_err());
        assert!(ShardStrategy::TimeRange { boundaries: vec![b(20), b(10)] }.validate(3).is_err());
    }

    #[test]
    fn the_hash_is_stable_across_releases() {
        // Changing it would silently re-route every existing key.
        assert_eq!(key_hash("job-0"), key_hash("job-0"));
        assert_eq!(jump_hash(key_hash("job-0"), 1), 0);
        assert_eq!(format!("{:016x}", key_hash("job-0")), "ec67b2acc821cb48");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("sqlite:/tmp/x.db"), "sqlite:/tmp/x.db");
    }
}
