use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use sluice_schemas::CallbackEvent;

use super::policy::non_public;
use super::*;
use crate::config::{CallbacksSection, Config};

fn section(hosts: &[&str], networks: &[&str]) -> CallbacksSection {
    let mut c = Config::load(None, serde_json::json!({})).unwrap().callbacks;
    c.allow_hosts = hosts.iter().map(|s| s.to_string()).collect();
    c.allow_networks = networks.iter().map(|s| s.to_string()).collect();
    c
}

fn policy(hosts: &[&str], networks: &[&str]) -> Policy {
    Policy::from_config(&section(hosts, networks)).unwrap()
}

#[test]
fn non_public_addresses_are_named() {
    for (addr, kind) in [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("::1", "loopback"),
        ("fd00::1", "private (unique local)"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("2002:0a00:0001::1", "private"),
    ] {
        assert_eq!(non_public(addr.parse::<IpAddr>().unwrap()), Some(kind), "{addr}");
    }
    for public in ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "172.32.0.1", "100.128.0.1"] {
        assert_eq!(non_public(public.parse::<IpAddr>().unwrap()), None, "{public}");
    }
}

#[tokio::test]
async fn loopback_private_and_metadata_addresses_are_refused_unless_listed() {
    let open = policy(&["*"], &[]);
    for url in
        ["http://127.0.0.1:9000/x", "http://[::1]/x", "http://10.0.0.5/", "http://169.254.169.254/latest/meta-data"]
    {
        let e = open.check(url).await.unwrap_err();
        assert!(matches!(e, Refusal::Address { .. }), "{url}: {e}");
    }
    // A name that resolves to loopback is refused like the address itself.
    let e = open.check("http://localhost:9000/hook").await.unwrap_err();
    assert!(matches!(&e, Refusal::Address { kind: "loopback", .. }), "{e}");
    assert!(e.to_string().contains("callbacks.allow_networks"), "{e}");
    // Listed, loopback is allowed, by address or by name.
    let listed = policy(&["*"], &["127.0.0.0/8", "::1"]);
    listed.check("http://127.0.0.1:9000/x").await.unwrap();
    listed.check("http://localhost:9000/x").await.unwrap();
    // Listing one network does not open another.
    assert!(listed.check("http://10.0.0.5/").await.is_err());
}

#[tokio::test]
async fn hosts_must_match_the_allowlist() {
    let p = policy(&["hooks.example.com", "*.acme.test"], &["127.0.0.0/8"]);
    assert_eq!(p.check_url("https://hooks.example.com/a").unwrap(), ("hooks.example.com".to_owned(), 443));
    assert!(p.check_url("https://eu.acme.test/a").is_ok());
    assert!(p.check_url("https://x.eu.acme.test:8443/a").is_ok());
    for bad in ["https://evil.example.com/", "https://acme.test.evil.com/", "https://notacme.test/"] {
        assert!(matches!(p.check_url(bad), Err(Refusal::Host(_))), "{bad}");
    }
    // An address inside an allowed network needs no host rule.
    assert!(p.check_url("http://127.0.0.1:8080/").is_ok());
    assert!(matches!(p.check_url("ftp://hooks.example.com/"), Err(Refusal::Invalid(_))));
    assert!(Policy::from_config(&section(&["*"], &["10.0.0.0/33"])).is_err());
}

#[test]
fn offsets_commit_up_to_the_oldest_pending_callback() {
    let mut t = Tracker::default();
    let g = t.seen("r", 0, 10);
    t.hold("r", 0, 10, 5);
    t.seen("r", 0, 11); // no callback
    t.seen("r", 0, 12);
    t.hold("r", 0, 12, 7);
    t.seen("r", 0, 13);
    assert_eq!(t.committable(), vec![("r".to_owned(), 0, 10)]);
    assert_eq!(t.held(), (2, 12));
    let done = |offset, finished| Done { topic: "r".into(), partition: 0, offset, generation: g, bytes: 7, finished };
    // 12 finishes first: still nothing past 10.
    t.finish(&done(12, true));
    assert_eq!(t.committable(), vec![("r".to_owned(), 0, 10)]);
    t.committed(&t.committable());
    assert!(t.committable().is_empty(), "nothing new to commit");
    // Stopped before 10 was delivered: it stays pending.
    t.finish(&Done { bytes: 5, ..done(10, false) });
    assert_eq!(t.held(), (0, 0));
    assert!(t.committable().is_empty());
}

#[test]
fn a_record_holding_a_callback_and_a_batch_count_commits_when_both_are_done() {
    let mut t = Tracker::default();
    let g = t.seen("r", 0, 4);
    t.hold("r", 0, 4, 3); // its batch line's count
    t.hold("r", 0, 4, 9); // its own callback
    let done = |bytes| Done { topic: "r".into(), partition: 0, offset: 4, generation: g, bytes, finished: true };
    t.finish(&done(3));
    assert_eq!(t.committable(), vec![("r".to_owned(), 0, 4)], "one of two done: still held");
    t.finish(&done(9));
    assert_eq!(t.committable(), vec![("r".to_owned(), 0, 5)]);
    assert_eq!(t.held(), (0, 0));
}

#[test]
fn a_late_report_from_an_earlier_holding_of_a_partition_is_ignored() {
    let mut t = Tracker::default();
    let old = t.seen("r", 1, 5);
    t.hold("r", 1, 5, 1);
    assert_eq!(t.revoke(&[("r".to_owned(), 1)]), vec![("r".to_owned(), 1, 5)]);
    // Given back, and offset 5 read again: a new callback in flight.
    let new = t.seen("r", 1, 5);
    assert_ne!(old, new);
    t.hold("r", 1, 5, 1);
    // The first holding's task ends: it must not release the new one's offset.
    t.finish(&Done { topic: "r".into(), partition: 1, offset: 5, generation: old, bytes: 1, finished: true });
    assert_eq!(t.committable(), vec![("r".to_owned(), 1, 5)]);
    t.finish(&Done { topic: "r".into(), partition: 1, offset: 5, generation: new, bytes: 1, finished: true });
    assert_eq!(t.committable(), vec![("r".to_owned(), 1, 6)]);
}

