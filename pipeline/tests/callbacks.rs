//! End-to-end tests of completion callbacks: real HTTP receivers on
//! loopback (allowed by `callbacks.allow_networks`), the real `sluice
//! notifier` binary (SIGKILLed mid-run), and a whole `sluice up` whose
//! gateway refuses disallowed destinations at submission.
//!
//! The notifier tests run on the embedded broker (librdkafka's mock
//! cluster) started in the test process: a replacement notifier joins the
//! killed one's consumer group and must resume from its committed offsets,
//! which tansu 0.6's group coordinator does not hand over reliably (see
//! ARCHITECTURE.md, `kafka/`).

mod support;

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, StatusCode};
use sluice_schemas::callback::{self as cb, SignatureError};
use support::*;

const SIGNING_KEY: &str = "test-signing-key";

/// What a receiver was sent.
#[derive(Default)]
struct Seen {
    /// Delivery id → times received.
    by_id: HashMap<String, usize>,
    /// Delivery id → (job id, event header, body status), of jobs.
    jobs: HashMap<String, (String, String, String)>,
    /// Delivery id → (`Sluice-Batch-Id`, body), of `batch.completed`.
    batches: HashMap<String, (String, Value)>,
    /// Deliveries whose signature did not verify.
    bad_signatures: usize,
    /// One delivery as received: (signature header, tenant, body).
    sample: Option<(String, String, Vec<u8>)>,
    requests: usize,
    first_ok: Option<Instant>,
    /// When each distinct delivery arrived.
    arrivals: Vec<Instant>,
}

/// How a receiver answers.
#[derive(Clone, Copy)]
enum Mode {
    Ok,
    /// 500 until this instant, then 200.
    FailUntil(Instant),
    /// Never answers (holds the connection).
    Hang,
}

struct Receiver {
    url: String,
    seen: Arc<Mutex<Seen>>,
}

impl Receiver {
    /// On 127.0.0.2: loopback, the address the tests allow.
    async fn start(mode: Mode) -> Receiver {
        Receiver::start_on("127.0.0.2", mode).await
    }

