//! A circuit breaker over batch outcomes.
//!
//! Closed: batches run; when at least `min_batches` of the last `window`
//! batches ran and `failure_ratio` of them failed, it opens. Open: the owner
//! should stop feeding work (the pipeline pauses its Kafka partitions, so the
//! jobs stay in Kafka) until `cool_down` has passed; then it is half-open and
//! lets work through as a probe: the next batch's outcome closes it or opens
//! it again.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Breaker thresholds.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Batches remembered.
    pub window: usize,
    /// Fewest batches in the window before the breaker may open.
    pub min_batches: usize,
    /// Share of failed batches in the window that opens the breaker.
    pub failure_ratio: f64,
    /// How long it stays open before probing.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { window: 20, min_batches: 5, failure_ratio: 0.5, cool_down: Duration::from_secs(5) }
    }
}

/// What the breaker allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Healthy: work flows.
    Closed,
    /// Failing: hold work back.
    Open,
    /// Cool-down over: let work through as a probe.
    HalfOpen,
}

impl BreakerState {
    /// 0 closed, 1 half-open, 2 open (the `sluice_breaker_state` gauge).
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

enum Inner {
    Closed { recent: VecDeque<bool> },
    Open { since: Instant },
    HalfOpen,
}

pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker { cfg, inner: Mutex::new(Inner::Closed { recent: VecDeque::new() }) }
    }

    /// Records one batch's outcome; returns the state after it.
    pub fn record(&self, ok: bool) -> BreakerState {
        self.record_at(ok, Instant::now())
    }

    fn record_at(&self, ok: bool, now: Instant) -> BreakerState {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let next = match &mut *g {
            Inner::Closed { recent } => {
                recent.push_back(ok);
                while recent.len() > self.cfg.window {
                    recent.pop_front();
                }
                let failed = recent.iter().filter(|&&x| !x).count();
                let trip = recent.len() >= self.cfg.min_batches
                    && failed as f64 >= self.cfg.failure_ratio * recent.len() as f64;
                trip.then_some(Inner::Open { since: now })
            }
            // A batch that started before the breaker opened may still report.
            Inner::Open { .. } => None,
            Inner::HalfOpen => {
                Some(if ok { Inner::Closed { recent: VecDeque::new() } } else { Inner::Open { since: now } })
            }
        };
        if let Some(n) = next {
            *g = n;
        }
        Self::state_of(&mut g, &self.cfg, now)
    }

    /// The current state (an open breaker turns half-open after `cool_down`).
    pub fn state(&self) -> BreakerState {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::state_of(&mut g, &self.cfg, Instant::now())
    }

    fn state_of(g: &mut Inner, cfg: &BreakerConfig, now: Instant) -> BreakerState {
        if let Inner::Open { since } = g
            && now.saturating_duration_since(*since) >= cfg.cool_down
        {
            *g = Inner::HalfOpen;
        }
        match g {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            window: 10,
            min_batches: 4,
            failure_ratio: 0.5,
            cool_down: Duration::from_millis(50),
        })
    }

    #[test]
    fn opens_on_failures_then_probes_and_closes() {
        let b = breaker();
        let t0 = Instant::now();
        assert_eq!(b.record_at(false, t0), BreakerState::Closed, "too few batches to judge");
        assert_eq!(b.record_at(true, t0), BreakerState::Closed);
        assert_eq!(b.record_at(false, t0), BreakerState::Closed);
        assert_eq!(b.record_at(false, t0), BreakerState::Open, "3 of 4 failed");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.record(false), BreakerState::Open, "failed probe reopens");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.record(true), BreakerState::Closed, "good probe closes");
        // A fresh window: one failure does not reopen it.
        assert_eq!(b.record(false), BreakerState::Closed);
    }

    #[test]
    fn occasional_failures_do_not_trip_it() {
        let b = breaker();
        for i in 0..100 {
            assert_eq!(b.record(i % 5 != 0), BreakerState::Closed);
        }
    }
}
