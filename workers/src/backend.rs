//! What runs a batch: a [`Preprocessor`] turns a job's input into model
//! inputs (tokenisation, tensor checks) before it is queued, and a
//! [`Runner`] owns one ONNX Runtime session on an inference thread and runs
//! whole batches. Both exist per model task (text embedding, generic tensor).

use std::collections::BTreeMap;

use ndarray::Array2;
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use sluice_schemas::{DType, Input, Output, Tensor as JsonTensor};
use tokenizers::{Tokenizer, TruncationParams};

use crate::WorkerError;
use crate::model::{ModelVersion, Pooling, Task};
use crate::runtime::{SessionConfig, session};

/// A job's input, ready for its batch.
#[derive(Debug, Clone)]
pub enum Prepared {
    /// Token ids and type ids (truncated to the model's `max_tokens`).
    Tokens { ids: Vec<i64>, type_ids: Vec<i64> },
    /// Named tensors, checked against the graph's inputs.
    Tensors(BTreeMap<String, JsonTensor>),
}

impl Prepared {
    /// What the job costs a batch: its token count, or 1.
    pub fn cost(&self) -> usize {
        match self {
            Prepared::Tokens { ids, .. } => ids.len().max(1),
            Prepared::Tensors(_) => 1,
        }
    }
}

/// One graph input as the model declares it.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DType,
    /// Dimensions; `-1` where the graph leaves one open.
    pub dims: Vec<i64>,
}

/// Makes [`Prepared`] inputs; shared by every thread (tokenizers are `Sync`).
pub enum Preprocessor {
    Text(Box<Tokenizer>),
    Tensor(Vec<InputSpec>),
}

impl Preprocessor {
    /// The preprocessor of `model`, given the graph inputs its session reports.
    pub fn new(model: &ModelVersion, inputs: Vec<InputSpec>) -> Result<Preprocessor, WorkerError> {
        let err = |message: String| WorkerError::Load { model: model.label(), message };
        match model.spec.task {
            Task::Embedding => {
                let spec = model.spec.tokenizer.as_ref().ok_or_else(|| err("no [tokenizer] section".into()))?;
                let mut tokenizer =
                    Tokenizer::from_file(model.dir.join(&spec.file)).map_err(|e| err(format!("tokenizer: {e}")))?;
                tokenizer
                    .with_truncation(Some(TruncationParams { max_length: spec.max_tokens, ..Default::default() }))
                    .map_err(|e| err(format!("tokenizer truncation: {e}")))?;
                // Padding is done per batch, to the batch's longest input.
                tokenizer.with_padding(None);
                Ok(Preprocessor::Text(Box::new(tokenizer)))
            }
            Task::Tensor => Ok(Preprocessor::Tensor(inputs)),
        }
    }

    /// Checks an input without preparing it (cheap; used at admission).
    pub fn check(&self, input: &Input) -> Result<(), String> {
        match (self, input) {
            (Preprocessor::Text(_), Input::Text(_)) => Ok(()),
            (Preprocessor::Text(_), Input::Tensors(_)) => {
                Err("this is a text model: send `input.text`, not `input.tensors`".into())
            }
            (Preprocessor::Tensor(_), Input::Text(_)) => {
                Err("this is a tensor model: send `input.tensors`, not `input.text`".into())
            }
            (Preprocessor::Tensor(specs), Input::Tensors(t)) => check_tensors(specs, t),
        }
    }

    /// Tokenizes or checks `input`.
    pub fn prepare(&self, input: &Input) -> Result<Prepared, WorkerError> {
        self.check(input).map_err(WorkerError::InvalidInput)?;
        match (self, input) {
            (Preprocessor::Text(tok), Input::Text(text)) => {
                let enc = tok.encode(text.as_str(), true).map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
                Ok(Prepared::Tokens {
                    ids: enc.get_ids().iter().map(|&i| i64::from(i)).collect(),
                    type_ids: enc.get_type_ids().iter().map(|&i| i64::from(i)).collect(),
                })
            }
            (Preprocessor::Tensor(_), Input::Tensors(t)) => Ok(Prepared::Tensors(t.clone())),
            _ => unreachable!("check() rejects mismatched inputs"),
        }
    }
}

