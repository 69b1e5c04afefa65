//! The notifier's settings (`[callbacks]`, documented in
//! `config/default.toml`).

use std::time::Duration;

use super::deliver::unit_random;
use crate::config::Config;

#[derive(Debug, Clone)]
pub struct NotifierConfig {
    pub signing_key: String,
    pub max_attempts: u32,
    /// Counted from the result's arrival at the notifier.
    pub max_elapsed: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub connect_timeout: Duration,
    /// One attempt, answer included.
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub per_host_concurrency: usize,
    pub per_host_pending: usize,
    /// A destination that has not answered a callback within this long,
    /// for this long, does not keep up.
    pub slow_after: Duration,
    pub max_pending: usize,
    pub max_pending_bytes: usize,
}

impl NotifierConfig {
    pub fn from_config(cfg: &Config) -> NotifierConfig {
        let c = &cfg.callbacks;
        NotifierConfig {
            signing_key: c.signing_key.clone(),
            max_attempts: c.max_attempts.max(1),
            max_elapsed: Duration::from_millis(c.max_elapsed_ms.max(1)),
            retry_initial: Duration::from_millis(c.retry_initial_ms.max(1)),
            retry_max: Duration::from_millis(c.retry_max_ms.max(c.retry_initial_ms).max(1)),
            connect_timeout: Duration::from_millis(c.connect_timeout_ms.max(1)),
            timeout: Duration::from_millis(c.timeout_ms.max(1)),
            max_response_bytes: c.max_response_bytes,
            per_host_concurrency: c.per_host_concurrency.max(1),
            per_host_pending: c.per_host_pending.max(1),
            slow_after: Duration::from_millis(c.slow_after_ms.max(1)),
            max_pending: c.max_pending.max(1),
            max_pending_bytes: c.max_pending_bytes.max(1),
        }
    }

    /// The wait before attempt `failed + 1`: exponential from
    /// `retry_initial`, capped at `retry_max`, with "equal jitter" (half
    /// fixed, half random) so that receivers that failed together are not
    /// retried together.
    pub fn backoff(&self, failed: u32) -> Duration {
        let base = self.retry_initial.saturating_mul(1 << failed.saturating_sub(1).min(20)).min(self.retry_max);
        base / 2 + base.mul_f64(unit_random() / 2.0)
    }
}
