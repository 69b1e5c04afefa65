//! Load scenarios: `steady`, `capacity`, `spike`, `tenants`, `faults`.
//!
//! Each drives a Sluice with the open-loop driver ([`drive`]) — against a
//! `sluice up` it starts, or a deployment given by `--http`/`--brokers` —
//! and writes a report directory ([`report`]): `report.json` with every
//! number and `report.html` with tables and plots. Every run is bounded in
//! time (its phases, then at most `--drain-secs`) and in jobs
//! (`--max-jobs`), and exits non-zero when its verdict fails (an accepted
//! job never finished, a poison record not dead-lettered, a submission
//! error other than 429/503).

mod drive;
mod faults;
mod report;
mod target;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use self::drive::{Answer, Book, Phase, Plan, Run, Stream, Via};
use self::target::{Target, TargetArgs};
use crate::corpus;

const TEXT_MODEL: &str = "all-minilm-l6-v2";
const TENSOR_MODEL: &str = "sigmoid";
/// Distinct inputs a run cycles through.
const DISTINCT_INPUTS: usize = 2000;

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// A constant arrival rate for a while (open loop: jobs are sent when
    /// due, whatever the system does). Reports latency submit → result
    /// apart from the pipeline's own queue and inference time.
    Steady {
        #[command(flatten)]
        common: Common,
        /// Jobs per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds of load.
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
    },
    /// Steps the arrival rate up (×`--factor` every `--step-secs`) until a
    /// step's p99 passes `--p99-ms` or it is refused (429/503) or falls
    /// behind; reports the highest rate that held.
    Capacity {
        #[command(flatten)]
        common: Common,
        /// Rate of the first step (jobs per second).
        #[arg(long, default_value_t = 50.0)]
        start_rate: f64,
        /// Each step's rate over the last one's.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        /// Seconds per step.
        #[arg(long, default_value_t = 10.0)]
        step_secs: f64,
        /// Latency target: a step holds while 99% of its jobs finish within it.
        #[arg(long, default_value_t = 2000.0)]
        p99_ms: f64,
        /// Highest rate tried.
        #[arg(long, default_value_t = 20000.0)]
        max_rate: f64,
    },
    /// A baseline rate, then `--factor`× it for `--spike-secs`, then the
    /// baseline again: answers by phase, how long the backlog took to drain,
    /// memory over time, and that every accepted job finished.
    Spike {
        #[command(flatten)]
        common: Common,
        /// Baseline jobs per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// The spike's rate over the baseline.
        #[arg(long, default_value_t = 10.0)]
        factor: f64,
        /// Seconds of baseline before the spike.
        #[arg(long, default_value_t = 10.0)]
        before_secs: f64,
        #[arg(long, default_value_t = 10.0)]
        spike_secs: f64,
        /// Seconds of baseline after the spike.
        #[arg(long, default_value_t = 30.0)]
        after_secs: f64,
    },
    /// A noisy tenant far over its rate limit next to a quiet one under it,
    /// through REST: each tenant's acceptance and latency side by side. The
    /// started `sluice up` gets `--limit` as every tenant's rate limit.
    Tenants {
        #[command(flatten)]
        common: Common,
        /// Per-tenant rate limit (jobs per second, burst the same) of the
        /// started `sluice up`.
        #[arg(long, default_value_t = 40)]
        limit: u32,
        #[arg(long, default_value_t = 10.0)]
        quiet_rate: f64,
        #[arg(long, default_value_t = 200.0)]
        noisy_rate: f64,
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        #[arg(long, default_value = "quiet")]
        quiet_tenant: String,
        #[arg(long, default_value = "noisy")]
        noisy_tenant: String,
        /// The quiet tenant's API key (a deployment with keys).
        #[arg(long)]
        quiet_key: Option<String>,
        /// The noisy tenant's API key.
        #[arg(long)]
        noisy_key: Option<String>,
    },
    /// Steady load through a gateway, two workers and a sink this tool
    /// starts as separate processes on the services of `services.sh start
    /// DIR`, while one fault at a time breaks something for `--fault-secs`
    /// (a worker SIGKILLed, Redis stopped, a PostgreSQL shard stopped, the
    /// broker restarted). Reports, per fault, what was accepted, finished,
    /// lost and redelivered, and checks every finished job's record in the
    /// store and its row in the lake and the shards, exactly once.
    Faults {
        #[command(flatten)]
        common: Common,
        /// The directory of `deploy/local/services.sh start DIR` (its `env`
        /// and `ctl`).
        #[arg(long)]
        services: PathBuf,
        /// Jobs per second, all along.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// The faults, in order.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "worker-kill,redis-stop,pg-stop,broker-restart"
        )]
        faults: Vec<faults::Fault>,
        /// How long each fault lasts.
        #[arg(long, default_value_t = 10.0)]
        fault_secs: f64,
        /// Normal operation before the first fault and after each.
        #[arg(long, default_value_t = 20.0)]
        gap_secs: f64,
        /// Longest wait, once every accepted job finished, for the sink to
        /// land them all in the lake and the shards.
        #[arg(long, default_value_t = 120.0)]
        land_secs: f64,
    },
}

