//! `sluice-load bench` (`make bench-e2e`): Sluice end to end against the
//! raw ONNX Runtime ceiling, in one run on one machine.
//!
//! For each workload (mixed-length texts, short texts, the trivial `sigmoid`
//! tensor model) it measures, in this order:
//!
//! 1. **ceiling** (text workloads): the same model file through one raw ONNX
//!    Runtime session with the same threads, the whole workload pre-tokenized
//!    and sorted by length, cut into batches of 32 — inference and nothing
//!    else;
//! 2. **end to end**, once per broker: a `sluice` process (`up` with its
//!    embedded broker, and `worker` against the real broker when
//!    `--brokers` is given) with Redis as the results store and the
//!    inference cache off; after a warm-up, every job is published by a
//!    Kafka client that is not Sluice (confluent-kafka,
//!    `scripts/publish_jobs.py`) and counted done when its terminal record is
//!    readable in the store (completion notices, reconciled against the
//!    store itself; every record is read back and checked at the end).
//!    Throughput is jobs ÷ (last result readable − first publish).
//!
//! Each run also reports the CPU every process used (Sluice, Redis, the
//! broker, the publisher, this driver) as a share of all cores: a run whose
//! processes leave cores idle is bound by latency, not compute.
//!
//! Then, for the text model, every version in the repository (fp32, int8, …)
//! through the raw session: speed against version 1 and the cosine of each
//! embedding to version 1's.
//!
//! A run that fails (a broker that stops answering: no job finishes for
//! [`STALL`]) is reported as failed, and later runs through the same real
//! broker are skipped; every other run still runs and is written, and the
//! bench then exits non-zero.
//!
//! The result is printed and written as JSON (`--out`); `--baseline` compares
//! with an earlier file. Ratios are taken within one run: absolute numbers
//! move between machines and runs.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde_json::{Value, json};
use sluice_pipeline::store::{Store, StoreConfig};

/// The tenant of the benchmark's jobs.
const TENANT: &str = "bench";
use sluice_schemas::{Input, Output};
use sluice_workers::{ModelRepository, ModelVersion, RawSession, SessionConfig};

use crate::child::SluiceProcess;
use crate::{corpus, procstat, stats};

const TEXT_MODEL: &str = "all-minilm-l6-v2";
const TENSOR_MODEL: &str = "sigmoid";
/// Batch size of the ceiling (Sluice's `engine.max_batch_size` default).
const CEILING_BATCH: usize = 32;
/// What a text-model version must show against version 1 (fp32), on both
/// corpora, to be worth choosing for speed: at least this speed-up ...
const VERSION_MIN_SPEEDUP: f64 = 1.4;
/// ... at this mean cosine to version 1's embeddings ...
const VERSION_MIN_MEAN_COSINE: f64 = 0.99;
/// ... and no text below this cosine.
const VERSION_MIN_COSINE: f64 = 0.98;
/// The confluent-kafka publisher (`scripts/publish_jobs.py`), built in.
const PUBLISH_SCRIPT: &str = include_str!("../scripts/publish_jobs.py");

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The `sluice` binary (a release build: this is a benchmark).
    #[arg(long, env = "SLUICE_BIN")]
    sluice: PathBuf,
    /// Model repository (MiniLM and `sigmoid`, as `make models` exports them).
    #[arg(long, env = "SLUICE_MODEL_REPO")]
    models: PathBuf,
    /// Python with confluent-kafka (the publisher is not Sluice).
    #[arg(long, env = "SLUICE_TEST_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// Redis URL of the results store.
    #[arg(long, env = "SLUICE_TEST_REDIS")]
    redis: String,
    /// A real Kafka-protocol broker; each workload also runs `sluice worker`
    /// against it. Without it, only the embedded broker is measured.
    #[arg(long)]
    brokers: Option<String>,
    /// Directory of `deploy/local/services.sh` (its redis.pid and tansu.pid
    /// let the CPU of Redis and the broker be counted).
    #[arg(long)]
    services: Option<PathBuf>,
    /// Workloads to run.
    #[arg(long, value_delimiter = ',', default_value = "mixed,short,tensor")]
    workloads: Vec<Workload>,
    /// Jobs per workload and broker: mixed, short, tensor (embedded broker),
    /// tensor (real broker). Enough for the backlog to drain mostly in
    /// steady state: with 1,600 mixed texts, the start (a thin window) and
    /// the end (one session finishing alone) cost several points of ratio.
    #[arg(long, value_delimiter = ',', default_values_t = [3200, 12_000, 50_000, 10_000])]
    jobs: Vec<usize>,
    /// Runs of each workload and broker; the report gives the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// A seconds-long smoke run (tiny workloads, one round): checks the
    /// instrument, not the numbers.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench-e2e.json")]
    out: PathBuf,
    /// An earlier JSON result to compare with.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Extra environment for the `sluice` processes (`KEY=VALUE`, repeatable),
    /// e.g. `--env SLUICE__WORKER__MAX_IN_FLIGHT=4096`.
    #[arg(long = "env", value_parser = crate::child::parse_env)]
    envs: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Texts of 4 to 110 words (MiniLM).
    Mixed,
    /// Texts of 3 to 14 words (MiniLM).
    Short,
    /// The trivial `sigmoid` tensor model: Sluice's own cost per job.
    Tensor,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Mixed => "mixed",
            Workload::Short => "short",
            Workload::Tensor => "tensor",
        }
    }

    fn model(self) -> &'static str {
        match self {
            Workload::Tensor => TENSOR_MODEL,
            _ => TEXT_MODEL,
        }
    }
}

