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
                None => std::env::var_os("ORT_DYLIB_PATH")
                    .map(PathBuf::from)
                    .ok_or_else(|| "ORT_DYLIB_PATH is not set".to_owned())?,
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
            metrics::counter!("sluice_execution_provider_fallback_total", "model" => model.to_owned()).increment(1);
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
