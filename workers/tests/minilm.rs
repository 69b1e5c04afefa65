//! The real model through the real engine: the MiniLM graph exported by
//! `workers/scripts/export_minilm.py`, run by ONNX Runtime on the engine's
//! inference thread. `make test` exports the model and sets
//! `SLUICE_MODEL_REPO` and `ORT_DYLIB_PATH`.

use std::path::PathBuf;
use std::time::Duration;

use sluice_workers::{EngineConfig, InferenceHandle, ModelRepository, WorkerError};

const MODEL: &str = "all-minilm-l6-v2";

fn repo() -> ModelRepository {
    let root = std::env::var_os("SLUICE_MODEL_REPO")
        .map(PathBuf::from)
        .expect("SLUICE_MODEL_REPO must point at the model repository (run the tests through `make test`)");
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH must point at libonnxruntime.so (run the tests through `make test`)"
    );
    ModelRepository::new(root)
}

async fn engine(cfg: EngineConfig) -> InferenceHandle {
    let model = repo().latest(MODEL).expect("exported MiniLM in the model repository");
    InferenceHandle::start(model, cfg).await.expect("engine starts")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_embedding_of_the_example_sentence() {
    let engine = engine(EngineConfig::default()).await;
    let out = engine.embed("This is an example sentence".into()).await.unwrap();
    let published = [0.0676569f32, 0.0634959, 0.0487131, 0.0793050, 0.0374481];
    assert_eq!(out.embedding.len(), 384);
    for (i, (got, want)) in out.embedding.iter().zip(published).enumerate() {
        assert!((got - want).abs() < 1e-4, "dim {i}: got {got}, published {want}");
    }
    let norm: f32 = out.embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
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
    let mut v = Vec::new();
    for t in texts {
        v.push(engine.enqueue(t.to_string()).await.unwrap());
    }
    let mut e = Vec::new();
    for t in v {
        e.push(t.wait().await.unwrap().embedding);
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
async fn batching_with_longer_inputs_does_not_change_an_embedding() {
    let engine =
        engine(EngineConfig { max_batch_size: 32, max_wait: Duration::from_millis(200), ..Default::default() }).await;
    let alone = engine.embed("Short one.".into()).await.unwrap();
    assert_eq!(alone.batch_size, 1);
    let mut tickets = Vec::new();
    for i in 0..31 {
        let words = "lorem ipsum dolor sit amet ".repeat(1 + i % 7 * 5);
        tickets.push(engine.enqueue(format!("{i} {words}")).await.unwrap());
    }
    let target = engine.enqueue("Short one.".into()).await.unwrap().wait().await.unwrap();
    assert_eq!(target.batch_size, 32, "ran inside the full batch");
    for t in tickets {
        let out = t.wait().await.unwrap();
        assert!(out.input_tokens <= 256, "truncated to max_tokens");
    }
    let c = cosine(&alone.embedding, &target.embedding);
    assert!(c >= 0.99999, "cosine {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_a_typed_overload_error() {
    let engine = engine(EngineConfig { queue_capacity: 2, max_batch_size: 1, ..Default::default() }).await;
    // Fill faster than one thread can drain: some try_enqueue must fail.
    let mut accepted = Vec::new();
    let mut overloaded = 0;
    for i in 0..200 {
        match engine.try_enqueue(format!("sentence number {i} with some words in it")) {
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
        assert_eq!(t.wait().await.unwrap().embedding.len(), 384, "accepted jobs all finish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_truncated_to_256_tokens() {
    let engine = engine(EngineConfig::default()).await;
    let out = engine.embed("word ".repeat(1000)).await.unwrap();
    assert_eq!(out.input_tokens, 256);
}
