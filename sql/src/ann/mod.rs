//! Approximate nearest-neighbour search over the lake's embeddings.
//!
//! One HNSW graph ([usearch]) per `(tenant, model, model version)`, so a
//! search can only ever meet the vectors of the tenant and the model
//! version it names: isolation is the shape of the data, not a filter.
//!
//! # Built from the lake's commit log
//!
//! The index follows the lake's manifests (see [`crate::lake`]), never the
//! results topic: a manifest is a committed, offset-ranged flush of one
//! topic-partition, and the index keeps the last offset it applied of each.
//! [`VectorIndex::refresh`] applies every newer manifest in offset order
//! and moves the watermark only after all of a manifest's rows are in. A
//! manifest is therefore applied once or not at all, whatever crashed when:
//! nothing missing, nothing twice, and no second consumer group to keep.
//!
//! # Persisted next to the lake
//!
//! `<lake>/_index/` (or [`IndexConfig::dir`]) holds snapshots (see `snapshot.rs`): each graph's
//! usearch file, its rows (job id, metadata, finish time) and the
//! watermarks they cover, written under a temporary name, fsynced and
//! renamed; `CURRENT` names the newest complete one. A process starts from
//! `CURRENT` and applies only the manifests after its watermarks; with no
//! usable snapshot it rebuilds from the whole log. A kill at any moment
//! leaves `CURRENT` naming a complete snapshot (or none).
//!
//! # Bounds
//!
//! - memory: at most [`IndexConfig::max_vectors`] vectors in all graphs of
//!   a process; past it the index stops applying manifests (it stays
//!   searchable, `full` says so) and exact search still sees everything;
//! - a search: at most `k` results, `k` bounded by the caller (the gateway's
//!   `MAX_K`), and ef = max(`expansion_search`, k) candidates explored;
//! - freshness: results are searchable after their lake flush and the next
//!   refresh (the caller's interval), not before.
//!
//! A re-used job id (the same tenant submitting the id again later) replaces
//! the earlier vector: searches skip rows superseded by a later one.

mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, TimestampMillisecondType};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::lake::{Lake, LakeError, Manifest};

/// The settings of a process's indexes.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Where snapshots go (default `<lake>/_index`: a gateway that mounts
    /// the lake read-only names a writable directory of its own).
    pub dir: Option<PathBuf>,
    /// Most vectors held in all graphs together (memory: about
    /// `4 × dimensions + 8 × connectivity × 2` bytes each, 1.8 KB for a
    /// 384-dimension model at connectivity 16).
    pub max_vectors: usize,
    /// HNSW edges per node (usearch `connectivity`, "M").
    pub connectivity: usize,
    /// Candidates explored while inserting ("ef_construction").
    pub expansion_add: usize,
    /// Candidates explored while searching ("ef"); at least `k`.
    pub expansion_search: usize,
    /// Persist after this many new vectors …
    pub persist_every_vectors: usize,
    /// … or this long after the first vector not yet persisted.
    pub persist_every: Duration,
    /// Rows with this metadata entry are never indexed (a search's own
    /// query jobs).
    pub skip_marked: Option<(String, String)>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            dir: None,
            max_vectors: 1_000_000,
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 64,
            persist_every_vectors: 50_000,
            persist_every: Duration::from_secs(30),
            skip_marked: None,
        }
    }
}

/// What can go wrong building, persisting or searching an index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("index I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the vector index: {0}")]
    Native(String),
    #[error("the query has {got} dimensions; {model} version {version} has {dims}")]
    Dimensions { got: usize, dims: usize, model: String, version: String },
}

fn native(e: impl std::fmt::Display) -> IndexError {
    IndexError::Native(e.to_string())
}

/// Whose vectors a graph holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IndexKey {
    pub tenant: String,
    pub model: String,
    pub version: String,
}