    async fn start_on(ip: &str, mode: Mode) -> Receiver {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = seen.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let now = Instant::now();
                state.lock().unwrap().requests += 1;
                match mode {
                    Mode::Hang => std::future::pending::<()>().await,
                    Mode::FailUntil(t) if now < t => return StatusCode::INTERNAL_SERVER_ERROR,
                    _ => {}
                }
                let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let (tenant, signature, id) =
                    (h(cb::TENANT_HEADER), h(cb::SIGNATURE_HEADER), h(cb::DELIVERY_ID_HEADER));
                let secret = cb::tenant_secret(SIGNING_KEY, &tenant);
                let verified = cb::verify(&secret, &signature, &body, chrono::Utc::now().timestamp(), 300);
                let record: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let mut s = state.lock().unwrap();
                s.bad_signatures += verified.is_err() as usize;
                s.first_ok.get_or_insert(now);
                let n = s.by_id.entry(id.clone()).or_default();
                *n += 1;
                if *n == 1 {
                    s.arrivals.push(now);
                }
                if h(cb::EVENT_HEADER) == sluice_schemas::batch::COMPLETED_EVENT {
                    s.batches.insert(id, (h(cb::BATCH_ID_HEADER), record));
                } else {
                    let job = (
                        record["job_id"].as_str().unwrap_or("").to_owned(),
                        h(cb::EVENT_HEADER),
                        record["status"].as_str().unwrap_or("").to_owned(),
                    );
                    s.jobs.insert(id, job);
                }
                if s.sample.is_none() {
                    s.sample = Some((signature, tenant, body.to_vec()));
                }
                StatusCode::NO_CONTENT
            }
        });
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let url = format!("http://{}/hooks/sluice", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, seen }
    }

    fn unique(&self) -> usize {
        self.seen.lock().unwrap().by_id.len()
    }

    async fn wait_unique(&self, n: usize, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let got = self.unique();
            if got >= n {
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "{got} of {n} callbacks after {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An embedded broker with the results and callbacks dead-letter topics.
fn broker(prefix: &str) -> sluice_pipeline::kafka::EmbeddedBroker {
    let broker = sluice_pipeline::kafka::EmbeddedBroker::start().unwrap();
    // Every topic `sluice notifier` would make (the mock cluster has no
    // admin API to make them with; `sluice up` makes them through it).
    for topic in [format!("{prefix}.results"), format!("{prefix}.dlq"), format!("{prefix}.callbacks.dlq")] {
        broker.create_topic(&topic, 4).unwrap();
    }
    broker
}

/// Results `<tag>-<lo..hi>` with a callback to `url` (of `tenant`, or of
/// five tenants), on `<prefix>.results`.
fn results_with_callback(
    brokers: &str,
    prefix: &str,
    tag: &str,
    range: std::ops::Range<usize>,
    url: &str,
    tenant: Option<&str>,
) {
    let mut args: Vec<String> =
        ["produce-results", "--brokers", brokers, "--topic", &format!("{prefix}.results")].map(String::from).into();
    args.extend([
        "--tag".into(),
        tag.into(),
        "--lo".into(),
        range.start.to_string(),
        "--hi".into(),
        range.end.to_string(),
    ]);
    args.extend(["--callback".into(), url.into()]);
    if let Some(t) = tenant {
        args.extend(["--tenant".into(), t.into()]);
    }
    kafka_client(&args, "");
}

/// Results `<tag>-<range>` as lines `range` of `tenant`'s batch `id` of
/// `total` lines, whose completion goes to `url`; each line with a job
/// callback to `url` too when `job_callbacks`.
#[allow(clippy::too_many_arguments)]
fn batch_lines(
    brokers: &str,
    prefix: &str,
    tenant: &str,
    id: &str,
    total: usize,
    range: std::ops::Range<usize>,
    url: &str,
    job_callbacks: bool,
) {
    let mut args: Vec<String> =
        ["produce-results", "--brokers", brokers, "--topic", &format!("{prefix}.results")].map(String::from).into();
    for (flag, value) in [
        ("--tag", id.to_owned()),
        ("--tenant", tenant.to_owned()),
        ("--lo", range.start.to_string()),
        ("--hi", range.end.to_string()),
        ("--batch-id", id.to_owned()),
        ("--batch-total", total.to_string()),
        ("--batch-callback", url.to_owned()),
    ] {
        args.extend([flag.to_owned(), value]);
    }
    if job_callbacks {
        args.extend(["--callback".into(), url.into()]);
    }
    kafka_client(&args, "");
}

/// Up to `n` records of `<prefix>.callbacks.dlq` (waiting a few seconds
/// for them).
async fn dead_letters(brokers: &str, prefix: &str, n: usize) -> Vec<Value> {
    let args = ["consume", "--brokers", brokers, "--topic", &format!("{prefix}.callbacks.dlq")].map(String::from);
    let mut args: Vec<String> = args.into();
    args.extend(["--count".into(), (n + 1).to_string(), "--timeout".into(), "5".into()]);
    python(args, String::new()).await.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A `sluice notifier` process in group `<prefix>.notifier`.
fn start_notifier(brokers: &str, prefix: &str, run: usize, extra: &str) -> KillOnDrop {
    let config = scratch(prefix).join(format!("notifier-{run}.toml"));
    let redis = env("SLUICE_TEST_REDIS");
    let toml = format!(
        "[kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\npartitions = 4\n\
         [ops]\nlisten = \"127.0.0.1:0\"\n\
         [store]\nredis = \"{redis}\"\nkey_prefix = \"{prefix}:\"\n\
         [callbacks]\nsigning_key = \"{SIGNING_KEY}\"\nallow_networks = [\"127.0.0.2/32\"]\n\
         session_timeout_ms = 6000\nmax_poll_interval_ms = 20000\n{extra}\n"
    );
    std::fs::write(&config, toml).unwrap();
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["notifier", "--config"])
            .arg(&config)
            .env("RUST_LOG", std::env::var("SLUICE_TEST_NOTIFIER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("sluice notifier starts"),
    )
}

/// 10,000 finished jobs with callbacks, the notifier SIGKILLed once
/// mid-run and replaced in the same consumer group: every job is delivered
/// at least once, the receiver (deduping by `Sluice-Delivery-Id`) sees each
/// exactly once, every signature verifies, a tampered body does not, and
/// the group ends with every offset committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_callback_arrives_through_a_sigkill_and_dedupes_by_delivery_id() {
    let prefix = unique_prefix("callbacks");
    let broker = broker(&prefix);
    let brokers = broker.bootstrap().to_owned();
    let receiver = Receiver::start(Mode::Ok).await;
    let n = 10_000;
    results_with_callback(&brokers, &prefix, "cb", 0..n, &receiver.url, None);

    // Killed once the group has committed past a varying point: what it
    // committed must not be delivered again, what it had not may be.
    let jitter =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() % 3000) as i64;
    let kill_at = 2_000 + jitter;
    let probe =
        sluice_pipeline::kafka::LagProbe::new(&brokers, &format!("{prefix}.notifier"), &format!("{prefix}.results"))
            .unwrap();
    // Two requests at a time: slow enough to be killed mid-run.
    let mut notifier = start_notifier(&brokers, &prefix, 0, "per_host_concurrency = 2");
    let started = Instant::now();
    let committed = loop {
        let committed = probe.progress().await.map(|p| p.committed).unwrap_or(0);
        if committed >= kill_at {
            break committed;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the notifier committed {committed} offsets in 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    notifier.0.kill().unwrap(); // SIGKILL: nothing committed on the way out
    notifier.0.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // requests sent before the kill, handled
    let at_kill = receiver.unique();
    assert!(at_kill < n, "killed mid-run, not after it ({at_kill} delivered)");
    println!("callbacks: SIGKILL with {committed} offsets committed and {at_kill} distinct deliveries made");

    let _notifier = start_notifier(&brokers, &prefix, 1, "");
    let took = receiver.wait_unique(n, Duration::from_secs(240)).await;
    let started = Instant::now();
    while probe.lag().await.unwrap_or(i64::MAX) != 0 {
        assert!(started.elapsed() < Duration::from_secs(60), "the notifier group never committed everything");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert_eq!(
        dead_letters(&brokers, &prefix, 1).await,
        Vec::<Value>::new(),
        "a burst to a healthy receiver is held, not dropped"
    );
    let seen = receiver.seen.lock().unwrap();
    let repeats: usize = seen.by_id.values().map(|c| c - 1).sum();
    println!(
        "callbacks: {n} distinct deliveries ({} requests, {repeats} repeated after the SIGKILL); the rest {:.1} s after the restart",
        seen.requests,
        took.as_secs_f64()
    );
    assert_eq!(seen.by_id.len(), n, "one delivery id per finished job");
    assert!(
        repeats <= at_kill - committed as usize,
        "{repeats} repeated, but only the {} delivered past the committed offsets may be",
        at_kill - committed as usize
    );
    let mut jobs: Vec<&str> = seen.jobs.values().map(|(j, _, _)| j.as_str()).collect();
    jobs.sort_unstable();
    jobs.dedup();
    assert_eq!(jobs.len(), n, "every job delivered, none under two ids");
    for (job, event, status) in seen.jobs.values() {
        assert_eq!(event, &format!("job.{status}"), "{job}: the event header is the body's status");
    }
    assert_eq!(seen.bad_signatures, 0, "every delivery's signature verifies");
    let (signature, tenant, mut body) = seen.sample.clone().unwrap();
    let secret = cb::tenant_secret(SIGNING_KEY, &tenant);
    let now = chrono::Utc::now().timestamp();
    assert_eq!(cb::verify(&secret, &signature, &body, now, 300), Ok(()));
    let at = body.iter().position(|b| *b == b':').unwrap();
    body[at + 2] ^= 1; // one bit of the body
    assert_eq!(cb::verify(&secret, &signature, &body, now, 300), Err(SignatureError::Mismatch));
    assert_eq!(
        cb::verify(
            &cb::tenant_secret(SIGNING_KEY, "someone-else"),
            &signature,
            &seen.sample.as_ref().unwrap().2,
            now,
            300
        ),
        Err(SignatureError::Mismatch),
        "another tenant's secret does not verify it"
    );
}

/// Waits until `group` has committed all of `<prefix>.results`.
async fn drained(brokers: &str, prefix: &str, group: &str) {
    let probe = sluice_pipeline::kafka::LagProbe::new(brokers, group, &format!("{prefix}.results")).unwrap();
    let started = Instant::now();
    while probe.lag().await.unwrap_or(i64::MAX) != 0 {
        assert!(started.elapsed() < Duration::from_secs(120), "{group} never committed everything");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two batches of 1,500 lines (two tenants) finishing in two waves, the
/// notifier SIGKILLed during the second and replaced: no batch is
/// announced before its last line is counted; each is announced once
/// complete, under its own delivery id, with its lines counted by status
/// (each once, whatever the replays); the lines' own callbacks, which
/// share their offsets with the counts, all arrive; and a new consumer
/// group that replays the whole topic announces neither batch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_announced_once_it_is_complete_through_a_sigkill_and_a_replay() {
    let prefix = unique_prefix("cbbatch");
    let broker = broker(&prefix);
    let brokers = broker.bootstrap().to_owned();
    let receiver = Receiver::start(Mode::Ok).await;
    let (total, half) = (1500, 750);
    let group = format!("{prefix}.notifier");
    let batches = [("acme", "batch_a", true), ("globex", "batch_b", false)];

    // The first half of each: counted, and neither batch announced.
    let mut notifier = start_notifier(&brokers, &prefix, 0, "per_host_concurrency = 2");
    for (tenant, id, job_callbacks) in batches {
        batch_lines(&brokers, &prefix, tenant, id, total, 0..half, &receiver.url, job_callbacks);
    }
    drained(&brokers, &prefix, &group).await;
    receiver.wait_unique(half, Duration::from_secs(60)).await;
    assert!(receiver.seen.lock().unwrap().batches.is_empty(), "announced before its last line was counted");

    // The second half, with the notifier killed once the group has
    // committed past a quarter of it.
    for (tenant, id, job_callbacks) in batches {
        batch_lines(&brokers, &prefix, tenant, id, total, half..total, &receiver.url, job_callbacks);
    }
    let probe = sluice_pipeline::kafka::LagProbe::new(&brokers, &group, &format!("{prefix}.results")).unwrap();
    let kill_at = (2 * half + half / 2) as i64;
    let started = Instant::now();
    while probe.progress().await.map(|p| p.committed).unwrap_or(0) < kill_at {
        assert!(started.elapsed() < Duration::from_secs(120), "the notifier never committed {kill_at} offsets");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    notifier.0.kill().unwrap();
    notifier.0.wait().unwrap();
    let announced_at_kill = receiver.seen.lock().unwrap().batches.len();
    let _notifier = start_notifier(&brokers, &prefix, 1, "");
    receiver.wait_unique(total + 2, Duration::from_secs(120)).await;
    drained(&brokers, &prefix, &group).await;

    let deliveries_of = |seen: &Seen| -> Vec<usize> {
        let mut ids: Vec<&String> = seen.batches.keys().collect();
        ids.sort();
        ids.iter().map(|id| seen.by_id[*id]).collect()
    };
    let before_replay = {
        let seen = receiver.seen.lock().unwrap();
        println!(
            "batch callbacks: {announced_at_kill} of 2 batches announced at the SIGKILL; deliveries of each {:?}; {} requests in all",
            deliveries_of(&seen),
            seen.requests
        );
        assert_eq!(seen.batches.len(), 2, "each batch under one delivery id");
        for (tenant, id, _) in batches {
            let delivery = sluice_schemas::batch::completed_delivery_id(tenant, id);
            let (header, body) = &seen.batches.get(&delivery).unwrap_or_else(|| panic!("{id} announced as {delivery}"));
            assert_eq!(header, id);
            assert_eq!(body["object"], "batch");
            assert_eq!((body["id"].as_str(), body["tenant"].as_str()), (Some(id), Some(tenant)));
            assert_eq!(body["status"], "completed");
            assert_eq!(body["total"], total);
            // kafka_client.py fails one result in ten.
            assert_eq!(body["counts"], json!({"failed": total / 10, "succeeded": total - total / 10}), "{id}");
            assert_eq!(body["results_url"], format!("/v1/batches/{id}/results"));
        }
        let jobs: std::collections::HashSet<&str> = seen.jobs.values().map(|(j, _, _)| j.as_str()).collect();
        assert_eq!(jobs.len(), total, "every line's own callback, beside the counts");
        assert!(jobs.iter().all(|j| j.starts_with("batch_a-")));
        assert_eq!(seen.bad_signatures, 0);
        deliveries_of(&seen)
    };

    // Another group reads the whole topic again: every line is counted
    // again (and ignored), and neither batch is announced a second time.
    let replay = format!("{prefix}.replay");
    let _replayer = start_notifier(&brokers, &prefix, 2, &format!("consumer_group = \"{replay}\""));
    drained(&brokers, &prefix, &replay).await;
    let seen = receiver.seen.lock().unwrap();
    assert_eq!(deliveries_of(&seen), before_replay, "a replayed line does not announce its batch again");
    assert!(seen.jobs.len() == total && seen.by_id.len() == total + 2, "a replay repeats ids, makes none");
}

/// A receiver that answers 500 for its first 10 s gets every callback
/// after it recovers; none is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_for_10s_gets_everything_after_it_recovers() {
    let prefix = unique_prefix("cbretry");
    let broker = broker(&prefix);
    let brokers = broker.bootstrap().to_owned();
    let recovers = Instant::now() + Duration::from_secs(10);
    let receiver = Receiver::start(Mode::FailUntil(recovers)).await;
    let n = 300;
    results_with_callback(&brokers, &prefix, "retry", 0..n, &receiver.url, None);
    let _notifier =
        start_notifier(&brokers, &prefix, 0, "retry_initial_ms = 200\nretry_max_ms = 2000\nmax_attempts = 50");
    receiver.wait_unique(n, Duration::from_secs(90)).await;
    {
        let seen = receiver.seen.lock().unwrap();
        assert!(seen.first_ok.unwrap() >= recovers, "nothing was accepted before the receiver recovered");
        assert!(seen.requests > n, "the 500s were retried ({} requests for {n} callbacks)", seen.requests);
        assert_eq!(seen.by_id.len(), n);
    }
    assert_eq!(dead_letters(&brokers, &prefix, 1).await, Vec::<Value>::new(), "nothing dead-lettered");
}

/// One tenant's receiver never answers; another tenant's callbacks go on
/// at the pace they had alone. Measured: the time for 1,000 callbacks of
/// the healthy tenant alone, then with 300 callbacks to the hung receiver
/// queued ahead of them on the same partitions. Its slots
/// (`per_host_concurrency`) are the hung receiver's own, so the healthy
/// tenant's callbacks must all arrive while the hung one has answered
/// nothing at all. Then 1,000 more to the hung receiver: it holds
/// `per_host_pending` (1,000) callbacks, and once it has not kept up for
/// `slow_after_ms` the other 300 are dead-lettered (`callback_saturated`)
/// instead of held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_does_not_slow_another_tenants_callbacks() {
    let prefix = unique_prefix("cbhung");
    let broker = broker(&prefix);
    let brokers = broker.bootstrap().to_owned();
    let healthy = Receiver::start(Mode::Ok).await;
    let hung = Receiver::start(Mode::Hang).await;
    let settings = "timeout_ms = 120000\nper_host_concurrency = 4\nslow_after_ms = 500";
    let _notifier = start_notifier(&brokers, &prefix, 0, settings);

    // Warm: the notifier has joined its group and connected.
    results_with_callback(&brokers, &prefix, "warm", 0..20, &healthy.url, Some("healthy"));
    healthy.wait_unique(20, Duration::from_secs(120)).await;
    let started = Instant::now();
    results_with_callback(&brokers, &prefix, "alone", 0..1000, &healthy.url, Some("healthy"));
    healthy.wait_unique(1020, Duration::from_secs(120)).await;
    let alone = started.elapsed();

    results_with_callback(&brokers, &prefix, "stuck", 0..300, &hung.url, Some("stuck"));
    let started = Instant::now();
    results_with_callback(&brokers, &prefix, "beside", 0..1000, &healthy.url, Some("healthy"));
    healthy.wait_unique(2020, Duration::from_secs(120)).await;
    let beside = started.elapsed();
    let hung_requests = hung.seen.lock().unwrap().requests;
    println!(
        "callbacks: 1,000 to a healthy receiver in {:.2} s alone, {:.2} s beside a hung one ({:.2}x; the hung one holds {hung_requests} requests)",
        alone.as_secs_f64(),
        beside.as_secs_f64(),
        beside.as_secs_f64() / alone.as_secs_f64()
    );
    assert_eq!(hung.unique(), 0, "the hung receiver answered nothing");
    assert_eq!(hung_requests, 4, "it holds exactly its per_host_concurrency requests");
    assert!(
        beside < alone * 3 + Duration::from_secs(2),
        "the healthy tenant was slowed: {beside:?} beside the hung receiver, {alone:?} alone"
    );
    assert_eq!(dead_letters(&brokers, &prefix, 1).await, Vec::<Value>::new(), "nothing dead-lettered yet");

    results_with_callback(&brokers, &prefix, "stuck", 300..1300, &hung.url, Some("stuck"));
    results_with_callback(&brokers, &prefix, "after", 0..100, &healthy.url, Some("healthy"));
    healthy.wait_unique(2120, Duration::from_secs(120)).await;
    let dead = dead_letters(&brokers, &prefix, 300).await;
    assert_eq!(dead.len(), 300, "1,300 for the hung receiver, 1,000 held: the rest dead-lettered");
    for d in &dead {
        assert_eq!(d["headers"]["sluice.error.code"], "callback_saturated", "{d}");
        assert_eq!(d["headers"]["sluice.callback.url"], hung.url.as_str(), "{d}");
        assert!(d["key"].as_str().unwrap().starts_with("stuck/stuck-"), "{d}");
    }
}

/// Through a whole `sluice up`: a job whose callback is allowed runs on the
/// real model and its result is delivered, signed with the secret the
/// tenant reads at `GET /v1/callbacks/secret`; callbacks to disallowed
/// destinations (loopback not listed, a name resolving to it, private and
/// link-local addresses) are refused at submission with `callback_refused`
/// and never attempted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_checked_at_submission_and_delivered_signed() {
    let receiver = Receiver::start(Mode::Ok).await;
    let extra = json!({"callbacks": {"signing_key": SIGNING_KEY, "allow_networks": ["127.0.0.2/32"]}});
    let h = Harness::start_with(unique_prefix("cbgateway"), false, extra).await;

    // Refused at submission, with the reason.
    // Where the refused callbacks point: a receiver on 127.0.0.1, which is
    // loopback and not listed.
    let trap = Receiver::start_on("127.0.0.1", Mode::Ok).await;
    let port = trap.url.rsplit(':').next().unwrap().split('/').next().unwrap().to_owned();
    for (url, why) in [
        (format!("http://127.0.0.1:{port}/hooks"), "loopback"),
        (format!("http://localhost:{port}/hooks"), "loopback"),
        ("http://10.1.2.3/hooks".to_owned(), "private"),
        ("http://169.254.169.254/latest/meta-data".to_owned(), "link-local"),
        (format!("http://[::1]:{port}/hooks"), "loopback"),
    ] {
        let body = json!({"job_id": format!("refused-{why}"), "model": MODEL, "input": {"text": "x"}, "callback": {"url": url}});
        let (status, _, answer) = h.post(body.to_string()).await;
        assert_eq!(status, 422, "{url}: {answer}");
        assert_eq!(answer["error"]["code"], "callback_refused", "{url}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(why) && message.contains("allow_networks"), "{url}: {message}");
        let (status, _) = h.get(&format!("/v1/jobs/refused-{why}")).await;
        assert_eq!(status, 404, "{url}: a refused job is not queued");
    }
    // A batch line's callback is checked like a job's: the whole batch is refused.
    let lines = [
        json!({"custom_id": "a", "model": MODEL, "input": {"text": "x"}}),
        json!({"custom_id": "b", "model": MODEL, "input": {"text": "y"}, "callback": {"url": "http://10.1.2.3/hooks"}}),
    ];
    let jsonl: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let (status, _, answer) = h.call(reqwest::Method::POST, "/v1/batches", None, Some(jsonl)).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("callback_refused")), "{answer}");
    let (status, _, answer) = h
        .post(json!({"model": MODEL, "input": {"text": "x"}, "callback": {"url": "gopher://127.0.0.2/"}}).to_string())
        .await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("schema_violation")), "{answer}");

    // Allowed: delivered once the job has run, signed with the tenant's secret.
    let body = json!({"job_id": "cb-ok", "model": MODEL, "input": {"text": "This is an example sentence"},
                      "callback": {"url": receiver.url, "events": ["succeeded"]}});
    let (status, _, answer) = h.post(body.to_string()).await;
    assert_eq!(status, 202, "{answer}");
    receiver.wait_unique(1, Duration::from_secs(60)).await;
    let (status, secret) = h.get("/v1/callbacks/secret").await;
    assert_eq!(status, 200, "{secret}");
    assert_eq!(secret["tenant"], "acme");
    let (signature, tenant, body, bad_signatures) = {
        let seen = receiver.seen.lock().unwrap();
        let (signature, tenant, body) = seen.sample.clone().unwrap();
        (signature, tenant, body, seen.bad_signatures)
    };
    assert_eq!(tenant, "acme");
    let secret = secret["secret"].as_str().unwrap();
    assert_eq!(cb::verify(secret, &signature, &body, chrono::Utc::now().timestamp(), 300), Ok(()));
    // The receiver's few lines that README shows agree.
    let python = |body: &[u8]| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/examples/callback/verify.py");
        let mut child = Command::new("python3")
            .args([script, secret, &signature])
            .stdin(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        child.stdin.take().unwrap().write_all(body).unwrap();
        child.wait().unwrap().success()
    };
    assert!(python(&body), "verify.py accepts the delivery");
    let mut tampered = body.clone();
    *tampered.last_mut().unwrap() = b' ';
    assert!(!python(&tampered), "verify.py refuses a tampered body");
    let record: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(record["job_id"], "cb-ok");
    assert_example_embedding(&record);
    assert_eq!(bad_signatures, 0);
    assert_eq!(trap.seen.lock().unwrap().requests, 0, "no refused callback was ever attempted");
    let (_, ready) = h.get("/readyz").await;
    assert_eq!(ready["notifier"]["status"], "ok", "{ready}");
    // In order: the notifier commits while the embedded broker still runs.
    let mut h = h;
    h.stop().await;
}

