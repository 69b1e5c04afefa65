//! A loaded embedding model: tokenizer + ONNX Runtime session. Synchronous;
//! only ever called from an inference thread (see `engine`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::Array2;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use crate::WorkerError;
use crate::model::{ModelVersion, Pooling};

/// Where ONNX Runtime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutionProvider {
    /// The CPU execution provider (always available).
    #[default]
    Cpu,
    /// CUDA on the given device; requires the `cuda` feature and a CUDA build
    /// of ONNX Runtime. Registration failure is an error, never a silent
    /// fallback to the CPU.
    Cuda { device_id: i32 },
}

/// ONNX Runtime settings of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// `libonnxruntime.so` to load; `ORT_DYLIB_PATH` when `None`.
    pub dylib_path: Option<PathBuf>,
    /// Threads ONNX Runtime uses inside one operator (0 = one per core).
    pub intra_threads: usize,
    /// Execution provider.
    pub provider: ExecutionProvider,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { dylib_path: None, intra_threads: 0, provider: ExecutionProvider::Cpu }
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

/// One token-encoded input.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
}

/// Tokenizer + session for one embedding model version.
pub struct Embedder {
    session: Session,
    tokenizer: Tokenizer,
    model: ModelVersion,
    /// Whether the graph takes `token_type_ids` (BERT does, many others not).
    wants_type_ids: bool,
}

impl Embedder {
    /// Loads the tokenizer and builds an ONNX Runtime session.
    pub fn load(model: &ModelVersion, cfg: &SessionConfig) -> Result<Embedder, WorkerError> {
        let env = environment(cfg.dylib_path.as_deref())?;
        let load_err = |message: String| WorkerError::Load {
            model: format!("{}/{}", model.spec.name, model.spec.version),
            message,
        };
        let mut tokenizer =
            Tokenizer::from_file(model.tokenizer_path()).map_err(|e| load_err(format!("tokenizer: {e}")))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: model.spec.tokenizer.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| load_err(format!("tokenizer truncation: {e}")))?;
        // Padding is done per batch here, to the batch's longest input.
        tokenizer.with_padding(None);

        let mut builder = Session::builder(env)
            .map_err(|e| load_err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| load_err(e.to_string()))?;
        if cfg.intra_threads > 0 {
            builder = builder.with_intra_threads(cfg.intra_threads).map_err(|e| load_err(e.to_string()))?;
        }
        builder = match cfg.provider {
            ExecutionProvider::Cpu => builder,
            #[cfg(feature = "cuda")]
            ExecutionProvider::Cuda { device_id } => builder
                .with_execution_providers([ort::ep::CUDA::default()
                    .with_device_id(device_id)
                    .build()
                    .error_on_failure()])
                .map_err(|e| load_err(format!("CUDA execution provider: {e}")))?,
            #[cfg(not(feature = "cuda"))]
            ExecutionProvider::Cuda { .. } => {
                return Err(load_err("this build has no CUDA support (build with `--features cuda`)".into()));
            }
        };
        let session = builder.commit_from_file(model.onnx_path()).map_err(|e| load_err(e.to_string()))?;

        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        for needed in ["input_ids", "attention_mask"] {
            if !inputs.contains(&needed) {
                return Err(load_err(format!("graph has no `{needed}` input (inputs: {inputs:?})")));
            }
        }
        let wants_type_ids = inputs.contains(&"token_type_ids");
        let output = &model.spec.embedding.output;
        if !session.outputs().iter().any(|o| o.name() == output) {
            return Err(load_err(format!("graph has no `{output}` output")));
        }
        Ok(Embedder { session, tokenizer, model: model.clone(), wants_type_ids })
    }

    /// The model version this embedder serves.
    pub fn model(&self) -> &ModelVersion {
        &self.model
    }

    /// Tokenizes one text (truncated to the model's `max_tokens`).
    pub fn encode(&self, text: &str) -> Result<Encoded, WorkerError> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
        Ok(Encoded {
            ids: enc.get_ids().iter().map(|&i| i64::from(i)).collect(),
            type_ids: enc.get_type_ids().iter().map(|&i| i64::from(i)).collect(),
        })
    }

    /// Runs one padded batch and returns one pooled embedding per input.
    pub fn embed(&mut self, batch: &[Encoded]) -> Result<Vec<Vec<f32>>, WorkerError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let n = batch.len();
        let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0).max(1);
        let mut ids = Array2::<i64>::zeros((n, len));
        let mut mask = Array2::<i64>::zeros((n, len));
        let mut types = Array2::<i64>::zeros((n, len));
        for (row, enc) in batch.iter().enumerate() {
            for (col, (&id, &ty)) in enc.ids.iter().zip(&enc.type_ids).enumerate() {
                ids[[row, col]] = id;
                types[[row, col]] = ty;
                mask[[row, col]] = 1;
            }
        }
        let mask_copy = mask.clone();
        let tensor = |a: Array2<i64>| Tensor::from_array(a).map_err(|e| WorkerError::Inference(e.to_string()));
        let mut inputs = ort::inputs!["input_ids" => tensor(ids)?, "attention_mask" => tensor(mask)?];
        if self.wants_type_ids {
            inputs.push(("token_type_ids".into(), tensor(types)?.into()));
        }
        let spec = &self.model.spec.embedding;
        let outputs = self.session.run(inputs).map_err(|e| WorkerError::Inference(e.to_string()))?;
        let (shape, states) = outputs[spec.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| WorkerError::Inference(e.to_string()))?;
        let dims: &[i64] = shape;
        if dims != [n as i64, len as i64, spec.dim as i64] {
            return Err(WorkerError::Inference(format!(
                "output `{}` has shape {dims:?}, expected [{n}, {len}, {}]",
                spec.output, spec.dim
            )));
        }
        Ok((0..n)
            .map(|row| {
                let rows = &states[row * len * spec.dim..(row + 1) * len * spec.dim];
                let mut v = pool(rows, mask_copy.row(row).as_slice().unwrap_or(&[]), spec.dim, spec.pooling);
                if spec.normalize {
                    l2_normalize(&mut v);
                }
                v
            })
            .collect())
    }
}

/// Pools `[len, dim]` token states into one `dim` vector.
fn pool(states: &[f32], mask: &[i64], dim: usize, pooling: Pooling) -> Vec<f32> {
    match pooling {
        Pooling::Cls => states[..dim].to_vec(),
        Pooling::Mean => {
            let mut sum = vec![0f32; dim];
            let mut count = 0f32;
            for (tok, &m) in states.chunks_exact(dim).zip(mask) {
                if m != 0 {
                    count += 1.0;
                    for (s, x) in sum.iter_mut().zip(tok) {
                        *s += x;
                    }
                }
            }
            let count = count.max(1e-9);
            sum.iter_mut().for_each(|s| *s /= count);
            sum
        }
    }
}

fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_padding() {
        // two tokens of dim 2, then one padded token full of garbage
        let states = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert_eq!(pool(&states, &[1, 1, 0], 2, Pooling::Mean), vec![2.0, 3.0]);
        assert_eq!(pool(&states, &[1, 1, 0], 2, Pooling::Cls), vec![1.0, 2.0]);
    }

    #[test]
    fn normalize_gives_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }
}