/// What every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    #[command(flatten)]
    target: TargetArgs,
    /// What the jobs carry: `short` (queries of 3–14 words), `mixed`
    /// (paragraphs of 4–110 words), `demo` (the demo's sentences), `tensor`
    /// (the `sigmoid` model's input), or a JSONL file with one `{"text": …}`
    /// or `{"input": {…}}` per line.
    #[arg(long, default_value = "short")]
    corpus: String,
    /// Model to run (default: MiniLM, or `sigmoid` for `--corpus tensor`).
    #[arg(long)]
    model: Option<String>,
    /// How jobs are submitted.
    #[arg(long, value_enum, default_value_t = Via::Rest)]
    via: Via,
    /// Share of records (0–1) replaced by malformed ones, produced to
    /// Kafka; each must be dead-lettered with a code.
    #[arg(long, default_value_t = 0.0)]
    poison: f64,
    /// Report directory (default `load-reports/<scenario>-<time>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Most submissions awaiting an answer at once.
    #[arg(long, default_value_t = 4096)]
    max_outstanding: usize,
    /// Most jobs sent in all.
    #[arg(long, default_value_t = 500_000)]
    max_jobs: u64,
    /// Seconds to wait, once sending stops, for accepted jobs to finish.
    #[arg(long, default_value_t = 120.0)]
    drain_secs: f64,
}

/// Settings of a started `sluice up` that keep the gateway's default rate
/// limit (100/s per tenant) out of scenarios that measure the pipeline.
fn unlimited() -> Vec<(String, String)> {
    vec![
        ("SLUICE__GATEWAY__RATE_PER_SECOND".into(), "1000000".into()),
        ("SLUICE__GATEWAY__RATE_BURST".into(), "1000000".into()),
    ]
}