/// Which broker a run goes through.
#[derive(Clone)]
enum Broker {
    /// `sluice up`'s in-process mock cluster.
    Embedded,
    /// A real broker at this address (`sluice worker`).
    Real(String),
}

impl Broker {
    fn label(&self) -> &'static str {
        match self {
            Broker::Embedded => "embedded",
            Broker::Real(_) => "real",
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(args.jobs.len() == 4, "--jobs takes four numbers: mixed, short, tensor (embedded), tensor (real)");
    let sentences = corpus::sentences(corpus::SENTENCES_TSV)?;
    let sizes = if args.quick { [24, 48, 300, 100] } else { [args.jobs[0], args.jobs[1], args.jobs[2], args.jobs[3]] };
    let mut brokers = vec![Broker::Embedded];
    if let Some(b) = &args.brokers {
        brokers.push(Broker::Real(b.clone()));
    }
    let pids = ServicePids::read(args.services.as_deref());
    println!(
        "bench-e2e: {} cores ({}), sluice {}, {} broker(s)",
        procstat::cores(),
        cpu_model(),
        args.sluice.display(),
        brokers.len()
    );

    let rounds = if args.quick { 1 } else { args.rounds.max(1) };
    let mut workloads = Vec::new();
    let mut failures = 0usize;
    for &w in &args.workloads {
        let texts = match w {
            Workload::Mixed => corpus::mixed(&sentences, sizes[0]),
            Workload::Short => corpus::short(&sentences, sizes[1]),
            Workload::Tensor => Vec::new(),
        };
        println!("\n== {} ({}), {rounds} round(s)", w.name(), w.model());
        let model = default_version(&args.models, TEXT_MODEL)?;
        // The ceiling is measured before the first run and after every run:
        // each run is compared with the mean of the ceilings on either side
        // (this machine's speed drifts by ±15% from minute to minute).
        let measure_ceiling = || {
            let (model, texts) = (model.clone(), texts.clone());
            async move {
                if texts.is_empty() {
                    return anyhow::Ok(None);
                }
                let (steal_before, started) = (procstat::steal_seconds(), Instant::now());
                let c = tokio::task::spawn_blocking(move || ceiling(&model, &texts)).await??;
                let cores = procstat::cores();
                let steal = procstat::steal_share_since(steal_before, started.elapsed().as_secs_f64());
                // A batch's time on one session, comparable with Sluice's
                // `inference ... ms per batch`.
                let per_batch = |sessions: usize, rate: f64| 1000.0 * (sessions * CEILING_BATCH) as f64 / rate;
                println!(
                    "   ceiling {:>8.1} texts/s (raw ONNX Runtime, sorted batches of {CEILING_BATCH}: one session × {cores} threads {:.1}/s = {:.1} ms per batch, {cores} sessions × 1 thread {:.1}/s = {:.1} ms per batch; padding {:.1}%){}",
                    c.best(),
                    c.one_session,
                    per_batch(1, c.one_session),
                    c.sessions,
                    per_batch(cores, c.sessions),
                    100.0 * c.padding,
                    steal.map(|x| format!("; hypervisor steal {:.0}%", 100.0 * x)).unwrap_or_default(),
                );
                Ok(Some(c))
            }
        };
        let mut before = measure_ceiling().await?;
        let mut ceilings: Vec<f64> = before.iter().map(Ceiling::best).collect();
        let mut per_broker: Vec<Vec<(RunReport, Option<f64>)>> = brokers.iter().map(|_| Vec::new()).collect();
        let mut failed: Vec<Vec<Value>> = brokers.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for (b, broker) in brokers.iter().enumerate() {
                // A real broker outlives its runs: after one failed, the next would wait
                // out the stall again on the same dead broker.
                if matches!(broker, Broker::Real(_)) && !failed[b].is_empty() {
                    println!("   {:<8} #{round} skipped: an earlier run through this broker failed", broker.label());
                    failed[b].push(json!({"round": round, "skipped": "an earlier run through this broker failed"}));
                    continue;
                }
                let n = match (w, broker) {
                    (Workload::Tensor, Broker::Embedded) => sizes[2],
                    (Workload::Tensor, Broker::Real(_)) => sizes[3],
                    _ => texts.len(),
                };
                let inputs: Vec<Value> = match w {
                    Workload::Tensor => (0..n).map(corpus::tensor_input).collect(),
                    _ => texts.iter().map(|t| json!({ "text": t })).collect(),
                };
                let r = match end_to_end(&args, &pids, broker, w, &inputs).await {
                    Ok(r) => r,
                    Err(e) => {
                        println!("   {:<8} #{round} FAILED: {e:#}", broker.label());
                        failed[b].push(json!({"round": round, "error": format!("{e:#}")}));
                        failures += 1;
                        continue;
                    }
                };
                let after = measure_ceiling().await?;
                let ratio = match (&before, &after) {
                    (Some(x), Some(y)) => Some(r.jobs_per_s / ((x.best() + y.best()) / 2.0)),
                    _ => None,
                };
                ceilings.extend(after.iter().map(Ceiling::best));
                before = after;
                print_run(round, broker, &r, ratio);
                per_broker[b].push((r, ratio));
            }
        }
        let mut runs = Vec::new();
        for ((broker, results), failed) in brokers.iter().zip(per_broker).zip(failed) {
            if results.is_empty() {
                println!("   => {:<8} no run finished ({} failed or skipped)", broker.label(), failed.len());
                runs.push(json!({"broker": broker.label(), "failed": failed}));
                continue;
            }
            let rates: Vec<f64> = results.iter().map(|(r, _)| r.jobs_per_s).collect();
            let ratios: Vec<f64> = results.iter().filter_map(|(_, x)| *x).collect();
            let busy: Vec<f64> = results.iter().map(|(r, _)| r.busy_share).collect();
            println!(
                "   => {:<8} median {:>8.1} jobs/s{}, CPU busy {:.0}% (of {} run(s){})",
                broker.label(),
                stats::percentile(&rates, 50.0),
                if ratios.is_empty() {
                    String::new()
                } else {
                    format!(
                        " = {:.2}× ceiling (runs {})",
                        stats::percentile(&ratios, 50.0),
                        ratios.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ")
                    )
                },
                100.0 * stats::percentile(&busy, 50.0),
                results.len(),
                if failed.is_empty() { String::new() } else { format!("; {} failed or skipped", failed.len()) },
            );
            runs.push(json!({
                "broker": broker.label(),
                "jobs_per_s": stats::percentile(&rates, 50.0),
                "ratio_to_ceiling": (!ratios.is_empty()).then(|| stats::percentile(&ratios, 50.0)),
                "cpu_busy_share": stats::percentile(&busy, 50.0),
                "rounds": results.iter().map(|(r, ratio)| run_json(r, *ratio)).collect::<Vec<_>>(),
                "failed": failed,
            }));
        }
        let ceiling = (!ceilings.is_empty()).then(|| stats::percentile(&ceilings, 50.0));
        workloads.push(
            json!({"name": w.name(), "model": w.model(), "ceiling_per_s": ceiling, "ceilings": ceilings, "runs": runs}),
        );
    }

