//! The served models: for each model, an engine per verified version, and
//! the routing between them (default version, canary share, pinned
//! versions). [`ModelPool::reload`] rescans the repository: new versions are
//! loaded and take traffic without a restart, removed ones are dropped (their
//! queued jobs still finish on the old session), and a version whose
//! checksums do not verify is refused while the previous one keeps serving.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sluice_schemas::{ErrorCode, JobRequest};

use crate::WorkerError;
use crate::breaker::BreakerState;
use crate::engine::{EngineConfig, InferenceHandle};
use crate::model::{ModelListing, ModelRepository};

/// The engines of one model and how jobs are routed to them.
struct Served {
    engines: BTreeMap<String, InferenceHandle>,
    default: String,
    canary: Option<(String, f64)>,
}

/// What one reload changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReloadReport {
    /// `name/version` loaded.
    pub loaded: Vec<String>,
    /// `name/version` dropped (removed from the repository).
    pub dropped: Vec<String>,
    /// `name/version: reason` refused (checksum, config, load errors).
    pub refused: Vec<String>,
}

/// The models this process serves (cheap to clone).
#[derive(Clone)]
pub struct ModelPool {
    repo: Arc<ModelRepository>,
    cfg: EngineConfig,
    names: Arc<Vec<String>>,
    served: Arc<RwLock<HashMap<String, Arc<Served>>>>,
    /// Serialises reloads (the watcher and explicit calls).
    reloading: Arc<tokio::sync::Mutex<()>>,
}

impl ModelPool {
    /// Loads every verified version of each of `names` (all models in the
    /// repository when empty). Fails if a model has no usable version.
    pub async fn start(repo: ModelRepository, names: Vec<String>, cfg: EngineConfig) -> Result<ModelPool, WorkerError> {
        let repo = Arc::new(repo);
        let names = if names.is_empty() { blocking(repo.clone(), |r| r.model_names()).await? } else { names };
        let pool = ModelPool {
            repo,
            cfg,
            names: Arc::new(names),
            served: Arc::new(RwLock::new(HashMap::new())),
            reloading: Arc::new(tokio::sync::Mutex::new(())),
        };
        let report = pool.reload().await?;
        for name in pool.names.iter() {
            if !pool.read().contains_key(name) {
                let why: Vec<&String> = report.refused.iter().filter(|r| r.starts_with(&format!("{name}/"))).collect();
                return Err(WorkerError::Load {
                    model: name.clone(),
                    message: if why.is_empty() { "no version in the repository".into() } else { format!("{why:?}") },
                });
            }
        }
        Ok(pool)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Served>>> {
        self.served.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Names of the served models.
    pub fn models(&self) -> Vec<String> {
        self.names.to_vec()
    }

    /// Loaded versions of each model, and which one is the default.
    pub fn versions(&self) -> Vec<(String, Vec<String>, String)> {
        let mut out: Vec<_> = self
            .read()
            .iter()
            .map(|(n, s)| (n.clone(), s.engines.keys().cloned().collect(), s.default.clone()))
            .collect();
        out.sort();
        out
    }

    /// The engine that runs `req`, after checking that it can: the pinned
    /// version, or the canary for its share of job ids, or the default.
    pub fn route(&self, req: &JobRequest) -> Result<InferenceHandle, (ErrorCode, String)> {
        let served = self.read().get(&req.model).cloned().ok_or_else(|| {
            (
                ErrorCode::UnknownModel,
                format!("model `{}` is not served here (served: {})", req.model, self.names.join(", ")),
            )
        })?;
        let version = match &req.model_version {
            Some(v) => v.clone(),
            None => match &served.canary {
                Some((v, share)) if canary_pick(&req.job_id, *share) => v.clone(),
                _ => served.default.clone(),
            },
        };
        let engine = served.engines.get(&version).ok_or_else(|| {
            let loaded: Vec<&str> = served.engines.keys().map(String::as_str).collect();
            (
                ErrorCode::UnknownModel,
                format!("model `{}` version `{version}` is not served (serving: {})", req.model, loaded.join(", ")),
            )
        })?;
        engine.model().check(req)?;
        engine.check_input(&req.input).map_err(|m| (ErrorCode::InvalidInput, m))?;
        Ok(engine.clone())
    }

    /// The breaker state of `model`'s default version (`None`: not served).
    pub fn health(&self, model: &str) -> Option<BreakerState> {
        let served = self.read().get(model).cloned()?;
        served.engines.get(&served.default).map(InferenceHandle::breaker)
    }

    /// Jobs admitted and not yet running, over every engine of `model`.
    pub fn queue_depth(&self, model: &str) -> usize {
        self.read().get(model).map(|s| s.engines.values().map(InferenceHandle::queue_depth).sum()).unwrap_or(0)
    }

    /// Rescans the repository and brings the engines in line with it.
    pub async fn reload(&self) -> Result<ReloadReport, WorkerError> {
        let _guard = self.reloading.lock().await;
        let mut report = ReloadReport::default();
        for name in self.names.iter() {
            let listing = match blocking(self.repo.clone(), {
                let name = name.clone();
                move |r| r.scan(&name)
            })
            .await
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(model = %name, error = %e, "cannot scan model; keeping what is served");
                    report.refused.push(format!("{name}: {e}"));
                    continue;
                }
            };
            for (version, why) in &listing.refused {
                report.refused.push(format!("{name}/{version}: {why}"));
            }
            let current = self.read().get(name).cloned();
            let mut engines = BTreeMap::new();
            for v in &listing.versions {
                let version = v.spec.version.clone();
                // A loaded version whose directory is unchanged keeps its engine.
                if let Some(e) = current.as_ref().and_then(|c| c.engines.get(&version))
                    && e.model().spec == v.spec
                {
                    engines.insert(version, e.clone());
                    continue;
                }
                match InferenceHandle::start(v.clone(), self.cfg.clone()).await {
                    Ok(engine) => {
                        report.loaded.push(v.label());
                        engines.insert(version, engine);
                    }
                    Err(e) => {
                        tracing::error!(model = %v.label(), error = %e, "model version failed to load");
                        report.refused.push(format!("{}: {e}", v.label()));
                        // Keep the old engine of this version, if there was one.
                        if let Some(e) = current.as_ref().and_then(|c| c.engines.get(&version)) {
                            engines.insert(version, e.clone());
                        }
                    }
                }
            }
            if let Some(c) = &current {
                for v in c.engines.keys().filter(|v| !engines.contains_key(*v)) {
                    report.dropped.push(format!("{name}/{v}"));
                }
            }
            match routing(&listing, &engines) {
                Some(served) => {
                    self.served.write().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), Arc::new(served));
                }
                None if current.is_some() => {
                    tracing::error!(model = %name, "no loadable version left; keeping the previous engines");
                }
                None => {}
            }
        }
        for l in &report.loaded {
            tracing::info!(model = %l, "model version serving");
        }
        for d in &report.dropped {
            tracing::info!(model = %d, "model version dropped");
        }
        Ok(report)
    }

    /// Reloads every `interval` until the pool is dropped everywhere else.
    pub fn spawn_watcher(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.served);
        let pool = ModelPool { served: Arc::new(RwLock::new(HashMap::new())), ..self.clone() };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(served) = weak.upgrade() else { return };
                let live = ModelPool { served, ..pool.clone() };
                if let Err(e) = live.reload().await {
                    tracing::warn!(error = %e, "model reload failed");
                }
            }
        })
    }
}

