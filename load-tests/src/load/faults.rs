//! The `faults` scenario: steady load through a deployment of separate
//! processes (a gateway, two workers, a sink) on the real services, while
//! one fault at a time breaks something for `--fault-secs`:
//!
//! - `worker-kill`: SIGKILL one worker, start a new one when the time is up;
//! - `redis-stop`: stop Redis (it saves a snapshot, as a Redis with
//!   persistence would), start it again;
//! - `pg-stop`: stop the first PostgreSQL shard, start it again;
//! - `broker-restart`: stop tansu, start it again on the same storage.
//!
//! Each fault is a phase of the run (the fault's window), followed by a
//! phase of normal operation (`after …`), so the report's per-phase table
//! shows what each fault did to acceptance and latency. Once the accepted
//! jobs have finished, the verdict checks every effect of every job where a
//! user would look: each accepted job finished (results topic), its record
//! in the store is terminal (REST), and the lake and the shards hold every
//! finished job exactly once (SQL through DataFusion).
//!
//! The services come from `deploy/local/services.sh start DIR` (`--services
//! DIR`): this reads `DIR/env` and drives `DIR/ctl`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use super::drive::{Answer, Book, Phase, Run};
use super::target::Target;
use crate::child::SluiceProcess;

/// What a fault breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    WorkerKill,
    RedisStop,
    PgStop,
    BrokerRestart,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::WorkerKill => "worker-kill",
            Fault::RedisStop => "redis-stop",
            Fault::PgStop => "pg-stop",
            Fault::BrokerRestart => "broker-restart",
        }
    }
}

/// The phases of a run: `before`, then each fault's window and the normal
/// operation after it.
pub fn phases(faults: &[Fault], rate: f64, before: f64, fault_secs: f64, gap_secs: f64) -> Vec<Phase> {
    let mut out = vec![Phase { name: "before".into(), secs: before, rate }];
    for f in faults {
        out.push(Phase { name: f.name().into(), secs: fault_secs, rate });
        out.push(Phase { name: format!("after {}", f.name()), secs: gap_secs, rate });
    }
    out
}

/// The services of `services.sh start DIR`.
pub struct Services {
    dir: PathBuf,
    pub redis: String,
    pub brokers: String,
    /// PostgreSQL cluster URLs (no database).
    pub pg: Vec<String>,
}

impl Services {
    pub fn read(dir: &Path) -> anyhow::Result<Services> {
        let env = std::fs::read_to_string(dir.join("env"))
            .with_context(|| format!("--services {}: no env file (run services.sh start DIR)", dir.display()))?;
        let get = |k: &str| {
            env.lines().find_map(|l| l.strip_prefix(&format!("export {k}=")).map(str::to_owned)).unwrap_or_default()
        };
        let services = Services {
            dir: dir.to_owned(),
            redis: get("SLUICE_TEST_REDIS"),
            brokers: get("SLUICE_TEST_BROKERS"),
            pg: get("SLUICE_TEST_PG").split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        };
        ensure!(
            !services.redis.is_empty() && !services.brokers.is_empty(),
            "{}/env names no Redis or broker",
            dir.display()
        );
        ensure!(
            dir.join("ctl").is_file(),
            "{}/ctl is missing (services.sh from before faults existed?)",
            dir.display()
        );
        Ok(services)
    }

