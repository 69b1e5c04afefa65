//! The model repository: `<root>/<name>/<version>/{model.onnx, model.toml,
//! [tokenizer.json], SHA256SUMS}` plus an optional `<root>/<name>/routing.toml`.
//!
//! A version directory is only served when every file listed in its
//! `SHA256SUMS` hashes to the listed digest; exporters write `SHA256SUMS`
//! last, so a half-written version is never picked up. Version directories
//! are immutable; `routing.toml` (not checksummed, re-read on every scan)
//! says which version serves by default and which one takes a canary share.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_schemas::{ErrorCode, Input, JobRequest};

use crate::WorkerError;

/// `model.toml`: what the model is and how to drive it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model name; must equal the directory name.
    pub name: String,
    /// Version; must equal the directory name.
    pub version: String,
    /// What the model computes.
    pub task: Task,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// How text becomes tokens (text tasks).
    #[serde(default)]
    pub tokenizer: Option<TokenizerSpec>,
    /// How token states become one vector (`task = "embedding"`).
    #[serde(default)]
    pub embedding: Option<EmbeddingSpec>,
    /// Which outputs a generic model returns (`task = "tensor"`).
    #[serde(default)]
    pub tensor: Option<TensorSpec>,
    /// Batching limits of this model; engine defaults where absent.
    #[serde(default)]
    pub batching: BatchingSpec,
    /// Longest accepted `input.text`, in characters. Longer inputs fail with
    /// `input_too_long` instead of being silently cut to `max_tokens`.
    #[serde(default = "default_max_input_chars")]
    pub max_input_chars: usize,
}

fn default_max_input_chars() -> usize {
    16_384
}

/// Tasks a model can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Text in, one vector out.
    Embedding,
    /// Named tensors in, named tensors out.
    Tensor,
}

/// Tokenizer settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    /// Hugging Face `tokenizer.json`, relative to the version directory.
    pub file: String,
    /// Inputs are truncated to this many tokens (special tokens included).
    pub max_tokens: usize,
}

/// Pooling and normalisation of an embedding model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// Graph output holding per-token states, `[batch, sequence, dim]`.
    pub output: String,
    /// Embedding width.
    pub dim: usize,
    /// How token states are combined.
    pub pooling: Pooling,
    /// L2-normalise the pooled vector.
    pub normalize: bool,
}

/// Outputs of a generic tensor model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Graph outputs returned to clients; empty means every tensor output.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// The graph's first axis is a batch axis whose rows do not interact
    /// (Triton's `max_batch_size > 0`): the jobs of a batch whose inputs
    /// agree in every other dimension are concatenated along it and run in
    /// one forward pass, and each output is split back by the rows of each
    /// job. Every input and every returned output must have a dynamic first
    /// dimension (checked when the model loads). Off by default: only the
    /// model's author knows that rows are independent.
    #[serde(default)]
    pub concat_batch: bool,
}

/// Per-model batching limits (see `EngineConfig` for the defaults).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingSpec {
    pub max_batch_size: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub max_wait_ms: Option<u64>,
}

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the tokens the attention mask keeps (sentence-transformers).
    Mean,
    /// The first (`[CLS]`) token's state.
    Cls,
}

/// `<root>/<name>/routing.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Version that serves jobs not pinning one; the newest when absent.
    #[serde(default)]
    pub default: Option<String>,
    /// A version that takes a share of the unpinned jobs.
    #[serde(default)]
    pub canary: Option<Canary>,
}

/// A canary version and its share of traffic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub version: String,
    /// Fraction of unpinned jobs, 0.0 to 1.0, chosen by a hash of the job id
    /// (a redelivered job lands on the same version).
    pub share: f64,
}

/// A verified version directory, ready to load.
#[derive(Debug, Clone)]
pub struct ModelVersion {
    /// Parsed `model.toml`.
    pub spec: ModelSpec,
    /// The version directory.
    pub dir: PathBuf,
}

