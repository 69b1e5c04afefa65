//! SQL analytics: DataFusion over the lake and the shards.
//!
//! Two tables are visible to queries:
//!
//! - `results`: the Parquet lake (a listing table; `model` and `date` come
//!   from the `model=…/date=…` directories), every column of
//!   [`lake_schema`] plus those two.
//! - `shards`: the union of every SQL shard's `results` table, with the same
//!   column names and types as `results` where both have them (timestamps
//!   converted from epoch milliseconds, `date` derived from `finished_at`).
//!   Each shard is a `datafusion-table-providers` table, so projections,
//!   filters and limits run inside the shard's own database and DataFusion
//!   merges what comes back.
//!
//! Queries are read-only (DDL, DML, `COPY` and `SET`-like statements are
//! refused before anything runs), bounded in time and rows, and optionally
//! scoped to one tenant: a scoped query sees the two tables as
//! [`TenantTable`]s, which yield only that tenant's rows before any of the
//! caller's expressions sees a row (see `scoped.rs`), and cannot name
//! anything else, because nothing else is registered in its session.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow_schema::{DataType, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::catalog::view::ViewTable;
use datafusion::common::TableReference;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{LogicalPlan, TableProviderFilterPushDown};
use datafusion_table_providers_common::sql::db_connection_pool::Mode;
use datafusion_table_providers_postgres::PostgresTableFactory;
use datafusion_table_providers_postgres::pool::PostgresConnectionPool;
use datafusion_table_providers_sqlite::SqliteTableFactory;
use datafusion_table_providers_sqlite::pool::SqliteConnectionPoolFactory;
use futures::StreamExt;
use secrecy::SecretString;
use sluice_schemas::results_table::{PARTITION_COLUMNS, lake_schema, shard_schema};
use tokio::sync::{Mutex, OnceCell};

use crate::bounds::{BoundConcat, Bounded, QueryPool, SharedBudget};
use crate::scoped::TenantTable;
use crate::shards::{ShardSet, ShardStrategy, redact};

/// Why a query was not answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL does not parse or does not plan (unknown column, type error…).
    #[error("{0}")]
    Invalid(String),
    /// The statement would change something: only queries are allowed.
    #[error("only read-only queries are allowed: {0}")]
    ReadOnly(String),
    #[error("the query ran past its {0:?} limit")]
    Timeout(Duration),
    /// A shard could not be reached to plan the query.
    #[error("{0}")]
    Unavailable(String),
    /// Running the query failed (a shard went away mid-query, I/O…).
    #[error("the query failed: {0}")]
    Execution(String),
    #[error("analytics setup: {0}")]
    Setup(String),
    /// The query needs more memory than one query may use; it will never fit.
    #[error("{0}")]
    TooBig(String),
    /// The queries running together hold all the memory SQL may use; the
    /// same query can succeed later.
    #[error("{0}")]
    Busy(String),
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> QueryError {
        match e.find_root() {
            DataFusionError::SQL(..) | DataFusionError::Plan(_) | DataFusionError::SchemaError(..) => {
                QueryError::Invalid(e.strip_backtrace())
            }
            DataFusionError::NotImplemented(_) => QueryError::Invalid(e.strip_backtrace()),
            DataFusionError::Execution(m) if m.contains(crate::vectors::MISMATCH) => QueryError::Invalid(m.clone()),
            DataFusionError::ResourcesExhausted(m) if m.contains(crate::bounds::BUSY) => QueryError::Busy(m.clone()),
            // Our pool and functions name their setting; an operator that
            // fails otherwise (e.g. when it cannot spill) does not.
            DataFusionError::ResourcesExhausted(m) if m.contains("sql.max_") => QueryError::TooBig(m.clone()),
            DataFusionError::ResourcesExhausted(m) => QueryError::TooBig(format!(
                "{m} (a query may hold sql.max_query_memory_bytes of memory, and does not spill to disk)"
            )),
            _ => QueryError::Execution(e.strip_backtrace()),
        }
    }
}

