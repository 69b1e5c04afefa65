//! Flow control at the front door: per-tenant rate limits (429), and
//! back-pressure from the jobs topics' backlog (503), both with
//! `Retry-After`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::ApiError;
use crate::config::ApiKey;
use crate::kafka::LagProbe;
use crate::shutdown::Shutdown;

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second.max(1)).expect("max(1) is non-zero");
    let burst = NonZeroU32::new(burst.max(1)).expect("max(1) is non-zero");
    Quota::per_second(rate).allow_burst(burst)
}

/// Per-tenant GCRA rate limits: configured tenants have their own quota,
/// every other tenant the default one (kept in a keyed limiter whose idle
/// keys are pruned, so unknown tenant names cannot grow memory for long).
pub struct RateLimits {
    /// Tenants with their own quota: limiter and burst.
    own: HashMap<String, (DefaultDirectRateLimiter, u32)>,
    shared: DefaultKeyedRateLimiter<String>,
    default_burst: u32,
    clock: DefaultClock,
}

impl RateLimits {
    pub fn new(default_per_second: u32, default_burst: u32, keys: &[ApiKey]) -> RateLimits {
        let own = keys
            .iter()
            .filter(|k| k.rate_per_second.is_some() || k.rate_burst.is_some())
            .map(|k| {
                let burst = k.rate_burst.unwrap_or(default_burst).max(1);
                let q = quota(k.rate_per_second.unwrap_or(default_per_second), burst);
                (k.tenant.clone(), (RateLimiter::direct(q), burst))
            })
            .collect();
        RateLimits {
            own,
            shared: RateLimiter::keyed(quota(default_per_second, default_burst)),
            default_burst: default_burst.max(1),
            clock: DefaultClock::default(),
        }
    }

    /// Takes `n` jobs from `tenant`'s allowance, or says when to retry.
    pub fn check(&self, tenant: &str, n: usize) -> Result<(), ApiError> {
        let n = NonZeroU32::new(n.clamp(1, u32::MAX as usize) as u32).expect("clamped to at least 1");
        let (outcome, burst) = match self.own.get(tenant) {
            Some((l, burst)) => (l.check_n(n), *burst),
            None => (self.shared.check_key_n(&tenant.to_owned(), n), self.default_burst),
        };
        let limited = |retry_after| ApiError::RateLimited { tenant: tenant.to_owned(), retry_after };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(limited(not_until.wait_time_from(self.clock.now()))),
            // More jobs in one request than the burst allows: it could never pass.
            Err(_) => Err(ApiError::TooManyItems { given: n.get() as usize, limit: burst as usize }),
        }
    }

    /// Forgets idle tenants of the shared limiter.
    pub fn prune(&self) {
        self.shared.retain_recent();
    }
}

/// The backlog (consumer lag) of each model's jobs topic, sampled in the
/// background; submissions to a model whose backlog passed the bound get 503.
pub struct Backlog {
    max: i64,
    lag: RwLock<HashMap<String, i64>>,
}

impl Backlog {
    pub fn new(max: i64) -> Arc<Backlog> {
        Arc::new(Backlog { max, lag: RwLock::new(HashMap::new()) })
    }

    /// Refuses new work for `model` while its backlog is over the bound.
    pub fn check(&self, model: &str) -> Result<(), ApiError> {
        let lag = self.lag.read().unwrap_or_else(|p| p.into_inner()).get(model).copied().unwrap_or(0);
        if lag > self.max {
            return Err(ApiError::Overloaded {
                why: format!("{lag} jobs of model `{model}` are waiting (bound {})", self.max),
                retry_after: Duration::from_secs(5),
            });
        }
        Ok(())
    }

    /// Samples every `every` until shutdown.
    pub async fn run(self: Arc<Self>, probes: Vec<(String, LagProbe)>, every: Duration, mut shutdown: Shutdown) {
        loop {
            for (model, probe) in &probes {
                match probe.lag().await {
                    Ok(lag) => {
                        metrics::gauge!(sluice_schemas::metrics::CONSUMER_LAG.name, "model" => model.clone())
                            .set(lag as f64);
                        self.lag.write().unwrap_or_else(|p| p.into_inner()).insert(model.clone(), lag);
                    }
                    Err(e) => tracing::debug!(model, error = %e, "lag sample failed"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_have_their_own_allowance() {
        let keys = vec![ApiKey {
            tenant: "big".into(),
            sha256: String::new(),
            rate_per_second: Some(1000),
            rate_burst: Some(1000),
        }];
        let limits = RateLimits::new(1, 2, &keys);
        assert!(limits.check("small", 1).is_ok());
        assert!(limits.check("small", 1).is_ok());
        match limits.check("small", 1) {
            Err(ApiError::RateLimited { retry_after, .. }) => assert!(retry_after <= Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
        assert!(limits.check("other", 2).is_ok(), "another tenant is unaffected");
        assert!(limits.check("big", 500).is_ok());
        assert!(matches!(limits.check("small", 3), Err(ApiError::TooManyItems { .. })), "over the burst");
    }

    #[test]
    fn backlog_over_the_bound_is_overload() {
        let b = Backlog::new(10);
        assert!(b.check("m").is_ok());
        b.lag.write().unwrap().insert("m".into(), 11);
        assert!(matches!(b.check("m"), Err(ApiError::Overloaded { .. })));
        assert!(b.check("other").is_ok());
    }
}