    /// `DIR/ctl <args>`.
    async fn ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(self.dir.join("ctl")).args(args).output().await?;
        ensure!(out.status.success(), "ctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// A fresh database `name` on each PostgreSQL cluster; their URLs.
    fn create_databases(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let mut urls = Vec::new();
        for pg in &self.pg {
            let out = std::process::Command::new("psql")
                .args(["-X", "-q", "-d", &format!("{pg}/postgres"), "-c", &format!("CREATE DATABASE \"{name}\"")])
                .output()
                .context("running psql (Debian: postgresql-client)")?;
            ensure!(out.status.success(), "creating database {name}: {}", String::from_utf8_lossy(&out.stderr));
            urls.push(format!("{pg}/{name}"));
        }
        Ok(urls)
    }
}

/// A gateway, two workers and a sink, as separate `sluice` processes.
pub struct Deployment {
    sluice: PathBuf,
    logs: PathBuf,
    worker_args: Vec<OsString>,
    envs: Vec<(String, String)>,
    gateway: SluiceProcess,
    workers: Vec<Option<SluiceProcess>>,
    sink: SluiceProcess,
    restarts: usize,
    pub http: String,
    pub prefix: String,
    pub lake: PathBuf,
    pub shards: Vec<String>,
}

/// The workers' `worker.session_timeout_ms` here: a killed worker's jobs
/// wait this long before the other worker takes them over.
pub const WORKER_SESSION_MS: u64 = 10_000;

impl Deployment {
    pub async fn start(
        sluice: &Path,
        models: &Path,
        services: &Services,
        out: &Path,
        tag: &str,
        user_envs: &[(String, String)],
    ) -> anyhow::Result<Deployment> {
        let prefix = format!("faults{tag}");
        let lake = out.join("lake");
        let shards = services.create_databases(&prefix)?;
        let logs = out.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut envs = vec![
            ("SLUICE__KAFKA__TOPIC_PREFIX".to_owned(), prefix.clone()),
            ("SLUICE__STORE__KEY_PREFIX".to_owned(), format!("{prefix}:")),
            ("SLUICE__STORE__CACHE_TTL_SECS".to_owned(), "0".to_owned()),
            ("SLUICE__GATEWAY__RATE_PER_SECOND".to_owned(), "1000000".to_owned()),
            ("SLUICE__GATEWAY__RATE_BURST".to_owned(), "1000000".to_owned()),
            // How soon the group hands a killed worker's partitions to the
            // other, which is the worker-kill fault's stall (`--env` may
            // set another).
            ("SLUICE__WORKER__SESSION_TIMEOUT_MS".to_owned(), WORKER_SESSION_MS.to_string()),
        ];
        envs.extend(user_envs.iter().cloned());
        let common =
            |role: &str| -> Vec<OsString> { vec![role.into(), "--brokers".into(), services.brokers.clone().into()] };
        let mut worker_args = common("worker");
        worker_args.extend(["--redis".into(), services.redis.clone().into(), "--models".into(), models.into()]);
        worker_args.extend(["--ops-listen".into(), "127.0.0.1:0".into()]);
        let mut gateway_args = common("gateway");
        gateway_args.extend(["--redis".into(), services.redis.clone().into(), "--listen".into(), "127.0.0.1:0".into()]);
        let mut sink_args = common("sink");
        sink_args.extend(["--lake".into(), lake.clone().into(), "--ops-listen".into(), "127.0.0.1:0".into()]);
        for s in &shards {
            sink_args.extend(["--shard".into(), s.into()]);
        }
        let start = |args: Vec<OsString>, log: &str| {
            let log = logs.join(log);
            let envs = envs.clone();
            async move { SluiceProcess::start(sluice, &args, &envs, Some(&log)).await }
        };
        let workers = vec![
            Some(start(worker_args.clone(), "worker-0.log").await?),
            Some(start(worker_args.clone(), "worker-1.log").await?),
        ];
        let sink = start(sink_args, "sink.log").await?;
        let gateway = start(gateway_args, "gateway.log").await?;
        let http = gateway.http.clone().context("the gateway serves no REST API")?;
        Ok(Deployment {
            sluice: sluice.to_owned(),
            logs,
            worker_args,
            envs,
            gateway,
            workers,
            sink,
            restarts: 0,
            http,
            prefix,
            lake,
            shards,
        })
    }