/// Limits of one query (and of all queries together); see `bounds.rs`.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Rows returned at most; the answer says when it was cut.
    pub max_rows: usize,
    /// Wall time from planning to the last row. A query past it is dropped,
    /// which cancels its tasks at their next await.
    pub timeout: Duration,
    /// Memory one query's operators may reserve (aggregates, sorts, joins,
    /// buffered batches), and the bytes of its answer.
    pub max_query_memory_bytes: usize,
    /// Memory all queries of one [`Analytics`] may reserve together.
    pub max_total_memory_bytes: usize,
    /// Bytes one function call may produce for one batch (`repeat`, `||`,
    /// `range`, …), estimated before it allocates.
    pub max_expression_bytes: usize,
}

impl QueryLimits {
    /// `max_rows` and `timeout`, with the default memory bounds.
    pub fn new(max_rows: usize, timeout: Duration) -> QueryLimits {
        QueryLimits {
            max_rows,
            timeout,
            max_query_memory_bytes: 512 << 20,
            max_total_memory_bytes: 1 << 30,
            max_expression_bytes: 64 << 20,
        }
    }
}

/// Whose rows a query may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant's (the operator's `sluice sql`).
    All,
    /// One tenant's (`POST /v1/sql`).
    Tenant(String),
}

/// A query's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    /// More rows existed than `max_rows`.
    pub truncated: bool,
    pub elapsed: Duration,
}

impl Answer {
    /// A text table, for terminals.
    pub fn to_table(&self) -> String {
        arrow::util::pretty::pretty_format_batches(&self.batches)
            .map(|t| t.to_string())
            .unwrap_or_else(|e| format!("(cannot format: {e})"))
    }

    /// Rows as JSON objects.
    pub fn to_json_rows(&self) -> Result<serde_json::Value, QueryError> {
        let mut w = arrow::json::ArrayWriter::new(Vec::new());
        let refs: Vec<&RecordBatch> = self.batches.iter().collect();
        w.write_batches(&refs).map_err(|e| QueryError::Execution(e.to_string()))?;
        w.finish().map_err(|e| QueryError::Execution(e.to_string()))?;
        let bytes = w.into_inner();
        if bytes.is_empty() {
            return Ok(serde_json::Value::Array(vec![]));
        }
        serde_json::from_slice(&bytes).map_err(|e| QueryError::Execution(e.to_string()))
    }

    /// CSV with a header line.
    pub fn to_csv(&self) -> Result<Vec<u8>, QueryError> {
        let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(Vec::new());
        if self.batches.is_empty() {
            // Still say which columns there would have been.
            let names: Vec<&str> = self.schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Ok(format!("{}\n", names.join(",")).into_bytes());
        }
        for b in &self.batches {
            w.write(b).map_err(|e| QueryError::Execution(e.to_string()))?;
        }
        Ok(w.into_inner())
    }

    /// An Arrow IPC stream.
    pub fn to_arrow_ipc(&self) -> Result<Vec<u8>, QueryError> {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &self.schema)
            .map_err(|e| QueryError::Execution(e.to_string()))?;
        for b in &self.batches {
            w.write(b).map_err(|e| QueryError::Execution(e.to_string()))?;
        }
        w.into_inner().map_err(|e| QueryError::Execution(e.to_string()))
    }
}

/// Longest wait to reach a shard (connect, migrate, read its schema) when a
/// query first names `shards`.
const SHARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for a connection to a shard from the pool that checks shards
/// are up before each query that names them.
const SHARD_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the data is.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The lake's root (as given to [`crate::Lake::open`]); `None`: no lake.
    pub lake: Option<PathBuf>,
    /// Shard URLs, in shard order (`sqlite:<path>` or `postgres://…`).
    pub shards: Vec<String>,
}

/// The analytics engine: cheap to share, one DataFusion session per query.
///
/// Queries run on threads of their own ([`SQL_THREADS`] of them, named
/// `sluice-sql`), never on the caller's runtime: a query that keeps its
/// threads busy for its whole time bound slows the process's other work
/// (the gateway's job submissions and long-polls) only as much as the
/// operating system shares the CPU, instead of holding the gateway's
/// runtime threads.
pub struct Analytics {
    engine: Arc<Engine>,
    runtime: SqlRuntime,
}