/// Through a whole `sluice up`: a batch's `callback` is checked at
/// submission like a job's; a caller cannot say which batch a job belongs
/// to; and a batch of real jobs (two expired on arrival, one with a job
/// callback of its own, one too large for its topic, so never queued) is
/// announced once every line has finished, signed, with its lines counted
/// by status, while `GET /v1/batches/{id}` says `completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_callback_is_checked_at_submission_and_announced_when_every_line_has_run() {
    let receiver = Receiver::start(Mode::Ok).await;
    // Records of at most 15,000 bytes: the long line below is refused by
    // Kafka, the results (about 8 KB) are not.
    let extra = json!({"callbacks": {"signing_key": SIGNING_KEY, "allow_networks": ["127.0.0.2/32"]},
                       "kafka": {"max_message_bytes": 15000}});
    let mut h = Harness::start_with(unique_prefix("cbbatchup"), false, extra).await;
    let line = |i: usize| json!({"custom_id": format!("c{i}"), "model": MODEL, "input": {"text": format!("Sentence number {i}.")}});
    let jsonl = |lines: &[Value]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let post_batch = |query: String, body: String| {
        let h = &h;
        async move { h.call(reqwest::Method::POST, &format!("/v1/batches{query}"), None, Some(body)).await }
    };

    for (query, code) in [
        ("?callback=http://10.1.2.3/hooks".to_owned(), "callback_refused"),
        ("?callback=http://127.0.0.1:9/hooks".to_owned(), "callback_refused"),
        ("?callback=gopher://127.0.0.2/".to_owned(), "schema_violation"),
        ("?callbak=x".to_owned(), "schema_violation"),
    ] {
        let (status, _, answer) = post_batch(query.clone(), jsonl(&[line(0)])).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (422, Some(code)), "{query}: {answer}");
    }
    let forged = json!({"model": MODEL, "input": {"text": "x"}, "batch": {"id": "batch_x", "index": 0, "total": 1}});
    let (status, _, answer) = h.post(forged.to_string()).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("schema_violation")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("set by the gateway"), "{answer}");

    let mut lines: Vec<Value> = (0..10).map(line).collect();
    for l in &mut lines[3..5] {
        l["deadline"] = json!("2020-01-01T00:00:00Z");
    }
    lines[7]["callback"] = json!({"url": receiver.url});
    lines.push(json!({"custom_id": "too-long", "model": MODEL, "input": {"text": "word ".repeat(3200)}}));
    let query = format!("?callback={}", receiver.url);
    let (status, _, accepted) = post_batch(query, jsonl(&lines)).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["callback"], receiver.url);
    assert_eq!((accepted["total"].as_u64(), accepted["not_queued"].as_u64()), (Some(11), Some(1)), "{accepted}");
    let id = accepted["id"].as_str().unwrap().to_owned();

    receiver.wait_unique(2, Duration::from_secs(120)).await;
    let (status, batch) = h.get(&format!("/v1/batches/{id}")).await;
    assert_eq!((status, batch["status"].as_str()), (200, Some("completed")), "{batch}");
    {
        let seen = receiver.seen.lock().unwrap();
        assert_eq!(seen.bad_signatures, 0);
        let delivery = sluice_schemas::batch::completed_delivery_id("acme", &id);
        let (header, body) = seen.batches.get(&delivery).unwrap_or_else(|| panic!("{id} announced as {delivery}"));
        assert_eq!(header, &id);
        assert_eq!(body["counts"], json!({"expired": 2, "failed": 1, "succeeded": 8}), "{body}");
        assert_eq!(body["total"], 11);
        assert_eq!(body["tenant"], "acme");
        let jobs: Vec<&(String, String, String)> = seen.jobs.values().collect();
        assert_eq!(jobs, vec![&(format!("{id}-8"), "job.succeeded".to_owned(), "succeeded".to_owned())]);
    }
    h.stop().await;
}
