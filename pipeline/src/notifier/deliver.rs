//! One callback's delivery: signed POSTs, retried with backoff and jitter,
//! until a 2xx, a final answer, or the attempts or the time window run out.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};
use sluice_schemas::callback::{self as cb};
use tokio::sync::Semaphore;

use super::config::NotifierConfig;
use super::policy::{PinnedResolver, Policy, Refusal};
use crate::shutdown::Shutdown;

/// Why a callback was dead-lettered; its code is the dead-letter record's
/// `sluice.error.code` and the `reason` label of
/// `sluice_callback_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The destination is not allowed; nothing was sent.
    Refused,
    /// A final answer: a 4xx other than 408 and 429, or a redirect.
    Rejected,
    /// Every attempt failed, or the time window closed.
    Exhausted,
    /// Too many callbacks pending for the destination; nothing was sent.
    Saturated,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::Refused => "callback_refused",
            Reason::Rejected => "callback_rejected",
            Reason::Exhausted => "callback_exhausted",
            Reason::Saturated => "callback_saturated",
        }
    }

    /// Every reason, for metrics' zero series.
    pub const ALL: [Reason; 4] = [Reason::Refused, Reason::Rejected, Reason::Exhausted, Reason::Saturated];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Refused => "refused",
            Reason::Rejected => "rejected",
            Reason::Exhausted => "exhausted",
            Reason::Saturated => "saturated",
        }
    }
}

/// One destination's share (scheme, host, port): its request slots, how
/// many of its callbacks are held, and whether it keeps up.
pub struct Destination {
    slots: Semaphore,
    pending: AtomicUsize,
    /// The last sign that it keeps up: an answer within `slow_after`, or
    /// the start of its current busy spell.
    progress: Mutex<Instant>,
}

impl Destination {
    pub fn new(concurrency: usize) -> Destination {
        Destination {
            slots: Semaphore::new(concurrency),
            pending: AtomicUsize::new(0),
            progress: Mutex::new(Instant::now()),
        }
    }

    /// Callbacks held for it (in flight, or waiting for a slot or a retry).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn hold(&self) {
        if self.pending.fetch_add(1, Ordering::Relaxed) == 0 {
            self.progressed();
        }
    }

    pub fn release(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
    }

    fn progressed(&self) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Whether it keeps up: it answered a callback with a 2xx within
    /// `slow_after` during the last `slow_after` (or its busy spell began
    /// that recently). One that does not (down, hung, slow) has its
    /// overflow dead-lettered rather than hold the consumer.
    pub fn keeps_up(&self, slow_after: Duration) -> bool {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).elapsed() < slow_after
    }
}

/// What a delivery is about: one job, or a whole batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Job(String),
    Batch(String),
}

impl Subject {
    /// The job's or the batch's id.
    pub fn id(&self) -> &str {
        match self {
            Subject::Job(id) | Subject::Batch(id) => id,
        }
    }

    /// The header that names it: `Sluice-Job-Id` or `Sluice-Batch-Id`.
    fn header(&self) -> &'static str {
        match self {
            Subject::Job(_) => cb::JOB_ID_HEADER,
            Subject::Batch(_) => cb::BATCH_ID_HEADER,
        }
    }
}

/// A callback to deliver.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub url: String,
    /// The JobResult, as it was on the results topic (a batch's
    /// [`sluice_schemas::BatchCompleted`] for a batch).
    pub body: Bytes,
    pub tenant: String,
    pub subject: Subject,
    /// The `Sluice-Event` value (`job.succeeded`, ..., `batch.completed`).
    pub event: &'static str,
    pub id: String,
    /// When the notifier read the result: the time window counts from here.
    pub arrived: Instant,
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered { attempts: u32 },
    DeadLetter { reason: Reason, message: String, attempts: u32 },
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    Retry { why: String, after: Option<Duration> },
    Final { reason: Reason, why: String },
}

/// Sends callbacks: one HTTP client (connections pooled per destination,
/// every one made through the [`PinnedResolver`]), the policy, the key.
pub struct Sender {
    client: reqwest::Client,
    policy: Arc<Policy>,
    cfg: NotifierConfig,
}

