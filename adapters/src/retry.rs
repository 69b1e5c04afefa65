//! Retrying with backoff: one helper and one retryability signal for every
//! stage (the worker's store writes and sends, the sinks' flushes, the
//! store's notification channel).
//!
//! An error says whether the same operation may succeed later
//! ([`Retryable`]); [`retry`] retries only those, with doubling delays
//! capped at [`Backoff::max`], and hands a permanent error back at once so
//! the caller can fail the job with a code instead of holding its
//! partition. A wait ends early when shutdown is requested.

use std::future::Future;
use std::time::Duration;

use crate::shutdown::Shutdown;

/// Whether the operation that failed may succeed if it is tried again
/// (the broker or store is away, busy or slow), as opposed to a failure
/// that repeats for the same input (too large, malformed, refused).
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

/// Delays between attempts: `initial`, doubling, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The worker's and the store's curve: 100 ms, doubling, at most 2 s.
    pub const DEFAULT: Backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };

    /// The delay after failed attempt `attempt` (1 = the first failure).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << doublings).min(self.max.max(self.initial))
    }
}

/// Why [`retry`] gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The operation failed with an error that retrying cannot fix.
    Permanent(E),
    /// Shutdown was requested while the operation kept failing.
    Shutdown,
}

/// The attempts of one operation: what a caller that drives its own loop
/// (one that borrows state mutably between attempts) uses; [`retry`] is
/// this with the loop included.
pub struct Attempts<'a> {
    what: &'a str,
    backoff: Backoff,
    shutdown: &'a Shutdown,
    failures: u32,
}

impl<'a> Attempts<'a> {
    pub fn new(what: &'a str, backoff: Backoff, shutdown: &'a Shutdown) -> Attempts<'a> {
        Attempts { what, backoff, shutdown, failures: 0 }
    }

    /// After a failed attempt: a permanent error is handed back at once; a
    /// retryable one is logged and waited out ([`Backoff::delay`]), unless
    /// shutdown is requested first. `Ok(())`: try again.
    pub async fn failed<E: Retryable + std::fmt::Display>(&mut self, e: E) -> Result<(), GaveUp<E>> {
        let what = self.what;
        if !e.is_retryable() {
            tracing::error!(error = %e, "{what} failed and retrying cannot help");
            return Err(GaveUp::Permanent(e));
        }
        self.failures += 1;
        let delay = self.backoff.delay(self.failures);
        tracing::warn!(attempt = self.failures, error = %e, retry_in = ?delay, "{what} failed; retrying");
        if self.shutdown.is_triggered() {
            return Err(GaveUp::Shutdown);
        }
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = shutdown.wait() => Err(GaveUp::Shutdown),
        }
    }
}

/// Runs `op` until it succeeds. A retryable error is logged and retried
/// after [`Backoff::delay`]; a permanent one is returned at once.
pub async fn retry<T, E, F, Fut>(what: &str, backoff: Backoff, shutdown: &Shutdown, mut op: F) -> Result<T, GaveUp<E>>
where
    E: Retryable + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts = Attempts::new(what, backoff, shutdown);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => attempts.failed(e).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[derive(Debug)]
    struct Failure {
        retryable: bool,
    }

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failure (retryable: {})", self.retryable)
        }
    }

    impl Retryable for Failure {
        fn is_retryable(&self) -> bool {
            self.retryable
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(1000) };
        let delays: Vec<u64> = (1..=6).map(|a| b.delay(a).as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(1000), "no overflow");
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_errors_are_retried_until_success() {
        let (_trigger, shutdown) = crate::shutdown::channel();
        let calls = Cell::new(0);
        let out = retry("op", Backoff::DEFAULT, &shutdown, || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { if n < 4 { Err(Failure { retryable: true }) } else { Ok(n) } }
        })
        .await;
        assert!(matches!(out, Ok(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_returned_at_once() {
        let (_trigger, shutdown) = crate::shutdown::channel();
        let calls = Cell::new(0);
        let out: Result<(), _> = retry("op", Backoff::DEFAULT, &shutdown, || {
            calls.set(calls.get() + 1);
            async { Err(Failure { retryable: false }) }
        })
        .await;
        assert!(matches!(out, Err(GaveUp::Permanent(Failure { retryable: false }))));
        assert_eq!(calls.get(), 1, "not retried");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_retries() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let calls = Cell::new(0);
        let out: Result<(), _> = retry("op", Backoff::DEFAULT, &shutdown, || {
            calls.set(calls.get() + 1);
            if calls.get() == 3 {
                trigger.fire();
            }
            async { Err(Failure { retryable: true }) }
        })
        .await;
        assert!(matches!(out, Err(GaveUp::Shutdown)));
        assert_eq!(calls.get(), 3);
    }
}