/// Threads of the runtime that runs queries: enough for
/// `sql.max_concurrent` queries to make progress together on a small
/// machine; DataFusion runs each query in 2 partitions.
pub const SQL_THREADS: usize = 2;

/// The query runtime; shut down without waiting when the engine is dropped
/// (possibly inside another runtime, where waiting is not allowed).
struct SqlRuntime(Option<tokio::runtime::Runtime>);

impl Drop for SqlRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Cancels a query's task when the caller stops waiting (a client gone).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Analytics {
    pub fn new(sources: Sources, limits: QueryLimits) -> Result<Analytics, QueryError> {
        let engine = Arc::new(Engine::new(sources, limits)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SQL_THREADS)
            .thread_name("sluice-sql")
            .enable_all()
            .build()
            .map_err(|e| QueryError::Setup(format!("cannot start the query runtime: {e}")))?;
        Ok(Analytics { engine, runtime: SqlRuntime(Some(runtime)) })
    }

    /// Runs one read-only statement on the query runtime, within
    /// `limits.timeout` from planning to the last row. Dropping the returned
    /// future cancels the query.
    pub async fn query(&self, sql: &str, scope: &Scope) -> Result<Answer, QueryError> {
        let (engine, sql, scope) = (Arc::clone(&self.engine), sql.to_owned(), scope.clone());
        let rt = self.runtime.0.as_ref().expect("the runtime lives as long as the engine");
        let task = rt.spawn(async move { engine.query(&sql, &scope).await });
        let _cancel = AbortOnDrop(task.abort_handle());
        match task.await {
            Ok(answer) => answer,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(QueryError::Execution("the query was cancelled".into())),
        }
    }
}

/// What runs queries: the sources, the plans built from them, the memory
/// budget.
struct Engine {
    sources: Sources,
    limits: QueryLimits,
    /// Used only to create the shards' tables before the first query.
    shard_set: Option<ShardSet>,
    /// The plan of `results`, built on the first query; it needs no shard.
    results: OnceCell<LogicalPlan>,
    /// The plan of `shards`, built on the first query that names `shards`
    /// and reaches every shard. While one cannot be reached, queries that
    /// name `shards` are answered `unavailable` (and the next one tries
    /// again); queries over `results` alone never wait for a shard.
    shards: Mutex<Option<LogicalPlan>>,
    /// What every query's pool draws from.
    memory: Arc<SharedBudget>,
}

fn sqlite_path(url: &str) -> Option<&str> {
    url.strip_prefix("sqlite:").map(|p| p.trim_start_matches("//"))
}

/// A `postgres://user:pass@host:port/db?sslmode=…` URL as the key/value
/// parameters `datafusion-table-providers` takes.
fn pg_params(url: &str) -> Result<std::collections::HashMap<String, SecretString>, QueryError> {
    let bad = || QueryError::Setup(format!("cannot parse shard URL {}", redact(url)));
    let rest = url.split_once("://").ok_or_else(bad)?.1;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, db) = rest.split_once('/').unwrap_or((rest, "postgres"));
    let (creds, hostport) = authority.rsplit_once('@').unwrap_or(("", authority));
    let (user, pass) = creds.split_once(':').map_or((creds, None), |(u, p)| (u, Some(p)));
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5432"));
    let mut p = std::collections::HashMap::new();
    let mut put = |k: &str, v: &str| {
        p.insert(k.to_owned(), SecretString::from(v.to_owned()));
    };
    put("host", host);
    put("port", port);
    put("db", db);
    put("sslmode", "prefer");
    if !user.is_empty() {
        put("user", user);
    }
    if let Some(pass) = pass {
        put("pass", pass);
    }
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        if let Some(("sslmode", v)) = kv.split_once('=') {
            put("sslmode", v);
        }
    }
    Ok(p)
}

impl Engine {
    fn new(sources: Sources, limits: QueryLimits) -> Result<Engine, QueryError> {
        if sources.shards.is_empty() && sources.lake.is_none() {
            return Err(QueryError::Setup("neither a lake nor shards to query".into()));
        }
        // Routing does not matter here; any valid strategy will do.
        let shard_set = match sources.shards.is_empty() {
            true => None,
            false => Some(
                ShardSet::open(&sources.shards, ShardStrategy::HashMod, SHARD_ACQUIRE_TIMEOUT)
                    .map_err(|e| QueryError::Setup(e.to_string()))?,
            ),
        };
        let memory = SharedBudget::new(limits.max_total_memory_bytes);
        Ok(Engine { sources, limits, shard_set, results: OnceCell::new(), shards: Mutex::new(None), memory })
    }

