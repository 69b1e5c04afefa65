//! The results lake: Parquet files partitioned `model=<m>/date=<YYYY-MM-DD>/`.
//!
//! # Layout
//!
//! ```text
//! <root>/results/model=<m>/date=<d>/part-<topic>-<p>-<first>-<last>.parquet   the table
//! <root>/_manifests/<topic>/<p>/<first>-<last>.json                           the commit log
//! <root>/_staging/<topic>/<p>/…                                               files not yet committed
//! ```
//!
//! # Commit protocol (one commit = one flush of one topic-partition)
//!
//! 1. Every data file is written under `_staging/`, then fsynced.
//! 2. The manifest (offset range and files) is written to a temp name,
//!    fsynced and renamed into `_manifests/`: **this is the commit point**.
//! 3. The staged files are renamed into `results/` (readers only list
//!    `results/`, so they never see a half-written file).
//! 4. Only then does the sink commit the Kafka offset `last + 1`.
//!
//! A crash anywhere is repaired by [`Lake::recover`] before the partition is
//! consumed again: a committed manifest is rolled forward (its staged files
//! renamed), anything staged without a manifest is deleted, and the next
//! offset to write is `last + 1` of the newest manifest, whatever Kafka's
//! committed offset says. The lake is its own commit log, so a replay can
//! neither duplicate nor lose rows; file names carry the offset range too.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float32Builder, Int32Builder, Int64Builder, ListBuilder, MapBuilder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sluice_schemas::results_table::{ResultRow, lake_schema};

/// What can go wrong writing or repairing the lake.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("lake I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("writing Parquet {path}: {source}")]
    Parquet { path: PathBuf, source: parquet::errors::ParquetError },
    #[error("building the Arrow batch: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("the lake is damaged: {0}")]
    Corrupt(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LakeError + '_ {
    move |source| LakeError::Io { path: path.to_owned(), source }
}

/// A committed flush: which offsets it covers and which files hold them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub rows: usize,
    /// Paths relative to `<root>/results/`.
    pub files: Vec<String>,
}

/// A lake rooted at a directory (a local or shared file system).
#[derive(Debug, Clone)]
pub struct Lake {
    root: PathBuf,
}

