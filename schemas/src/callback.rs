//! Completion callbacks: what a job asks to be told ([`Callback`]), and the
//! contract of a delivery: its headers, its [`delivery_id`] (stable across
//! retries and replays, so a receiver dedupes by it) and its signature
//! ([`sign`], [`verify`]).
//!
//! A delivery is `POST <url>` with the JobResult as its JSON body (a
//! [`crate::batch::BatchCompleted`] for a batch) and:
//!
//! | header | value |
//! |---|---|
//! | `Sluice-Event` | `job.succeeded`, `job.failed`, `job.expired` or `job.cancelled`; `batch.completed` for a batch |
//! | `Sluice-Delivery-Id` | `dlv_` + 32 hex digits, the same for every attempt and replay |
//! | `Sluice-Job-Id` (`Sluice-Batch-Id` for a batch), `Sluice-Tenant` | whose job |
//! | `Sluice-Attempt` | 1 for the first attempt |
//! | `Sluice-Signature` | `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` |
//!
//! The secret is the tenant's own ([`tenant_secret`]): derived from the
//! operator's signing key, so tenants cannot forge each other's deliveries,
//! and read by the tenant at `GET /v1/callbacks/secret`.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::JobStatus;

/// Longest callback URL, in characters.
pub const URL_CHARS: usize = 2048;

/// `Sluice-Event`: what happened (`job.succeeded`, ...).
pub const EVENT_HEADER: &str = "Sluice-Event";
/// `Sluice-Delivery-Id`: stable across retries and replays; dedupe by it.
pub const DELIVERY_ID_HEADER: &str = "Sluice-Delivery-Id";
/// `Sluice-Job-Id`: the job's id.
pub const JOB_ID_HEADER: &str = "Sluice-Job-Id";
/// `Sluice-Batch-Id`: the batch's id (a `batch.completed` delivery has it
/// instead of `Sluice-Job-Id`).
pub const BATCH_ID_HEADER: &str = "Sluice-Batch-Id";
/// `Sluice-Tenant`: the job's tenant.
pub const TENANT_HEADER: &str = "Sluice-Tenant";
/// `Sluice-Attempt`: 1, 2, ... (a replay after a crash starts again at 1).
pub const ATTEMPT_HEADER: &str = "Sluice-Attempt";
/// `Sluice-Signature`: `t=<unix seconds>,v1=<hex>`.
pub const SIGNATURE_HEADER: &str = "Sluice-Signature";

/// Where to POST a job's result when it finishes, and for which outcomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Callback {
    /// `http://` or `https://`, at most 2048 characters, no user or
    /// password. The destination must be allowed by the operator
    /// (`callbacks.allow_hosts`, `callbacks.allow_networks`); private,
    /// loopback and link-local addresses are refused unless listed.
    pub url: String,
    /// Which outcomes are delivered (default: all four).
    #[serde(default = "CallbackEvent::all")]
    pub events: BTreeSet<CallbackEvent>,
}

/// An outcome a callback can be asked for: a job's terminal status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CallbackEvent {
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl CallbackEvent {
    /// Every event: the default of [`Callback::events`].
    pub fn all() -> BTreeSet<CallbackEvent> {
        [CallbackEvent::Succeeded, CallbackEvent::Failed, CallbackEvent::Expired, CallbackEvent::Cancelled].into()
    }

    /// The event of a job that ended in `status`; `None` while it has not.
    pub fn of(status: JobStatus) -> Option<CallbackEvent> {
        match status {
            JobStatus::Succeeded => Some(CallbackEvent::Succeeded),
            JobStatus::Failed => Some(CallbackEvent::Failed),
            JobStatus::Expired => Some(CallbackEvent::Expired),
            JobStatus::Cancelled => Some(CallbackEvent::Cancelled),
            JobStatus::Queued | JobStatus::Running => None,
        }
    }

    /// The `Sluice-Event` header's value, e.g. `job.succeeded`.
    pub fn header_value(self) -> &'static str {
        match self {
            CallbackEvent::Succeeded => "job.succeeded",
            CallbackEvent::Failed => "job.failed",
            CallbackEvent::Expired => "job.expired",
            CallbackEvent::Cancelled => "job.cancelled",
        }
    }
}

impl Callback {
    /// The rules serde types do not express: a well-formed http(s) URL with
    /// a host and no credentials, at most [`URL_CHARS`]; at least one event.
    /// Whether the destination is allowed is the operator's to decide, at
    /// submission and again at delivery.
    pub fn validate(&self) -> Result<(), String> {
        validate_url("callback.url", &self.url)?;
        if self.events.is_empty() {
            return Err("callback.events: must name at least one of succeeded, failed, expired, cancelled".into());
        }
        Ok(())
    }

    /// Whether a job that ended in `status` is to be delivered.
    pub fn wants(&self, status: JobStatus) -> bool {
        CallbackEvent::of(status).is_some_and(|e| self.events.contains(&e))
    }
}

