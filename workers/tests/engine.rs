//! The real engine on real models: MiniLM (fp32 and int8) exported by
//! `workers/scripts/export_minilm.py`, onnxruntime's bundled tensor models,
//! and tiny test models made by `workers/scripts/make_test_models.py`, all
//! run by ONNX Runtime on the engine's inference threads.
//!
//! `make test` sets SLUICE_MODEL_REPO, ORT_DYLIB_PATH and SLUICE_TEST_PYTHON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_schemas::{DType, ErrorCode, Input, JobRequest, Output, Tensor};
use sluice_workers::{
    BreakerConfig, BreakerState, EngineConfig, EngineJob, InferenceHandle, ModelPool, ModelRepository, SessionConfig,
    WorkerError,
};

const MODEL: &str = "all-minilm-l6-v2";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (run the tests through `make test`)"))
}

fn repo() -> ModelRepository {
    assert!(std::env::var_os("ORT_DYLIB_PATH").is_some(), "ORT_DYLIB_PATH is not set (run through `make test`)");
    ModelRepository::new(env("SLUICE_MODEL_REPO"))
}

async fn engine(cfg: EngineConfig) -> InferenceHandle {
    let model = repo().latest(MODEL).expect("exported MiniLM in the model repository");
    assert_eq!(model.spec.version, "1", "routing.toml pins the fp32 version as default");
    InferenceHandle::start(model, cfg).await.expect("engine starts")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn embedding(r: Result<sluice_workers::Inferred, WorkerError>) -> Vec<f32> {
    r.expect("inference succeeds").embedding().expect("an embedding").to_vec()
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-engine-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

/// Builds a test model (`double`, `rows` or `broken`) as `<repo>/<name>/<version>`.
fn make_model(repo: &Path, name: &str, version: &str, kind: &str) {
    make_model_with(repo, name, version, kind, &[]);
}

fn make_model_with(repo: &Path, name: &str, version: &str, kind: &str, flags: &[&str]) {
    let out = std::process::Command::new(env("SLUICE_TEST_PYTHON"))
        .arg(script("make_test_models.py"))
        .args(["--out", repo.to_str().unwrap(), "--name", name, "--version", version, "--kind", kind])
        .args(flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "make_test_models.py: {}", String::from_utf8_lossy(&out.stderr));
}

/// Copies (hard-links where possible) a version directory into another repo.
fn link_version(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let mut entries: Vec<_> = std::fs::read_dir(src).unwrap().map(|e| e.unwrap().path()).collect();
    // SHA256SUMS last, as exporters do: the version is complete only then.
    entries.sort_by_key(|p| p.file_name().unwrap() == "SHA256SUMS");
    for p in entries {
        let to = dst.join(p.file_name().unwrap());
        if std::fs::hard_link(&p, &to).is_err() {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

fn x(rows: usize, value: f64) -> Input {
    Input::Tensors(BTreeMap::from([(
        "x".to_string(),
        Tensor { dtype: DType::Float32, shape: vec![rows as u64, 4], data: vec![value; rows * 4] },
    )]))
}

fn request(id: &str, model: &str, input: Input) -> JobRequest {
    JobRequest {
        job_id: id.into(),
        tenant: "t".into(),
        model: model.into(),
        model_version: None,
        input,
        priority: Default::default(),
        deadline: None,
        ttl_ms: None,
        metadata: Default::default(),
        submitted_at: None,
        callback: None,
        batch: None,
    }
}

fn tensor(out: &Output, name: &str) -> Tensor {
    match out {
        Output::Tensors(t) => t[name].clone(),
        other => panic!("expected tensors, got {other:?}"),
    }
}

/// Runs `req` through the pool; returns the version that ran it.
async fn run_routed(pool: &ModelPool, req: &JobRequest) -> Result<(String, Output), WorkerError> {
    let engine = pool.route(req).map_err(|(_, m)| WorkerError::InvalidInput(m))?;
    let version = engine.model().spec.version.clone();
    let out = engine.infer(EngineJob::new(req.input.clone(), &req.tenant)).await?;
    Ok((version, out.output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_embedding_of_the_example_sentence() {
    let engine = engine(EngineConfig::default()).await;
    let out = engine.infer(EngineJob::text("This is an example sentence")).await.unwrap();
    let v = out.embedding().unwrap();
    let published = [0.0676569f32, 0.0634959, 0.0487131, 0.0793050, 0.0374481];
    assert_eq!(v.len(), 384);
    for (i, (got, want)) in v.iter().zip(published).enumerate() {
        assert!((got - want).abs() < 1e-4, "dim {i}: got {got}, published {want}");
    }
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "normalised, got norm {norm}");
    // [CLS] this is an example sentence [SEP]
    assert_eq!(out.input_tokens, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paraphrases_score_higher_than_unrelated_sentences() {
    let engine = engine(EngineConfig::default()).await;
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "The film everyone is talking about is great.",
        "The stock market fell sharply today.",
    ];
    let mut tickets = Vec::new();
    for t in texts {
        tickets.push(engine.enqueue(EngineJob::text(t)).await.unwrap());
    }
    let mut e = Vec::new();
    for t in tickets {
        e.push(embedding(t.wait().await));
    }
    let food = cosine(&e[0], &e[1]);
    let movie = cosine(&e[2], &e[3]);
    for (i, j) in [(0, 2), (0, 4), (1, 3), (2, 4), (3, 4)] {
        let unrelated = cosine(&e[i], &e[j]);
        assert!(food > unrelated + 0.3, "food {food} vs ({i},{j}) {unrelated}");
        assert!(movie > unrelated + 0.3, "movie {movie} vs ({i},{j}) {unrelated}");
    }
}

/// A text's embedding does not depend on what it was batched with: padding
/// is masked out of attention and pooling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_alone_and_inside_a_padded_batch_of_32_agree() {
    let engine = engine(EngineConfig {
        max_batch_size: 32,
        max_wait: Duration::from_millis(300),
        length_aware: false,
        ..Default::default()
    })
    .await;
    let alone = engine.infer(EngineJob::text("Short one.")).await.unwrap();
    assert_eq!(alone.batch_size, 1);
    let mut tickets = Vec::new();
    for i in 0..31 {
        let words = "lorem ipsum dolor sit amet ".repeat(1 + i % 7 * 5);
        tickets.push(engine.enqueue(EngineJob::text(format!("{i} {words}"))).await.unwrap());
    }
    let target = engine.enqueue(EngineJob::text("Short one.")).await.unwrap().wait().await.unwrap();
    assert_eq!(target.batch_size, 32, "ran inside the full batch");
    assert!(target.padding_ratio > 0.3, "the batch was mostly padding for this text: {}", target.padding_ratio);
    for t in tickets {
        assert!(t.wait().await.unwrap().input_tokens <= 256, "truncated to max_tokens");
    }
    let c = cosine(alone.embedding().unwrap(), target.embedding().unwrap());
    assert!(c >= 0.99999, "cosine {c}");
}

/// Two inference threads, each with a single-threaded session (the default
/// layout on 2 cores), taking batches as they free up: every result is the
/// one a lone session gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_single_threaded_sessions_give_a_lone_sessions_results() {
    let model = repo().latest(MODEL).unwrap();
    let one = SessionConfig { intra_threads: 1, ..Default::default() };
    let engine = InferenceHandle::start(
        model.clone(),
        EngineConfig { inference_threads: 2, max_batch_size: 8, session: one.clone(), ..Default::default() },
    )
    .await
    .unwrap();
    let texts: Vec<String> =
        (0..64).map(|i| format!("sentence number {i} {}", "about sessions ".repeat(i % 9))).collect();
    let mut tickets = Vec::new();
    for t in &texts {
        tickets.push(engine.enqueue(EngineJob::text(t.clone())).await.unwrap());
    }
    let mut lone = sluice_workers::RawSession::load(&model, &one).unwrap();
    for (t, ticket) in texts.iter().zip(tickets) {
        let shared = ticket.wait().await.unwrap();
        let prepared = lone.prepare(&Input::Text(t.clone())).unwrap();
        let Output::Embedding(alone) = lone.run(&[&prepared]).unwrap().remove(0) else { panic!() };
        let c = cosine(shared.embedding().unwrap(), &alone);
        assert!(c >= 0.99999, "{t}: cosine {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_engine_is_a_typed_overload_error() {
    let engine = engine(EngineConfig { queue_capacity: 2, max_batch_size: 1, ..Default::default() }).await;
    let mut accepted = Vec::new();
    let mut overloaded = 0;
    for i in 0..200 {
        match engine.try_enqueue(EngineJob::text(format!("sentence number {i} with some words in it"))).await {
            Ok(t) => accepted.push(t),
            Err(WorkerError::Overloaded { capacity }) => {
                assert_eq!(capacity, 2);
                overloaded += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(overloaded > 0, "queue of 2 never filled");
    for t in accepted {
        assert_eq!(embedding(t.wait().await).len(), 384, "accepted jobs all finish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_truncated_to_256_tokens() {
    let engine = engine(EngineConfig::default()).await;
    let out = engine.infer(EngineJob::text("word ".repeat(1000))).await.unwrap();
    assert_eq!(out.input_tokens, 256);
}

/// The int8 version built by the export step stays as close to fp32 as the
/// bar a faster version must meet (mean cosine ≥ 0.99, minimum ≥ 0.98), on
/// the export's own 160 sentences run through the engine's batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_version_is_close_to_fp32() {
    let listing = repo().scan(MODEL).unwrap();
    let v = |name: &str| listing.versions.iter().find(|v| v.spec.version == name).expect("version exported").clone();
    let fp32 = InferenceHandle::start(v("1"), EngineConfig::default()).await.unwrap();
    let int8 = InferenceHandle::start(v("2"), EngineConfig::default()).await.unwrap();
    let corpus =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../load-tests/data/sentences.tsv"))
            .unwrap();
    let texts: Vec<String> = corpus.lines().filter_map(|l| l.split_once('\t')).map(|(_, t)| t.to_owned()).collect();
    let mut a = Vec::new();
    let mut b = Vec::new();
    for t in &texts {
        a.push(fp32.enqueue(EngineJob::text(t.clone())).await.unwrap());
        b.push(int8.enqueue(EngineJob::text(t.clone())).await.unwrap());
    }
    let mut cosines = Vec::new();
    for (x, y) in a.into_iter().zip(b) {
        cosines.push(cosine(&embedding(x.wait().await), &embedding(y.wait().await)));
    }
    let mean = cosines.iter().sum::<f32>() / cosines.len() as f32;
    let min = cosines.iter().copied().fold(1f32, f32::min);
    println!("int8 vs fp32 over {} sentences: mean cosine {mean:.4}, min {min:.4}", cosines.len());
    assert!(mean >= 0.99 && min >= 0.98, "mean {mean}, min {min}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_tensor_models_from_the_onnxruntime_wheel() {
    let pool = ModelPool::start(repo(), vec!["sigmoid".into(), "logreg-iris".into()], EngineConfig::default())
        .await
        .expect("tensor models imported by `make models`");
    let values: Vec<f64> = (0..60).map(|i| (i as f64 - 30.0) / 10.0).collect();
    let input = Input::Tensors(BTreeMap::from([(
        "x".to_string(),
        Tensor { dtype: DType::Float32, shape: vec![3, 4, 5], data: values.clone() },
    )]));
    let (_, out) = run_routed(&pool, &request("s-1", "sigmoid", input)).await.unwrap();
    let y = tensor(&out, "y");
    assert_eq!(y.shape, vec![3, 4, 5]);
    for (xi, yi) in values.iter().zip(&y.data) {
        assert!((yi - 1.0 / (1.0 + (-xi).exp())).abs() < 1e-6, "sigmoid({xi}) = {yi}");
    }

    let iris = Input::Tensors(BTreeMap::from([(
        "float_input".to_string(),
        Tensor { dtype: DType::Float32, shape: vec![3, 2], data: vec![5.1, 3.5, 6.7, 3.1, 5.8, 2.7] },
    )]));
    let (_, out) = run_routed(&pool, &request("iris-1", "logreg-iris", iris)).await.unwrap();
    let label = tensor(&out, "label");
    assert_eq!((label.dtype, label.shape.clone()), (DType::Int64, vec![3]));
    assert!(label.data.iter().all(|l| (0.0..3.0).contains(l)), "{label:?}");

    // Shapes and dtypes are checked against the graph before inference.
    let bad = Input::Tensors(BTreeMap::from([(
        "x".to_string(),
        Tensor { dtype: DType::Float32, shape: vec![2, 2], data: vec![0.0; 4] },
    )]));
    let (code, msg) = pool.route(&request("s-2", "sigmoid", bad)).err().unwrap();
    assert_eq!(code, ErrorCode::InvalidInput);
    assert!(msg.contains("shape [2, 2]"), "{msg}");
    let (code, _) = pool.route(&request("s-3", "sigmoid", Input::Text("hi".into()))).err().unwrap();
    assert_eq!(code, ErrorCode::InvalidInput);
    let (code, _) = pool.route(&request("s-4", "nope", x(1, 1.0))).err().unwrap();
    assert_eq!(code, ErrorCode::UnknownModel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_cancelled_jobs_never_reach_inference() {
    let root = tempdir("expire");
    make_model(&root, "double", "1", "double");
    let model = ModelRepository::new(&root).latest("double").unwrap();
    let engine =
        InferenceHandle::start(model, EngineConfig { max_wait: Duration::from_millis(300), ..Default::default() })
            .await
            .unwrap();
    let mut late = EngineJob::new(x(1, 1.0), "t");
    late.deadline = Some(Instant::now() + Duration::from_millis(50));
    let cancel = Arc::new(AtomicBool::new(false));
    let mut cancelled = EngineJob::new(x(1, 1.0), "t");
    cancelled.cancel = Some(cancel.clone());
    let mut late = engine.enqueue(late).await.unwrap();
    let mut cancelled = engine.enqueue(cancelled).await.unwrap();
    let mut fine = engine.enqueue(EngineJob::new(x(2, 1.5), "t")).await.unwrap();
    cancel.store(true, Ordering::Release);
    // `started` says whether the job's batch began its forward pass.
    assert!(!late.started().await, "an expired job never starts");
    assert!(!cancelled.started().await, "a cancelled job never starts");
    assert!(matches!(late.wait().await, Err(WorkerError::Expired)));
    assert!(matches!(cancelled.wait().await, Err(WorkerError::Cancelled)));
    assert!(fine.started().await, "the live job's batch starts");
    assert!(fine.started().await, "asked again, it answers the same");
    let out = fine.wait().await.unwrap();
    assert_eq!(out.batch_size, 1, "only the live job ran");
    assert_eq!(tensor(&out.output, "y").data, vec![3.0; 8]);
    std::fs::remove_dir_all(root).unwrap();
}

/// A model whose first axis is a batch axis (`concat_batch`) runs a batch
/// of jobs in one forward pass, and every job gets exactly its own rows back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concat_batch_model_runs_a_batch_in_one_forward_pass() {
    let root = tempdir("concat");
    make_model_with(&root, "rows", "1", "rows", &["--concat-batch"]);
    make_model(&root, "alone", "1", "rows");
    for (name, concat) in [("rows", true), ("alone", false)] {
        let model = ModelRepository::new(&root).latest(name).unwrap();
        // The batch is due when it holds all six jobs (max_wait is far away;
        // in arrival order, a full batch does not wait for a window).
        let cfg = EngineConfig {
            max_batch_size: 6,
            max_wait: Duration::from_secs(60),
            length_aware: false,
            ..Default::default()
        };
        let engine = InferenceHandle::start(model, cfg).await.unwrap();
        let rows = |i: usize| 1 + i % 3;
        let mut tickets = Vec::new();
        for i in 0..6 {
            tickets.push(engine.enqueue(EngineJob::new(x(rows(i), i as f64), "t")).await.unwrap());
        }
        let total: usize = (0..6).map(rows).sum();
        for (i, t) in tickets.into_iter().enumerate() {
            let out = t.wait().await.unwrap();
            assert_eq!(out.batch_size, 6, "{name}: one batch");
            let y = tensor(&out.output, "y");
            assert_eq!(y.shape, vec![rows(i) as u64, 4], "{name}: job {i} gets its own rows");
            assert_eq!(y.data, vec![2.0 * i as f64; rows(i) * 4], "{name}: job {i}");
            let seen = tensor(&out.output, "rows");
            assert_eq!(seen.shape, vec![rows(i) as u64, 1]);
            let pass = if concat { total } else { rows(i) };
            assert_eq!(seen.data, vec![pass as f64; rows(i)], "{name}: job {i} ran in a pass of {pass} rows");
        }
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// A new version dropped into the repository takes over without a restart
/// and without failing a single job; a corrupt one is refused and the
/// previous version keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_fails_no_job_and_refuses_a_corrupt_version() {
    let root = tempdir("reload");
    let src = repo().scan(MODEL).unwrap();
    let dir = |v: &str| src.versions.iter().find(|m| m.spec.version == v).unwrap().dir.clone();
    link_version(&dir("1"), &root.join(MODEL).join("1"));
    let pool =
        ModelPool::start(ModelRepository::new(&root), vec![MODEL.into()], EngineConfig::default()).await.unwrap();
    assert_eq!(pool.versions(), vec![(MODEL.to_string(), vec!["1".to_string()], "1".to_string())]);

    // Load: a stream of jobs while version 2 appears.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (pool, stop) = (pool.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let req =
                    request(&format!("w{worker}-{i}"), MODEL, Input::Text(format!("sentence {i} of worker {worker}")));
                let (version, _) = run_routed(&pool, &req).await.expect("no job fails during a reload");
                versions.push(version);
                i += 1;
            }
            versions
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    link_version(&dir("2"), &root.join(MODEL).join("2"));
    let report = pool.reload().await.unwrap();
    assert_eq!(report.loaded, vec![format!("{MODEL}/2")]);
    assert_eq!(pool.versions()[0].2, "2", "the newest version is the default without routing.toml");
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A corrupt version 3: refused, version 2 keeps serving.
    let v3 = root.join(MODEL).join("3");
    link_version(&dir("2"), &v3);
    // Replace (not rewrite) the hard-linked file: the source must not change.
    let toml = std::fs::read_to_string(v3.join("model.toml")).unwrap().replace("\"2\"", "\"3\"");
    std::fs::remove_file(v3.join("model.toml")).unwrap();
    std::fs::write(v3.join("model.toml"), toml).unwrap();
    let report = pool.reload().await.unwrap();
    assert!(report.loaded.is_empty(), "{report:?}");
    assert!(
        report.refused.iter().any(|r| r.contains(&format!("{MODEL}/3")) && r.contains("checksum mismatch")),
        "{report:?}"
    );
    assert_eq!(pool.versions()[0].2, "2");
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Release);
    let mut all = Vec::new();
    for l in load {
        all.extend(l.await.unwrap());
    }
    let (v1, v2) = (all.iter().filter(|v| *v == "1").count(), all.iter().filter(|v| *v == "2").count());
    println!("hot reload: {} jobs, {v1} on version 1, {v2} on version 2, 0 failed", all.len());
    assert!(v1 > 0 && v2 > 0, "both versions served: {v1} / {v2}");
    assert_eq!(all.last().unwrap(), "2");
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_share_holds_within_five_points_over_2000_jobs() {
    let root = tempdir("canary");
    make_model(&root, "double", "1", "double");
    make_model(&root, "double", "2", "double");
    std::fs::write(root.join("double/routing.toml"), "default = \"1\"\n[canary]\nversion = \"2\"\nshare = 0.3\n")
        .unwrap();
    let pool = ModelPool::start(ModelRepository::new(&root), vec![], EngineConfig::default()).await.unwrap();
    let mut tickets = Vec::new();
    for i in 0..2000 {
        let req = request(&format!("canary-{i}"), "double", x(1, i as f64));
        let engine = pool.route(&req).unwrap();
        let version = engine.model().spec.version.clone();
        tickets.push((version, engine.enqueue(EngineJob::new(req.input.clone(), "t")).await.unwrap()));
    }
    let mut on_canary = 0;
    for (version, t) in tickets {
        t.wait().await.expect("every job succeeds");
        on_canary += usize::from(version == "2");
    }
    let share = on_canary as f64 / 2000.0;
    println!("canary share over 2000 jobs: {share:.3} (setting 0.3)");
    assert!((share - 0.3).abs() <= 0.05, "share {share}");
    // Pinned jobs go where they are pinned.
    let mut pinned = request("pinned", "double", x(1, 1.0));
    pinned.model_version = Some("2".into());
    assert_eq!(run_routed(&pool, &pinned).await.unwrap().0, "2");
    pinned.model_version = Some("9".into());
    assert_eq!(pool.route(&pinned).err().unwrap().0, ErrorCode::UnknownModel);
    std::fs::remove_dir_all(root).unwrap();
}

/// A model that fails every batch opens its breaker; a fixed version
/// dropped into the repository serves and the model is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_inference_opens_the_breaker_until_a_healthy_version_serves() {
    let root = tempdir("breaker");
    make_model(&root, "flaky", "1", "broken");
    let cfg = EngineConfig {
        breaker: BreakerConfig { window: 10, min_batches: 3, failure_ratio: 0.5, cool_down: Duration::from_secs(60) },
        max_batch_size: 1,
        ..Default::default()
    };
    let pool = ModelPool::start(ModelRepository::new(&root), vec![], cfg).await.unwrap();
    assert_eq!(pool.health("flaky"), Some(BreakerState::Closed));
    for i in 0..3 {
        let err = run_routed(&pool, &request(&format!("f-{i}"), "flaky", x(1, 1.0))).await.unwrap_err();
        assert!(matches!(err, WorkerError::Inference(_)), "{err}");
    }
    assert_eq!(pool.health("flaky"), Some(BreakerState::Open));

    make_model(&root, "flaky", "2", "double");
    pool.reload().await.unwrap();
    assert_eq!(pool.health("flaky"), Some(BreakerState::Closed), "the new default version is healthy");
    let (version, out) = run_routed(&pool, &request("f-ok", "flaky", x(1, 2.0))).await.unwrap();
    assert_eq!(version, "2");
    assert_eq!(tensor(&out, "y").data, vec![4.0; 4]);
    std::fs::remove_dir_all(root).unwrap();
}

/// An execution provider that cannot be registered (this build has no CUDA,
/// or ONNX Runtime is a CPU build): refused by default, or run on the CPU
/// when the policy says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_execution_provider_fails_or_falls_back_by_policy() {
    use sluice_workers::{ExecutionProvider, ProviderFallback};
    let model = repo().latest(MODEL).unwrap();
    let cuda = |fallback| EngineConfig {
        session: SessionConfig { provider: ExecutionProvider::Cuda { device_id: 0 }, fallback, ..Default::default() },
        ..Default::default()
    };
    let err = InferenceHandle::start(model.clone(), cuda(ProviderFallback::Fail)).await.err().expect("refused");
    assert!(err.to_string().contains("CUDA"), "{err}");
    let engine = InferenceHandle::start(model, cuda(ProviderFallback::Cpu)).await.expect("falls back to the CPU");
    let out = engine.infer(EngineJob::text("This is an example sentence")).await.unwrap();
    assert!((out.embedding().unwrap()[0] - 0.0676569).abs() < 1e-4);
}