fn check_tensors(specs: &[InputSpec], given: &BTreeMap<String, JsonTensor>) -> Result<(), String> {
    for name in given.keys() {
        if !specs.iter().any(|s| &s.name == name) {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(format!("input.tensors.{name}: the model has no such input (inputs: {})", names.join(", ")));
        }
    }
    for spec in specs {
        let t = given.get(&spec.name).ok_or_else(|| format!("input.tensors.{}: missing", spec.name))?;
        if t.dtype != spec.dtype {
            return Err(format!("input.tensors.{}: dtype {:?}, the model takes {:?}", spec.name, t.dtype, spec.dtype));
        }
        let fits = t.shape.len() == spec.dims.len()
            && t.shape.iter().zip(&spec.dims).all(|(&got, &want)| want < 0 || got as i64 == want);
        if !fits {
            return Err(format!(
                "input.tensors.{}: shape {:?}, the model takes {:?} (-1 = any)",
                spec.name, t.shape, spec.dims
            ));
        }
        let Some(elements) = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)) else {
            return Err(format!(
                "input.tensors.{}: shape {:?} holds more elements than can be counted",
                spec.name, t.shape
            ));
        };
        if elements != t.data.len() as u64 {
            return Err(format!(
                "input.tensors.{}: shape {:?} holds {elements} elements, data has {}",
                spec.name,
                t.shape,
                t.data.len()
            ));
        }
    }
    Ok(())
}

/// Owns one session; lives on an inference thread.
pub enum Runner {
    Embedding { session: Session, output: String, dim: usize, pooling: Pooling, normalize: bool, type_ids: bool },
    Tensor { session: Session, outputs: Vec<String>, concat_batch: bool },
}

impl Runner {
    /// Loads `model`'s graph and checks it fits the model's task. Returns the
    /// runner and the graph's inputs.
    pub fn load(model: &ModelVersion, cfg: &SessionConfig) -> Result<(Runner, Vec<InputSpec>), WorkerError> {
        let label = model.label();
        let err = |message: String| WorkerError::Load { model: label.clone(), message };
        let session = session(&model.onnx_path(), cfg, &label)?;
        let mut inputs = Vec::new();
        for o in session.inputs() {
            if let ValueType::Tensor { ty, shape, .. } = o.dtype() {
                inputs.push(InputSpec { name: o.name().to_owned(), dtype: dtype_of(*ty), dims: shape.to_vec() });
            } else {
                return Err(err(format!("input `{}` is not a tensor", o.name())));
            }
        }
        let output_names: Vec<String> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
        let runner = match model.spec.task {
            Task::Embedding => {
                let e = model.spec.embedding.as_ref().ok_or_else(|| err("no [embedding] section".into()))?;
                for needed in ["input_ids", "attention_mask"] {
                    if !inputs.iter().any(|i| i.name == needed) {
                        return Err(err(format!("graph has no `{needed}` input")));
                    }
                }
                if !output_names.contains(&e.output) {
                    return Err(err(format!("graph has no `{}` output", e.output)));
                }
                Runner::Embedding {
                    type_ids: inputs.iter().any(|i| i.name == "token_type_ids"),
                    session,
                    output: e.output.clone(),
                    dim: e.dim,
                    pooling: e.pooling,
                    normalize: e.normalize,
                }
            }
            Task::Tensor => {
                let wanted = model.spec.tensor.as_ref().map(|t| t.outputs.clone()).unwrap_or_default();
                let concat_batch = model.spec.tensor.as_ref().is_some_and(|t| t.concat_batch);
                let tensor_outputs: Vec<(String, Vec<i64>)> = session
                    .outputs()
                    .iter()
                    .filter_map(|o| match o.dtype() {
                        ValueType::Tensor { shape, .. } => Some((o.name().to_owned(), shape.to_vec())),
                        _ => None,
                    })
                    .collect();
                for w in &wanted {
                    if !tensor_outputs.iter().any(|(name, _)| name == w) {
                        return Err(err(format!("output `{w}` is not a tensor output of the graph")));
                    }
                }
                let outputs: Vec<String> = if wanted.is_empty() {
                    tensor_outputs.iter().map(|(name, _)| name.clone()).collect()
                } else {
                    wanted
                };
                if concat_batch {
                    let fixed_inputs = inputs.iter().filter(|i| i.dims.first() != Some(&-1)).map(|i| i.name.as_str());
                    let fixed_outputs = tensor_outputs
                        .iter()
                        .filter(|(name, dims)| outputs.contains(name) && dims.first() != Some(&-1))
                        .map(|(name, _)| name.as_str());
                    let fixed: Vec<&str> = fixed_inputs.chain(fixed_outputs).collect();
                    if !fixed.is_empty() {
                        return Err(err(format!(
                            "[tensor] concat_batch needs a dynamic first dimension on every input and returned \
                             output; these have a fixed one: {}",
                            fixed.join(", ")
                        )));
                    }
                }
                Runner::Tensor { session, outputs, concat_batch }
            }
        };
        Ok((runner, inputs))
    }