/// Runs a scenario; `Ok(false)` when its verdict failed.
pub async fn run(scenario: Scenario) -> anyhow::Result<bool> {
    match scenario {
        Scenario::Steady { common, rate, duration } => {
            ensure!(rate > 0.0 && duration > 0.0, "--rate and --duration must be positive");
            let streams = vec![one(TENANT, vec![Phase { name: "steady".into(), secs: duration, rate }])];
            execute(
                "steady",
                &common,
                streams,
                unlimited(),
                |_| async {},
                |plan, book| {
                    let mut v = basic_verdict(plan, book);
                    let finished = book.jobs.values().filter(|j| j.done.is_some()).count() as f64;
                    v["offered_per_s"] = json!(rate);
                    v["finished_per_s"] = json!(round(finished / book.ended.max(duration)));
                    (v, Vec::new())
                },
            )
            .await
        }
        Scenario::Capacity { common, start_rate, factor, step_secs, p99_ms, max_rate } => {
            ensure!(start_rate > 0.0 && factor > 1.0 && step_secs > 0.0, "need --start-rate > 0, --factor > 1");
            let mut phases = Vec::new();
            let mut rate = start_rate;
            while rate <= max_rate && phases.len() < 64 {
                phases.push(Phase { name: format!("step {}", phases.len() + 1), secs: step_secs, rate: round(rate) });
                rate *= factor;
            }
            let steps: Arc<Mutex<Vec<Value>>> = Arc::default();
            let recorded = steps.clone();
            let plan_phases = phases.clone();
            let during = move |run: Arc<Run>| judge_steps(run, plan_phases, p99_ms, recorded);
            execute("capacity", &common, vec![one(TENANT, phases)], unlimited(), during, move |plan, book| {
                let steps = steps.lock().expect("steps").clone();
                let held: Vec<f64> =
                    steps.iter().take_while(|s| s["held"] == true).filter_map(|s| s["rate"].as_f64()).collect();
                let mut v = basic_verdict(plan, book);
                v["p99_target_ms"] = json!(p99_ms);
                v["capacity_per_s"] = json!(held.last());
                v["steps"] = json!(steps);
                // Capacity found when some step held and a later one did not.
                let bounded = steps.iter().any(|s| s["held"] == false);
                v["found_limit"] = json!(bounded);
                (v, capacity_charts(&steps, p99_ms))
            })
            .await
        }
        Scenario::Spike { common, rate, factor, before_secs, spike_secs, after_secs } => {
            ensure!(rate > 0.0 && factor >= 1.0, "need --rate > 0 and --factor >= 1");
            let phases = vec![
                Phase { name: "baseline".into(), secs: before_secs, rate },
                Phase { name: "spike".into(), secs: spike_secs, rate: rate * factor },
                Phase { name: "after".into(), secs: after_secs, rate },
            ];
            execute(
                "spike",
                &common,
                vec![one(TENANT, phases)],
                unlimited(),
                |_| async {},
                move |plan, book| {
                    let mut v = basic_verdict(plan, book);
                    let tl = report::timeline(book);
                    let spike_end = (before_secs + spike_secs).ceil() as usize;
                    // Drained: the backlog back to what the baseline carried.
                    let base =
                        tl.iter().take(before_secs as usize).map(|s| s.backlog).max().unwrap_or(0).max(rate as u64);
                    let drained =
                        tl.iter().skip(spike_end).find(|s| s.backlog <= base).map(|s| s.t as f64 - spike_end as f64);
                    v["backlog_peak"] = json!(tl.iter().map(|s| s.backlog).max());
                    v["baseline_backlog"] = json!(base);
                    v["drain_secs_after_spike"] = json!(drained);
                    let mut peak = serde_json::Map::new();
                    for (_, name, bytes) in &book.rss {
                        let e = peak.entry(name.clone()).or_insert(json!(0));
                        if bytes > &e.as_u64().unwrap_or(0) {
                            *e = json!(bytes);
                        }
                    }
                    v["rss_peak_bytes"] = Value::Object(peak);
                    (v, Vec::new())
                },
            )
            .await
        }
        Scenario::Tenants {
            common,
            limit,
            quiet_rate,
            noisy_rate,
            duration,
            quiet_tenant,
            noisy_tenant,
            quiet_key,
            noisy_key,
        } => {
            ensure!(common.via == Via::Rest, "tenants: rate limits are the gateway's: use --via rest");
            let phase = |rate| vec![Phase { name: "load".into(), secs: duration, rate }];
            let streams = vec![
                Stream { tenant: quiet_tenant.clone(), api_key: quiet_key, phases: phase(quiet_rate) },
                Stream { tenant: noisy_tenant.clone(), api_key: noisy_key, phases: phase(noisy_rate) },
            ];
            let settings = vec![
                ("SLUICE__GATEWAY__RATE_PER_SECOND".into(), limit.to_string()),
                ("SLUICE__GATEWAY__RATE_BURST".into(), limit.to_string()),
            ];
            execute(
                "tenants",
                &common,
                streams,
                settings,
                |_| async {},
                move |plan, book| {
                    let mut v = basic_verdict(plan, book);
                    let side = |i: usize| {
                        let s = report::summary(book.jobs.values().filter(move |j| j.stream == i));
                        let sent = s["sent"].as_f64().unwrap_or(0.0).max(1.0);
                        json!({
                            "offered_per_s": plan.streams[i].phases[0].rate,
                            "accepted_share": round(s["accepted"].as_f64().unwrap_or(0.0) / sent),
                            "limited": s["answers"]["429"].as_u64().unwrap_or(0),
                            "p50_ms": s["latency_ms"]["p50"],
                            "p99_ms": s["latency_ms"]["p99"],
                        })
                    };
                    let quiet = side(0);
                    // The quiet tenant, under its limit, must not pay for the noisy one.
                    let quiet_ok = quiet["accepted_share"].as_f64().unwrap_or(0.0) >= 0.99;
                    v["ok"] = json!(v["ok"] == true && quiet_ok);
                    v[quiet_tenant.as_str()] = quiet;
                    v[noisy_tenant.as_str()] = side(1);
                    v["limit_per_s"] = json!(limit);
                    (v, Vec::new())
                },
            )
            .await
        }
        Scenario::Faults { common, services, rate, faults, fault_secs, gap_secs, land_secs } => {
            run_faults(common, services, rate, faults, fault_secs, gap_secs, land_secs).await
        }
    }
}