impl Sender {
    pub fn new(policy: Arc<Policy>, cfg: NotifierConfig) -> Result<Sender, reqwest::Error> {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(PinnedResolver(policy.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("sluice-notifier/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender { client, policy, cfg })
    }

    /// Delivers `d`, taking one of its destination's slots per attempt and
    /// none while waiting to retry. `None`: stopped by `shutdown` first
    /// (the callback is neither delivered nor dead-lettered).
    pub async fn deliver(&self, d: &Delivery, dest: &Destination, shutdown: &Shutdown) -> Option<Outcome> {
        let secret = cb::tenant_secret(&self.cfg.signing_key, &d.tenant);
        let mut n = 0;
        loop {
            n += 1;
            let attempt = {
                let mut sd = shutdown.clone();
                let _slot = tokio::select! {
                    slot = dest.slots.acquire() => slot.expect("destination slots are never closed"),
                    _ = sd.wait() => return None,
                };
                let started = Instant::now();
                let attempt = self.attempt(d, n, &secret).await;
                if matches!(attempt, Attempt::Delivered) && started.elapsed() < self.cfg.slow_after {
                    dest.progressed();
                }
                attempt
            };
            let label = match &attempt {
                Attempt::Delivered => "2xx",
                Attempt::Retry { .. } => "retryable",
                Attempt::Final { .. } => "final",
            };
            metrics::counter!(sluice_schemas::metrics::CALLBACK_ATTEMPTS.name, "result" => label).increment(1);
            let (why, after) = match attempt {
                Attempt::Delivered => return Some(Outcome::Delivered { attempts: n }),
                Attempt::Final { reason, why } => {
                    return Some(Outcome::DeadLetter { reason, message: why, attempts: n });
                }
                Attempt::Retry { why, after } => (why, after),
            };
            let exhausted = |what: String| Outcome::DeadLetter {
                reason: Reason::Exhausted,
                message: format!("{what}; last attempt: {why}"),
                attempts: n,
            };
            if n >= self.cfg.max_attempts {
                return Some(exhausted(format!("{n} attempts made (callbacks.max_attempts)")));
            }
            let wait = self.cfg.backoff(n).max(after.unwrap_or_default().min(self.cfg.retry_max));
            if d.arrived.elapsed() + wait > self.cfg.max_elapsed {
                return Some(exhausted(format!(
                    "the next attempt would come after callbacks.max_elapsed_ms ({} s)",
                    self.cfg.max_elapsed.as_secs()
                )));
            }
            tracing::debug!(delivery_id = %d.id, attempt = n, ?wait, %why, "callback attempt failed; retrying");
            metrics::counter!(sluice_schemas::metrics::CALLBACK_RETRIES.name).increment(1);
            let mut sd = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = sd.wait() => return None,
            }
        }
    }

    async fn attempt(&self, d: &Delivery, n: u32, secret: &str) -> Attempt {
        if let Err(e) = self.policy.check_url(&d.url) {
            return Attempt::Final { reason: Reason::Refused, why: e.to_string() };
        }
        let signature = cb::sign(secret, Utc::now().timestamp(), &d.body);
        let sent = self
            .client
            .post(&d.url)
            .header(CONTENT_TYPE, "application/json")
            .header(cb::EVENT_HEADER, d.event)
            .header(cb::DELIVERY_ID_HEADER, &d.id)
            .header(d.subject.header(), d.subject.id())
            .header(cb::TENANT_HEADER, &d.tenant)
            .header(cb::ATTEMPT_HEADER, n.to_string())
            .header(cb::SIGNATURE_HEADER, signature)
            .body(d.body.clone())
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                if let Some(refusal) = refusal_in(&e) {
                    return Attempt::Final { reason: Reason::Refused, why: refusal.to_string() };
                }
                let what = if e.is_timeout() { "timed out" } else { "connection failed" };
                return Attempt::Retry { why: format!("{what}: {}", chain(&e)), after: None };
            }
        };
        let status = resp.status();
        let after = retry_after(resp.headers());
        let location = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        // Bounded: at most max_response_bytes are read; the rest is dropped
        // with the connection.
        let mut answer = Vec::new();
        while answer.len() < self.cfg.max_response_bytes {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    answer.extend_from_slice(&chunk[..chunk.len().min(self.cfg.max_response_bytes - answer.len())])
                }
                Ok(None) | Err(_) => break,
            }
        }
        let said = || {
            let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]).trim().to_owned();
            if text.is_empty() { format!("answered {status}") } else { format!("answered {status}: {text}") }
        };
        match status {
            s if s.is_success() => Attempt::Delivered,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => Attempt::Retry { why: said(), after },
            s if s.is_server_error() => Attempt::Retry { why: said(), after },
            s if s.is_redirection() => Attempt::Final {
                reason: Reason::Rejected,
                why: format!(
                    "answered {s} (a redirect to {}); redirects are not followed",
                    location.as_deref().unwrap_or("nowhere")
                ),
            },
            _ => Attempt::Final { reason: Reason::Rejected, why: said() },
        }
    }
}

/// The policy's refusal inside a client error (the resolver refused).
fn refusal_in(e: &reqwest::Error) -> Option<&Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refusal>() {
            return Some(r);
        }
        source = s.source();
    }
    None
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

/// A number in `[0, 1)`, different on each call (jitter; not for secrets).
pub fn unit_random() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