    /// What the driver sends to; memory is sampled for the first processes.
    pub fn target(&self, brokers: &str) -> Target {
        let mut pids = vec![];
        for (name, p) in [("gateway", Some(&self.gateway)), ("sink", Some(&self.sink))].into_iter().chain(
            self.workers.iter().enumerate().map(|(i, w)| (if i == 0 { "worker 0" } else { "worker 1" }, w.as_ref())),
        ) {
            if let Some(pid) = p.and_then(SluiceProcess::pid) {
                pids.push((name.to_owned(), pid));
            }
        }
        let how = format!(
            "sluice gateway + 2 × sluice worker + sluice sink (lake {}, {} PostgreSQL shards), logs in {}",
            self.lake.display(),
            self.shards.len(),
            self.logs.display()
        );
        Target::deployed(self.http.clone(), brokers.to_owned(), self.prefix.clone(), pids, how)
    }

    async fn kill_worker(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(w) = self.workers[i].take() {
            w.kill().await?;
        }
        Ok(())
    }

    async fn start_worker(&mut self, i: usize) -> anyhow::Result<()> {
        self.restarts += 1;
        let log = self.logs.join(format!("worker-{i}-restart-{}.log", self.restarts));
        self.workers[i] = Some(SluiceProcess::start(&self.sluice, &self.worker_args, &self.envs, Some(&log)).await?);
        Ok(())
    }