impl Lake {
    /// Opens (creating if needed) the lake under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Lake, LakeError> {
        let root = root.into();
        for d in ["results", "_manifests", "_staging"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Lake { root })
    }

    /// The lake's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `results` table's directory (what analytics lists).
    pub fn results_dir(&self) -> PathBuf {
        self.root.join("results")
    }

    fn manifest_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.root.join("_manifests").join(topic).join(partition.to_string())
    }

    fn staging_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.root.join("_staging").join(topic).join(partition.to_string())
    }

    /// The newest committed manifest of a topic-partition, if any.
    pub fn last_manifest(&self, topic: &str, partition: i32) -> Result<Option<Manifest>, LakeError> {
        let dir = self.manifest_dir(topic, partition);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&dir)(e)),
        };
        // Names are zero-padded offset ranges: the greatest name is the newest.
        let mut newest: Option<String> = None;
        for entry in entries {
            let name = entry.map_err(io(&dir))?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") && newest.as_ref().is_none_or(|n| name > *n) {
                newest = Some(name);
            }
        }
        let Some(name) = newest else { return Ok(None) };
        let path = dir.join(name);
        let bytes = fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| LakeError::Corrupt(format!("manifest {} does not parse: {e}", path.display())))
    }

    /// The committed manifests newer than `after` (the last offset already
    /// consumed of each `(topic, partition)`; absent: none), oldest first
    /// within each topic-partition. Only the manifests' names are read for
    /// the ones skipped, so following the commit log costs a directory
    /// listing per poll, whatever its length.
    pub fn manifests_after(&self, after: &BTreeMap<(String, i32), i64>) -> Result<Vec<Manifest>, LakeError> {
        let root = self.root.join("_manifests");
        let mut out = Vec::new();
        for topic in list_dir(&root)? {
            let Some(topic_name) = topic.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
            for part in list_dir(&topic)? {
                let Some(partition) = part.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                let done = after.get(&(topic_name.clone(), partition)).copied().unwrap_or(-1);
                let mut newer: Vec<(i64, PathBuf)> = list_dir(&part)?
                    .into_iter()
                    .filter_map(|p| {
                        let name = p.file_name()?.to_str()?;
                        let (first, last) = name.strip_suffix(".json")?.split_once('-')?;
                        let (_, last) = (first.parse::<i64>().ok()?, last.parse::<i64>().ok()?);
                        (last > done).then_some((last, p))
                    })
                    .collect();
                newer.sort();
                for (_, path) in newer {
                    let bytes = fs::read(&path).map_err(io(&path))?;
                    out.push(
                        serde_json::from_slice(&bytes).map_err(|e| {
                            LakeError::Corrupt(format!("manifest {} does not parse: {e}", path.display()))
                        })?,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Makes a topic-partition consistent after a crash and says where to go
    /// on: the offset after the last committed one (`None`: nothing yet).
    ///
    /// Rolls the newest commit forward (renames files it staged) and
    /// deletes everything else staged for this partition (never committed).
    pub fn recover(&self, topic: &str, partition: i32) -> Result<Option<i64>, LakeError> {
        let last = self.last_manifest(topic, partition)?;
        let staging = self.staging_dir(topic, partition);
        if let Some(m) = &last {
            for rel in &m.files {
                let dst = self.results_dir().join(rel);
                let src = staging.join(staged_name(rel));
                if dst.exists() {
                    continue;
                }
                if !src.exists() {
                    return Err(LakeError::Corrupt(format!(
                        "{rel} is committed (offsets {}..={} of {topic}/{partition}) but neither staged nor in place",
                        m.first_offset, m.last_offset
                    )));
                }
                publish(&src, &dst)?;
            }
        }
        if let Ok(entries) = fs::read_dir(&staging) {
            for entry in entries.flatten() {
                let p = entry.path();
                fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        Ok(last.map(|m| m.last_offset + 1))
    }

    /// Commits offsets `first..=last` of a topic-partition whose decodable
    /// records are `rows` (in offset order; possibly none). Returns the
    /// manifest; on return the rows are durable and visible.
    pub fn commit(
        &self,
        topic: &str,
        partition: i32,
        first: i64,
        last: i64,
        rows: &[ResultRow],
    ) -> Result<Manifest, LakeError> {
        assert!(first <= last, "empty offset range {first}..={last}");
        let staging = self.staging_dir(topic, partition);
        fs::create_dir_all(&staging).map_err(io(&staging))?;

        // Group by partition directory, keeping offset order inside each.
        let mut groups: Vec<(String, Vec<&ResultRow>)> = Vec::new();
        for row in rows {
            let dir = format!("model={}/date={}", row.model, row.date());
            match groups.iter_mut().find(|(d, _)| *d == dir) {
                Some((_, g)) => g.push(row),
                None => groups.push((dir, vec![row])),
            }
        }
        let file_name = format!("part-{topic}-{partition}-{first:020}-{last:020}.parquet");
        let mut files = Vec::with_capacity(groups.len());
        for (dir, group) in &groups {
            let rel = format!("{dir}/{file_name}");
            let path = staging.join(staged_name(&rel));
            write_parquet(&path, group)?;
            files.push(rel);
        }
        sync_dir(&staging)?;

        let manifest = Manifest {
            topic: topic.to_owned(),
            partition,
            first_offset: first,
            last_offset: last,
            rows: rows.len(),
            files,
        };
        let mdir = self.manifest_dir(topic, partition);
        fs::create_dir_all(&mdir).map_err(io(&mdir))?;
        let final_manifest = mdir.join(format!("{first:020}-{last:020}.json"));
        let tmp_manifest = mdir.join(format!(".{first:020}-{last:020}.json.tmp"));
        {
            let mut f = File::create(&tmp_manifest).map_err(io(&tmp_manifest))?;
            f.write_all(&serde_json::to_vec_pretty(&manifest).expect("a manifest serialises"))
                .map_err(io(&tmp_manifest))?;
            f.sync_all().map_err(io(&tmp_manifest))?;
        }
        fs::rename(&tmp_manifest, &final_manifest).map_err(io(&final_manifest))?;
        sync_dir(&mdir)?; // the commit point

        for rel in &manifest.files {
            publish(&staging.join(staged_name(rel)), &self.results_dir().join(rel))?;
        }
        Ok(manifest)
    }
}

impl Lake {
    /// The results of `jobs` (`(tenant, job_id)` pairs) the lake already
    /// holds from `topic`'s `partition` in the table directory `dir`
    /// (`model=<m>/date=<d>`, where a result of that model finished on that
    /// day lands), as `(tenant, job_id, finished_at in epoch ms)`: a repeat
    /// of a result has all three, a job id used again later has another
    /// finish, another tenant's job of the same id another tenant. Reads only those three columns of
    /// that partition's files in that directory: for the rare result that
    /// may repeat one already landed (see
    /// `sluice_schemas::headers::MAYBE_REPEATED`), not for every row.
    pub fn holding(
        &self,
        topic: &str,
        partition: i32,
        dir: &str,
        jobs: &std::collections::HashSet<(&str, &str)>,
    ) -> Result<std::collections::HashSet<(String, String, i64)>, LakeError> {
        use arrow::array::{Array, StringArray, TimestampMillisecondArray};
        use parquet::arrow::ProjectionMask;
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let mut found = std::collections::HashSet::new();
        let path = self.results_dir().join(dir);
        let entries = match fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(io(&path)(e)),
        };
        let owner = format!("{topic}-{partition}");
        for entry in entries {
            let file = entry.map_err(io(&path))?.path();
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            // part-<topic>-<partition>-<first>-<last>.parquet
            let of = name
                .strip_prefix("part-")
                .and_then(|n| n.strip_suffix(".parquet"))
                .and_then(|n| n.rsplitn(3, '-').nth(2).map(str::to_owned));
            if of.as_deref() != Some(owner.as_str()) {
                continue;
            }
            let pq = |source| LakeError::Parquet { path: file.clone(), source };
            let reader = File::open(&file).map_err(io(&file))?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(reader).map_err(pq)?;
            let mask = ProjectionMask::columns(builder.parquet_schema(), ["tenant", "job_id", "finished_at"]);
            for batch in builder.with_projection(mask).build().map_err(pq)? {
                let corrupt = |what: &str| LakeError::Corrupt(format!("{}: {what}", file.display()));
                let batch = batch.map_err(|e| corrupt(&e.to_string()))?;
                let column = |name: &str| batch.column_by_name(name).ok_or_else(|| corrupt(&format!("no {name}")));
                let strings = |name: &str| {
                    column(name)?
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .cloned()
                        .ok_or_else(|| corrupt(&format!("{name} is not a string column")))
                };
                let (tenants, ids) = (strings("tenant")?, strings("job_id")?);
                let finished = column("finished_at")?
                    .as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .ok_or_else(|| corrupt("finished_at is not a millisecond timestamp"))?;
                for i in 0..ids.len() {
                    if tenants.is_valid(i)
                        && ids.is_valid(i)
                        && finished.is_valid(i)
                        && jobs.contains(&(tenants.value(i), ids.value(i)))
                    {
                        found.insert((tenants.value(i).to_owned(), ids.value(i).to_owned(), finished.value(i)));
                    }
                }
            }
        }
        Ok(found)
    }
}

/// The entries of `dir`, none if it does not exist.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, LakeError> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.map(|e| e.path()).map_err(io(dir))).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(dir)(e)),
    }
}

/// A staged file's name: the relative path, flattened.
fn staged_name(rel: &str) -> String {
    rel.replace('/', "__")
}

/// Renames a staged file into the table, fsyncing the directory.
fn publish(src: &Path, dst: &Path) -> Result<(), LakeError> {
    let dir = dst.parent().expect("a table file has a directory");
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::rename(src, dst).map_err(io(dst))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), LakeError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn write_parquet(path: &Path, rows: &[&ResultRow]) -> Result<(), LakeError> {
    let batch = to_batch(rows)?;
    let file = File::create(path).map_err(io(path))?;
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build();
    let pq = |source| LakeError::Parquet { path: path.to_owned(), source };
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(pq)?;
    writer.write(&batch).map_err(pq)?;
    let file = writer.into_inner().map_err(pq)?;
    file.sync_all().map_err(io(path))
}

/// Rows as one Arrow batch of [`lake_schema`].
pub fn to_batch(rows: &[&ResultRow]) -> Result<RecordBatch, LakeError> {
    let n = rows.len();
    let mut job_id = StringBuilder::new();
    let mut tenant = StringBuilder::new();
    let mut model_version = StringBuilder::new();
    let mut status = StringBuilder::new();
    let mut error_code = StringBuilder::new();
    let mut error_message = StringBuilder::new();
    let mut queued_ms = Int64Builder::with_capacity(n);
    let mut inference_ms = Int64Builder::with_capacity(n);
    let mut batch_size = Int64Builder::with_capacity(n);
    let mut input_tokens = Int64Builder::with_capacity(n);
    let mut worker_id = StringBuilder::new();
    let mut submitted_at = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut finished_at = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let item = Arc::new(arrow_schema::Field::new("item", arrow_schema::DataType::Float32, false));
    let mut embedding = ListBuilder::new(Float32Builder::new()).with_field(item);
    let mut output_json = StringBuilder::new();
    let mut metadata = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let mut kafka_partition = Int32Builder::with_capacity(n);
    let mut kafka_offset = Int64Builder::with_capacity(n);
    for r in rows {
        job_id.append_value(&r.job_id);
        tenant.append_value(&r.tenant);
        model_version.append_option(r.model_version.as_deref());
        status.append_value(r.status);
        error_code.append_option(r.error_code);
        error_message.append_option(r.error_message.as_deref());
        queued_ms.append_option(r.queued_ms);
        inference_ms.append_option(r.inference_ms);
        batch_size.append_option(r.batch_size);
        input_tokens.append_option(r.input_tokens);
        worker_id.append_option(r.worker_id.as_deref());
        submitted_at.append_option(r.submitted_at.map(|t| t.timestamp_millis()));
        finished_at.append_value(r.finished_at.timestamp_millis());
        match &r.embedding {
            Some(v) => {
                embedding.values().append_slice(v);
                embedding.append(true);
            }
            None => embedding.append(false),
        }
        output_json.append_option(r.output_json.as_deref());
        for (k, v) in &r.metadata {
            metadata.keys().append_value(k);
            metadata.values().append_value(v);
        }
        metadata.append(true)?;
        kafka_partition.append_value(r.kafka_partition);
        kafka_offset.append_value(r.kafka_offset);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(job_id.finish()),
        Arc::new(tenant.finish()),
        Arc::new(model_version.finish()),
        Arc::new(status.finish()),
        Arc::new(error_code.finish()),
        Arc::new(error_message.finish()),
        Arc::new(queued_ms.finish()),
        Arc::new(inference_ms.finish()),
        Arc::new(batch_size.finish()),
        Arc::new(input_tokens.finish()),
        Arc::new(worker_id.finish()),
        Arc::new(submitted_at.finish()),
        Arc::new(finished_at.finish()),
        Arc::new(embedding.finish()),
        Arc::new(output_json.finish()),
        Arc::new(metadata.finish()),
        Arc::new(kafka_partition.finish()),
        Arc::new(kafka_offset.finish()),
    ];
    Ok(RecordBatch::try_new(lake_schema(), columns)?)
}

/// Rough in-memory size of a row, for rolling files by bytes.
pub fn estimated_bytes(row: &ResultRow) -> usize {
    128 + row.job_id.len()
        + row.tenant.len()
        + row.error_message.as_ref().map_or(0, String::len)
        + row.embedding.as_ref().map_or(0, |v| v.len() * 4)
        + row.output_json.as_ref().map_or(0, String::len)
        + row.metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn row(i: i64, model: &str) -> ResultRow {
        ResultRow {
            job_id: format!("j-{i}"),
            tenant: "t".into(),
            model: model.into(),
            model_version: Some("1".into()),
            status: "succeeded",
            error_code: None,
            error_message: None,
            queued_ms: Some(i),
            inference_ms: Some(3),
            batch_size: Some(8),
            input_tokens: Some(5),
            worker_id: Some("w".into()),
            submitted_at: None,
            finished_at: Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap(),
            embedding: Some(vec![0.5, -0.5]),
            output_json: None,
            metadata: [("doc".to_owned(), format!("d-{i}"))].into(),
            kafka_partition: 0,
            kafka_offset: i,
        }
    }

    fn table_files(lake: &Lake) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![lake.results_dir()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path().strip_prefix(lake.results_dir()).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_commit_writes_one_file_per_partition_directory_named_by_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path()).unwrap();
        let rows = vec![row(10, "a"), row(11, "b"), row(12, "a")];
        let m = lake.commit("res", 3, 10, 12, &rows).unwrap();
        assert_eq!(m.rows, 3);
        assert_eq!(
            table_files(&lake),
            vec![
                "model=a/date=2026-11-27/part-res-3-00000000000000000010-00000000000000000012.parquet",
                "model=b/date=2026-11-27/part-res-3-00000000000000000010-00000000000000000012.parquet",
            ]
        );
        assert_eq!(lake.recover("res", 3).unwrap(), Some(13));
        assert_eq!(lake.recover("res", 4).unwrap(), None);
    }

    #[test]
    fn recovery_rolls_a_committed_flush_forward_and_drops_an_uncommitted_one() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path()).unwrap();
        let m = lake.commit("res", 0, 0, 1, &[row(0, "a"), row(1, "b")]).unwrap();
        // Crash after the commit point, before the renames: move a file back.
        let staged = lake.staging_dir("res", 0).join(staged_name(&m.files[1]));
        fs::rename(lake.results_dir().join(&m.files[1]), &staged).unwrap();
        // And a later flush that crashed before its manifest.
        fs::write(lake.staging_dir("res", 0).join("model=a__date=x__part-res-0-2-3.parquet"), b"half").unwrap();
        assert_eq!(lake.recover("res", 0).unwrap(), Some(2));
        assert_eq!(table_files(&lake).len(), 2, "the committed flush is whole again");
        assert_eq!(fs::read_dir(lake.staging_dir("res", 0)).unwrap().count(), 0, "nothing stray is left");
    }

    #[test]
    fn a_committed_file_that_vanished_is_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path()).unwrap();
        let m = lake.commit("res", 0, 0, 0, &[row(0, "a")]).unwrap();
        fs::remove_file(lake.results_dir().join(&m.files[0])).unwrap();
        assert!(matches!(lake.recover("res", 0), Err(LakeError::Corrupt(_))));
    }
}