    /// Runs one batch; one result per job, in order. `Err` fails the whole
    /// batch (the engine is unhealthy), an inner `Err` only that job.
    pub fn run(&mut self, batch: &[&Prepared]) -> Result<Vec<Result<Output, WorkerError>>, WorkerError> {
        match self {
            Runner::Embedding { session, output, dim, pooling, normalize, type_ids } => {
                let vectors = embed(session, batch, output, *dim, *pooling, *normalize, *type_ids)?;
                Ok(vectors.into_iter().map(|v| Ok(Output::Embedding(v))).collect())
            }
            // Generic graphs may have fixed batch dimensions: unless the model
            // says its first axis is a batch axis, jobs run one by one inside
            // the batch (batching still amortises scheduling).
            Runner::Tensor { session, outputs, concat_batch } => {
                let mut tensors = Vec::with_capacity(batch.len());
                for p in batch {
                    let Prepared::Tensors(t) = p else {
                        return Err(WorkerError::Inference("tensor model got a token input. This is a bug.".into()));
                    };
                    tensors.push(t);
                }
                if !*concat_batch {
                    return Ok(tensors.iter().map(|t| run_tensors(session, &[t], outputs).map(one)).collect());
                }
                let mut results: Vec<Option<Result<Output, WorkerError>>> = (0..batch.len()).map(|_| None).collect();
                for group in concat_groups(&tensors) {
                    let jobs: Vec<&BTreeMap<String, JsonTensor>> = group.iter().map(|&i| tensors[i]).collect();
                    match run_tensors(session, &jobs, outputs) {
                        Ok(outs) => {
                            for (&i, out) in group.iter().zip(outs) {
                                results[i] = Some(Ok(Output::Tensors(out)));
                            }
                        }
                        // One job's bad input must not fail the rest: each
                        // job of a failed group runs alone and fails alone.
                        Err(_) if group.len() > 1 => {
                            for &i in &group {
                                results[i] = Some(run_tensors(session, &[tensors[i]], outputs).map(one));
                            }
                        }
                        Err(e) => results[group[0]] = Some(Err(e)),
                    }
                }
                Ok(results.into_iter().map(|r| r.expect("every job is in one group. This is a bug.")).collect())
            }
        }
    }
}

/// The only job's outputs of a one-job run.
fn one(mut outs: Vec<BTreeMap<String, JsonTensor>>) -> Output {
    Output::Tensors(outs.pop().expect("a run returns one output map per job. This is a bug."))
}