    /// SIGTERM to every process; the first failure is returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        let mut first = Ok(());
        let all = [Some(self.gateway), Some(self.sink)].into_iter().chain(self.workers).flatten();
        for p in all {
            if let Err(e) = p.stop().await
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

/// When each fault began and ended (seconds of the run), and what went wrong
/// injecting it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Injected {
    pub fault: Fault,
    pub began: f64,
    pub ended: f64,
    pub error: Option<String>,
}

/// Injects each fault at the start of its phase and undoes it at the end.
/// `broker_down` is set while a `broker-restart` has the broker stopped.
pub async fn inject(
    run: Arc<Run>,
    deployment: Arc<tokio::sync::Mutex<Deployment>>,
    services: Arc<Services>,
    plan: Vec<Phase>,
    faults: Vec<Fault>,
    log: Arc<Mutex<Vec<Injected>>>,
    broker_down: Arc<AtomicBool>,
) {
    let mut at = plan[0].secs;
    for (k, fault) in faults.into_iter().enumerate() {
        let secs = plan[1 + 2 * k].secs;
        sleep_until(&run, at).await;
        if run.stop.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let began = run.elapsed();
        let broke = match fault {
            Fault::WorkerKill => deployment.lock().await.kill_worker(0).await,
            Fault::RedisStop => services.ctl(&["redis", "stop"]).await,
            Fault::PgStop => services.ctl(&["pg", "0", "stop"]).await,
            Fault::BrokerRestart => {
                broker_down.store(true, Ordering::Release);
                services.ctl(&["kafka", "stop"]).await
            }
        };
        sleep_until(&run, at + secs).await;
        let mended = match fault {
            Fault::WorkerKill => deployment.lock().await.start_worker(0).await,
            Fault::RedisStop => services.ctl(&["redis", "start"]).await,
            Fault::PgStop => services.ctl(&["pg", "0", "start"]).await,
            Fault::BrokerRestart => {
                let started = services.ctl(&["kafka", "start"]).await;
                broker_down.store(false, Ordering::Release);
                started
            }
        };
        let error = broke.and(mended).err().map(|e| format!("{e:#}"));
        if let Some(e) = &error {
            eprintln!("faults: {}: {e}", fault.name());
        }
        log.lock().expect("faults log").push(Injected { fault, began, ended: run.elapsed(), error });
        at += secs + plan[2 + 2 * k].secs;
    }
}

/// The broker's supervisor (what a liveness probe and a restart policy are
/// to a broker pod): every second, unless a `broker-restart` fault has the
/// broker stopped, checks that its process runs and that it answers a
/// metadata and watermark query on `topic` (which reads its storage);
/// after two failures in a row it restarts the broker. Each crash is
/// recorded (seconds of the run). tansu 0.6 needs this: its storage loop
/// ends when a client goes away while one of its requests waits in the
/// storage queue (a SIGKILLed worker; `tansu-storage` 0.6.0,
/// `ChannelRequestService::serve` returns on the failed reply), after
/// which it resets every connection, or exits.
pub async fn supervise_broker(
    run: Arc<Run>,
    services: Arc<Services>,
    topic: String,
    broker_down: Arc<AtomicBool>,
    crashes: Arc<Mutex<Vec<f64>>>,
) -> std::convert::Infallible {
    let mut failed = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if broker_down.load(Ordering::Acquire) {
            failed = 0;
            continue;
        }
        let answers = services.ctl(&["kafka", "alive"]).await.is_ok()
            && sluice_pipeline::kafka::high_watermarks(&services.brokers, &topic).await.is_ok();
        failed = if answers { 0 } else { failed + 1 };
        if failed < 2 || broker_down.load(Ordering::Acquire) {
            continue;
        }
        failed = 0;
        let at = run.elapsed();
        eprintln!("faults: the broker stopped answering at {at:.1} s; restarting it");
        crashes.lock().expect("crashes").push(at);
        let restarted = async {
            services.ctl(&["kafka", "stop"]).await?;
            services.ctl(&["kafka", "start"]).await
        };
        if let Err(e) = restarted.await {
            eprintln!("faults: restarting the broker: {e:#}");
        }
    }
}

async fn sleep_until(run: &Run, at: f64) {
    let wait = at - run.elapsed();
    if wait > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
}

/// Where each finished job's effects are: the store's record through REST,
/// the lake and the shards through SQL. Waits (at most `limit`) for the sink
/// to land every finished job, then counts.
pub async fn audit(deployment: &Deployment, tag: &str, finished: &[String], limit: Duration) -> anyhow::Result<Value> {
    let analytics = sluice_sql::Analytics::new(
        sluice_sql::Sources { lake: Some(deployment.lake.clone()), shards: deployment.shards.clone() },
        sluice_sql::QueryLimits::new(10_000, Duration::from_secs(60)),
    )?;
    // Only this run's jobs (the warm-up's too are in the lake).
    let mine = format!("job_id LIKE '{tag}-0-%'");
    let count = |table: &'static str| {
        let (analytics, mine) = (&analytics, &mine);
        async move {
            let sql = format!("SELECT count(*) AS n, count(DISTINCT job_id) AS d FROM {table} WHERE {mine}");
            let row = analytics.query(&sql, &sluice_sql::Scope::All).await?.to_json_rows()?;
            let n = |k: &str| row[0][k].as_u64().unwrap_or(0);
            anyhow::Ok((n("n"), n("d")))
        }
    };
    let want = finished.len() as u64;
    let deadline = Instant::now() + limit;
    let (lake, shards) = loop {
        let (lake, shards) = (count("results").await?, count("shards").await?);
        if (lake.1 >= want && shards.1 >= want) || Instant::now() >= deadline {
            break (lake, shards);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let twice = |table: &'static str| {
        let (analytics, mine) = (&analytics, &mine);
        async move {
            let sql = format!("SELECT job_id FROM {table} WHERE {mine} GROUP BY job_id HAVING count(*) > 1");
            let rows = analytics.query(&sql, &sluice_sql::Scope::All).await?.to_json_rows()?;
            let ids = rows.as_array().into_iter().flatten().filter_map(|r| r["job_id"].as_str().map(str::to_owned));
            anyhow::Ok(ids.collect::<Vec<_>>())
        }
    };
    let store = store_records(&deployment.http, finished).await?;
    Ok(json!({
        "finished": want,
        "store": store,
        "lake": {"rows": lake.0, "jobs": lake.1, "missing": want.saturating_sub(lake.1), "duplicated": twice("results").await?},
        "shards": {"rows": shards.0, "jobs": shards.1, "missing": want.saturating_sub(shards.1), "duplicated": twice("shards").await?},
    }))
}

/// `GET /v1/jobs/{id}?tenant=` for every finished job (job ids are per
/// tenant): how many the store answers with a terminal record, and the ids
/// it does not.
async fn store_records(http: &str, ids: &[String]) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let (client, url, slots, id) =
            (client.clone(), format!("{http}/v1/jobs/{id}?tenant={}", super::TENANT), slots.clone(), id.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.expect("never closed");
            let got: Result<Value, reqwest::Error> = async { client.get(&url).send().await?.json().await }.await;
            let terminal = got
                .as_ref()
                .ok()
                .and_then(|v| v["status"].as_str())
                .is_some_and(|s| matches!(s, "succeeded" | "failed" | "cancelled" | "expired"));
            (id, terminal)
        });
    }
    let (mut terminal, mut not) = (0u64, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r? {
            (_, true) => terminal += 1,
            (id, false) => not.push(id),
        }
    }
    not.sort();
    Ok(json!({"terminal": terminal, "not_terminal": not.len(), "examples": not.iter().take(10).collect::<Vec<_>>()}))
}