    let versions = if args.workloads.iter().any(|w| *w != Workload::Tensor) {
        let mixed = corpus::mixed(&sentences, sizes[0].min(600));
        let short = corpus::short(&sentences, sizes[1].min(1500));
        let models = args.models.clone();
        tokio::task::spawn_blocking(move || compare_versions(&models, &mixed, &short)).await??
    } else {
        Value::Null
    };

    let report = json!({
        "when": chrono::Utc::now().to_rfc3339(),
        "machine": {"cores": procstat::cores(), "cpu": cpu_model(), "flags": cpu_flags()},
        "quick": args.quick,
        "envs": args.envs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "workloads": workloads,
        "versions": versions,
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("\nwrote {}", args.out.display());
    if let Some(b) = &args.baseline {
        compare(&report, b)?;
    }
    ensure!(failures == 0, "{failures} run(s) failed (above); {} keeps the runs that finished", args.out.display());
    Ok(())
}

fn print_run(round: usize, broker: &Broker, r: &RunReport, ratio: Option<f64>) {
    println!(
        "   {:<8} #{round} {:>6} jobs in {:>6.2} s: {:>8.1} jobs/s{}  CPU {:>3.0}% of {} cores ({}){}",
        broker.label(),
        r.jobs,
        r.seconds,
        r.jobs_per_s,
        ratio.map(|x| format!(" = {x:.2}× ceiling")).unwrap_or_default(),
        100.0 * r.busy_share,
        procstat::cores(),
        r.cpu.iter().map(|(k, v)| format!("{k} {:.0}%", 100.0 * v / r.seconds)).collect::<Vec<_>>().join(", "),
        r.steal_share.map(|x| format!("; hypervisor steal {:.0}%", 100.0 * x)).unwrap_or_default(),
    );
    let order = ["started", "inferred", "stored", "published", "marked"];
    let stages: Vec<String> =
        order.iter().filter_map(|s| r.engine.stages.get(*s).map(|v| format!("{s} {:.1}", v * 1000.0))).collect();
    println!(
        "               published in {:.2} s; batch size mean {:.1}, padding {}, inference {} ms per batch, scheduler depth p50 {:.0} p10 {:.0}; queue p50 {:.0} ms p99 {:.0} ms; RSS {} MiB; ms per stage: {}",
        r.publish_seconds,
        r.batch_mean,
        r.engine.padding.map(|p| format!("{:.1}%", 100.0 * p)).unwrap_or_else(|| "?".into()),
        r.engine.inference_per_batch.map(|s| format!("{:.1}", 1000.0 * s)).unwrap_or_else(|| "?".into()),
        r.depth_p50,
        r.depth_p10,
        r.queue_p50_ms,
        r.queue_p99_ms,
        r.rss >> 20,
        stages.join(", ")
    );
}

fn run_json(r: &RunReport, ratio: Option<f64>) -> Value {
    json!({
        "jobs": r.jobs,
        "seconds": r.seconds,
        "jobs_per_s": r.jobs_per_s,
        "ratio_to_ceiling": ratio,
        "publish_seconds": r.publish_seconds,
        "cpu_seconds": r.cpu,
        "cpu_busy_share": r.busy_share,
        "cpu_steal_share": r.steal_share,
        "batch_size_mean": r.batch_mean,
        "queue_ms_p50": r.queue_p50_ms,
        "queue_ms_p99": r.queue_p99_ms,
        "stage_mean_seconds": r.engine.stages,
        "padding_ratio_mean": r.engine.padding,
        "scheduler_depth_p50": r.depth_p50,
        "scheduler_depth_p10": r.depth_p10,
        "inference_seconds_per_batch": r.engine.inference_per_batch,
        "rss_bytes": r.rss,
    })
}

/// Raw ONNX Runtime on one workload, in the two ways two cores can be used.
struct Ceiling {
    /// One session with ONNX Runtime's default intra-op threads (one per core).
    one_session: f64,
    /// One single-threaded session per core, each running its own batches.
    sessions: f64,
    /// Share of the sorted batches' padded tokens that is padding.
    padding: f64,
}

impl Ceiling {
    /// The faster of the two: the bar Sluice is held to.
    fn best(&self) -> f64 {
        self.one_session.max(self.sessions)
    }
}

fn ceiling(model: &ModelVersion, texts: &[String]) -> anyhow::Result<Ceiling> {
    let (sessions, padding) = raw_parallel(model, texts, procstat::cores())?;
    Ok(Ceiling { one_session: raw_run(model, texts)?.per_s, sessions, padding })
}

/// `n` single-threaded sessions on `n` OS threads, taking the sorted batches
/// in turn. Sessions are loaded and inputs tokenized before the clock starts.
/// Returns texts/s and the batches' padding share.
fn raw_parallel(model: &ModelVersion, texts: &[String], n: usize) -> anyhow::Result<(f64, f64)> {
    let one = SessionConfig { intra_threads: 1, ..SessionConfig::default() };
    let tokenizer = RawSession::load(model, &one)?;
    let mut prepared =
        texts.iter().map(|t| tokenizer.prepare(&Input::Text(t.clone()))).collect::<Result<Vec<_>, _>>()?;
    drop(tokenizer);
    prepared.sort_by_key(|p| p.cost());
    let batches: Vec<&[sluice_workers::Prepared]> = prepared.chunks(CEILING_BATCH).collect();
    let padded: usize = batches.iter().map(|b| b.iter().map(|p| p.cost()).max().unwrap_or(0) * b.len()).sum();
    let padding = 1.0 - prepared.iter().map(|p| p.cost()).sum::<usize>() as f64 / padded.max(1) as f64;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = std::sync::Barrier::new(n + 1);
    let elapsed = std::thread::scope(|scope| -> anyhow::Result<Duration> {
        let workers: Vec<_> = (0..n)
            .map(|_| {
                let (batches, next, start, one) = (&batches, &next, &start, &one);
                scope.spawn(move || -> anyhow::Result<()> {
                    let session = RawSession::load(model, one);
                    start.wait();
                    let mut session = session?;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(batch) = batches.get(i) else { return Ok(()) };
                        session.run(&batch.iter().collect::<Vec<_>>())?;
                    }
                })
            })
            .collect();
        start.wait();
        let started = Instant::now();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a ceiling thread panicked"))??;
        }
        Ok(started.elapsed())
    })?;
    Ok((texts.len() as f64 / elapsed.as_secs_f64(), padding))
}