/// Which rows a search may return.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Entries a row's metadata must have, all of them.
    pub metadata: BTreeMap<String, String>,
    /// Finished at or after (epoch ms).
    pub finished_after_ms: Option<i64>,
    /// Finished before (epoch ms).
    pub finished_before_ms: Option<i64>,
}

impl Filter {
    fn admits(&self, row: &Row) -> bool {
        let time = |bound: Option<i64>, ok: fn(i64, i64) -> bool| match bound {
            None => true,
            Some(b) => row.finished_at_ms.is_some_and(|t| ok(t, b)),
        };
        time(self.finished_after_ms, |t, b| t >= b)
            && time(self.finished_before_ms, |t, b| t < b)
            && self.metadata.iter().all(|(k, v)| row.metadata.get(k) == Some(v))
    }
}

/// One neighbour.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub job_id: String,
    /// Cosine similarity to the query.
    pub score: f32,
    pub metadata: BTreeMap<String, String>,
    pub finished_at_ms: Option<i64>,
}

/// A search's answer.
#[derive(Debug, Clone)]
pub struct Found {
    /// Nearest first.
    pub hits: Vec<Hit>,
    /// Vectors in the searched graph (superseded ones included).
    pub indexed: usize,
}

/// What one [`VectorIndex::refresh`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Refreshed {
    pub manifests: usize,
    pub vectors: usize,
    /// Whether it wrote a snapshot.
    pub persisted: bool,
}

/// The state of a process's indexes, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub graphs: usize,
    pub vectors: usize,
    /// `max_vectors` was reached: newer manifests are not applied.
    pub full: bool,
    /// The vectors the last snapshot loaded at open held (0: none loaded).
    pub loaded: usize,
}

/// A stored job in a graph: the key of its vector is its position.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    job_id: String,
    finished_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
    /// A later row of the same job id replaced this one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    superseded: bool,
}

/// A row read from the lake, with its graph and vector.
type Indexable = (IndexKey, Vec<f32>, Row);

/// One (tenant, model, version)'s graph.
struct Graph {
    /// usearch's `add` and `search` are thread-safe; `reserve` is not, so
    /// it alone takes the write lock.
    index: RwLock<usearch::Index>,
    dims: usize,
    rows: RwLock<Rows>,
}

#[derive(Default)]
struct Rows {
    rows: Vec<Row>,
    /// Job id → the key of its newest row.
    latest: HashMap<String, u64>,
}

impl Rows {
    /// Adds `row`, superseding an earlier row of its job id; `None` if it
    /// repeats the newest row of its job (same id, same finish): a row
    /// applied again after a failed refresh, or a repeat in the lake.
    fn push(&mut self, row: Row) -> Option<u64> {
        let key = self.rows.len() as u64;
        if let Some(&old) = self.latest.get(&row.job_id) {
            let old = &mut self.rows[old as usize];
            if old.finished_at_ms == row.finished_at_ms {
                return None;
            }
            old.superseded = true;
        }
        self.latest.insert(row.job_id.clone(), key);
        self.rows.push(row);
        Some(key)
    }
}

/// The builder's position: what it applied, what it holds.
#[derive(Default)]
struct Builder {
    /// The last offset applied of each (topic, partition).
    applied: BTreeMap<(String, i32), i64>,
    vectors: usize,
    /// Vectors applied since the last snapshot, and since when.
    unpersisted: usize,
    dirty_since: Option<Instant>,
    full: bool,
}

/// The approximate indexes over one lake.
pub struct VectorIndex {
    lake: Lake,
    dir: PathBuf,
    cfg: IndexConfig,
    graphs: RwLock<HashMap<IndexKey, Arc<Graph>>>,
    builder: Mutex<Builder>,
    loaded: usize,
}