    fn lake_table(&self) -> Result<Arc<dyn TableProvider>, QueryError> {
        let schema = lake_schema();
        let Some(root) = &self.sources.lake else {
            return Ok(Arc::new(datafusion::datasource::empty::EmptyTable::new(Arc::new(with_partitions(&schema)))));
        };
        let dir = crate::Lake::open(root).map_err(|e| QueryError::Setup(e.to_string()))?.results_dir();
        let url = ListingTableUrl::parse(format!("{}/", dir.display()))?;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(PARTITION_COLUMNS.iter().map(|c| (c.to_string(), DataType::Utf8)).collect());
        let config = ListingTableConfig::new(url).with_listing_options(options).with_schema(schema);
        Ok(Arc::new(ListingTable::try_new(config)?))
    }

    /// Shard `i`'s table, its schema migrated; `unavailable` when the shard
    /// cannot be reached within [`SHARD_CONNECT_TIMEOUT`].
    async fn shard_table(&self, i: usize) -> Result<Arc<dyn TableProvider>, QueryError> {
        let url = &self.sources.shards[i];
        tokio::time::timeout(SHARD_CONNECT_TIMEOUT, self.connect_shard(i)).await.map_err(|_| {
            QueryError::Unavailable(format!(
                "shard {i} ({}): no answer within {SHARD_CONNECT_TIMEOUT:?}; `results` (the lake) answers without it",
                redact(url)
            ))
        })?
    }

    async fn connect_shard(&self, i: usize) -> Result<Arc<dyn TableProvider>, QueryError> {
        let url = &self.sources.shards[i];
        let unavailable = |e: &dyn std::fmt::Display| {
            QueryError::Unavailable(format!(
                "shard {i} ({}): {e}; `results` (the lake) answers without it",
                redact(url)
            ))
        };
        let shard_set = self.shard_set.as_ref().expect("shards are configured");
        shard_set
            .migrate(i)
            .await
            .map_err(|e| QueryError::Unavailable(format!("{e}; `results` (the lake) answers without it")))?;
        let table = TableReference::bare("results");
        if let Some(path) = sqlite_path(url) {
            let pool = SqliteConnectionPoolFactory::new(path, Mode::File, Duration::from_secs(5))
                .with_schema(table.clone(), shard_schema())
                .build()
                .await
                .map_err(|e| unavailable(&e))?;
            let t = SqliteTableFactory::new(Arc::new(pool)).table_provider(table).await.map_err(|e| unavailable(&e))?;
            Ok(Arc::new(ShardTable(t)))
        } else {
            let pool = PostgresConnectionPool::new(pg_params(url)?).await.map_err(|e| unavailable(&e))?;
            let t =
                PostgresTableFactory::new(Arc::new(pool)).table_provider(table).await.map_err(|e| unavailable(&e))?;
            Ok(Arc::new(ShardTable(t)))
        }
    }

    /// The plan of `results` (the lake), built once.
    async fn results_plan(&self) -> Result<LogicalPlan, QueryError> {
        let plan = self
            .results
            .get_or_try_init(|| async {
                let base = SessionContext::new();
                base.register_table("lake", self.lake_table()?)?;
                Ok::<_, QueryError>(base.sql("SELECT * FROM lake").await?.into_unoptimized_plan())
            })
            .await?;
        Ok(plan.clone())
    }

