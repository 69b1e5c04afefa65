//! `sluice-load search-bench` (`make bench-search`): the approximate index
//! of `POST /v1/search` against exact search, on embeddings made by the
//! pipeline itself.
//!
//! 1. Starts `sluice up` (embedded broker, in-process store) with a lake of
//!    its own and the index on.
//! 2. Builds `--vectors` distinct texts from the built-in corpus (each two
//!    windows of 3 to 14 words of two different sentences: about 160² × 50²
//!    combinations, so short, varied and realistic for RAG chunks of FAQ
//!    size) and `--queries` further texts not among them, and submits all
//!    of them as ordinary jobs through `POST /v1/jobs`. The query texts'
//!    jobs carry the search-query mark, so they are neither indexed nor
//!    scanned: their embeddings are read back and used as query vectors.
//! 3. Waits until the lake holds every stored job and the index has applied
//!    them, then sends each query vector twice, one at a time:
//!    `"exact": true` (a scan of the lake) and the default (the index).
//!    Recall@k is |approximate ∩ exact| / k per query; latency is measured
//!    by this client, end to end through HTTP.
//!
//! Prints the figures and writes them as JSON (`--out`).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_schemas::SEARCH_QUERY_MARK;

use crate::child::SluiceProcess;
use crate::{corpus, stats};

const MODEL: &str = "all-minilm-l6-v2";
/// Items per `POST /v1/jobs` (the gateway's default `max_items_per_request`
/// is 256).
const PER_REQUEST: usize = 200;

#[derive(Args, Debug)]
pub struct SearchBenchArgs {
    /// The `sluice` binary (a release build: this is a benchmark).
    #[arg(long, env = "SLUICE_BIN")]
    sluice: PathBuf,
    /// Model repository (with all-minilm-l6-v2).
    #[arg(long, env = "SLUICE_MODEL_REPO")]
    models: PathBuf,
    /// Embeddings stored and indexed.
    #[arg(long, default_value_t = 50_000)]
    vectors: usize,
    /// Query vectors, each searched exactly and approximately.
    #[arg(long, default_value_t = 100)]
    queries: usize,
    /// Neighbours per search.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Concurrent submissions.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Exit non-zero when the mean recall@k is below this.
    #[arg(long)]
    min_recall: Option<f64>,
    /// Where the JSON result goes.
    #[arg(long, default_value = "bench-search.json")]
    out: PathBuf,
}