/// The `faults` scenario (see [`faults`]).
async fn run_faults(
    common: Common,
    services: PathBuf,
    rate: f64,
    list: Vec<faults::Fault>,
    fault_secs: f64,
    gap_secs: f64,
    land_secs: f64,
) -> anyhow::Result<bool> {
    ensure!(rate > 0.0 && fault_secs > 0.0 && gap_secs > 0.0, "--rate, --fault-secs and --gap-secs must be positive");
    ensure!(common.via == Via::Rest, "faults: jobs go through the gateway it starts: use --via rest");
    let services = Arc::new(faults::Services::read(&services)?);
    faults::check(&list, &services)?;
    let (sluice, models) = common.target.own_binaries()?;
    let out = out_dir("faults", &common)?;
    let tag = chrono::Utc::now().format("%H%M%S%3f").to_string();
    let deployment = faults::Deployment::start(&sluice, &models, &services, &out, &tag, common.target.envs()).await?;
    let target = deployment.target(&services.brokers);
    let prefix = deployment.prefix.clone();
    let deployment = Arc::new(tokio::sync::Mutex::new(deployment));
    let phases = faults::phases(&list, rate, gap_secs, fault_secs, gap_secs);
    let injected: Arc<Mutex<Vec<faults::Injected>>> = Arc::default();
    let crashes: Arc<Mutex<Vec<f64>>> = Arc::default();
    let audited: Arc<Mutex<Option<anyhow::Result<Value>>>> = Arc::default();
    let (d, s, p, l, i, a, c) = (
        deployment.clone(),
        services.clone(),
        phases.clone(),
        list.clone(),
        injected.clone(),
        audited.clone(),
        crashes.clone(),
    );
    let drain = Duration::from_secs_f64(common.drain_secs.max(0.0));
    let during = move |run: Arc<Run>| async move {
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let results = sluice_schemas::topics::results(&prefix);
        let supervise = faults::supervise_broker(run.clone(), s.clone(), results, down.clone(), c);
        tokio::select! {
            _ = supervise => unreachable!("the supervisor runs until the run ends"),
            _ = faults_then_audit(run, d, s, p, l, i, a, down, drain, land_secs) => {}
        }
    };
    let verdict_phases = phases.clone();
    let verdict = move |plan: &Plan, book: &Book| {
        let audit = match audited.lock().expect("audit").take() {
            Some(Ok(v)) => v,
            Some(Err(e)) => json!({"error": format!("{e:#}")}),
            None => json!({"error": "not audited"}),
        };
        let injected = injected.lock().expect("faults log").clone();
        let crashes = crashes.lock().expect("crashes").clone();
        let v = faults::verdict(book, &verdict_phases, &injected, &crashes, &audit, basic_verdict(plan, book));
        (v, Vec::new())
    };
    let streams = vec![one(TENANT, phases)];
    let outcome = execute_on("faults", &common, &out, target, streams, during, verdict).await;
    match Arc::try_unwrap(deployment) {
        Ok(d) => {
            if let Err(e) = d.into_inner().stop().await {
                eprintln!("warning: stopping the deployment: {e:#}");
            }
        }
        Err(_) => eprintln!("warning: the deployment is still in use; its processes are killed on exit"),
    }
    outcome
}

