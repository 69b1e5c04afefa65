//! ONNX Runtime: the process-wide environment and session construction,
//! including the execution-provider policy.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::WorkerError;

/// Where ONNX Runtime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutionProvider {
    /// The CPU execution provider (always available).
    #[default]
    Cpu,
    /// CUDA on the given device; requires the `cuda` feature and a CUDA build
    /// of ONNX Runtime.
    Cuda { device_id: i32 },
}

/// What to do when the requested execution provider cannot be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderFallback {
    /// Refuse to load the model (the default: a GPU deployment that silently
    /// runs on the CPU is an outage in disguise).
    #[default]
    Fail,
    /// Load on the CPU, log an error and count
    /// `sluice_execution_provider_fallback_total`.
    Cpu,
}

/// ONNX Runtime settings of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// `libonnxruntime.so` to load; `ORT_DYLIB_PATH` when `None`.
    pub dylib_path: Option<PathBuf>,
    /// Threads ONNX Runtime uses inside one operator (0 = one per core).
    pub intra_threads: usize,
    /// Graph optimisation level, 0 (none) to 3 (all).
    pub optimization_level: u8,
    /// Execution provider.
    pub provider: ExecutionProvider,
    /// Policy when `provider` cannot be registered.
    pub fallback: ProviderFallback,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            dylib_path: None,
            intra_threads: 0,
            optimization_level: 3,
            provider: ExecutionProvider::Cpu,
            fallback: ProviderFallback::Fail,
        }
    }
}

/// ONNX Runtime allows one environment per process; it is made on first use
/// and shared by every session.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

fn environment(dylib: Option<&Path>) -> Result<&'static Environment, WorkerError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = match dylib {
                Some(p) => p.to_path_buf(),
                None => match std::env::var_os("ORT_DYLIB_PATH") {
                    Some(p) => PathBuf::from(p),
                    None => find_dylib(&dylib_places())?,
                },
            };
            if !path.is_file() {
                return Err(format!("{} does not exist", path.display()));
            }
            ort::init_from(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .with_name("sluice")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| WorkerError::Runtime(e.clone()))
}

/// Where ONNX Runtime is looked for when neither `engine.ort_dylib` nor
/// `ORT_DYLIB_PATH` names it, in order: next to the executable and in
/// `../lib` (an install prefix or the container image), the Python venv
/// that `make` installs (`~/.cache/sluice/venv`, its `onnxruntime` wheel),
/// then the system library directories.
fn dylib_places() -> Vec<PathBuf> {
    let mut places = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        places.push(dir.join("../lib"));
        places.push(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(cache) = cache {
        let lib = cache.join("sluice/venv/lib");
        // lib/python3.X/site-packages/onnxruntime/capi
        let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("site-packages/onnxruntime/capi"))
            .collect();
        pythons.sort();
        if pythons.is_empty() {
            pythons.push(lib.join("python3*/site-packages/onnxruntime/capi"));
        }
        places.extend(pythons);
    }
    places.extend(["/usr/local/lib", "/usr/lib", "/usr/lib/x86_64-linux-gnu"].map(PathBuf::from));
    places
}

/// The first `libonnxruntime.so` or `libonnxruntime.so.<version>` (the
/// highest version in a directory) in `places`; the error names every
/// place looked at.
fn find_dylib(places: &[PathBuf]) -> Result<PathBuf, String> {
    for dir in places {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n == "libonnxruntime.so"
                            || n.strip_prefix("libonnxruntime.so.")
                                .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
                    })
            })
            .collect();
        // Highest version last: 1.22.1 after 1.9.0.
        found.sort_by_key(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let version = name.strip_prefix("libonnxruntime.so").unwrap_or_default();
            version.split('.').filter_map(|v| v.parse::<u32>().ok()).collect::<Vec<_>>()
        });
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    let looked: Vec<String> = places.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "no libonnxruntime.so: engine.ort_dylib and ORT_DYLIB_PATH are not set, and none was found in {}",
        looked.join(", ")
    ))
}

/// Builds a session for `onnx`, applying the provider policy. `model` names
/// the model in errors and metrics.
pub(crate) fn session(onnx: &Path, cfg: &SessionConfig, model: &str) -> Result<Session, WorkerError> {
    let load_err = |message: String| WorkerError::Load { model: model.to_owned(), message };
    match build(onnx, cfg, cfg.provider) {
        Ok(s) => Ok(s),
        Err(e) if cfg.provider != ExecutionProvider::Cpu && cfg.fallback == ProviderFallback::Cpu => {
            tracing::error!(
                model,
                provider = ?cfg.provider,
                error = %e,
                "execution provider unavailable: FALLING BACK TO CPU (policy cuda_fallback = \"cpu\")"
            );
            metrics::counter!(sluice_schemas::metrics::PROVIDER_FALLBACK.name, "model" => model.to_owned())
                .increment(1);
            build(onnx, cfg, ExecutionProvider::Cpu).map_err(load_err)
        }
        Err(e) => Err(load_err(e)),
    }
}

fn build(onnx: &Path, cfg: &SessionConfig, provider: ExecutionProvider) -> Result<Session, String> {
    let env = environment(cfg.dylib_path.as_deref()).map_err(|e| e.to_string())?;
    let level = match cfg.optimization_level {
        0 => GraphOptimizationLevel::Disable,
        1 => GraphOptimizationLevel::Level1,
        2 => GraphOptimizationLevel::Level2,
        _ => GraphOptimizationLevel::Level3,
    };
    let mut builder =
        Session::builder(env).map_err(|e| e.to_string())?.with_optimization_level(level).map_err(|e| e.to_string())?;
    if cfg.intra_threads > 0 {
        builder = builder.with_intra_threads(cfg.intra_threads).map_err(|e| e.to_string())?;
    }
    builder = match provider {
        ExecutionProvider::Cpu => builder,
        #[cfg(feature = "cuda")]
        ExecutionProvider::Cuda { device_id } => builder
            .with_execution_providers([ort::ep::CUDA::default().with_device_id(device_id).build().error_on_failure()])
            .map_err(|e| format!("CUDA execution provider: {e}"))?,
        #[cfg(not(feature = "cuda"))]
        ExecutionProvider::Cuda { .. } => {
            return Err("CUDA execution provider: this build has no CUDA support (build with `--features cuda`)".into());
        }
    };
    builder.commit_from_file(onnx).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_runtime_is_found_where_make_installs_it_and_the_error_says_where_it_looked() {
        let root = std::env::temp_dir().join(format!("sluice-ort-{}", std::process::id()));
        let (empty, capi) = (root.join("empty"), root.join("venv/lib/python3.11/site-packages/onnxruntime/capi"));
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::create_dir_all(&capi).unwrap();
        for name in ["libonnxruntime.so.1.9.0", "libonnxruntime.so.1.22.1", "libonnxruntime_providers_shared.so"] {
            std::fs::write(capi.join(name), b"").unwrap();
        }
        let found = find_dylib(&[empty.clone(), capi.clone()]).unwrap();
        assert_eq!(found, capi.join("libonnxruntime.so.1.22.1"));

        let err = find_dylib(&[empty.clone(), root.join("missing")]).unwrap_err();
        assert!(err.contains(&empty.display().to_string()) && err.contains("missing"), "{err}");
        assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }
}