impl ModelVersion {
    /// `name/version`, for logs and errors.
    pub fn label(&self) -> String {
        format!("{}/{}", self.spec.name, self.spec.version)
    }

    /// Path of the ONNX graph.
    pub fn onnx_path(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }

    /// Reads and verifies one version directory.
    pub fn open(dir: &Path) -> Result<ModelVersion, WorkerError> {
        let toml_path = dir.join("model.toml");
        let text = fs::read_to_string(&toml_path).map_err(|e| WorkerError::io(&toml_path, e))?;
        let config_err = |message: String| WorkerError::ModelConfig { path: toml_path.clone(), message };
        let spec: ModelSpec = toml::from_str(&text).map_err(|e| config_err(e.to_string()))?;
        let mut required = vec!["model.onnx", "model.toml"];
        match spec.task {
            Task::Embedding => {
                let tok =
                    spec.tokenizer.as_ref().ok_or_else(|| config_err("embedding models need [tokenizer]".into()))?;
                if spec.embedding.is_none() {
                    return Err(config_err("embedding models need [embedding]".into()));
                }
                required.push(tok.file.as_str());
            }
            Task::Tensor => {}
        }
        verify_checksums(dir, &required)?;
        let (want_name, want_version) = (dir_name(dir.parent().unwrap_or(dir)), dir_name(dir));
        if spec.name != want_name || spec.version != want_version {
            return Err(config_err(format!(
                "declares {}/{} but lives in {want_name}/{want_version}",
                spec.name, spec.version
            )));
        }
        Ok(ModelVersion { spec, dir: dir.to_path_buf() })
    }

    /// Checks that `req` is something this model version can run, as far as
    /// `model.toml` tells (the engine also checks tensors against the graph).
    pub fn check(&self, req: &JobRequest) -> Result<(), (ErrorCode, String)> {
        let name = &self.spec.name;
        match (&req.input, self.spec.task) {
            (Input::Text(text), Task::Embedding) => {
                let n = text.chars().count();
                if n > self.spec.max_input_chars {
                    return Err((
                        ErrorCode::InputTooLong,
                        format!(
                            "input.text has {n} characters; model `{name}` accepts at most {}",
                            self.spec.max_input_chars
                        ),
                    ));
                }
                Ok(())
            }
            (Input::Tensors(_), Task::Embedding) => Err((
                ErrorCode::InvalidInput,
                format!("model `{name}` is a text model: send `input.text`, not `input.tensors`"),
            )),
            (Input::Text(_), Task::Tensor) => Err((
                ErrorCode::InvalidInput,
                format!("model `{name}` is a tensor model: send `input.tensors`, not `input.text`"),
            )),
            (Input::Tensors(_), Task::Tensor) => Ok(()),
        }
    }
}

fn dir_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Verifies every line of `dir/SHA256SUMS` (`<hex>  <file>`), which must
/// list at least `required`.
fn verify_checksums(dir: &Path, required: &[&str]) -> Result<(), WorkerError> {
    let sums_path = dir.join("SHA256SUMS");
    let sums = fs::read_to_string(&sums_path).map_err(|e| WorkerError::io(&sums_path, e))?;
    let bad = |message: String| WorkerError::ModelConfig { path: sums_path.clone(), message };
    let mut listed = BTreeMap::new();
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (digest, file) = line
            .split_once(char::is_whitespace)
            .map(|(d, f)| (d.trim(), f.trim().trim_start_matches('*')))
            .ok_or_else(|| bad(format!("malformed line {line:?}")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!("{file:?} is not a file of this directory")));
        }
        listed.insert(file.to_owned(), digest.to_ascii_lowercase());
    }
    for r in required {
        if !listed.contains_key(*r) {
            return Err(bad(format!("{r} is not listed")));
        }
    }
    for (file, expected) in listed {
        let path = dir.join(&file);
        let actual = sha256_file(&path)?;
        if actual != expected {
            return Err(WorkerError::Checksum { path, expected, actual });
        }
    }
    Ok(())
}