/// The verdict: per fault, what its window's jobs went through; overall,
/// that nothing accepted was lost or landed twice anywhere.
pub fn verdict(
    book: &Book,
    phases: &[Phase],
    injected: &[Injected],
    crashes: &[f64],
    audit: &Value,
    base: Value,
) -> Value {
    let mut per_fault = Vec::new();
    let duplicated: Vec<&str> = ["lake", "shards"]
        .iter()
        .flat_map(|t| audit[*t]["duplicated"].as_array().into_iter().flatten().filter_map(Value::as_str))
        .collect();
    for inj in injected {
        // The fault's window and the recovery after it.
        let Some(k) = phases.iter().position(|p| p.name == inj.fault.name()) else { continue };
        let jobs: Vec<(&String, &super::drive::Job)> =
            book.jobs.iter().filter(|(_, j)| j.phase == k || j.phase == k + 1).collect();
        let count = |f: &dyn Fn(&super::drive::Job) -> bool| jobs.iter().filter(|(_, j)| f(j)).count();
        let mut answers: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, j) in &jobs {
            let a = match j.answer {
                Answer::Accepted => "accepted",
                Answer::Limited => "429",
                Answer::Overloaded => "503",
                Answer::Error => "error",
                Answer::Pending => "unanswered",
            };
            *answers.entry(a).or_default() += 1;
        }
        let lat: Vec<f64> = jobs.iter().filter_map(|(_, j)| j.latency_ms()).collect();
        per_fault.push(json!({
            "fault": inj.fault,
            "began_s": (inj.began * 10.0).round() / 10.0,
            "ended_s": (inj.ended * 10.0).round() / 10.0,
            "injection_error": inj.error,
            "sent": jobs.len(),
            "answers": answers,
            "finished": count(&|j| j.done.is_some()),
            "lost": count(&|j| j.answer == Answer::Accepted && j.done.is_none()),
            "redelivered_results": jobs.iter().map(|(_, j)| j.deliveries.saturating_sub(1) as u64).sum::<u64>(),
            "duplicated_in_lake_or_shards": jobs.iter().filter(|(id, _)| duplicated.contains(&id.as_str())).count(),
            "p99_ms": (!lat.is_empty()).then(|| crate::stats::percentile(&lat, 99.0).round()),
            "max_ms": lat.iter().cloned().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))).map(f64::round),
        }));
    }
    let clean = |t: &str| {
        audit[t]["missing"].as_u64() == Some(0) && audit[t]["duplicated"].as_array().is_some_and(Vec::is_empty)
    };
    let injected_all = injected.iter().all(|i| i.error.is_none());
    let store_ok = audit["store"]["not_terminal"].as_u64() == Some(0);
    let mut v = base;
    v["ok"] = json!(v["ok"] == true && injected_all && store_ok && clean("lake") && clean("shards"));
    v["faults"] = json!(per_fault);
    // Where each broker crash fell: the phase running at the time.
    let mut ends = Vec::new();
    let mut t = 0.0;
    for p in phases {
        t += p.secs;
        ends.push((t, p.name.clone()));
    }
    let during = |at: f64| ends.iter().find(|(end, _)| at < *end).map_or("drain".to_owned(), |(_, n)| n.clone());
    v["broker_crashes"] = json!(
        crashes.iter().map(|at| json!({"at_s": (at * 10.0).round() / 10.0, "during": during(*at)})).collect::<Vec<_>>()
    );
    v["effects"] = audit.clone();
    v
}