/// A callback URL's own rules: a well-formed http(s) URL with a host and no
/// credentials, at most [`URL_CHARS`]. `field` names it in the message.
pub(crate) fn validate_url(field: &str, url: &str) -> Result<(), String> {
    let n = url.chars().count();
    if n > URL_CHARS {
        return Err(format!("{field}: {n} characters, at most {URL_CHARS} allowed"));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("{field}: {url:?} is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{field}: scheme {:?} is not http or https", parsed.scheme()));
    }
    if parsed.host().is_none() {
        return Err(format!("{field}: has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!("{field}: must not carry a user or password (deliveries are signed instead)"));
    }
    Ok(())
}

/// The id of the delivery of `event` for one finished job: `dlv_` and 32 hex
/// digits of SHA-256 over who, which event and when it finished. The same
/// for every attempt, and for a replay after a crash (the same stored
/// result); another run of a reused job id finishes at another time.
pub fn delivery_id(tenant: &str, job_id: &str, event: CallbackEvent, finished_at: Option<DateTime<Utc>>) -> String {
    let finished = finished_at.map_or(0, |t| t.timestamp_millis());
    let digest = Sha256::digest(format!("{tenant}/{job_id}\n{}\n{finished}", event.header_value()));
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("dlv_{hex}")
}

/// A tenant's signing secret (`whsec_` and 64 hex digits): HMAC-SHA256 of
/// the tenant under the operator's `callbacks.signing_key`. Receivers use
/// the whole string, as bytes, as the HMAC key.
pub fn tenant_secret(signing_key: &str, tenant: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(signing_key.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"sluice callback secret v1\n");
    mac.update(tenant.as_bytes());
    format!("whsec_{}", hex(&mac.finalize().into_bytes()))
}

/// The `Sluice-Signature` value of `body` sent at `t` (unix seconds).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex(&mac(secret, t, body).finalize().into_bytes()))
}

/// Why a delivery's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is not `t=<unix seconds>,v1=<hex>`")]
    Malformed,
    #[error("signed at {signed}, more than {tolerance_secs} s from now ({now})")]
    Stale { signed: i64, now: i64, tolerance_secs: i64 },
    #[error("the signature does not match the body")]
    Mismatch,
}

/// Checks a `Sluice-Signature` header against the body received, in
/// constant time, refusing one signed more than `tolerance_secs` from
/// `now` (a replayed old delivery).
pub fn verify(secret: &str, header: &str, body: &[u8], now: i64, tolerance_secs: i64) -> Result<(), SignatureError> {
    let (mut t, mut v1) = (None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = unhex(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return Err(SignatureError::Malformed) };
    if (now - t).abs() > tolerance_secs {
        return Err(SignatureError::Stale { signed: t, now, tolerance_secs });
    }
    mac(secret, t, body).verify_slice(&v1).map_err(|_| SignatureError::Mismatch)
}

fn mac(secret: &str, t: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn callback(url: &str) -> Callback {
        Callback { url: url.into(), events: CallbackEvent::all() }
    }

    #[test]
    fn urls_are_http_with_a_host_and_no_credentials() {
        assert!(callback("https://hooks.example.com/sluice?x=1").validate().is_ok());
        assert!(callback("http://127.0.0.1:8080/").validate().is_ok());
        for (bad, why) in [
            ("ftp://example.com/", "scheme"),
            ("file:///etc/passwd", "scheme"),
            ("not a url", "is not a URL"),
            ("https://user:pw@example.com/", "user or password"),
            ("http://", "is not a URL"),
        ] {
            let e = callback(bad).validate().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let long = format!("https://example.com/{}", "a".repeat(URL_CHARS));
        assert!(callback(&long).validate().unwrap_err().contains("at most 2048"));
        let none = Callback { url: "https://example.com".into(), events: BTreeSet::new() };
        assert!(none.validate().unwrap_err().contains("at least one"));
    }

    #[test]
    fn events_default_to_every_outcome_and_filter_what_is_delivered() {
        let c: Callback = serde_json::from_str(r#"{"url":"https://example.com"}"#).unwrap();
        assert_eq!(c.events.len(), 4);
        let c: Callback = serde_json::from_str(r#"{"url":"https://example.com","events":["failed"]}"#).unwrap();
        assert!(c.wants(JobStatus::Failed));
        assert!(!c.wants(JobStatus::Succeeded));
        assert!(!c.wants(JobStatus::Running));
        assert!(serde_json::from_str::<Callback>(r#"{"url":"https://e.com","events":["queued"]}"#).is_err());
    }

    #[test]
    fn delivery_ids_are_stable_per_finished_job_and_event() {
        let at = Some("2026-12-07T00:00:00Z".parse().unwrap());
        let a = delivery_id("acme", "j1", CallbackEvent::Succeeded, at);
        assert_eq!(a, delivery_id("acme", "j1", CallbackEvent::Succeeded, at));
        assert!(a.starts_with("dlv_") && a.len() == 36, "{a}");
        assert_ne!(a, delivery_id("globex", "j1", CallbackEvent::Succeeded, at));
        assert_ne!(a, delivery_id("acme", "j1", CallbackEvent::Failed, at));
        assert_ne!(
            a,
            delivery_id("acme", "j1", CallbackEvent::Succeeded, Some("2026-12-08T00:00:00Z".parse().unwrap()))
        );
    }

    #[test]
    fn signatures_verify_and_refuse_tampering_staleness_and_other_tenants() {
        let secret = tenant_secret("operator-key", "acme");
        assert!(secret.starts_with("whsec_") && secret.len() == 70);
        assert_ne!(secret, tenant_secret("operator-key", "globex"));
        assert_ne!(secret, tenant_secret("other-key", "acme"));
        let body = br#"{"job_id":"j1","status":"succeeded"}"#;
        let header = sign(&secret, 1_000, body);
        assert_eq!(verify(&secret, &header, body, 1_100, 300), Ok(()));
        assert_eq!(
            verify(&secret, &header, br#"{"job_id":"j1","status":"failed"}"#, 1_100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&tenant_secret("operator-key", "globex"), &header, body, 1_100, 300),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(verify(&secret, &header, body, 2_000, 300), Err(SignatureError::Stale { .. })));
        assert_eq!(verify(&secret, "v1=abc", body, 1_000, 300), Err(SignatureError::Malformed));
        // Re-signing with another timestamp is not possible without the secret.
        let moved = header.replace("t=1000", "t=1050");
        assert_eq!(verify(&secret, &moved, body, 1_100, 300), Err(SignatureError::Mismatch));
    }
}