pub(crate) fn sha256_file(path: &Path) -> Result<String, WorkerError> {
    let mut f = fs::File::open(path).map_err(|e| WorkerError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| WorkerError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What a scan found for one model.
#[derive(Debug, Clone, Default)]
pub struct ModelListing {
    /// Verified versions, oldest first.
    pub versions: Vec<ModelVersion>,
    /// Version directories that were refused, with the reason.
    pub refused: Vec<(String, String)>,
    /// Parsed `routing.toml` (default routing when absent).
    pub routing: Routing,
}

impl ModelListing {
    /// The version serving unpinned jobs: `routing.default` if it verified,
    /// else the newest verified version.
    pub fn default_version(&self) -> Option<&ModelVersion> {
        self.routing
            .default
            .as_ref()
            .and_then(|d| self.versions.iter().find(|v| &v.spec.version == d))
            .or_else(|| self.versions.last())
    }
}

/// A model repository on disk. Verification results are cached per version
/// directory (keyed by the `SHA256SUMS` file's size and mtime), so rescans
/// are cheap and a refused version is reported once, not on every scan.
#[derive(Debug)]
pub struct ModelRepository {
    root: PathBuf,
    verified: Mutex<HashMap<PathBuf, Verified>>,
}

/// `SHA256SUMS`' size and mtime when a directory was verified, and the result.
type Verified = (Stamp, Result<ModelVersion, String>);
type Stamp = Option<(u64, SystemTime)>;

impl Clone for ModelRepository {
    fn clone(&self) -> Self {
        ModelRepository::new(self.root.clone())
    }
}

impl ModelRepository {
    /// A repository rooted at `root` (nothing is read yet).
    pub fn new(root: impl Into<PathBuf>) -> ModelRepository {
        ModelRepository { root: root.into(), verified: Mutex::new(HashMap::new()) }
    }

    /// The repository root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Names of the model directories.
    pub fn model_names(&self) -> Result<Vec<String>, WorkerError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| WorkerError::io(&self.root, e))? {
            let entry = entry.map_err(|e| WorkerError::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Every version of `name`, verified (or refused), and its routing.
    pub fn scan(&self, name: &str) -> Result<ModelListing, WorkerError> {
        let dir = self.root.join(name);
        let entries = fs::read_dir(&dir).map_err(|_| WorkerError::UnknownModel(name.to_owned()))?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && !dir_name(p).starts_with('.'))
            .collect();
        dirs.sort_by(|a, b| version_order(&dir_name(a), &dir_name(b)));
        let mut listing = ModelListing::default();
        for d in dirs {
            match self.verify_cached(&d) {
                Ok(v) => listing.versions.push(v),
                Err(e) => listing.refused.push((dir_name(&d), e)),
            }
        }
        let routing_path = dir.join("routing.toml");
        if let Ok(text) = fs::read_to_string(&routing_path) {
            listing.routing = toml::from_str(&text)
                .map_err(|e| WorkerError::ModelConfig { path: routing_path.clone(), message: e.to_string() })?;
            if let Some(c) = &listing.routing.canary
                && !(0.0..=1.0).contains(&c.share)
            {
                return Err(WorkerError::ModelConfig {
                    path: routing_path,
                    message: format!("canary share {} is outside 0.0..=1.0", c.share),
                });
            }
        }
        Ok(listing)
    }

    /// The version serving unpinned jobs of `name` (see [`ModelListing::default_version`]).
    pub fn latest(&self, name: &str) -> Result<ModelVersion, WorkerError> {
        let listing = self.scan(name)?;
        if let Some(v) = listing.default_version() {
            return Ok(v.clone());
        }
        match listing.refused.last() {
            Some((version, reason)) => {
                Err(WorkerError::ModelConfig { path: self.root.join(name).join(version), message: reason.clone() })
            }
            None => Err(WorkerError::UnknownModel(name.to_owned())),
        }
    }

    fn verify_cached(&self, dir: &Path) -> Result<ModelVersion, String> {
        let stamp: Stamp = fs::metadata(dir.join("SHA256SUMS")).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, result)) = cache.get(dir)
            && *s == stamp
            && stamp.is_some()
        {
            return result.clone();
        }
        let result = ModelVersion::open(dir).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::warn!(dir = %dir.display(), error = %e, "model version refused");
            metrics::counter!(sluice_schemas::metrics::VERSIONS_REFUSED.name).increment(1);
        }
        cache.insert(dir.to_path_buf(), (stamp, result.clone()));
        result
    }
}