    /// The plan of `shards`, built once every shard has been reached. The
    /// lock makes concurrent first queries connect once; they wait for it
    /// within their own time bound.
    async fn shards_plan(&self) -> Result<LogicalPlan, QueryError> {
        let mut guard = self.shards.lock().await;
        if let Some(plan) = guard.as_ref() {
            return Ok(plan.clone());
        }
        let base = SessionContext::new();
        let sql = if self.sources.shards.is_empty() {
            // No shards: an empty table with the same columns.
            base.register_table("lake", self.lake_table()?)?;
            "SELECT job_id, tenant, model, model_version, status, error_code, error_message, queued_ms, \
             inference_ms, batch_size, input_tokens, worker_id, submitted_at, finished_at, kafka_offset, date \
             FROM lake WHERE false"
                .to_owned()
        } else {
            let mut branches = Vec::new();
            for i in 0..self.sources.shards.len() {
                base.register_table(format!("shard_{i}"), self.shard_table(i).await?)?;
                branches.push(format!(
                    "SELECT job_id, tenant, model, model_version, status, error_code, error_message, \
                     queued_ms, inference_ms, batch_size, input_tokens, worker_id, \
                     {ts}(submitted_at_ms) {utc} AS submitted_at, {ts}(finished_at_ms) {utc} AS finished_at, \
                     kafka_offset, to_char({ts}(finished_at_ms), '%Y-%m-%d') AS date FROM shard_{i}",
                    ts = "to_timestamp_millis",
                    utc = "AT TIME ZONE 'UTC'"
                ));
            }
            branches.join(" UNION ALL ")
        };
        let plan = base.sql(&sql).await?.into_unoptimized_plan();
        *guard = Some(plan.clone());
        Ok(plan)
    }

    /// Asks every shard for `SELECT 1`, all at once: a shard that has gone
    /// down since the plan was built answers `unavailable` within
    /// [`SHARD_ACQUIRE_TIMEOUT`], rather than failing the query after the
    /// shard reader's own 30 s.
    async fn reach_shards(&self) -> Result<(), QueryError> {
        let Some(set) = &self.shard_set else { return Ok(()) };
        let pings = (0..set.len()).map(|i| set.ping(i));
        futures::future::try_join_all(pings)
            .await
            .map_err(|e| QueryError::Unavailable(format!("{e}; `results` (the lake) answers without it")))?;
        Ok(())
    }

    /// A session that can see exactly `results` and, when `with_shards`,
    /// `shards`, through the tenant filter when scoped.
    async fn session(&self, scope: &Scope, with_shards: bool) -> Result<SessionContext, QueryError> {
        let results = self.results_plan().await?;
        let shards = match with_shards {
            true => Some(self.shards_plan().await?),
            false => None,
        };
        let config = SessionConfig::new().with_target_partitions(2).with_information_schema(false);
        let pool = QueryPool::new(self.limits.max_query_memory_bytes, Arc::clone(&self.memory));
        // No spilling: a query that does not fit its memory fails, rather
        // than filling the disk (DataFusion would spill up to 100 GB).
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(pool))
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        // Exact vector search; bounded below like every function.
        for f in crate::vectors::udfs() {
            ctx.register_udf(f);
        }
        let cap = self.limits.max_expression_bytes;
        // The map holds each function under its name and its aliases: wrap
        // each function once (registering it registers its aliases too).
        let mut functions: Vec<_> = ctx.state().scalar_functions().values().cloned().collect();
        functions.sort_by(|a, b| a.name().cmp(b.name()));
        functions.dedup_by(|a, b| a.name() == b.name());
        for f in functions.iter().filter_map(|f| Bounded::wrap(f, cap)) {
            ctx.register_udf(f);
        }
        ctx.add_analyzer_rule(Arc::new(BoundConcat::new(cap)));
        // DataFusion 55 mis-plans a filter that folds to `false` under an
        // aggregate (e.g. the tenant filter AND a contradicting predicate):
        // leave such filters in place; they cost a scan that finds nothing.
        ctx.remove_optimizer_rule("eliminate_filter");
        for (name, plan) in [("results", Some(&results)), ("shards", shards.as_ref())] {
            let Some(plan) = plan else { continue };
            let table: Arc<dyn TableProvider> = match scope {
                Scope::All => Arc::new(ViewTable::new(plan.clone(), None)),
                Scope::Tenant(t) => Arc::new(TenantTable::new(plan, t)?),
            };
            ctx.register_table(name, table)?;
        }
        Ok(ctx)
    }

    /// Runs one read-only statement. Everything, from connecting to the
    /// shards it names to its last row, runs within `limits.timeout`.
    async fn query(&self, sql: &str, scope: &Scope) -> Result<Answer, QueryError> {
        let started = Instant::now();
        let limits = self.limits;
        let run = async {
            // Which tables it names: a query that does not name `shards`
            // never waits for (or fails on) a shard.
            let parser = SessionContext::new().state();
            let statement = parser.sql_to_statement(sql, &parser.config().options().sql_parser.dialect)?;
            let with_shards = parser.resolve_table_references(&statement)?.iter().any(|t| t.table() == "shards");
            if with_shards {
                self.reach_shards().await?;
            }
            let ctx = self.session(scope, with_shards).await?;
            let plan = ctx.state().statement_to_plan(statement).await?;
            SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false)
                .verify_plan(&plan)
                .map_err(|e| {
                    QueryError::ReadOnly(e.strip_backtrace().trim_start_matches("Error during planning: ").into())
                })?;
            let df = ctx.execute_logical_plan(plan).await?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let mut stream = df.execute_stream().await?;
            let (mut batches, mut rows, mut truncated) = (Vec::new(), 0usize, false);
            let mut answer_bytes = 0usize;
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                answer_bytes += batch.get_array_memory_size();
                if answer_bytes > limits.max_query_memory_bytes {
                    return Err(QueryError::TooBig(format!(
                        "the answer holds more than the {} bytes a query may (sql.max_query_memory_bytes); \
                         select fewer columns or rows",
                        limits.max_query_memory_bytes
                    )));
                }
                let room = limits.max_rows - rows;
                if batch.num_rows() > room {
                    truncated = true;
                    if room > 0 {
                        batches.push(batch.slice(0, room));
                        rows += room;
                    }
                    break;
                }
                rows += batch.num_rows();
                batches.push(batch);
            }
            Ok::<_, QueryError>(Answer { schema, batches, rows, truncated, elapsed: Duration::ZERO })
        };
        let mut answer =
            tokio::time::timeout(limits.timeout, run).await.map_err(|_| QueryError::Timeout(limits.timeout))??;
        answer.elapsed = started.elapsed();
        Ok(answer)
    }
}