/// Jobs that can share one forward pass: the same inputs, with the same
/// dtypes and the same dimensions after the first, and each job's inputs
/// agreeing on their first dimension (its rows). Groups keep the batch's
/// order; a job that fits no other runs in a group of one.
fn concat_groups(jobs: &[&BTreeMap<String, JsonTensor>]) -> Vec<Vec<usize>> {
    type Signature = Vec<(String, DType, Vec<u64>)>;
    let signature = |t: &BTreeMap<String, JsonTensor>| -> Option<Signature> {
        let rows = t.values().next()?.shape.first().copied()?;
        t.iter()
            .map(|(name, x)| (x.shape.first() == Some(&rows)).then(|| (name.clone(), x.dtype, x.shape[1..].to_vec())))
            .collect()
    };
    let mut groups: Vec<(Option<Signature>, Vec<usize>)> = Vec::new();
    for (i, t) in jobs.iter().enumerate() {
        let sig = signature(t);
        match groups.iter_mut().find(|(s, _)| s.is_some() && *s == sig) {
            Some((_, members)) => members.push(i),
            None => groups.push((sig, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

fn embed(
    session: &mut Session,
    batch: &[&Prepared],
    output: &str,
    dim: usize,
    pooling: Pooling,
    normalize: bool,
    with_type_ids: bool,
) -> Result<Vec<Vec<f32>>, WorkerError> {
    let n = batch.len();
    let len = batch.iter().map(|p| p.cost()).max().unwrap_or(1);
    let mut ids = Array2::<i64>::zeros((n, len));
    let mut mask = Array2::<i64>::zeros((n, len));
    let mut types = Array2::<i64>::zeros((n, len));
    for (row, p) in batch.iter().enumerate() {
        let Prepared::Tokens { ids: tok, type_ids } = p else {
            return Err(WorkerError::Inference("text model got a non-token input. This is a bug.".into()));
        };
        for (col, (&id, &ty)) in tok.iter().zip(type_ids).enumerate() {
            ids[[row, col]] = id;
            types[[row, col]] = ty;
            mask[[row, col]] = 1;
        }
    }
    let mask_rows: Vec<Vec<i64>> = mask.rows().into_iter().map(|r| r.to_vec()).collect();
    let tensor = |a: Array2<i64>| Tensor::from_array(a).map_err(|e| WorkerError::Inference(e.to_string()));
    let mut inputs = ort::inputs!["input_ids" => tensor(ids)?, "attention_mask" => tensor(mask)?];
    if with_type_ids {
        inputs.push(("token_type_ids".into(), tensor(types)?.into()));
    }
    let outputs = session.run(inputs).map_err(|e| WorkerError::Inference(e.to_string()))?;
    let (shape, states) =
        outputs[output].try_extract_tensor::<f32>().map_err(|e| WorkerError::Inference(e.to_string()))?;
    let dims: &[i64] = shape;
    if dims != [n as i64, len as i64, dim as i64] {
        return Err(WorkerError::Inference(format!(
            "output `{output}` has shape {dims:?}, expected [{n}, {len}, {dim}]"
        )));
    }
    Ok((0..n)
        .map(|row| {
            let rows = &states[row * len * dim..(row + 1) * len * dim];
            let mut v = pool(rows, &mask_rows[row], dim, pooling);
            if normalize {
                l2_normalize(&mut v);
            }
            v
        })
        .collect())
}

/// Runs `jobs` (one, or several of one [`concat_groups`] group) in one
/// forward pass: each input is the jobs' inputs concatenated along the first
/// axis, and each output is split back along it by the jobs' rows. One
/// output map per job, in order.
fn run_tensors(
    session: &mut Session,
    jobs: &[&BTreeMap<String, JsonTensor>],
    outputs: &[String],
) -> Result<Vec<BTreeMap<String, JsonTensor>>, WorkerError> {
    let first = jobs.first().ok_or_else(|| WorkerError::Inference("an empty tensor batch. This is a bug.".into()))?;
    let rows: Vec<u64> =
        jobs.iter().map(|t| t.values().next().and_then(|x| x.shape.first().copied()).unwrap_or(0)).collect();
    let mut inputs: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> = Vec::new();
    for (name, t) in first.iter() {
        let mut shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        if let Some(d0) = shape.first_mut() {
            *d0 = jobs.iter().map(|j| j[name].shape.first().copied().unwrap_or(1) as i64).sum();
        }
        let data = || jobs.iter().flat_map(|j| j[name].data.iter().copied());
        let e = |e: ort::Error| WorkerError::Inference(format!("input `{name}`: {e}"));
        let value: DynValue = match t.dtype {
            DType::Float32 => {
                Tensor::from_array((shape, data().map(|x| x as f32).collect::<Vec<_>>())).map_err(e)?.into_dyn()
            }
            DType::Float64 => Tensor::from_array((shape, data().collect::<Vec<_>>())).map_err(e)?.into_dyn(),
            DType::Int32 => {
                Tensor::from_array((shape, data().map(|x| x as i32).collect::<Vec<_>>())).map_err(e)?.into_dyn()
            }
            DType::Int64 => {
                Tensor::from_array((shape, data().map(|x| x as i64).collect::<Vec<_>>())).map_err(e)?.into_dyn()
            }
        };
        inputs.push((name.as_str().into(), value.into()));
    }
    let result = session.run(inputs).map_err(|e| WorkerError::Inference(e.to_string()))?;
    let mut out = vec![BTreeMap::new(); jobs.len()];
    for name in outputs {
        let v = &result[name.as_str()];
        let (dtype, shape, data) = extract(v).map_err(|m| WorkerError::Inference(format!("output `{name}`: {m}")))?;
        if jobs.len() == 1 {
            out[0].insert(name.clone(), JsonTensor { dtype, shape, data });
            continue;
        }
        let total: u64 = rows.iter().sum();
        if shape.first() != Some(&total) {
            return Err(WorkerError::Inference(format!(
                "output `{name}` has shape {shape:?}: its first axis is not the batch's {total} rows"
            )));
        }
        let per_row: usize = shape[1..].iter().product::<u64>() as usize;
        let mut at = 0usize;
        for (job, &r) in out.iter_mut().zip(&rows) {
            let n = r as usize * per_row;
            let mut job_shape = shape.clone();
            job_shape[0] = r;
            job.insert(name.clone(), JsonTensor { dtype, shape: job_shape, data: data[at..at + n].to_vec() });
            at += n;
        }
    }
    Ok(out)
}

fn extract(v: &DynValue) -> Result<(DType, Vec<u64>, Vec<f64>), String> {
    fn pair<T: ort::value::PrimitiveTensorElementType + Copy>(
        v: &DynValue,
        f: impl Fn(T) -> f64,
    ) -> Result<(Vec<u64>, Vec<f64>), String> {
        let (shape, data) = v.try_extract_tensor::<T>().map_err(|e| e.to_string())?;
        Ok((shape.iter().map(|&d| d.max(0) as u64).collect(), data.iter().map(|&x| f(x)).collect()))
    }
    match v.dtype() {
        ValueType::Tensor { ty: TensorElementType::Float32, .. } => {
            pair::<f32>(v, f64::from).map(|(s, d)| (DType::Float32, s, d))
        }
        ValueType::Tensor { ty: TensorElementType::Float64, .. } => {
            pair::<f64>(v, |x| x).map(|(s, d)| (DType::Float64, s, d))
        }
        ValueType::Tensor { ty: TensorElementType::Int32, .. } => {
            pair::<i32>(v, f64::from).map(|(s, d)| (DType::Int32, s, d))
        }
        ValueType::Tensor { ty: TensorElementType::Int64, .. } => {
            pair::<i64>(v, |x| x as f64).map(|(s, d)| (DType::Int64, s, d))
        }
        other => Err(format!("unsupported output type {other:?}")),
    }
}

fn dtype_of(ty: TensorElementType) -> DType {
    match ty {
        TensorElementType::Float64 => DType::Float64,
        TensorElementType::Int32 => DType::Int32,
        TensorElementType::Int64 => DType::Int64,
        // Other element types cannot be expressed in a JobRequest; declaring
        // them float32 makes every request fail the dtype check clearly.
        _ => DType::Float32,
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

    #[test]
    fn jobs_share_a_forward_pass_only_when_their_inputs_line_up() {
        let job = |inputs: &[(&str, DType, Vec<u64>)]| {
            inputs
                .iter()
                .map(|(name, dtype, shape)| {
                    let n = shape.iter().product::<u64>() as usize;
                    (name.to_string(), JsonTensor { dtype: *dtype, shape: shape.clone(), data: vec![0.0; n] })
                })
                .collect::<BTreeMap<_, _>>()
        };
        let f = DType::Float32;
        let jobs = [
            job(&[("x", f, vec![1, 4])]),
            job(&[("x", f, vec![3, 4])]),            // more rows: same pass
            job(&[("x", f, vec![2, 5])]),            // another row width
            job(&[("x", DType::Int64, vec![1, 4])]), // another dtype
            job(&[("x", f, vec![2, 5])]),
            job(&[("x", f, vec![1, 4]), ("z", f, vec![2, 4])]), // its inputs disagree on rows
            job(&[("x", f, vec![1, 4]), ("z", f, vec![2, 4])]),
        ];
        let refs: Vec<&BTreeMap<String, JsonTensor>> = jobs.iter().collect();
        assert_eq!(concat_groups(&refs), vec![vec![0, 1], vec![2, 4], vec![3], vec![5], vec![6]]);
    }

    #[test]
    fn tensor_inputs_are_checked_against_the_graph() {
        let specs = vec![InputSpec { name: "x".into(), dtype: DType::Float32, dims: vec![-1, 4] }];
        let t = |dtype, shape: Vec<u64>, n: usize| {
            BTreeMap::from([("x".to_string(), JsonTensor { dtype, shape, data: vec![0.0; n] })])
        };
        assert!(check_tensors(&specs, &t(DType::Float32, vec![2, 4], 8)).is_ok());
        assert!(check_tensors(&specs, &t(DType::Int64, vec![2, 4], 8)).unwrap_err().contains("dtype"));
        assert!(check_tensors(&specs, &t(DType::Float32, vec![2, 3], 6)).unwrap_err().contains("shape"));
        assert!(check_tensors(&specs, &t(DType::Float32, vec![2, 4], 7)).unwrap_err().contains("holds 8 elements"));
        let mut extra = t(DType::Float32, vec![1, 4], 4);
        extra.insert("z".into(), JsonTensor { dtype: DType::Float32, shape: vec![1], data: vec![0.0] });
        assert!(check_tensors(&specs, &extra).unwrap_err().contains("no such input"));
        assert!(check_tensors(&specs, &BTreeMap::new()).unwrap_err().contains("missing"));
        // A shape whose element count overflows is an input error, not a panic.
        let huge = vec![-1, -1, -1];
        let specs3 = vec![InputSpec { name: "x".into(), dtype: DType::Float32, dims: huge }];
        let overflow = t(DType::Float32, vec![u64::MAX / 2, 4, 3], 0);
        assert!(check_tensors(&specs3, &overflow).unwrap_err().contains("more elements than can be counted"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Issue 10, items 5 and 14: any shape a record can carry (huge
        /// dimensions, wrong rank, a count that overflows) against a graph
        /// with open and fixed dimensions is refused with a message, never
        /// a panic, and what passes holds exactly as many elements as data.
        #[test]
        fn any_tensor_shape_is_checked_without_a_panic(
            shape in proptest::collection::vec(proptest::prop_oneof![0u64..6, proptest::prelude::any::<u64>()], 0..6),
            len in 0usize..40,
            float in proptest::prelude::any::<bool>(),
        ) {
            let specs = [InputSpec { name: "x".into(), dtype: DType::Float32, dims: vec![-1, 4, -1] }];
            let dtype = if float { DType::Float32 } else { DType::Int64 };
            let t = JsonTensor { dtype, shape: shape.clone(), data: vec![0.5; len] };
            let given: BTreeMap<String, JsonTensor> = [("x".to_owned(), t)].into();
            match check_tensors(&specs, &given) {
                Ok(()) => {
                    proptest::prop_assert!(float && shape.len() == 3 && shape[1] == 4);
                    proptest::prop_assert_eq!(shape.iter().product::<u64>(), len as u64);
                }
                Err(message) => proptest::prop_assert!(message.starts_with("input.tensors.x"), "{}", message),
            }
        }
    }
}