impl VectorIndex {
    /// Opens the indexes of `lake`: the newest complete snapshot under
    /// `<lake>/_index/` if there is one (else empty: the next
    /// [`refresh`](Self::refresh) rebuilds from the whole commit log).
    pub fn open(lake: Lake, cfg: IndexConfig) -> Result<VectorIndex, IndexError> {
        let dir = cfg.dir.clone().unwrap_or_else(|| lake.root().join("_index"));
        std::fs::create_dir_all(&dir).map_err(|source| IndexError::Io { path: dir.clone(), source })?;
        let (graphs, applied) = match snapshot::load(&dir, &cfg) {
            Ok(Some(loaded)) => loaded,
            Ok(None) => Default::default(),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "the index snapshot is unusable; rebuilding from the lake");
                Default::default()
            }
        };
        let vectors = graphs.values().map(|g: &Arc<Graph>| g.rows.read().expect("rows lock").rows.len()).sum();
        let builder = Builder { applied, vectors, ..Builder::default() };
        Ok(VectorIndex { lake, dir, cfg, graphs: RwLock::new(graphs), builder: Mutex::new(builder), loaded: vectors })
    }

    /// Applies every manifest committed since the last refresh (stopping at
    /// one whose files are not published yet, or at `max_vectors`), and
    /// persists when due. One refresh runs at a time; searches go on.
    pub fn refresh(&self) -> Result<Refreshed, IndexError> {
        let mut b = self.builder.lock().expect("builder lock");
        let mut done = Refreshed::default();
        if b.full {
            return Ok(done);
        }
        let manifests = self.lake.manifests_after(&b.applied)?;
        let mut blocked: Option<(String, i32)> = None;
        for m in manifests {
            let tp = (m.topic.clone(), m.partition);
            if blocked.as_ref() == Some(&tp) {
                continue;
            }
            let Some(rows) = self.read(&m)? else {
                // Committed, not yet renamed into `results/`: next time.
                blocked = Some(tp);
                continue;
            };
            if b.vectors + rows.len() > self.cfg.max_vectors {
                tracing::error!(
                    max_vectors = self.cfg.max_vectors,
                    "the vector index is full: newer results are not indexed (exact search still sees them)"
                );
                b.full = true;
                break;
            }
            let n = self.apply(rows)?;
            b.applied.insert(tp, m.last_offset);
            b.vectors += n;
            b.unpersisted += n;
            b.dirty_since.get_or_insert_with(Instant::now);
            done.manifests += 1;
            done.vectors += n;
            if b.unpersisted >= self.cfg.persist_every_vectors {
                self.persist_locked(&mut b)?;
                done.persisted = true;
            }
        }
        if b.dirty_since.is_some_and(|t| t.elapsed() >= self.cfg.persist_every) {
            self.persist_locked(&mut b)?;
            done.persisted = true;
        }
        Ok(done)
    }

    /// Writes a snapshot now if anything is not persisted yet.
    pub fn persist(&self) -> Result<bool, IndexError> {
        let mut b = self.builder.lock().expect("builder lock");
        if b.dirty_since.is_none() {
            return Ok(false);
        }
        self.persist_locked(&mut b)?;
        Ok(true)
    }

    fn persist_locked(&self, b: &mut Builder) -> Result<(), IndexError> {
        let graphs = self.graphs.read().expect("graphs lock").clone();
        snapshot::write(&self.dir, &graphs, &b.applied)?;
        b.unpersisted = 0;
        b.dirty_since = None;
        Ok(())
    }

    /// The `k` rows of `key` nearest `query` (cosine) that `filter` admits.
    /// A key with nothing indexed answers no hits.
    pub fn search(&self, key: &IndexKey, query: &[f32], k: usize, filter: &Filter) -> Result<Found, IndexError> {
        let Some(graph) = self.graphs.read().expect("graphs lock").get(key).cloned() else {
            return Ok(Found { hits: Vec::new(), indexed: 0 });
        };
        if query.len() != graph.dims {
            return Err(IndexError::Dimensions {
                got: query.len(),
                dims: graph.dims,
                model: key.model.clone(),
                version: key.version.clone(),
            });
        }
        let rows = graph.rows.read().expect("rows lock");
        let index = graph.index.read().expect("index lock");
        let admits = |k: u64| rows.rows.get(k as usize).is_some_and(|r| !r.superseded && filter.admits(r));
        let found = index.filtered_search(query, k, admits).map_err(native)?;
        let hits = found
            .keys
            .iter()
            .zip(&found.distances)
            .filter_map(|(&k, &d)| {
                let row = rows.rows.get(k as usize)?;
                Some(Hit {
                    job_id: row.job_id.clone(),
                    score: 1.0 - d,
                    metadata: row.metadata.clone(),
                    finished_at_ms: row.finished_at_ms,
                })
            })
            .collect();
        Ok(Found { hits, indexed: rows.rows.len() })
    }

    /// The job ids `key`'s graph holds (its newest row of each), in key
    /// order: what an operator or a test checks against the lake.
    pub fn job_ids(&self, key: &IndexKey) -> Vec<String> {
        let Some(graph) = self.graphs.read().expect("graphs lock").get(key).cloned() else { return Vec::new() };
        let rows = graph.rows.read().expect("rows lock");
        rows.rows.iter().filter(|r| !r.superseded).map(|r| r.job_id.clone()).collect()
    }

    /// How many graphs and vectors this process holds.
    pub fn stats(&self) -> Stats {
        let graphs = self.graphs.read().expect("graphs lock");
        let b = self.builder.lock().expect("builder lock");
        Stats { graphs: graphs.len(), vectors: b.vectors, full: b.full, loaded: self.loaded }
    }

    /// The indexable rows of a manifest's files, or `None` while one of
    /// them is not in `results/` yet.
    fn read(&self, m: &Manifest) -> Result<Option<Vec<Indexable>>, IndexError> {
        let mut out = Vec::new();
        for rel in &m.files {
            let path = self.lake.results_dir().join(rel);
            if !path.exists() {
                return Ok(None);
            }
            // `model=<m>/date=<d>/part-….parquet`: the model is in the path.
            let Some(model) = rel.split('/').next().and_then(|d| d.strip_prefix("model=")) else {
                return Err(LakeError::Corrupt(format!("{rel}: not under model=<name>/")).into());
            };
            read_file(&path, model, self.cfg.skip_marked.as_ref(), &mut out)?;
        }
        Ok(Some(out))
    }

    /// Adds rows to their graphs; returns how many were new.
    fn apply(&self, rows: Vec<Indexable>) -> Result<usize, IndexError> {
        let mut added = 0;
        let mut by_key: BTreeMap<IndexKey, Vec<(Vec<f32>, Row)>> = BTreeMap::new();
        for (key, v, row) in rows {
            by_key.entry(key).or_default().push((v, row));
        }
        for (key, rows) in by_key {
            let dims = rows[0].0.len();
            let graph = {
                let mut graphs = self.graphs.write().expect("graphs lock");
                match graphs.get(&key) {
                    Some(g) => g.clone(),
                    None => {
                        let g = Arc::new(Graph {
                            index: RwLock::new(new_index(&self.cfg, dims)?),
                            dims,
                            rows: RwLock::new(Rows::default()),
                        });
                        graphs.insert(key.clone(), g.clone());
                        g
                    }
                }
            };
            {
                let index = graph.index.write().expect("index lock");
                let need = index.size() + rows.len();
                if need > index.capacity() {
                    index.reserve(need.max(index.capacity() * 2).max(1024)).map_err(native)?;
                }
            }
            let index = graph.index.read().expect("index lock");
            for (v, row) in rows {
                if v.len() != graph.dims {
                    // One model version has one output size; a row that
                    // differs is not comparable and is left out, loudly.
                    tracing::warn!(job_id = %row.job_id, got = v.len(), dims = graph.dims, "an embedding of another size is not indexed");
                    continue;
                }
                if let Some(k) = graph.rows.write().expect("rows lock").push(row) {
                    index.add(k, &v).map_err(native)?;
                    added += 1;
                }
            }
        }
        Ok(added)
    }
}

