//! Batching benchmark: `make bench` (or `cargo bench -p sluice-workers
//! --bench batching` with ORT_DYLIB_PATH and SLUICE_MODEL_REPO set).
//!
//! One run, same inputs, same model, same threads, measured in alternation
//! (ceiling, length-aware, arrival-order, repeated `ROUNDS` times; medians):
//!
//! 1. **ceiling**: raw ONNX Runtime on one session, the whole corpus
//!    pre-tokenized and sorted by length, then cut into batches of
//!    `max_batch_size` — the least padding possible, no queue, no threads.
//! 2. **engine, length-aware**: every input enqueued at once (a Kafka
//!    backlog) into the engine — tokenization thread, scheduler, inference
//!    thread — with length-aware grouping on.
//! 3. **engine, arrival order**: the same with length-aware grouping off.
//!
//! Reports texts/s, the padding ratio (share of padded tokens that are
//! padding) and the ratios between them, each the median of the ratios
//! measured within one round. This machine is noisy: compare ratios from one
//! run, not absolute numbers across runs.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_schemas::Input;
use sluice_workers::{EngineConfig, EngineJob, InferenceHandle, ModelRepository, Prepared, RawSession, SessionConfig};

const MODEL: &str = "all-minilm-l6-v2";
const BATCH: usize = 32;
const ROUNDS: usize = 3;

/// A mixed-length corpus: the demo sentences, plus four times as many
/// paragraphs of 3 to 12 of them, shuffled deterministically. Large enough
/// that the first and last batches of the burst weigh little, as in a Kafka
/// backlog.
fn corpus() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../load-tests/data/sentences.tsv"))
        .expect("load-tests/data/sentences.tsv");
    let sentences: Vec<&str> = text.lines().filter_map(|l| l.split_once('\t')).map(|(_, s)| s).collect();
    let mut out: Vec<String> = sentences.iter().map(|s| s.to_string()).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..4 * sentences.len() {
        let n = 3 + (next() % 10) as usize;
        let para: Vec<&str> = (0..n).map(|_| sentences[(next() % sentences.len() as u64) as usize]).collect();
        out.push(para.join(" "));
    }
    for i in (1..out.len()).rev() {
        out.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    out
}

fn padding(batches: &[Vec<usize>]) -> f64 {
    let (mut real, mut padded) = (0usize, 0usize);
    for b in batches {
        real += b.iter().sum::<usize>();
        padded += b.iter().max().unwrap_or(&0) * b.len();
    }
    1.0 - real as f64 / padded as f64
}

fn ceiling(session: &mut RawSession, prepared: &[Prepared]) -> (f64, f64) {
    let mut sorted: Vec<&Prepared> = prepared.iter().collect();
    sorted.sort_by_key(|p| p.cost());
    let start = Instant::now();
    let mut lens = Vec::new();
    for chunk in sorted.chunks(BATCH) {
        session.run(chunk).expect("inference");
        lens.push(chunk.iter().map(|p| p.cost()).collect());
    }
    (prepared.len() as f64 / start.elapsed().as_secs_f64(), padding(&lens))
}

async fn engine_run(engine: &InferenceHandle, texts: &[String]) -> (f64, f64) {
    let start = Instant::now();
    let mut tickets = Vec::with_capacity(texts.len());
    for t in texts {
        tickets.push(engine.enqueue(EngineJob::text(t.clone())).await.expect("enqueue"));
    }
    let (mut real, mut padded) = (0f64, 0f64);
    for t in tickets {
        let out = t.wait().await.expect("inference");
        // Each job's share: its tokens, and its padded row.
        real += out.input_tokens as f64;
        padded += out.input_tokens as f64 / (1.0 - out.padding_ratio).max(1e-9);
    }
    (texts.len() as f64 / start.elapsed().as_secs_f64(), 1.0 - real / padded)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let repo = ModelRepository::new(std::env::var("SLUICE_MODEL_REPO").expect("SLUICE_MODEL_REPO"));
    let model =
        repo.scan(MODEL).expect("model repository").versions.into_iter().find(|v| v.spec.version == "1").unwrap();
    let texts = corpus();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();

    let mut raw = RawSession::load(&model, &SessionConfig::default()).expect("session");
    let prepared: Vec<Prepared> = texts.iter().map(|t| raw.prepare(&Input::Text(t.clone())).unwrap()).collect();
    let tokens: usize = prepared.iter().map(|p| p.cost()).sum();
    let cfg = |length_aware| EngineConfig {
        max_batch_size: BATCH,
        max_wait: Duration::from_millis(5),
        length_aware,
        queue_capacity: texts.len(),
        ..Default::default()
    };
    let (aware, arrival) = rt.block_on(async {
        (
            InferenceHandle::start(model.clone(), cfg(true)).await.unwrap(),
            InferenceHandle::start(model.clone(), cfg(false)).await.unwrap(),
        )
    });
    println!(
        "corpus: {} texts, {} tokens (mean {:.1}), model {}, batch {BATCH}, {ROUNDS} rounds",
        texts.len(),
        tokens,
        tokens as f64 / texts.len() as f64,
        model.label()
    );
    // Warm-up.
    ceiling(&mut raw, &prepared[..BATCH * 2]);
    rt.block_on(engine_run(&aware, &texts[..BATCH * 2]));

    let (mut c, mut a, mut r) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cp, mut ap, mut rp) = (0.0, 0.0, 0.0);
    for round in 0..ROUNDS {
        let (tput, pad) = ceiling(&mut raw, &prepared);
        c.push(tput);
        cp = pad;
        let (tput, pad) = rt.block_on(engine_run(&aware, &texts));
        a.push(tput);
        ap = pad;
        let (tput, pad) = rt.block_on(engine_run(&arrival, &texts));
        r.push(tput);
        rp = pad;
        println!(
            "round {round}: ceiling {:.1}/s, length-aware {:.1}/s (padding {ap:.3}), arrival-order {:.1}/s; \
             length-aware/ceiling {:.3}",
            c[round],
            a[round],
            r[round],
            a[round] / c[round]
        );
    }
    // Ratios per round (measured back to back, so slow drift in the
    // machine's speed cancels), then their median.
    let aware_vs_ceiling = median(a.iter().zip(&c).map(|(a, c)| a / c).collect());
    let aware_vs_arrival = median(a.iter().zip(&r).map(|(a, r)| a / r).collect());
    let (c, a, r) = (median(c), median(a), median(r));
    println!();
    println!("| path | texts/s (median) | padding ratio |");
    println!("|---|---|---|");
    println!("| raw ORT, sorted batches (ceiling) | {c:.1} | {cp:.3} |");
    println!("| engine, length-aware | {a:.1} | {ap:.3} |");
    println!("| engine, arrival order | {r:.1} | {rp:.3} |");
    println!();
    println!("engine length-aware / ceiling = {aware_vs_ceiling:.3} (median of per-round ratios; target >= 0.95)");
    println!("length-aware / arrival order  = {aware_vs_arrival:.3} (median of per-round ratios)");
}