/// The repository's default version of `name`.
fn default_version(models: &Path, name: &str) -> anyhow::Result<ModelVersion> {
    let listing = ModelRepository::new(models).scan(name)?;
    listing.default_version().cloned().with_context(|| format!("{name}: no usable version in {}", models.display()))
}

struct Raw {
    per_s: f64,
    /// One embedding per text, in the workload's order.
    embeddings: Vec<Vec<f32>>,
}

/// The ceiling: one raw session, pre-tokenized, sorted by length, batches of
/// [`CEILING_BATCH`]; ORT's threads as Sluice's engine gets them by default.
fn raw_run(model: &ModelVersion, texts: &[String]) -> anyhow::Result<Raw> {
    let mut session = RawSession::load(model, &SessionConfig::default())?;
    let prepared = texts.iter().map(|t| session.prepare(&Input::Text(t.clone()))).collect::<Result<Vec<_>, _>>()?;
    let mut order: Vec<usize> = (0..prepared.len()).collect();
    order.sort_by_key(|&i| prepared[i].cost());
    // Warm-up: the first run of a session allocates its arenas.
    session.run(&[&prepared[order[0]]])?;
    let mut embeddings = vec![Vec::new(); texts.len()];
    let started = Instant::now();
    for chunk in order.chunks(CEILING_BATCH) {
        let batch: Vec<_> = chunk.iter().map(|&i| &prepared[i]).collect();
        for (&i, out) in chunk.iter().zip(session.run(&batch)?) {
            let Output::Embedding(v) = out else { bail!("{}: not an embedding model", model.label()) };
            embeddings[i] = v;
        }
    }
    Ok(Raw { per_s: texts.len() as f64 / started.elapsed().as_secs_f64(), embeddings })
}