fn new_index(cfg: &IndexConfig, dims: usize) -> Result<usearch::Index, IndexError> {
    usearch::Index::new(&usearch::IndexOptions {
        dimensions: dims,
        metric: usearch::MetricKind::Cos,
        quantization: usearch::ScalarKind::F32,
        connectivity: cfg.connectivity,
        expansion_add: cfg.expansion_add,
        expansion_search: cfg.expansion_search,
        multi: false,
    })
    .map_err(native)
}

/// Appends the indexable rows of one lake file: succeeded, with an
/// embedding, not marked `skip`.
fn read_file(
    path: &Path,
    model: &str,
    skip: Option<&(String, String)>,
    out: &mut Vec<Indexable>,
) -> Result<(), IndexError> {
    let corrupt = |what: String| IndexError::Lake(LakeError::Corrupt(format!("{}: {what}", path.display())));
    let pq = |source| LakeError::Parquet { path: path.to_owned(), source };
    let file = File::open(path).map_err(|source| IndexError::Io { path: path.to_owned(), source })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?;
    let wanted = ["job_id", "tenant", "model_version", "status", "finished_at", "embedding", "metadata"];
    // Files written before `metadata` existed lack it: project what is there.
    let roots: Vec<usize> = wanted.iter().filter_map(|c| builder.schema().index_of(c).ok()).collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    for batch in builder.with_projection(mask).build().map_err(pq)? {
        let batch: RecordBatch = batch.map_err(|e| corrupt(e.to_string()))?;
        let column = |name: &str| batch.column_by_name(name).ok_or_else(|| corrupt(format!("no {name} column")));
        let strings = |name: &str| -> Result<_, IndexError> {
            column(name)?.as_string_opt::<i32>().cloned().ok_or_else(|| corrupt(format!("{name} is not text")))
        };
        let (ids, tenants, versions, statuses) =
            (strings("job_id")?, strings("tenant")?, strings("model_version")?, strings("status")?);
        let finished = column("finished_at")?
            .as_primitive_opt::<TimestampMillisecondType>()
            .cloned()
            .ok_or_else(|| corrupt("finished_at is not a millisecond timestamp".into()))?;
        let embeddings = column("embedding")?
            .as_list_opt::<i32>()
            .cloned()
            .ok_or_else(|| corrupt("embedding is not a list".into()))?;
        let metadata = batch.column_by_name("metadata").and_then(|c| c.as_map_opt().cloned());
        for i in 0..batch.num_rows() {
            if statuses.value(i) != "succeeded" || embeddings.is_null(i) || versions.is_null(i) {
                continue;
            }
            let mut meta = BTreeMap::new();
            if let Some(m) = metadata.as_ref().filter(|m| m.is_valid(i)) {
                let entry = m.value(i);
                let (keys, values) = (entry.column(0).as_string::<i32>(), entry.column(1).as_string::<i32>());
                for j in 0..keys.len() {
                    if values.is_valid(j) {
                        meta.insert(keys.value(j).to_owned(), values.value(j).to_owned());
                    }
                }
            }
            if skip.is_some_and(|(k, v)| meta.get(k) == Some(v)) {
                continue;
            }
            let vector: Vec<f32> = embeddings
                .value(i)
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(|| corrupt("embedding items are not float32".into()))?
                .values()
                .to_vec();
            if vector.is_empty() {
                continue;
            }
            let key = IndexKey {
                tenant: tenants.value(i).to_owned(),
                model: model.to_owned(),
                version: versions.value(i).to_owned(),
            };
            let row = Row {
                job_id: ids.value(i).to_owned(),
                finished_at_ms: finished.is_valid(i).then(|| finished.value(i)),
                metadata: meta,
                superseded: false,
            };
            out.push((key, vector, row));
        }
    }
    Ok(())
}
