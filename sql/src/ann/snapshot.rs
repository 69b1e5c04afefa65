//! Snapshots of the indexes under `<lake>/_index/`.
//!
//! ```text
//! _index/CURRENT                       the name of the newest complete snapshot
//! _index/snap-<ms>-<writer>/state.json    watermarks and the graphs' keys
//! _index/snap-<ms>-<writer>/g<i>.usearch  graph i (usearch's own format)
//! _index/snap-<ms>-<writer>/g<i>.rows     graph i's rows, JSON, in key order
//! ```
//!
//! A snapshot is written into `.tmp-<name>/`, every file fsynced, the
//! directory renamed to `<name>/` and fsynced; then `CURRENT` is replaced
//! the same way. That rename is the commit point: a kill before it leaves
//! the previous snapshot current, and the leftovers are swept by the next
//! writer. Several processes may write snapshots of the same lake: each is
//! complete and consistent on its own, so whichever is current is valid.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Graph, IndexConfig, IndexError, IndexKey, Row, Rows, native, new_index};

/// Bumped when the layout changes: another format is rebuilt, not read.
const FORMAT: u32 = 1;
/// Leftovers of other writers younger than this are left alone (they may
/// still be writing).
const SWEEP_AFTER: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    /// `[topic, partition, last offset applied]`.
    applied: Vec<(String, i32, i64)>,
    graphs: Vec<GraphEntry>,
}

#[derive(Serialize, Deserialize)]
struct GraphEntry {
    key: IndexKey,
    dims: usize,
    file: String,
    vectors: usize,
}

type Loaded = (HashMap<IndexKey, Arc<Graph>>, BTreeMap<(String, i32), i64>);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IndexError + '_ {
    move |source| IndexError::Io { path: path.to_owned(), source }
}

/// The snapshot `CURRENT` names, or `None` if there is none yet.
pub(super) fn load(dir: &Path, cfg: &IndexConfig) -> Result<Option<Loaded>, IndexError> {
    let current = dir.join("CURRENT");
    let name = match fs::read_to_string(&current) {
        Ok(n) => n.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&current)(e)),
    };
    let snap = dir.join(&name);
    let state_path = snap.join("state.json");
    let state: State = serde_json::from_slice(&fs::read(&state_path).map_err(io(&state_path))?)
        .map_err(|e| IndexError::Native(format!("{}: {e}", state_path.display())))?;
    if state.format != FORMAT {
        return Err(IndexError::Native(format!("{name}: format {} (this build reads {FORMAT})", state.format)));
    }
    let mut graphs = HashMap::new();
    for g in state.graphs {
        let index = new_index(cfg, g.dims)?;
        let graph_path = snap.join(format!("{}.usearch", g.file));
        index.load(&graph_path.to_string_lossy()).map_err(native)?;
        let rows_path = snap.join(format!("{}.rows", g.file));
        let rows: Vec<Row> = serde_json::from_slice(&fs::read(&rows_path).map_err(io(&rows_path))?)
            .map_err(|e| IndexError::Native(format!("{}: {e}", rows_path.display())))?;
        if rows.len() != g.vectors || index.size() != g.vectors {
            return Err(IndexError::Native(format!(
                "{name}/{}: {} rows and {} vectors, {} expected",
                g.file,
                rows.len(),
                index.size(),
                g.vectors
            )));
        }
        let mut latest = HashMap::with_capacity(rows.len());
        for (k, r) in rows.iter().enumerate() {
            if !r.superseded {
                latest.insert(r.job_id.clone(), k as u64);
            }
        }
        let graph = Graph { index: RwLock::new(index), dims: g.dims, rows: RwLock::new(Rows { rows, latest }) };
        graphs.insert(g.key, Arc::new(graph));
    }
    let applied = state.applied.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
    Ok(Some((graphs, applied)))
}

/// Writes a snapshot of `graphs` covering `applied` and makes it current.
/// The caller holds the builder: nothing is added meanwhile.
pub(super) fn write(
    dir: &Path,
    graphs: &HashMap<IndexKey, Arc<Graph>>,
    applied: &BTreeMap<(String, i32), i64>,
) -> Result<(), IndexError> {
    let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    let name = format!("snap-{ms:013}-{}", writer_id());
    let tmp = dir.join(format!(".tmp-{name}"));
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut keys: Vec<&IndexKey> = graphs.keys().collect();
    keys.sort();
    let mut entries = Vec::with_capacity(keys.len());
    for (i, key) in keys.into_iter().enumerate() {
        let graph = &graphs[key];
        let file = format!("g{i}");
        let graph_path = tmp.join(format!("{file}.usearch"));
        graph.index.read().expect("index lock").save(&graph_path.to_string_lossy()).map_err(native)?;
        File::open(&graph_path).and_then(|f| f.sync_all()).map_err(io(&graph_path))?;
        let rows = graph.rows.read().expect("rows lock");
        write_synced(&tmp.join(format!("{file}.rows")), &serde_json::to_vec(&rows.rows).expect("rows serialise"))?;
        entries.push(GraphEntry { key: key.clone(), dims: graph.dims, file, vectors: rows.rows.len() });
    }
    let state = State {
        format: FORMAT,
        applied: applied.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect(),
        graphs: entries,
    };
    write_synced(&tmp.join("state.json"), &serde_json::to_vec_pretty(&state).expect("state serialises"))?;
    sync_dir(&tmp)?;
    let snap = dir.join(&name);
    fs::rename(&tmp, &snap).map_err(io(&snap))?;
    sync_dir(dir)?;
    let current_tmp = dir.join(format!(".CURRENT-{name}"));
    write_synced(&current_tmp, name.as_bytes())?;
    let current = dir.join("CURRENT");
    fs::rename(&current_tmp, &current).map_err(io(&current))?;
    sync_dir(dir)?; // the commit point
    sweep(dir, &name);
    Ok(())
}

/// Removes snapshots other than `keep` and leftovers of interrupted
/// writes, leaving other writers' recent work alone. Best effort.
fn sweep(dir: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == keep || name == "CURRENT" {
            continue;
        }
        let ours = name.ends_with(&format!("-{}", writer_id()));
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= SWEEP_AFTER);
        if !(ours || old) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        if let Err(e) = removed {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an old index snapshot");
        }
    }
}

/// This process's mark on the snapshots it writes: random, so writers in
/// containers (where every process may be pid 1) never take each other's.
fn writer_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        format!("{:016x}", h.finish())
    })
}

fn write_synced(path: &PathBuf, bytes: &[u8]) -> Result<(), IndexError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), IndexError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}