/// Every version of the text model on both corpora: speed against version 1
/// (same run) and cosine of each embedding to version 1's, and whether it is
/// faster at the bar (`VERSION_MIN_*`) on both.
fn compare_versions(models: &Path, mixed: &[String], short: &[String]) -> anyhow::Result<Value> {
    let listing = ModelRepository::new(models).scan(TEXT_MODEL)?;
    let mut versions = listing.versions.clone();
    versions.sort_by(|a, b| a.spec.version.cmp(&b.spec.version));
    let Some(base) = versions.iter().find(|v| v.spec.version == "1").cloned() else {
        return Ok(Value::Null);
    };
    println!("\n== {TEXT_MODEL} versions, raw ONNX Runtime (speed and cosine against version 1)");
    let base_mixed = raw_run(&base, mixed)?;
    let base_short = raw_run(&base, short)?;
    let mut out = Vec::new();
    for v in &versions {
        let (m, s) = if v.spec.version == "1" {
            (
                Raw { per_s: base_mixed.per_s, embeddings: Vec::new() },
                Raw { per_s: base_short.per_s, embeddings: Vec::new() },
            )
        } else {
            (raw_run(v, mixed)?, raw_run(v, short)?)
        };
        let cos = |raw: &Raw, base: &Raw| -> (f64, f64) {
            if raw.embeddings.is_empty() {
                return (1.0, 1.0);
            }
            let c: Vec<f64> =
                raw.embeddings.iter().zip(&base.embeddings).map(|(a, b)| stats::cosine(a, b) as f64).collect();
            (stats::mean(&c), stats::percentile(&c, 0.0))
        };
        let ((mm, mmin), (sm, smin)) = (cos(&m, &base_mixed), cos(&s, &base_short));
        let (xm, xs) = (m.per_s / base_mixed.per_s, s.per_s / base_short.per_s);
        let meets_bar = v.spec.version != "1"
            && xm.min(xs) >= VERSION_MIN_SPEEDUP
            && mm.min(sm) >= VERSION_MIN_MEAN_COSINE
            && mmin.min(smin) >= VERSION_MIN_COSINE;
        println!(
            "   v{:<3} mixed {:>7.1}/s ({xm:.2}×) cos mean {mm:.4} min {mmin:.4} | short {:>7.1}/s ({xs:.2}×) cos mean {sm:.4} min {smin:.4}{}   {}",
            v.spec.version,
            m.per_s,
            s.per_s,
            if meets_bar { "  [faster at the bar]" } else { "" },
            v.spec.description
        );
        out.push(json!({
            "version": v.spec.version,
            "description": v.spec.description,
            "mixed": {"per_s": m.per_s, "speedup": xm, "cosine_mean": mm, "cosine_min": mmin},
            "short": {"per_s": s.per_s, "speedup": xs, "cosine_mean": sm, "cosine_min": smin},
            "meets_bar": meets_bar,
        }));
    }
    Ok(Value::Array(out))
}

/// Pids of the services whose CPU a run counts.
struct ServicePids {
    redis: Option<u32>,
    broker: Option<u32>,
}