#[test]
fn retry_after_is_read_as_seconds_or_a_date_and_backoff_is_bounded() {
    let mut h = HeaderMap::new();
    h.insert("retry-after", "7".parse().unwrap());
    assert_eq!(deliver::retry_after(&h), Some(Duration::from_secs(7)));
    let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822().replace("+0000", "GMT");
    h.insert("retry-after", later.parse().unwrap());
    let d = deliver::retry_after(&h).unwrap();
    assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30), "{d:?}");
    h.insert("retry-after", "soon".parse().unwrap());
    assert_eq!(deliver::retry_after(&h), None);

    let cfg =
        Config::load(None, serde_json::json!({"callbacks": {"retry_initial_ms": 100, "retry_max_ms": 1000}})).unwrap();
    let n = NotifierConfig::from_config(&cfg);
    for (failed, lo, hi) in [(1, 50, 100), (2, 100, 200), (3, 200, 400), (8, 500, 1000), (40, 500, 1000)] {
        let d = n.backoff(failed).as_millis() as u64;
        assert!((lo..=hi).contains(&d), "after {failed} failures: {d} ms not in {lo}..={hi}");
    }
}

/// A receiver on loopback answering with `status` (and `Retry-After: 1`
/// for 429), counting requests.
async fn receiver(status: StatusCode, extra: Option<(&'static str, &'static str)>) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut h = HeaderMap::new();
            if let Some((k, v)) = extra {
                h.insert(k, v.parse().unwrap());
            }
            (status, h, "receiver says no")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), hits)
}

fn sender(extra: serde_json::Value) -> Sender {
    let mut base = serde_json::json!({"callbacks": {
        "signing_key": "k", "allow_networks": ["127.0.0.0/8"], "retry_initial_ms": 10, "retry_max_ms": 50,
        "max_attempts": 3, "timeout_ms": 2000,
    }});
    merge(&mut base, extra);
    let cfg = Config::load(None, base).unwrap();
    Sender::new(Arc::new(Policy::from_config(&cfg.callbacks).unwrap()), NotifierConfig::from_config(&cfg)).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn delivery(url: &str) -> Delivery {
    Delivery {
        url: url.into(),
        body: Bytes::from_static(b"{}"),
        tenant: "acme".into(),
        subject: Subject::Job("j1".into()),
        event: CallbackEvent::Succeeded.header_value(),
        id: "dlv_1".into(),
        arrived: Instant::now(),
    }
}

#[tokio::test]
async fn answers_decide_between_delivered_retried_and_final() {
    let slots = Destination::new(1);
    let never = crate::shutdown::Shutdown::never();
    let s = sender(serde_json::json!({}));

    let (url, hits) = receiver(StatusCode::NO_CONTENT, None).await;
    assert_eq!(s.deliver(&delivery(&url), &slots, &never).await, Some(Outcome::Delivered { attempts: 1 }));
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let (url, hits) = receiver(StatusCode::SERVICE_UNAVAILABLE, None).await;
    let Some(Outcome::DeadLetter { reason: Reason::Exhausted, attempts: 3, message }) =
        s.deliver(&delivery(&url), &slots, &never).await
    else {
        panic!("a 503 three times is exhausted after max_attempts")
    };
    assert!(message.contains("503") && message.contains("receiver says no"), "{message}");
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    for status in [StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND, StatusCode::FOUND] {
        let (url, hits) = receiver(status, Some(("location", "http://169.254.169.254/"))).await;
        let out = s.deliver(&delivery(&url), &slots, &never).await;
        assert!(
            matches!(out, Some(Outcome::DeadLetter { reason: Reason::Rejected, attempts: 1, .. })),
            "{status}: {out:?}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1, "{status} is final, and a redirect is not followed");
    }

    // Retry-After is honoured up to retry_max (50 ms here), not beyond.
    let (url, hits) = receiver(StatusCode::TOO_MANY_REQUESTS, Some(("retry-after", "3600"))).await;
    let started = Instant::now();
    let out = s.deliver(&delivery(&url), &slots, &never).await;
    assert!(matches!(out, Some(Outcome::DeadLetter { reason: Reason::Exhausted, .. })), "{out:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());

    // Nothing listens: connection errors are retried, then exhausted.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let out = s.deliver(&delivery(&format!("http://{closed}/")), &slots, &never).await;
    assert!(
        matches!(&out, Some(Outcome::DeadLetter { reason: Reason::Exhausted, attempts: 3, message }) if message.contains("connection failed")),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_disallowed_destination_is_never_attempted() {
    let slots = Destination::new(1);
    let never = crate::shutdown::Shutdown::never();
    let (url, hits) = receiver(StatusCode::OK, None).await;
    // Loopback not listed: refused before a byte is sent, by address or by name.
    let s = sender(serde_json::json!({"callbacks": {"allow_networks": []}}));
    for u in [url.clone(), url.replace("127.0.0.1", "localhost")] {
        let out = s.deliver(&delivery(&u), &slots, &never).await;
        assert!(
            matches!(&out, Some(Outcome::DeadLetter { reason: Reason::Refused, attempts: 1, message }) if message.contains("loopback")),
            "{u}: {out:?}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}