/// A shard table as DataFusion sees it. Works around a rough edge of
/// `datafusion-table-providers` 0.15: a scan that wants no columns but has
/// pushed-down filters (`count(*) … WHERE …`) is answered with a column
/// anyway, which fails planning; so an empty projection reads one column
/// and drops it. Filters, projections and limits still run in the shard.
#[derive(Debug)]
struct ShardTable(Arc<dyn TableProvider>);

#[async_trait::async_trait]
impl TableProvider for ShardTable {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.0.table_type()
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
        match projection {
            // No columns wanted (`count(*)`): read the narrowest one and
            // drop it, so the scan's schema is what the plan expects.
            Some(p) if p.is_empty() => {
                let inner = self.0.scan(state, Some(&vec![0]), filters, limit).await?;
                Ok(Arc::new(ProjectionExec::try_new(Vec::<ProjectionExpr>::new(), inner)?))
            }
            _ => self.0.scan(state, projection, filters, limit).await,
        }
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::logical_expr::Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        self.0.supports_filters_pushdown(filters)
    }
}

fn with_partitions(schema: &arrow_schema::Schema) -> arrow_schema::Schema {
    let mut fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    for p in PARTITION_COLUMNS {
        fields.push(arrow_schema::Field::new(p, DataType::Utf8, false));
    }
    arrow_schema::Schema::new(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_become_provider_parameters() {
        use secrecy::ExposeSecret;
        let p = pg_params("postgres://sluice:pw@127.0.0.1:5433/shard1?sslmode=disable").unwrap();
        let get = |k: &str| p.get(k).map(|v| v.expose_secret().to_owned());
        assert_eq!(get("host").as_deref(), Some("127.0.0.1"));
        assert_eq!(get("port").as_deref(), Some("5433"));
        assert_eq!(get("db").as_deref(), Some("shard1"));
        assert_eq!(get("user").as_deref(), Some("sluice"));
        assert_eq!(get("pass").as_deref(), Some("pw"));
        assert_eq!(get("sslmode").as_deref(), Some("disable"));
    }
}