impl ServicePids {
    fn read(dir: Option<&Path>) -> ServicePids {
        let pid = |f: &str| -> Option<u32> {
            std::fs::read_to_string(dir?.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
                .filter(|p| procstat::cpu_seconds(*p).is_some())
        };
        ServicePids { redis: pid("redis.pid"), broker: pid("tansu.pid") }
    }
}

struct RunReport {
    /// Sluice's own metrics.
    engine: EngineReport,
    /// Resident memory of the Sluice process after the run.
    rss: u64,
    jobs: usize,
    seconds: f64,
    jobs_per_s: f64,
    publish_seconds: f64,
    /// CPU seconds per process over the run.
    cpu: BTreeMap<String, f64>,
    /// All processes' CPU ÷ (cores × seconds).
    busy_share: f64,
    /// CPU the hypervisor took ÷ (cores × seconds): part of what
    /// `busy_share` misses on a shared VM.
    steal_share: Option<f64>,
    batch_mean: f64,
    queue_p50_ms: f64,
    queue_p99_ms: f64,
    /// Median and 10th percentile of the scheduler's queue while it ran.
    depth_p50: f64,
    depth_p10: f64,
}

/// One end-to-end run: start Sluice, warm up, publish `inputs`, wait until
/// every result is readable in the store, check them all, stop.
async fn end_to_end(
    args: &BenchArgs,
    pids: &ServicePids,
    broker: &Broker,
    w: Workload,
    inputs: &[Value],
) -> anyhow::Result<RunReport> {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = format!("bench{}x{run}{}", std::process::id(), w.name());
    let mut envs = vec![
        ("SLUICE__KAFKA__TOPIC_PREFIX".to_owned(), prefix.clone()),
        ("SLUICE__STORE__KEY_PREFIX".to_owned(), format!("{prefix}:")),
        ("SLUICE__STORE__CACHE_TTL_SECS".to_owned(), "0".to_owned()),
        ("SLUICE__SINKS__UP_LOCAL_DEFAULTS".to_owned(), "false".to_owned()),
        ("SLUICE__MODELS__SERVE".to_owned(), format!("[\"{}\"]", w.model())),
    ];
    envs.extend(args.envs.iter().cloned());
    let models = args.models.display().to_string();
    let cmd: Vec<String> = match broker {
        Broker::Embedded => {
            vec![
                "up".into(),
                "--redis".into(),
                args.redis.clone(),
                "--models".into(),
                models,
                "--listen".into(),
                "127.0.0.1:0".into(),
            ]
        }
        Broker::Real(b) => vec![
            "worker".into(),
            "--brokers".into(),
            b.clone(),
            "--redis".into(),
            args.redis.clone(),
            "--models".into(),
            models,
            "--ops-listen".into(),
            "127.0.0.1:0".into(),
        ],
    };
    let cmd: Vec<std::ffi::OsString> = cmd.into_iter().map(Into::into).collect();
    let log = std::env::temp_dir().join(format!("{prefix}.log"));
    let sluice = SluiceProcess::start(&args.sluice, &cmd, &envs, Some(&log)).await?;
    let store_cfg = StoreConfig {
        ttl: Duration::from_secs(3600),
        memory_capacity: 1,
        key_prefix: format!("{prefix}:"),
        cache_ttl: Duration::ZERO,
        cache_capacity: 1,
    };
    let store = Store::redis(&args.redis, &store_cfg).await?;
    let mut notices = store.completions();
    let topic = sluice_schemas::topics::jobs(&prefix, w.model());
    let publisher = Publisher { python: &args.python, brokers: &sluice.bootstrap, topic: &topic, broker };

    // Warm-up: the group join, the sessions' first runs, connections.
    let warm: Vec<(String, String)> =
        (0..16.min(inputs.len())).map(|i| job(&format!("{prefix}-warm-{i}"), w.model(), &inputs[i])).collect();
    publisher.publish(&warm, &prefix).await?;
    let warm_ids: Vec<String> = warm.iter().map(|(id, _)| id.clone()).collect();
    wait_all_polling(&store, &warm_ids, Duration::from_secs(180)).await?;
    while notices.try_recv().is_ok() {}

    let jobs: Vec<(String, String)> =
        inputs.iter().enumerate().map(|(i, input)| job(&format!("{prefix}-{i}"), w.model(), input)).collect();
    let ids: Vec<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
    let procs: Vec<(&str, Option<u32>)> = vec![
        ("sluice", sluice.pid()),
        ("redis", pids.redis),
        ("broker", if matches!(broker, Broker::Real(_)) { pids.broker } else { None }),
        ("bench", Some(std::process::id())),
    ];
    let ready = publisher.ready(&jobs, &prefix).await?;
    let cpu_before: Vec<Option<f64>> = procs.iter().map(|(_, p)| p.and_then(procstat::cpu_seconds)).collect();
    let steal_before = procstat::steal_seconds();
    let started = Instant::now();
    let publishing = ready.go();
    let waiting = async {
        wait_all(&store, &mut notices, &ids, started, STALL)
            .await
            .with_context(|| format!("the sluice process's log: {}", log.display()))
    };
    // The batcher's window while the backlog drains: how many jobs the
    // scheduler had to choose a batch from.
    let depths = std::cell::RefCell::new(Vec::new());
    // The first to fail ends the run (a stalled wait kills the publisher).
    let (published, finished) = tokio::select! {
        r = async { tokio::try_join!(publishing, waiting) } => r?,
        never = sample_queue_depth(sluice.http.as_deref(), &depths) => match never {},
    };
    let depths = depths.into_inner();
    let seconds = finished.duration_since(started).as_secs_f64();
    let steal_share = procstat::steal_share_since(steal_before, seconds);
    let mut cpu = BTreeMap::new();
    for ((name, pid), before) in procs.iter().zip(cpu_before) {
        // Sampled after the run: what a process used in the window, give or
        // take the time the publisher's exit was awaited.
        if let (Some(p), Some(b)) = (pid, before)
            && let Some(after) = procstat::cpu_seconds(*p)
        {
            cpu.insert((*name).to_owned(), after - b);
        }
    }
    cpu.insert("publisher".to_owned(), published.cpu_seconds);
    let busy_share = cpu.values().sum::<f64>() / (procstat::cores() as f64 * seconds);

    // Every result, read back from the store and checked.
    let records = store.get_many(TENANT, &ids).await?;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let (mut batch, mut queued) = (Vec::new(), Vec::new());
    for r in records.iter().flatten() {
        *by_status.entry(r.status.as_str().to_owned()).or_default() += 1;
        if let Some(t) = &r.timings {
            batch.push(t.batch_size as f64);
            queued.push(t.queued_ms as f64);
        }
    }
    ensure!(
        by_status.get("succeeded") == Some(&ids.len()),
        "{} of {} jobs did not succeed: {by_status:?}",
        ids.len() - by_status.get("succeeded").copied().unwrap_or(0),
        ids.len()
    );
    let rss = sluice.pid().and_then(procstat::rss_bytes).unwrap_or(0);
    let engine = match &sluice.http {
        Some(http) => engine_report(http).await.unwrap_or_default(),
        None => EngineReport::default(),
    };
    sluice.stop().await?;
    Ok(RunReport {
        engine,
        rss,
        jobs: ids.len(),
        seconds,
        jobs_per_s: ids.len() as f64 / seconds,
        publish_seconds: published.seconds,
        cpu,
        busy_share,
        steal_share,
        batch_mean: stats::mean(&batch),
        queue_p50_ms: stats::percentile(&queued, 50.0),
        queue_p99_ms: stats::percentile(&queued, 99.0),
        depth_p50: stats::percentile(&depths, 50.0),
        depth_p10: stats::percentile(&depths, 10.0),
    })
}

/// What Sluice's own metrics say about a run (`/metrics`, read after it).
#[derive(Default)]
struct EngineReport {
    /// Mean seconds a job spent in each worker stage.
    stages: BTreeMap<String, f64>,
    /// Mean share of a batch's padded tokens that was padding.
    padding: Option<f64>,
    /// Mean seconds of one batch on an inference thread (tensors built,
    /// forward pass, outputs read).
    inference_per_batch: Option<f64>,
}

async fn engine_report(http: &str) -> anyhow::Result<EngineReport> {
    let text = reqwest::get(format!("{http}/metrics")).await?.text().await?;
    let overall = |metric: &str| summary_means(&text, metric, None).remove("");
    Ok(EngineReport {
        stages: summary_means(&text, sluice_schemas::metrics::WORKER_STAGE.name, Some("stage")),
        padding: overall(sluice_schemas::metrics::BATCH_PADDING.name),
        inference_per_batch: overall(sluice_schemas::metrics::INFERENCE_SECONDS.name),
    })
}

/// Mean of a summary (`_sum` ÷ `_count`) per value of `label`, or over all
/// series under the key `""` when `label` is `None`.
fn summary_means(text: &str, metric: &str, label: Option<&str>) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let (sum, count) = (format!("{metric}_sum"), format!("{metric}_count"));
    for line in text.lines().filter(|l| l.starts_with(metric)) {
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let key = match label {
            None => String::new(),
            Some(l) => match line.split(&format!("{l}=\"")).nth(1).and_then(|s| s.split('"').next()) {
                Some(k) => k.to_owned(),
                None => continue,
            },
        };
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let e = sums.entry(key).or_default();
        if name == sum {
            e.0 += value;
        } else if name == count {
            e.1 += value;
        }
    }
    sums.into_iter().filter(|(_, (_, n))| *n > 0.0).map(|(k, (s, n))| (k, s / n)).collect()
}