/// The faults, then (once every accepted job has finished, or the drain is
/// up) the audit of each finished job's effects, while the deployment runs.
#[allow(clippy::too_many_arguments)]
async fn faults_then_audit(
    run: Arc<Run>,
    d: Arc<tokio::sync::Mutex<faults::Deployment>>,
    s: Arc<faults::Services>,
    p: Vec<Phase>,
    l: Vec<faults::Fault>,
    i: Arc<Mutex<Vec<faults::Injected>>>,
    a: Arc<Mutex<Option<anyhow::Result<Value>>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    drain: Duration,
    land_secs: f64,
) {
    {
        faults::inject(run.clone(), d.clone(), s, p, l, i, down).await;
        // Once every accepted job has finished (or the drain is up), look
        // for each one's effects while the deployment still runs.
        // Sending ends with the last phase; the drain is counted from there.
        let mut until = None;
        loop {
            let (sent, waiting) = run.with_book(|b| {
                let waiting = b.jobs.values().filter(|j| j.answer == Answer::Accepted && j.done.is_none()).count();
                (b.sent_until > 0.0, waiting)
            });
            if sent {
                let until = *until.get_or_insert_with(|| tokio::time::Instant::now() + drain);
                if waiting == 0 || tokio::time::Instant::now() >= until {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ids = run.with_book(faults::finished_ids);
        let tag = run.tag.clone();
        let result = faults::audit(&*d.lock().await, &tag, &ids, Duration::from_secs_f64(land_secs)).await;
        *a.lock().expect("audit") = Some(result);
    }
}

/// The tenant of the scenarios' jobs (but `tenants`'s two).
pub(crate) const TENANT: &str = "load";

fn one(tenant: &str, phases: Vec<Phase>) -> Stream {
    Stream { tenant: tenant.into(), api_key: None, phases }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Verdict parts every scenario has: nothing accepted was lost, every
/// poison record was dead-lettered (and nothing else), no submission failed
/// other than with 429/503.
fn basic_verdict(plan: &Plan, book: &Book) -> Value {
    let accepted = book.jobs.values().filter(|j| j.answer == Answer::Accepted).count();
    let unfinished = book.jobs.values().filter(|j| j.answer == Answer::Accepted && j.done.is_none()).count();
    let errors = book.jobs.values().filter(|j| j.answer == Answer::Error).count();
    let poison_missing = book.poison.values().filter(|c| c.is_none()).count();
    let ok = unfinished == 0 && errors == 0 && poison_missing == 0 && book.good_dead_lettered == 0;
    json!({
        "ok": ok,
        "accepted": accepted,
        "unfinished": unfinished,
        "submission_errors": errors,
        "poison_sent": book.poison.len(),
        "poison_not_dead_lettered": poison_missing,
        "poison_share": plan.poison,
        "good_jobs_dead_lettered": book.good_dead_lettered,
        "duplicate_results": book.duplicate_results,
    })
}

/// Capacity's judge: once a step's jobs have had `p99_ms` to finish, the
/// step held if at most 1% were refused and 99% of those accepted finished
/// within `p99_ms` of when they were due. Sending stops after the first
/// step that did not hold.
async fn judge_steps(run: Arc<Run>, phases: Vec<Phase>, p99_ms: f64, out: Arc<Mutex<Vec<Value>>>) {
    let mut end = 0.0;
    for (k, phase) in phases.iter().enumerate() {
        end += phase.secs;
        let at = end + p99_ms / 1000.0 + 0.5;
        let wait = at - run.elapsed();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        let step = run.with_book(|b| {
            let jobs: Vec<&drive::Job> = b.jobs.values().filter(|j| j.stream == 0 && j.phase == k).collect();
            let sent = jobs.len();
            let accepted = jobs.iter().filter(|j| j.answer == Answer::Accepted).count();
            let within = jobs.iter().filter(|j| j.latency_ms().is_some_and(|l| l <= p99_ms)).count();
            let lat: Vec<f64> = jobs.iter().filter_map(|j| j.latency_ms()).collect();
            let finished_in_step =
                b.jobs.values().filter(|j| j.done.is_some_and(|d| d > end - phase.secs && d <= end)).count();
            (sent, accepted, within, lat, finished_in_step)
        });
        let (sent, accepted, within, lat, finished_in_step) = step;
        if sent == 0 {
            break;
        }
        let refused_share = 1.0 - accepted as f64 / sent as f64;
        let within_share = if accepted == 0 { 0.0 } else { within as f64 / accepted as f64 };
        let held = refused_share <= 0.01 && within_share >= 0.99;
        out.lock().expect("steps").push(json!({
            "step": k + 1,
            "rate": phase.rate,
            "sent": sent,
            "accepted": accepted,
            "within_target_share": round(within_share * 100.0) / 100.0,
            "p99_ms_of_finished": (!lat.is_empty()).then(|| crate::stats::percentile(&lat, 99.0).round()),
            "finished_per_s": round(finished_in_step as f64 / phase.secs),
            "held": held,
        }));
        if !held {
            run.stop.store(true, std::sync::atomic::Ordering::Release);
            break;
        }
    }
}

fn capacity_charts(steps: &[Value], p99_ms: f64) -> Vec<report::Chart> {
    let pts = |key: &str| -> Vec<(f64, f64)> {
        steps.iter().filter_map(|s| Some((s["rate"].as_f64()?, s[key].as_f64()?))).collect()
    };
    let finished = pts("finished_per_s");
    let offered: Vec<(f64, f64)> = finished.iter().map(|&(r, _)| (r, r)).collect();
    let p99: Vec<(f64, f64)> = pts("p99_ms_of_finished").into_iter().map(|(r, v)| (r, v.min(p99_ms * 4.0))).collect();
    let mut out = Vec::new();
    if let Ok(svg) = report::line_chart(
        "Capacity: throughput per step",
        "offered jobs/s",
        "jobs/s",
        &[("offered", offered), ("finished", finished)],
    ) {
        out.push(("capacity-throughput", svg));
    }
    let target: Vec<(f64, f64)> = p99.iter().map(|&(r, _)| (r, p99_ms)).collect();
    if let Ok(svg) = report::line_chart(
        "Capacity: p99 latency per step (capped at 4× the target)",
        "offered jobs/s",
        "ms",
        &[("p99", p99), ("target", target)],
    ) {
        out.push(("capacity-latency", svg));
    }
    out
}

/// Starts (or connects to) the target, drives `streams`, writes the report,
/// prints the verdict.
async fn execute<D, DF, V>(
    scenario: &str,
    common: &Common,
    streams: Vec<Stream>,
    settings: Vec<(String, String)>,
    during: D,
    verdict: V,
) -> anyhow::Result<bool>
where
    D: FnOnce(Arc<Run>) -> DF,
    DF: std::future::Future<Output = ()>,
    V: FnOnce(&Plan, &Book) -> (Value, Vec<report::Chart>),
{
    let out = out_dir(scenario, common)?;
    let target = Target::open(&common.target, &settings, out.join("sluice.log")).await?;
    execute_on(scenario, common, &out, target, streams, during, verdict).await
}

/// The report directory of a run (created).
fn out_dir(scenario: &str, common: &Common) -> anyhow::Result<PathBuf> {
    let out = common.out.clone().unwrap_or_else(|| {
        PathBuf::from("load-reports").join(format!("{scenario}-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ")))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    Ok(out)
}

/// [`execute`] on a target already open.
async fn execute_on<D, DF, V>(
    scenario: &str,
    common: &Common,
    out: &Path,
    target: Target,
    streams: Vec<Stream>,
    during: D,
    verdict: V,
) -> anyhow::Result<bool>
where
    D: FnOnce(Arc<Run>) -> DF,
    DF: std::future::Future<Output = ()>,
    V: FnOnce(&Plan, &Book) -> (Value, Vec<report::Chart>),
{
    ensure!((0.0..1.0).contains(&common.poison), "--poison is a share in [0, 1)");
    let (model, inputs) = workload(&common.corpus, common.model.as_deref())?;
    let plan = Plan {
        model,
        inputs,
        via: common.via,
        streams,
        poison: common.poison,
        max_outstanding: common.max_outstanding,
        max_jobs: common.max_jobs,
        drain: Duration::from_secs_f64(common.drain_secs.max(0.0)),
    };
    println!("{scenario}: {} via {:?}, report in {}", plan.model, plan.via, out.display());
    if let Some(how) = &target.started {
        println!("   started {how}");
    }
    let described = json!({
        "http": target.http,
        "brokers": target.brokers,
        "topic_prefix": target.topic_prefix,
        "started": target.started,
    });
    let driven = drive::drive(&target, &plan, during).await;
    let closed = target.close().await;
    let book = driven?;
    let (verdict, charts) = verdict(&plan, &book);
    let report = report::build(scenario, described, &plan, &book, verdict.clone());
    report::write(out, &report, charts)?;
    print_summary(&report, out);
    if let Err(e) = closed {
        eprintln!("warning: stopping sluice: {e:#}");
    }
    Ok(verdict["ok"] == true)
}

fn print_summary(r: &Value, out: &Path) {
    for s in r["streams"].as_array().into_iter().flatten() {
        let a = &s["answers"];
        println!(
            "   tenant {:<8} sent {:>7}  accepted {:>7}  429 {:>6}  503 {:>6}  finished {:>7}  p50 {:>6} ms  p99 {:>6} ms  (queued p99 {} ms, inference p99 {} ms)",
            s["tenant"].as_str().unwrap_or(""),
            s["sent"],
            a["accepted"].as_u64().unwrap_or(0),
            a["429"].as_u64().unwrap_or(0),
            a["503"].as_u64().unwrap_or(0),
            s["finished"],
            s["latency_ms"]["p50"],
            s["latency_ms"]["p99"],
            s["queued_ms"]["p99"],
            s["inference_ms"]["p99"],
        );
    }
    println!("   verdict {}", r["verdict"]);
    println!("   report  {}", out.join("report.html").display());
}

/// The model and the distinct inputs a run cycles through.
fn workload(corpus: &str, model: Option<&str>) -> anyhow::Result<(String, Vec<Value>)> {
    let text = |t: &String| json!({ "text": t });
    let sentences = || corpus::sentences(corpus::SENTENCES_TSV);
    let (default_model, inputs) = match corpus {
        "short" => (TEXT_MODEL, corpus::short(&sentences()?, DISTINCT_INPUTS).iter().map(text).collect()),
        "mixed" => (TEXT_MODEL, corpus::mixed(&sentences()?, DISTINCT_INPUTS).iter().map(text).collect()),
        "demo" => (TEXT_MODEL, sentences()?.iter().map(text).collect()),
        "tensor" => (TENSOR_MODEL, (0..DISTINCT_INPUTS).map(corpus::tensor_input).collect()),
        path => (TEXT_MODEL, jsonl(Path::new(path))?),
    };
    Ok((model.unwrap_or(default_model).to_owned(), inputs))
}

/// A user's corpus: one `{"text": …}`, `{"input": {…}}` or JSON string per line.
fn jsonl(path: &Path) -> anyhow::Result<Vec<Value>> {
    let body = std::fs::read_to_string(path)
        .with_context(|| format!("--corpus {}: not short/mixed/demo/tensor, nor a readable file", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in body.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        out.push(match v {
            Value::String(s) => json!({ "text": s }),
            Value::Object(mut o) if o.contains_key("input") => o.remove("input").expect("checked"),
            Value::Object(o) if o.get("text").is_some_and(Value::is_string) => json!({ "text": o["text"] }),
            _ => anyhow::bail!("{}:{}: expected {{\"text\": …}}, {{\"input\": …}} or a string", path.display(), n + 1),
        });
    }
    ensure!(!out.is_empty(), "{}: no inputs", path.display());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jsonl_corpus_takes_texts_inputs_and_strings_and_names_a_bad_line() {
        let dir = std::env::temp_dir().join(format!("sluice-load-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(&good, "{\"text\": \"a\"}\n\n\"b\"\n{\"input\": {\"text\": \"c\"}}\n").unwrap();
        let got = jsonl(&good).unwrap();
        assert_eq!(got, vec![json!({"text": "a"}), json!({"text": "b"}), json!({"text": "c"})]);
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"text\": \"a\"}\n{\"txt\": 1}\n").unwrap();
        let e = jsonl(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2"), "{e}");
        let (model, inputs) = workload("tensor", None).unwrap();
        assert_eq!((model.as_str(), inputs.len()), (TENSOR_MODEL, DISTINCT_INPUTS));
        assert!(workload(dir.join("missing").to_str().unwrap(), None).is_err());
    }
}