/// What a process that does not run models (the gateway) knows of them:
/// the verified versions and routing of each, rescanned by
/// [`ModelCatalog::refresh`]. Enough to reject unknown models and inputs a
/// model cannot take before they reach Kafka.
#[derive(Debug)]
pub struct ModelCatalog {
    repo: ModelRepository,
    /// Models to list; every model in the repository when empty.
    serve: Vec<String>,
    listings: std::sync::RwLock<BTreeMap<String, ModelListing>>,
}

impl ModelCatalog {
    /// Scans the repository (blocking: hashes new version files).
    pub fn load(repo: ModelRepository, serve: Vec<String>) -> Result<ModelCatalog, WorkerError> {
        let catalog = ModelCatalog { repo, serve, listings: Default::default() };
        catalog.refresh()?;
        Ok(catalog)
    }

    /// Rescans; a model that cannot be scanned keeps its last listing.
    pub fn refresh(&self) -> Result<(), WorkerError> {
        let names = if self.serve.is_empty() { self.repo.model_names()? } else { self.serve.clone() };
        let mut fresh = BTreeMap::new();
        let old = self.listings.read().unwrap_or_else(|p| p.into_inner()).clone();
        for name in names {
            match self.repo.scan(&name) {
                Ok(l) if !l.versions.is_empty() => {
                    fresh.insert(name, l);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(model = %name, error = %e, "cannot scan model");
                    if let Some(l) = old.get(&name) {
                        fresh.insert(name, l.clone());
                    }
                }
            }
        }
        *self.listings.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Names of the listed models.
    pub fn names(&self) -> Vec<String> {
        self.listings.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// The version serving jobs of `model` that name none.
    pub fn default_version(&self, model: &str) -> Option<String> {
        let listings = self.listings.read().unwrap_or_else(|p| p.into_inner());
        listings.get(model)?.default_version().map(|v| v.spec.version.clone())
    }

    /// Checks `req` against the model it names, as far as `model.toml` tells.
    pub fn check(&self, req: &JobRequest) -> Result<(), (ErrorCode, String)> {
        let listings = self.listings.read().unwrap_or_else(|p| p.into_inner());
        let Some(listing) = listings.get(&req.model) else {
            let names: Vec<&str> = listings.keys().map(String::as_str).collect();
            return Err((
                ErrorCode::UnknownModel,
                format!("model `{}` is not served (served: {})", req.model, names.join(", ")),
            ));
        };
        let version = match &req.model_version {
            Some(v) => listing.versions.iter().find(|m| &m.spec.version == v).ok_or_else(|| {
                let have: Vec<&str> = listing.versions.iter().map(|m| m.spec.version.as_str()).collect();
                (
                    ErrorCode::UnknownModel,
                    format!("model `{}` version `{v}` is not served (serving: {})", req.model, have.join(", ")),
                )
            })?,
            None => listing.default_version().expect("listed models have a verified version"),
        };
        version.check(req)
    }
}

fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Greater,
        (Err(_), Ok(_)) => std::cmp::Ordering::Less,
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
name = "toy"
version = "VERSION"
task = "embedding"
[tokenizer]
file = "tokenizer.json"
max_tokens = 8
[embedding]
output = "last_hidden_state"
dim = 4
pooling = "mean"
normalize = true
"#;

    fn write_version(root: &Path, version: &str, corrupt: bool) -> PathBuf {
        let dir = root.join("toy").join(version);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("model.onnx"), b"graph bytes").unwrap();
        fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        fs::write(dir.join("model.toml"), TOML.replace("VERSION", version)).unwrap();
        let sums: String = ["model.onnx", "model.toml", "tokenizer.json"]
            .iter()
            .map(|f| format!("{}  {f}\n", sha256_file(&dir.join(f)).unwrap()))
            .collect();
        fs::write(dir.join("SHA256SUMS"), sums).unwrap();
        if corrupt {
            fs::write(dir.join("model.onnx"), b"tampered").unwrap();
        }
        dir
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-model-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn newest_verified_version_wins_and_corrupt_one_is_refused() {
        let root = tempdir("versions");
        write_version(&root, "2", false);
        write_version(&root, "10", false);
        let repo = ModelRepository::new(&root);
        assert_eq!(repo.latest("toy").unwrap().spec.version, "10");

        write_version(&root, "11", true);
        let err = ModelVersion::open(&root.join("toy/11")).unwrap_err();
        assert!(matches!(err, WorkerError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("model.onnx"), "{err}");
        // the corrupt newer version does not replace the good one
        let listing = repo.scan("toy").unwrap();
        assert_eq!(listing.default_version().unwrap().spec.version, "10");
        assert_eq!(listing.refused.len(), 1);
        assert!(listing.refused[0].1.contains("checksum mismatch"), "{:?}", listing.refused);
        assert!(matches!(repo.latest("nope"), Err(WorkerError::UnknownModel(_))));
        assert_eq!(repo.model_names().unwrap(), vec!["toy"]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn routing_pins_the_default_and_names_a_canary() {
        let root = tempdir("routing");
        write_version(&root, "1", false);
        write_version(&root, "2", false);
        let repo = ModelRepository::new(&root);
        fs::write(root.join("toy/routing.toml"), "default = \"1\"\n[canary]\nversion = \"2\"\nshare = 0.25\n").unwrap();
        let listing = repo.scan("toy").unwrap();
        assert_eq!(listing.default_version().unwrap().spec.version, "1");
        assert_eq!(listing.routing.canary, Some(Canary { version: "2".into(), share: 0.25 }));
        fs::write(root.join("toy/routing.toml"), "[canary]\nversion = \"2\"\nshare = 1.5\n").unwrap();
        assert!(repo.scan("toy").unwrap_err().to_string().contains("outside"));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn directory_and_declared_version_must_agree() {
        let root = tempdir("mismatch");
        let dir = write_version(&root, "3", false);
        fs::rename(&dir, root.join("toy/4")).unwrap();
        let err = ModelVersion::open(&root.join("toy/4")).unwrap_err();
        assert!(err.to_string().contains("declares toy/3 but lives in toy/4"), "{err}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn check_rejects_wrong_inputs_with_codes() {
        let spec: ModelSpec = toml::from_str(&TOML.replace("VERSION", "1")).unwrap();
        let mv = ModelVersion { spec, dir: PathBuf::new() };
        let req = |body: &str| JobRequest::decode(body.as_bytes()).unwrap();
        assert!(mv.check(&req(r#"{"job_id":"a","tenant":"t","model":"toy","input":{"text":"hi"}}"#)).is_ok());
        let long =
            format!(r#"{{"job_id":"a","tenant":"t","model":"toy","input":{{"text":"{}"}}}}"#, "x".repeat(16_385));
        assert_eq!(mv.check(&req(&long)).unwrap_err().0, ErrorCode::InputTooLong);
        let tensors = r#"{"job_id":"a","tenant":"t","model":"toy","input":{"tensors":{"x":{"dtype":"int64","shape":[1],"data":[1]}}}}"#;
        assert_eq!(mv.check(&req(tensors)).unwrap_err().0, ErrorCode::InvalidInput);
    }
}