/// Reads `sluice_queue_depth` every 500 ms into `into`, until dropped.
/// Not more often: rendering `/metrics` takes Sluice about 1.5 ms of CPU,
/// which every 200 ms was 0.4% of the 2-core machine under measurement.
async fn sample_queue_depth(http: Option<&str>, into: &std::cell::RefCell<Vec<f64>>) -> std::convert::Infallible {
    let name = sluice_schemas::metrics::QUEUE_DEPTH.name;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(http) = http else { continue };
        let Ok(text) = async { reqwest::get(format!("{http}/metrics")).await?.text().await }.await else { continue };
        let depth: f64 = text
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        into.borrow_mut().push(depth);
    }
}

/// `(job_id, JobRequest JSON)`.
fn job(id: &str, model: &str, input: &Value) -> (String, String) {
    (id.to_owned(), json!({"job_id": id, "tenant": TENANT, "model": model, "input": input}).to_string())
}

struct Publisher<'a> {
    python: &'a Path,
    brokers: &'a str,
    topic: &'a str,
    broker: &'a Broker,
}

struct Published {
    seconds: f64,
    cpu_seconds: f64,
}

/// A publisher process that has connected and waits for the go-ahead.
struct ReadyPublisher {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    file: PathBuf,
    jobs: usize,
}

impl Publisher<'_> {
    /// Starts the publisher on `jobs` and waits until it is connected.
    async fn ready(&self, jobs: &[(String, String)], tag: &str) -> anyhow::Result<ReadyPublisher> {
        use tokio::io::AsyncBufReadExt;
        let file = std::env::temp_dir().join(format!("{tag}-{}.jobs", jobs.len()));
        let mut body = String::with_capacity(jobs.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
        for (k, v) in jobs {
            body.push_str(k);
            body.push('\t');
            body.push_str(v);
            body.push('\n');
        }
        tokio::fs::write(&file, body).await?;
        // Built into the binary: an installed `sluice-load` needs no checkout.
        let script = std::env::temp_dir().join(format!("sluice-publish-jobs-{}.py", std::process::id()));
        tokio::fs::write(&script, PUBLISH_SCRIPT).await?;
        // The mock cluster takes concurrent idempotent batches; tansu 0.6 does not.
        let in_flight = match self.broker {
            Broker::Embedded => "5",
            Broker::Real(_) => "1",
        };
        let mut child = tokio::process::Command::new(self.python)
            .arg(&script)
            .args(["--brokers", self.brokers, "--topic", self.topic, "--tenant", TENANT, "--max-in-flight", in_flight])
            .arg("--file")
            .arg(&file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.python.display()))?;
        let stdin = child.stdin.take().context("publisher stdin")?;
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().context("publisher stdout")?).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), stdout.next_line())
            .await
            .context("publisher not connected within 60 s")??
            .context("publisher exited before it was ready")?;
        ensure!(line.contains("ready"), "publisher: {line}");
        Ok(ReadyPublisher { child, stdin, stdout, file, jobs: jobs.len() })
    }

    /// Publishes `jobs` (start, go, wait for every acknowledgement).
    async fn publish(&self, jobs: &[(String, String)], tag: &str) -> anyhow::Result<Published> {
        self.ready(jobs, tag).await?.go().await
    }
}

impl ReadyPublisher {
    /// Lets it publish; returns once every record is acknowledged.
    async fn go(mut self) -> anyhow::Result<Published> {
        use tokio::io::AsyncWriteExt;
        self.stdin.write_all(b"go\n").await?;
        self.stdin.flush().await?;
        let line = self.stdout.next_line().await?.context("publisher exited without a summary")?;
        let status = self.child.wait().await?;
        let _ = tokio::fs::remove_file(&self.file).await;
        ensure!(status.success(), "publisher failed ({status})");
        let v: Value = serde_json::from_str(&line).context("publisher output")?;
        ensure!(v["published"].as_u64() == Some(self.jobs as u64), "publisher: {v}");
        Ok(Published {
            seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
            cpu_seconds: v["cpu_seconds"].as_f64().unwrap_or(0.0),
        })
    }
}

