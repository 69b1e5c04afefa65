//! The model repository: `<root>/<name>/<version>/{model.onnx, model.toml,
//! tokenizer.json, SHA256SUMS}`.
//!
//! A version directory is only served when every file listed in its
//! `SHA256SUMS` hashes to the listed digest; exporters write `SHA256SUMS` last,
//! so a half-written version is never picked up.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_schemas::{ErrorCode, Input, JobRequest};

use crate::WorkerError;

/// The files every text-model version must list in its `SHA256SUMS`.
const REQUIRED_FILES: [&str; 3] = ["model.onnx", "model.toml", "tokenizer.json"];

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
    /// How text becomes tokens.
    pub tokenizer: TokenizerSpec,
    /// How token states become one vector (for `task = "embedding"`).
    pub embedding: EmbeddingSpec,
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

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the tokens the attention mask keeps (sentence-transformers).
    Mean,
    /// The first (`[CLS]`) token's state.
    Cls,
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
    /// Path of the ONNX graph.
    pub fn onnx_path(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }

    /// Path of the tokenizer.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.spec.tokenizer.file)
    }

    /// Reads and verifies one version directory.
    pub fn open(dir: &Path) -> Result<ModelVersion, WorkerError> {
        verify_checksums(dir)?;
        let toml_path = dir.join("model.toml");
        let text = fs::read_to_string(&toml_path).map_err(|e| WorkerError::io(&toml_path, e))?;
        let spec: ModelSpec = toml::from_str(&text)
            .map_err(|e| WorkerError::ModelConfig { path: toml_path.clone(), message: e.to_string() })?;
        let (want_name, want_version) = (dir_name(dir.parent().unwrap_or(dir)), dir_name(dir));
        if spec.name != want_name || spec.version != want_version {
            return Err(WorkerError::ModelConfig {
                path: toml_path,
                message: format!("declares {}/{} but lives in {want_name}/{want_version}", spec.name, spec.version),
            });
        }
        Ok(ModelVersion { spec, dir: dir.to_path_buf() })
    }

    /// Checks that `req` is something this model version can run.
    ///
    /// Returns the stable error code and message to fail the job with.
    pub fn check(&self, req: &JobRequest) -> Result<(), (ErrorCode, String)> {
        if let Some(v) = &req.model_version
            && *v != self.spec.version
        {
            return Err((
                ErrorCode::UnknownModel,
                format!("model `{}` version `{v}` is not served (serving `{}`)", req.model, self.spec.version),
            ));
        }
        match &req.input {
            Input::Text(text) => {
                let n = text.chars().count();
                if n > self.spec.max_input_chars {
                    return Err((
                        ErrorCode::InputTooLong,
                        format!(
                            "input.text has {n} characters; model `{}` accepts at most {}",
                            self.spec.name, self.spec.max_input_chars
                        ),
                    ));
                }
                Ok(())
            }
            Input::Tensors(_) => Err((
                ErrorCode::InvalidInput,
                format!("model `{}` is a text model: send `input.text`, not `input.tensors`", self.spec.name),
            )),
        }
    }
}

fn dir_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Verifies every line of `dir/SHA256SUMS` (`<hex>  <file>`).
fn verify_checksums(dir: &Path) -> Result<(), WorkerError> {
    let sums_path = dir.join("SHA256SUMS");
    let sums = fs::read_to_string(&sums_path).map_err(|e| WorkerError::io(&sums_path, e))?;
    let mut listed = BTreeMap::new();
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (digest, file) = line
            .split_once(char::is_whitespace)
            .map(|(d, f)| (d.trim(), f.trim().trim_start_matches('*')))
            .ok_or_else(|| WorkerError::ModelConfig {
                path: sums_path.clone(),
                message: format!("malformed line {line:?}"),
            })?;
        if file.contains('/') || file.contains("..") {
            return Err(WorkerError::ModelConfig {
                path: sums_path.clone(),
                message: format!("{file:?} is not a file of this directory"),
            });
        }
        listed.insert(file.to_owned(), digest.to_ascii_lowercase());
    }
    for required in REQUIRED_FILES {
        if !listed.contains_key(required) {
            return Err(WorkerError::ModelConfig {
                path: sums_path.clone(),
                message: format!("{required} is not listed"),
            });
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

fn sha256_file(path: &Path) -> Result<String, WorkerError> {
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

/// A model repository on disk.
#[derive(Debug, Clone)]
pub struct ModelRepository {
    root: PathBuf,
}

impl ModelRepository {
    /// A repository rooted at `root` (nothing is read yet).
    pub fn new(root: impl Into<PathBuf>) -> ModelRepository {
        ModelRepository { root: root.into() }
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
            if entry.path().is_dir() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The newest version of `name` whose checksums verify.
    ///
    /// Versions compare numerically when both are numbers, else as strings.
    /// A version that fails verification is skipped with a warning, so a bad
    /// upload never replaces a good version; if none verifies, the newest
    /// version's error is returned.
    pub fn latest(&self, name: &str) -> Result<ModelVersion, WorkerError> {
        let dir = self.root.join(name);
        let mut versions: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|_| WorkerError::UnknownModel(name.to_owned()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && !dir_name(p).starts_with('.'))
            .collect();
        versions.sort_by(|a, b| version_order(&dir_name(a), &dir_name(b)));
        let mut first_error = None;
        for v in versions.iter().rev() {
            match ModelVersion::open(v) {
                Ok(mv) => return Ok(mv),
                Err(e) => {
                    tracing::warn!(model = name, version = %dir_name(v), error = %e, "model version refused");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| WorkerError::UnknownModel(name.to_owned())))
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
        let sums: String =
            REQUIRED_FILES.iter().map(|f| format!("{}  {f}\n", sha256_file(&dir.join(f)).unwrap())).collect();
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
        assert_eq!(repo.latest("toy").unwrap().spec.version, "10");
        assert!(matches!(repo.latest("nope"), Err(WorkerError::UnknownModel(_))));
        assert_eq!(repo.model_names().unwrap(), vec!["toy"]);
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
        let pinned = r#"{"job_id":"a","tenant":"t","model":"toy","model_version":"9","input":{"text":"hi"}}"#;
        assert_eq!(mv.check(&req(pinned)).unwrap_err().0, ErrorCode::UnknownModel);
        let tensors = r#"{"job_id":"a","tenant":"t","model":"toy","input":{"tensors":{"x":{"dtype":"int64","shape":[1],"data":[1]}}}}"#;
        assert_eq!(mv.check(&req(tensors)).unwrap_err().0, ErrorCode::InvalidInput);
    }
}