pub async fn run(args: SearchBenchArgs) -> anyhow::Result<()> {
    ensure!(args.k >= 1 && args.queries >= 1 && args.vectors >= args.k, "need vectors >= k >= 1 and queries >= 1");
    let dir = std::env::temp_dir().join(format!("sluice-search-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let envs: Vec<(String, String)> = [
        ("SLUICE__SINKS__LAKE", dir.join("lake").display().to_string()),
        ("SLUICE__MODELS__REPOSITORY", args.models.display().to_string()),
        ("SLUICE__MODELS__SERVE", format!("[\"{MODEL}\"]")),
        ("SLUICE__GATEWAY__LISTEN", "127.0.0.1:0".into()),
        ("SLUICE__KAFKA__EMBEDDED_LISTEN", String::new()),
        ("SLUICE__OPS__LISTEN", String::new()),
        // The benchmark is one tenant submitting as fast as it can.
        ("SLUICE__GATEWAY__RATE_PER_SECOND", "1000000".into()),
        ("SLUICE__GATEWAY__RATE_BURST", "1000000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let cmd: Vec<OsString> = vec!["up".into()];
    let log = dir.join("sluice.log");
    let sluice = SluiceProcess::start(&args.sluice, &cmd, &envs, Some(&log)).await?;
    let base = sluice.http.clone().context("sluice up has no HTTP address")?;
    let http = reqwest::Client::new();
    println!(
        "search-bench: {} stored texts, {} queries, k = {} (sluice log: {})",
        args.vectors,
        args.queries,
        args.k,
        log.display()
    );

    let sentences = corpus::sentences(corpus::SENTENCES_TSV)?;
    let texts = corpus::pairs(&sentences, args.vectors + args.queries);
    ensure!(texts.len() == args.vectors + args.queries, "the corpus gave only {} distinct texts", texts.len());
    let (stored, queries) = texts.split_at(args.vectors);

    // Embed everything through the job path.
    let started = Instant::now();
    let mut items: Vec<Value> = stored
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"job_id": format!("s-{i}"), "model": MODEL, "input": {"text": t}, "metadata": {"doc": i.to_string()}}))
        .collect();
    items.extend(queries.iter().enumerate().map(|(i, t)| {
        json!({"job_id": format!("q-{i}"), "model": MODEL, "input": {"text": t}, "metadata": {SEARCH_QUERY_MARK.0: SEARCH_QUERY_MARK.1}})
    }));
    let chunks: Vec<Vec<Value>> = items.chunks(PER_REQUEST).map(<[Value]>::to_vec).collect();
    let mut submits =
        futures::stream::iter(chunks.into_iter().map(|c| submit(&http, &base, c))).buffer_unordered(args.concurrency);
    while let Some(r) = submits.next().await {
        r?;
    }
    let submitted = started.elapsed().as_secs_f64();

    // Query vectors: the query jobs' embeddings.
    let mut query_vectors = Vec::with_capacity(args.queries);
    for i in 0..args.queries {
        query_vectors.push(embedding(&http, &base, &format!("q-{i}")).await?);
    }
    // The lake (exact) and the index (approximate) hold every stored job.
    let count = json!({"query": format!("SELECT count(*) AS n FROM results WHERE metadata['{}'] IS NULL", SEARCH_QUERY_MARK.0)});
    wait(Duration::from_secs(1800), || async {
        let r: Value = http.post(format!("{base}/v1/sql")).json(&count).send().await.ok()?.json().await.ok()?;
        (r["rows"][0]["n"].as_u64()? as usize >= args.vectors).then_some(())
    })
    .await
    .context("the lake never held every stored job")?;
    let landed = started.elapsed().as_secs_f64();
    let probe = json!({"model": MODEL, "vector": query_vectors[0], "k": 1});
    wait(Duration::from_secs(1800), || async {
        let r: Value = http.post(format!("{base}/v1/search")).json(&probe).send().await.ok()?.json().await.ok()?;
        (r["indexed"].as_u64()? as usize >= args.vectors).then_some(())
    })
    .await
    .context("the index never held every stored job")?;
    let indexed = started.elapsed().as_secs_f64();
    println!(
        "   embedded {} texts: submitted in {submitted:.1} s, all in the lake after {landed:.1} s ({:.0} jobs/s), all indexed after {indexed:.1} s",
        items.len(),
        items.len() as f64 / landed
    );

    // Searches, one at a time.
    let (mut recalls, mut exact_ms, mut approx_ms) = (Vec::new(), Vec::new(), Vec::new());
    for v in &query_vectors {
        let (exact, t_exact) = search(&http, &base, v, args.k, true).await?;
        let (approx, t_approx) = search(&http, &base, v, args.k, false).await?;
        ensure!(exact.len() == args.k, "exact search gave {} neighbours", exact.len());
        let truth: HashSet<&String> = exact.iter().collect();
        recalls.push(approx.iter().filter(|id| truth.contains(id)).count() as f64 / args.k as f64);
        exact_ms.push(t_exact);
        approx_ms.push(t_approx);
    }
    sluice.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);

    let recall = stats::mean(&recalls);
    let min_recall = recalls.iter().copied().fold(f64::INFINITY, f64::min);
    let p = |v: &[f64], q: f64| stats::percentile(v, q);
    println!("   recall@{} of the index against exact search: mean {recall:.4}, min {min_recall:.2}", args.k);
    println!(
        "   latency (HTTP, one at a time): exact p50 {:.1} ms p99 {:.1} ms | approximate p50 {:.2} ms p99 {:.2} ms = {:.0}× faster at p50",
        p(&exact_ms, 50.0),
        p(&exact_ms, 99.0),
        p(&approx_ms, 50.0),
        p(&approx_ms, 99.0),
        p(&exact_ms, 50.0) / p(&approx_ms, 50.0)
    );
    let result = json!({
        "vectors": args.vectors, "queries": args.queries, "k": args.k, "model": MODEL,
        "embedded_per_s": items.len() as f64 / landed, "indexed_after_s": indexed,
        "recall": {"mean": recall, "min": min_recall},
        "exact_ms": {"p50": p(&exact_ms, 50.0), "p99": p(&exact_ms, 99.0)},
        "approximate_ms": {"p50": p(&approx_ms, 50.0), "p99": p(&approx_ms, 99.0)},
        "recalls": BTreeMap::from([("per_query", recalls.clone())]),
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&result)?)?;
    println!("wrote {}", args.out.display());
    if let Some(min) = args.min_recall
        && recall < min
    {
        bail!("mean recall@{} {recall:.4} is below --min-recall {min}", args.k);
    }
    Ok(())
}

/// Submits jobs, retrying while the gateway answers 429 or 503.
async fn submit(http: &reqwest::Client, base: &str, items: Vec<Value>) -> anyhow::Result<()> {
    for _ in 0..600 {
        let r = http.post(format!("{base}/v1/jobs")).json(&items).send().await?;
        match r.status().as_u16() {
            200..=299 => return Ok(()),
            429 | 503 => tokio::time::sleep(Duration::from_millis(200)).await,
            s => bail!("POST /v1/jobs answered {s}: {}", r.text().await.unwrap_or_default()),
        }
    }
    bail!("POST /v1/jobs stayed overloaded for 2 minutes")
}

/// A finished job's embedding (waiting for it).
async fn embedding(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<Vec<f32>> {
    wait(Duration::from_secs(1800), || async {
        let r: Value = http.get(format!("{base}/v1/jobs/{id}?wait=10")).send().await.ok()?.json().await.ok()?;
        r["output"]["embedding"].as_array().map(|v| v.iter().filter_map(|x| x.as_f64().map(|x| x as f32)).collect())
    })
    .await
    .with_context(|| format!("job {id} never finished"))
}

/// One search: the neighbours' job ids and the milliseconds it took.
async fn search(
    http: &reqwest::Client,
    base: &str,
    v: &[f32],
    k: usize,
    exact: bool,
) -> anyhow::Result<(Vec<String>, f64)> {
    let body = json!({"model": MODEL, "vector": v, "k": k, "exact": exact});
    let t = Instant::now();
    let r = http.post(format!("{base}/v1/search")).json(&body).send().await?;
    let status = r.status();
    let answer: Value = r.json().await?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(status.is_success(), "POST /v1/search answered {status}: {answer}");
    ensure!(answer["exact"] == exact, "asked exact={exact}, answered {}", answer["exact"]);
    let ids =
        answer["results"].as_array().into_iter().flatten().filter_map(|r| r["job_id"].as_str().map(str::to_owned));
    Ok((ids.collect(), ms))
}

/// Polls `probe` every 200 ms until it gives a value, for at most `limit`.
async fn wait<T, F, Fut>(limit: Duration, probe: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
