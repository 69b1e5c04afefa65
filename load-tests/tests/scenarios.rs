//! Every load scenario as a seconds-long smoke run (so the scripts never
//! rot): `sluice-load <scenario>` starts its own `sluice up`, drives it, and
//! writes a report; each test checks the report's numbers against what it
//! sent, and the HTML report is rendered by headless Chromium, whose page
//! must hold the plots.
//!
//! Environment (set by `make test`): SLUICE_BIN (the `sluice` binary),
//! SLUICE_MODEL_REPO, ORT_DYLIB_PATH, SLUICE_TEST_BROKERS and
//! SLUICE_TEST_REDIS (tansu and Redis); `chromium` on the PATH.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// One `sluice up` at a time: they share 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn need(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run these through `make test`"))
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-load-smoke-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs `sluice-load <args> --out <dir>` and returns its report and exit status.
fn run(name: &str, args: &[&str]) -> (Value, bool, PathBuf) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    run_alone(name, args)
}

/// [`run`], for a caller that holds [`SERIAL`].
fn run_alone(name: &str, args: &[&str]) -> (Value, bool, PathBuf) {
    let dir = out_dir(name);
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-load"))
        .args(args)
        .arg("--out")
        .arg(&dir)
        .env("SLUICE_BIN", need("SLUICE_BIN"))
        .env("SLUICE_MODEL_REPO", need("SLUICE_MODEL_REPO"))
        .output()
        .expect("sluice-load runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    let report = std::fs::read(dir.join("report.json"))
        .unwrap_or_else(|e| panic!("{name}: no report.json ({e}); stdout:\n{stdout}\nstderr:\n{stderr}"));
    (serde_json::from_slice(&report).expect("report.json is JSON"), out.status.success(), dir)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn steady_through_kafka_finishes_every_job_and_dead_letters_every_poison_record() {
    let (r, ok, _) = run(
        "steady",
        &["steady", "--via", "kafka", "--rate", "25", "--duration", "4", "--poison", "0.2", "--corpus", "short"],
    );
    assert!(ok, "verdict: {}", r["verdict"]);
    // 100 records due, one in five poison.
    assert_eq!(u(&r["poison"]["sent"]), 20);
    assert_eq!(u(&r["poison"]["dead_lettered"]), 20, "{}", r["poison"]);
    let codes = r["poison"]["codes"].as_object().unwrap();
    assert!(codes.keys().all(|c| !c.is_empty()), "every dead letter has a code: {codes:?}");
    assert_eq!(u(&r["total"]["sent"]), 80);
    assert_eq!(u(&r["total"]["accepted"]), 80);
    assert_eq!(u(&r["total"]["finished"]), 80);
    assert_eq!(u(&r["total"]["statuses"]["succeeded"]), 80);
    assert_eq!(u(&r["poison"]["good_jobs_dead_lettered"]), 0);
    // The pipeline's own timings came back with the results.
    let lat = &r["total"]["latency_ms"];
    assert!(u(&lat["p99"]) >= u(&lat["p50"]) && u(&lat["max"]) >= u(&lat["p99"]), "{lat}");
    assert!(r["total"]["inference_ms"]["p50"].is_u64(), "{}", r["total"]);
    let batched: u64 = r["batch_sizes"].as_object().unwrap().values().map(u).sum();
    assert_eq!(batched, 80, "every job's batch size is in the histogram");
    let timeline = r["timeline"].as_array().unwrap();
    assert_eq!(timeline.iter().map(|s| u(&s["sent"])).sum::<u64>(), 80);
    assert_eq!(timeline.iter().map(|s| u(&s["completed"])).sum::<u64>(), 80);
    assert_eq!(u(&timeline.last().unwrap()["backlog"]), 0);
}

#[test]
fn capacity_stops_after_the_first_step_that_misses_the_target() {
    // A target no system meets: the first step cannot hold, and sending
    // stops after the step under way when it was judged.
    let (r, ok, _) = run(
        "capacity",
        &[
            "capacity",
            "--corpus",
            "tensor",
            "--start-rate",
            "20",
            "--factor",
            "2",
            "--step-secs",
            "2",
            "--p99-ms",
            "1",
            "--max-rate",
            "1000",
        ],
    );
    let v = &r["verdict"];
    assert!(ok, "nothing lost, so the run itself passes: {v}");
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{v}");
    assert_eq!(steps[0]["held"], false);
    assert!(v["capacity_per_s"].is_null());
    assert_eq!(v["found_limit"], true);
    let phases = r["phases"].as_array().unwrap();
    assert!(phases.len() <= 2, "sending stopped after the judged step: {} phases of 6 planned", phases.len());
    assert_eq!(u(&r["total"]["unfinished"]), 0);
}

#[test]
fn capacity_reports_the_last_rate_that_held() {
    let (r, ok, _) = run(
        "capacity-held",
        &[
            "capacity",
            "--corpus",
            "tensor",
            "--start-rate",
            "10",
            "--factor",
            "2",
            "--step-secs",
            "2",
            "--p99-ms",
            "3000",
            "--max-rate",
            "40",
        ],
    );
    let v = &r["verdict"];
    assert!(ok, "{v}");
    let rates: Vec<f64> = v["steps"].as_array().unwrap().iter().map(|s| s["rate"].as_f64().unwrap()).collect();
    assert_eq!(rates, vec![10.0, 20.0, 40.0], "{v}");
    assert_eq!(v["capacity_per_s"], 40.0);
    assert_eq!(v["found_limit"], false, "every step held: the limit lies above --max-rate");
}

#[test]
fn a_spike_is_absorbed_and_every_accepted_job_finishes() {
    let (r, ok, _) = run(
        "spike",
        &[
            "spike",
            "--corpus",
            "short",
            "--rate",
            "10",
            "--factor",
            "6",
            "--before-secs",
            "2",
            "--spike-secs",
            "2",
            "--after-secs",
            "3",
        ],
    );
    let v = &r["verdict"];
    assert!(ok, "{v}");
    let phases = r["phases"].as_array().unwrap();
    let sent: Vec<u64> = phases.iter().map(|p| u(&p["sent"])).collect();
    assert_eq!(sent, vec![20, 120, 30], "baseline, spike, after");
    assert_eq!(u(&v["unfinished"]), 0);
    assert!(v["drain_secs_after_spike"].is_number(), "{v}");
    assert!(u(&v["rss_peak_bytes"]["sluice up"]) > 10 << 20, "{v}");
    assert!(!r["rss_bytes"]["sluice up"].as_array().unwrap().is_empty());
}

#[test]
fn a_noisy_tenant_is_limited_and_the_quiet_one_is_not() {
    let (r, ok, _) = run(
        "tenants",
        &[
            "tenants",
            "--corpus",
            "short",
            "--limit",
            "10",
            "--quiet-rate",
            "5",
            "--noisy-rate",
            "60",
            "--duration",
            "4",
        ],
    );
    let v = &r["verdict"];
    assert!(ok, "{v}");
    assert_eq!(v["quiet"]["accepted_share"], 1.0, "{v}");
    assert_eq!(u(&v["quiet"]["limited"]), 0);
    // 240 sent, about 10/s + a burst of 10 accepted: most refused.
    assert!(u(&v["noisy"]["limited"]) >= 150, "{v}");
    let streams = r["streams"].as_array().unwrap();
    assert_eq!(u(&streams[0]["sent"]), 20);
    assert_eq!(u(&streams[1]["sent"]), 240);
    assert_eq!(u(&r["total"]["unfinished"]), 0);
}

/// A `sluice gateway` or `sluice worker` of the test's own, killed on drop.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `sluice <args>` and returns it with the REST address from its
/// ready file (for a gateway).
fn start(args: &[&str], prefix: &str) -> (Process, Option<String>) {
    let ready = std::env::temp_dir().join(format!("sluice-load-smoke-{}-{}.ready", std::process::id(), args[0]));
    let _ = std::fs::remove_file(&ready);
    let child = Command::new(need("SLUICE_BIN"))
        .args(args)
        .arg("--ready-file")
        .arg(&ready)
        .env("SLUICE__KAFKA__TOPIC_PREFIX", prefix)
        .env("SLUICE__STORE__KEY_PREFIX", format!("{prefix}:"))
        .env("SLUICE__STORE__CACHE_TTL_SECS", "0")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("sluice starts");
    let mut process = Process(child);
    for _ in 0..1200 {
        if let Ok(bytes) = std::fs::read(&ready)
            && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
        {
            return (process, v["http"].as_str().map(str::to_owned));
        }
        assert!(process.0.try_wait().unwrap().is_none(), "sluice {} exited before it was ready", args[0]);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("sluice {} not ready after 120 s", args[0]);
}

/// `steady` against a deployment it did not start: a gateway and a worker as
/// separate processes on the real broker (tansu) and Redis, as `make test`
/// runs them; jobs through REST, results read from the deployment's topic.
#[test]
fn steady_drives_a_deployment_of_separate_processes_on_the_real_broker() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (brokers, redis, models) = (need("SLUICE_TEST_BROKERS"), need("SLUICE_TEST_REDIS"), need("SLUICE_MODEL_REPO"));
    let prefix = format!("loadsmoke{}", std::process::id());
    let (_worker, _) = start(
        &["worker", "--brokers", &brokers, "--redis", &redis, "--models", &models, "--ops-listen", "127.0.0.1:0"],
        &prefix,
    );
    let (_gateway, http) =
        start(&["gateway", "--brokers", &brokers, "--redis", &redis, "--listen", "127.0.0.1:0"], &prefix);
    let http = http.expect("the gateway's REST address");
    let (r, ok, _) = run_alone(
        "separate",
        &[
            "steady",
            "--http",
            &http,
            "--brokers",
            &brokers,
            "--topic-prefix",
            &prefix,
            "--corpus",
            "short",
            "--rate",
            "10",
            "--duration",
            "4",
        ],
    );
    assert!(ok, "{}", r["verdict"]);
    assert_eq!(r["target"]["started"], Value::Null, "nothing started by the tool");
    assert_eq!(u(&r["total"]["sent"]), 40);
    assert_eq!(u(&r["total"]["finished"]), 40);
    assert_eq!(u(&r["total"]["statuses"]["succeeded"]), 40);
}

/// The HTML report, rendered by a real browser, shows its plots.
#[test]
fn the_html_report_renders_with_its_plots_in_a_browser() {
    let (_, ok, dir) = run("render", &["steady", "--corpus", "short", "--rate", "20", "--duration", "3"]);
    assert!(ok);
    let html = dir.join("report.html");
    let url = format!("file://{}", html.display());
    let chromium = |extra: &[&str]| {
        let out = Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,2600"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium runs (make test installs Debian's chromium)");
        assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let dom = String::from_utf8(chromium(&["--dump-dom"])).unwrap();
    let svgs = dom.matches("<svg").count();
    assert!(svgs >= 5, "throughput, latency, backlog, batch sizes and memory: {svgs} plots in the rendered page");
    assert!(dom.matches("<polyline").count() >= 6, "the plots have lines");
    let png = dir.join("report.png");
    chromium(&[&format!("--screenshot={}", png.display())]);
    let (dark, total) = ink(&png);
    assert!(total > 1_000_000, "a 1100×2600 screenshot");
    // Text and plot lines: far more ink than a page of tables alone.
    assert!(dark as f64 / total as f64 > 0.01, "{dark} of {total} pixels are not white");
}

/// Pixels of a PNG screenshot that are not near-white, and all pixels.
fn ink(png: &Path) -> (u64, u64) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).expect("a screenshot")));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = info.color_type.samples();
    let px = &buf[..info.buffer_size()];
    let dark = px.chunks(channels).filter(|p| p.iter().take(3).any(|&c| c < 200)).count() as u64;
    (dark, (info.width as u64) * (info.height as u64))
}