/// Ids of the run's jobs that finished.
pub fn finished_ids(book: &Book) -> Vec<String> {
    book.jobs.iter().filter(|(_, j)| j.done.is_some()).map(|(id, _)| id.clone()).collect()
}

/// `--faults` needs what it breaks.
pub fn check(faults: &[Fault], services: &Services) -> anyhow::Result<()> {
    if faults.contains(&Fault::PgStop) && services.pg.is_empty() {
        bail!("pg-stop needs a PostgreSQL cluster (services.sh start with PG_CLUSTERS >= 1)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::drive::Job;

    fn job(phase: usize, answer: Answer, done: Option<f64>, deliveries: u32) -> Job {
        Job { answer, done, deliveries, ..Job::new(0, phase, phase as f64) }
    }

    #[test]
    fn the_verdict_counts_each_faults_window_and_fails_on_a_loss_or_a_duplicate() {
        let faults = [Fault::RedisStop, Fault::PgStop];
        let phases = phases(&faults, 10.0, 5.0, 3.0, 5.0);
        let names: Vec<&str> = phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["before", "redis-stop", "after redis-stop", "pg-stop", "after pg-stop"]);
        let mut book = Book::default();
        book.jobs.insert("t-0-0".into(), job(0, Answer::Accepted, Some(1.0), 1));
        book.jobs.insert("t-0-1".into(), job(1, Answer::Overloaded, None, 0));
        book.jobs.insert("t-0-2".into(), job(2, Answer::Accepted, Some(9.0), 2));
        book.jobs.insert("t-0-3".into(), job(3, Answer::Accepted, None, 0));
        book.jobs.insert("t-0-4".into(), job(4, Answer::Accepted, Some(20.0), 1));
        let injected = [
            Injected { fault: Fault::RedisStop, began: 5.0, ended: 8.0, error: None },
            Injected { fault: Fault::PgStop, began: 13.0, ended: 16.0, error: None },
        ];
        let audit = |dups: Vec<&str>| {
            json!({
                "finished": 3,
                "store": {"terminal": 3, "not_terminal": 0},
                "lake": {"missing": 0, "duplicated": dups},
                "shards": {"missing": 0, "duplicated": []},
            })
        };
        let v = verdict(&book, &phases, &injected, &[14.5, 30.0], &audit(vec![]), json!({"ok": true}));
        let f = &v["faults"];
        assert_eq!(f[0]["sent"], 2, "the fault's window and the phase after it: {f}");
        assert_eq!(f[0]["answers"], json!({"503": 1, "accepted": 1}));
        assert_eq!((f[0]["finished"].clone(), f[0]["lost"].clone()), (json!(1), json!(0)));
        assert_eq!(f[0]["redelivered_results"], 1);
        assert_eq!((f[1]["finished"].clone(), f[1]["lost"].clone()), (json!(1), json!(1)));
        assert_eq!(
            v["broker_crashes"],
            json!([{"at_s": 14.5, "during": "pg-stop"}, {"at_s": 30.0, "during": "drain"}])
        );
        assert_eq!(v["ok"], true, "the loss is the base verdict's to judge (unfinished): {v}");
        let dup = verdict(&book, &phases, &injected, &[], &audit(vec!["t-0-4"]), json!({"ok": true}));
        assert_eq!(dup["ok"], false);
        assert_eq!(dup["faults"][1]["duplicated_in_lake_or_shards"], 1);
        let failed = [Injected { error: Some("ctl: no".into()), ..injected[0].clone() }];
        assert_eq!(verdict(&book, &phases, &failed, &[], &audit(vec![]), json!({"ok": true}))["ok"], false);
    }
}