fn routing(listing: &ModelListing, engines: &BTreeMap<String, InferenceHandle>) -> Option<Served> {
    // The default: routing.toml's pick if it is loaded, else the newest loaded.
    let default =
        listing.routing.default.clone().filter(|d| engines.contains_key(d)).or_else(|| {
            listing.versions.iter().rev().map(|v| v.spec.version.clone()).find(|v| engines.contains_key(v))
        })?;
    let canary = listing
        .routing
        .canary
        .as_ref()
        .filter(|c| engines.contains_key(&c.version) && c.version != default)
        .map(|c| (c.version.clone(), c.share));
    Some(Served { engines: engines.clone(), default, canary })
}

/// Deterministic per job id (FNV-1a), so a redelivered job takes the same
/// version.
fn canary_pick(job_id: &str, share: f64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % 10_000) < (share * 10_000.0).round() as u64
}

async fn blocking<T: Send + 'static>(
    repo: Arc<ModelRepository>,
    f: impl FnOnce(&ModelRepository) -> Result<T, WorkerError> + Send + 'static,
) -> Result<T, WorkerError> {
    tokio::task::spawn_blocking(move || f(&repo)).await.expect("repository scan does not panic. This is a bug.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_share_is_close_to_its_setting_and_stable() {
        let picked = (0..20_000).filter(|i| canary_pick(&format!("job-{i}"), 0.1)).count();
        let share = picked as f64 / 20_000.0;
        assert!((share - 0.1).abs() < 0.01, "share {share}");
        assert_eq!(canary_pick("job-7", 0.1), canary_pick("job-7", 0.1));
        assert!(!canary_pick("job-7", 0.0));
        assert!(canary_pick("job-7", 1.0));
    }
}