/// Services of the test's own (`services.sh start`, one PostgreSQL cluster):
/// the faults stop and restart them. Stopped on drop.
struct OwnServices(PathBuf);

impl OwnServices {
    fn start(name: &str) -> OwnServices {
        let dir = out_dir(name);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/services.sh");
        let out = Command::new(&script).arg("start").arg(&dir).env("PG_CLUSTERS", "1").output().unwrap();
        assert!(out.status.success(), "services.sh start: {}", String::from_utf8_lossy(&out.stderr));
        OwnServices(dir)
    }
}

impl Drop for OwnServices {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/services.sh");
        let _ = Command::new(script).arg("stop").arg(&self.0).output();
    }
}

/// `faults` with a worker SIGKILLed, then Redis and a PostgreSQL shard
/// stopped, for 3 s each, at 10 jobs/s through a gateway, two workers and a
/// sink of its own: every accepted job finishes, its record in the store is
/// terminal, and the lake and the shards hold it exactly once (a worker
/// killed between the results topic's acknowledgement and the published
/// mark publishes a result twice: the lake must land it once); each fault's
/// window is in the verdict. The killed worker's partitions wait for its
/// session (10 s here) and, on tansu, for the survivor's rejoin (20 s).
///
/// Not here: `broker-restart`. A restarted tansu 0.6 panics in its SQLite
/// storage on its first produce (`more or less than one row`), so the
/// verdict would judge the broker, not Sluice (measured with `make load`;
/// see the README).
#[test]
fn faults_lose_nothing_and_land_every_finished_job_exactly_once() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let services = OwnServices::start("faults-services");
    let (r, ok, _) = run_alone(
        "faults",
        &[
            "faults",
            "--services",
            services.0.to_str().unwrap(),
            "--corpus",
            "short",
            "--rate",
            "10",
            "--fault-secs",
            "3",
            "--gap-secs",
            "5",
            "--faults",
            "worker-kill,redis-stop,pg-stop",
            "--drain-secs",
            "240",
        ],
    );
    let v = &r["verdict"];
    assert!(ok, "verdict: {v}");
    let faults: Vec<&str> = v["faults"].as_array().unwrap().iter().map(|f| f["fault"].as_str().unwrap()).collect();
    assert_eq!(faults, ["worker-kill", "redis-stop", "pg-stop"]);
    for f in v["faults"].as_array().unwrap() {
        assert_eq!(f["injection_error"], Value::Null, "{f}");
        assert_eq!(u(&f["lost"]), 0, "{f}");
        assert_eq!(u(&f["sent"]), 80, "3 s of fault and 5 s after, at 10/s: {f}");
    }
    // 5 s before and 3 × 8 s of faults and after, at 10/s.
    assert_eq!(u(&r["total"]["sent"]), 290);
    assert_eq!(v["broker_crashes"], serde_json::json!([]), "{v}");
    let accepted = u(&v["accepted"]);
    assert!(accepted > 0 && accepted == u(&r["total"]["finished"]), "{v}");
    let effects = &v["effects"];
    assert_eq!(u(&effects["finished"]), accepted);
    assert_eq!(u(&effects["store"]["terminal"]), accepted, "{effects}");
    for place in ["lake", "shards"] {
        assert_eq!(u(&effects[place]["jobs"]), accepted, "{effects}");
        assert_eq!(u(&effects[place]["rows"]), accepted, "exactly once: {effects}");
    }
}