/// Waits until every id's record is terminal in the store, polling (for a
/// handful of jobs).
async fn wait_all_polling(store: &Store, ids: &[String], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = store.get_many(TENANT, ids).await?;
        if records.iter().all(|r| r.as_ref().is_some_and(|r| r.status.is_terminal())) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "warm-up jobs not done within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a run may go without a single job finishing before it is failed:
/// a broker that has stopped answering (tansu 0.6 can panic on concurrent
/// idempotent batches and then refuses every request) or a worker that has
/// stopped. The slowest honest gap seen is a mixed batch through tansu, a
/// few seconds.
const STALL: Duration = Duration::from_secs(120);

/// Waits until every id's record is terminal; returns when the last one was
/// seen. Completion notices say which ids finished; when they fall quiet
/// (a notice can be dropped), the ids not yet seen are read from the store.
/// Fails when no job has finished for `stall`, or after a generous overall
/// timeout (a slow broker is reported, not failed).
async fn wait_all(
    store: &Store,
    notices: &mut tokio::sync::mpsc::Receiver<String>,
    ids: &[String],
    started: Instant,
    stall: Duration,
) -> anyhow::Result<Instant> {
    let mut pending: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut last = Instant::now();
    let timeout = Duration::from_secs(300) + Duration::from_millis(ids.len() as u64 * 50);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !pending.is_empty() {
        tokio::select! {
            n = notices.recv() => match n {
                Some(key) => {
                    let id = sluice_schemas::topics::split_job_key(&key).map_or("", |(_, id)| id);
                    if pending.remove(id) {
                        last = Instant::now();
                    }
                }
                None => bail!("completion notices stopped"),
            },
            _ = tick.tick() => {
                ensure!(started.elapsed() < timeout, "{} of {} jobs not done after {timeout:?}", pending.len(), ids.len());
                ensure!(
                    last.elapsed() < stall,
                    "no job finished for {stall:?} ({} of {} still not done): the broker or the worker has stopped",
                    pending.len(),
                    ids.len()
                );
                if last.elapsed() > Duration::from_secs(1) {
                    let rest: Vec<String> = pending.iter().map(|s| (*s).to_owned()).collect();
                    let records = store.get_many(TENANT, &rest).await?;
                    let now = Instant::now();
                    for (id, r) in rest.iter().zip(records) {
                        if r.is_some_and(|r| r.status.is_terminal()) {
                            pending.remove(id.as_str());
                            last = now;
                        }
                    }
                }
            }
        }
    }
    Ok(last)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name"))?.split_once(':').map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The CPU features ONNX Runtime's kernels care about.
fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
    ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
        .iter()
        .filter(|f| flags.split_whitespace().any(|x| x == **f))
        .map(|f| (*f).to_owned())
        .collect()
}

/// Prints this run's throughput against an earlier result, workload by
/// workload and broker by broker.
fn compare(report: &Value, baseline: &Path) -> anyhow::Result<()> {
    let old: Value = serde_json::from_slice(&std::fs::read(baseline)?).context("baseline JSON")?;
    println!("\n== against {}", baseline.display());
    let runs = |v: &Value| -> BTreeMap<(String, String), f64> {
        let mut m = BTreeMap::new();
        for w in v["workloads"].as_array().into_iter().flatten() {
            for r in w["runs"].as_array().into_iter().flatten() {
                if let (Some(n), Some(b), Some(x)) =
                    (w["name"].as_str(), r["broker"].as_str(), r["jobs_per_s"].as_f64())
                {
                    m.insert((n.to_owned(), b.to_owned()), x);
                }
            }
        }
        m
    };
    let (new, old) = (runs(report), runs(&old));
    for ((w, b), x) in &new {
        if let Some(o) = old.get(&(w.clone(), b.clone())) {
            println!("   {w:<7} {b:<8} {o:>9.1} -> {x:>9.1} jobs/s ({:.2}×)", x / o);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::memory(&StoreConfig {
            ttl: Duration::from_secs(60),
            memory_capacity: 100,
            key_prefix: "t:".into(),
            cache_ttl: Duration::ZERO,
            cache_capacity: 1,
        })
    }

    fn finished(id: &str) -> sluice_schemas::JobResult {
        sluice_schemas::JobResult::failed(
            id.into(),
            TENANT.into(),
            "m".into(),
            sluice_schemas::ErrorCode::InferenceFailed,
            "x".into(),
            chrono::Utc::now(),
        )
    }

    #[tokio::test]
    async fn a_run_whose_jobs_stop_finishing_fails_at_the_stall_and_says_how_many_are_left() {
        let store = store();
        let mut notices = store.completions();
        let ids: Vec<String> = ["j-1", "j-2", "j-3"].map(String::from).to_vec();
        store.put(&finished("j-1")).await.unwrap();
        let err = wait_all(&store, &mut notices, &ids, Instant::now(), Duration::from_secs(2)).await.unwrap_err();
        let err = err.to_string();
        assert!(err.contains("no job finished for 2s (2 of 3 still not done)"), "{err}");
    }

    #[tokio::test]
    async fn a_run_whose_jobs_all_finish_is_done() {
        let store = store();
        let mut notices = store.completions();
        let ids: Vec<String> = ["j-1", "j-2"].map(String::from).to_vec();
        for id in &ids {
            store.put(&finished(id)).await.unwrap();
        }
        wait_all(&store, &mut notices, &ids, Instant::now(), Duration::from_secs(60)).await.unwrap();
    }
}
