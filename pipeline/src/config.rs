//! Configuration: `config/default.toml` (every setting and its default), an
//! optional file, `SLUICE__SECTION__KEY` environment variables, then
//! command-line flags — later sources win.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use sluice_workers::{BreakerConfig, EngineConfig, ExecutionProvider, ProviderFallback, SessionConfig};

use sluice_sql::{QueryLimits, ShardStrategy};

use crate::gateway::{ApiKey, GatewayConfig};
use crate::sinks::SinkConfig;
use crate::store::StoreConfig;
use crate::worker::WorkerConfig;

/// The defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// An invalid configuration: which key, from which source, and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(Box<figment::Error>);

/// All of Sluice's settings. Field meanings are documented in
/// `config/default.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaSection,
    pub store: StoreSection,
    pub models: ModelsSection,
    pub engine: EngineSection,
    pub worker: WorkerSection,
    pub gateway: GatewaySection,
    pub sinks: SinksSection,
    pub sql: SqlSection,
    pub ops: OpsSection,
}

/// The health and metrics listener of `sluice worker` and `sluice sink`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsSection {
    /// Address of `/healthz`, `/readyz` and `/metrics` (port 0 picks a free
    /// port; empty: no listener).
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksSection {
    pub lake: String,
    pub shards: Vec<String>,
    pub shard_strategy: String,
    pub time_boundaries: Vec<String>,
    pub flush_rows: usize,
    pub flush_bytes: usize,
    pub flush_interval_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub shard_timeout_ms: u64,
    pub session_timeout_ms: u64,
    pub max_poll_interval_ms: u64,
    pub consumer_group: String,
    pub up_local_defaults: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSection {
    pub max_rows: usize,
    pub timeout_ms: u64,
    pub max_query_bytes: usize,
    pub max_concurrent: usize,
    pub max_query_memory_bytes: usize,
    pub max_total_memory_bytes: usize,
    pub max_expression_bytes: usize,
    pub open_mode_all_tenants: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    pub brokers: String,
    pub topic_prefix: String,
    pub partitions: i32,
    pub embedded_partitions: i32,
    pub embedded_listen: String,
    pub replication: i32,
    pub produce_timeout_ms: u64,
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub redis: String,
    pub ttl_secs: u64,
    pub memory_capacity: usize,
    pub key_prefix: String,
    pub cache_ttl_secs: u64,
    pub cache_capacity: usize,
    pub cache_shared: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSection {
    pub repository: PathBuf,
    pub serve: Vec<String>,
    pub poll_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_wait_ms: u64,
    pub length_aware: bool,
    pub starvation_after_ms: u64,
    pub queue_capacity: usize,
    pub inference_threads: usize,
    pub intra_threads: usize,
    pub optimization_level: u8,
    pub ort_dylib: String,
    pub provider: Provider,
    pub cuda_device: i32,
    pub cuda_fallback: Fallback,
    pub breaker_window: usize,
    pub breaker_min_batches: usize,
    pub breaker_failure_ratio: f64,
    pub breaker_cool_down_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    Fail,
    Cpu,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub id: String,
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    pub resume_below: usize,
    pub running_status_after_ms: u64,
    pub max_attempts: u32,
    pub publish_timeout_ms: u64,
    pub commit_interval_ms: u64,
    pub drain_timeout_ms: u64,
    pub session_timeout_ms: u64,
    pub max_poll_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    pub listen: String,
    pub default_tenant: String,
    pub max_body_bytes: usize,
    pub max_items_per_request: usize,
    pub max_batch_bytes: usize,
    pub max_batch_lines: usize,
    pub max_concurrent_uploads: usize,
    pub upload_timeout_ms: u64,
    pub max_in_flight: usize,
    pub max_backlog: i64,
    pub backlog_poll_ms: u64,
    pub max_wait_secs: u64,
    pub max_waiters: usize,
    pub max_waiters_per_tenant: usize,
    pub rate_per_second: u32,
    pub rate_burst: u32,
    pub api_keys: Vec<ApiKey>,
}

impl Config {
    /// Defaults, then `file`, then `SLUICE__*` variables, then `overrides`
    /// (a partial config, e.g. from command-line flags).
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        let mut cfg: Config = fig
            .merge(Env::prefixed("SLUICE__").split("__"))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| ConfigError(Box::new(e)))?;
        cfg.models.repository = expand_home(&cfg.models.repository);
        Ok(cfg)
    }

    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            ttl: Duration::from_secs(self.store.ttl_secs),
            memory_capacity: self.store.memory_capacity,
            key_prefix: self.store.key_prefix.clone(),
            cache_ttl: Duration::from_secs(self.store.cache_ttl_secs),
            cache_capacity: self.store.cache_capacity,
        }
    }

    pub fn engine(&self) -> EngineConfig {
        let e = &self.engine;
        EngineConfig {
            max_batch_size: e.max_batch_size,
            max_batch_tokens: e.max_batch_tokens,
            max_wait: Duration::from_millis(e.max_wait_ms),
            starvation_after: Duration::from_millis(e.starvation_after_ms),
            length_aware: e.length_aware,
            queue_capacity: e.queue_capacity,
            inference_threads: e.inference_threads,
            session: SessionConfig {
                dylib_path: (!e.ort_dylib.is_empty()).then(|| PathBuf::from(&e.ort_dylib)),
                intra_threads: e.intra_threads,
                optimization_level: e.optimization_level,
                provider: match e.provider {
                    Provider::Cpu => ExecutionProvider::Cpu,
                    Provider::Cuda => ExecutionProvider::Cuda { device_id: e.cuda_device },
                },
                fallback: match e.cuda_fallback {
                    Fallback::Fail => ProviderFallback::Fail,
                    Fallback::Cpu => ProviderFallback::Cpu,
                },
            },
            breaker: BreakerConfig {
                window: e.breaker_window,
                min_batches: e.breaker_min_batches,
                failure_ratio: e.breaker_failure_ratio,
                cool_down: Duration::from_millis(e.breaker_cool_down_ms),
            },
        }
    }

    pub fn worker(&self) -> WorkerConfig {
        let w = &self.worker;
        WorkerConfig {
            worker_id: if w.id.is_empty() { default_worker_id() } else { w.id.clone() },
            topic_prefix: self.kafka.topic_prefix.clone(),
            max_in_flight: w.max_in_flight,
            max_in_flight_bytes: w.max_in_flight_bytes,
            resume_below: w.resume_below,
            running_after: Duration::from_millis(w.running_status_after_ms),
            max_attempts: w.max_attempts,
            commit_interval: Duration::from_millis(w.commit_interval_ms),
            drain_timeout: Duration::from_millis(w.drain_timeout_ms),
            cache_shared: self.store.cache_shared,
        }
    }

    pub fn gateway(&self) -> GatewayConfig {
        let g = &self.gateway;
        GatewayConfig {
            topic_prefix: self.kafka.topic_prefix.clone(),
            default_tenant: g.default_tenant.clone(),
            max_body_bytes: g.max_body_bytes,
            max_batch_bytes: g.max_batch_bytes,
            max_items_per_request: g.max_items_per_request,
            max_batch_lines: g.max_batch_lines,
            max_concurrent_uploads: g.max_concurrent_uploads,
            upload_timeout: Duration::from_millis(g.upload_timeout_ms.max(1)),
            max_in_flight: g.max_in_flight,
            max_backlog: g.max_backlog,
            backlog_poll: Duration::from_millis(g.backlog_poll_ms.max(50)),
            max_wait: Duration::from_secs(g.max_wait_secs),
            max_waiters: g.max_waiters,
            max_waiters_per_tenant: g.max_waiters_per_tenant,
            rate_per_second: g.rate_per_second,
            rate_burst: g.rate_burst,
            api_keys: g.api_keys.clone(),
            max_query_bytes: self.sql.max_query_bytes,
            max_concurrent_queries: self.sql.max_concurrent,
            open_mode_sql_all_tenants: self.sql.open_mode_all_tenants,
        }
    }

    pub fn sink(&self) -> SinkConfig {
        let s = &self.sinks;
        SinkConfig {
            flush_rows: s.flush_rows.max(1),
            flush_bytes: s.flush_bytes.max(1),
            flush_interval: Duration::from_millis(s.flush_interval_ms.max(1)),
            retry_initial: Duration::from_millis(s.retry_initial_ms.max(1)),
            retry_max: Duration::from_millis(s.retry_max_ms.max(s.retry_initial_ms).max(1)),
        }
    }

    /// The shard strategy, checked against the number of shards.
    pub fn shard_strategy(&self) -> Result<ShardStrategy, String> {
        let s = &self.sinks;
        let strategy = match s.shard_strategy.as_str() {
            "hash_mod" => ShardStrategy::HashMod,
            "jump" => ShardStrategy::Jump,
            "time_range" => ShardStrategy::TimeRange {
                boundaries: s
                    .time_boundaries
                    .iter()
                    .map(|b| {
                        chrono::DateTime::parse_from_rfc3339(b)
                            .map(|t| t.with_timezone(&chrono::Utc))
                            .map_err(|e| format!("sinks.time_boundaries: {b:?}: {e}"))
                    })
                    .collect::<Result<_, _>>()?,
            },
            other => return Err(format!("sinks.shard_strategy {other:?}: expected hash_mod, jump or time_range")),
        };
        if !s.shards.is_empty() {
            strategy.validate(s.shards.len()).map_err(|e| e.to_string())?;
        }
        Ok(strategy)
    }

    /// `(session timeout, max poll interval)` of the sinks' consumer groups.
    pub fn sink_group_timeouts(&self) -> (Duration, Duration) {
        let s = &self.sinks;
        (Duration::from_millis(s.session_timeout_ms.max(1000)), Duration::from_millis(s.max_poll_interval_ms.max(1000)))
    }

    /// `(session timeout, max poll interval)` of the workers' consumer groups.
    pub fn worker_group_timeouts(&self) -> (Duration, Duration) {
        let w = &self.worker;
        (Duration::from_millis(w.session_timeout_ms.max(1000)), Duration::from_millis(w.max_poll_interval_ms.max(1000)))
    }

    /// The sinks' consumer-group prefix (`<group>.lake`, `<group>.shards`).
    pub fn sink_group(&self) -> String {
        match self.sinks.consumer_group.as_str() {
            "" => format!("{}.sink", self.kafka.topic_prefix),
            g => g.to_owned(),
        }
    }

    pub fn query_limits(&self) -> QueryLimits {
        QueryLimits {
            max_query_memory_bytes: self.sql.max_query_memory_bytes,
            max_total_memory_bytes: self.sql.max_total_memory_bytes,
            max_expression_bytes: self.sql.max_expression_bytes,
            ..QueryLimits::new(self.sql.max_rows.max(1), Duration::from_millis(self.sql.timeout_ms.max(1)))
        }
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.models.poll_interval_ms.max(100))
    }

    /// Delivery timeout of the worker's results and dead letters.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.worker.publish_timeout_ms)
    }

    /// Delivery timeout of the gateway's jobs.
    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.kafka.produce_timeout_ms)
    }
}

fn default_worker_id() -> String {
    let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// `~/x` → `$HOME/x` (the default model repository lives under the home
/// directory); other paths, and `~` without a `HOME`, are kept as written.
fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_layers_override_in_order() {
        let c = Config::load(None, serde_json::json!({})).unwrap();
        assert_eq!(c.kafka.topic_prefix, "sluice");
        assert_eq!(c.engine.max_batch_size, 32);

        let dir = std::env::temp_dir().join(format!("sluice-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[kafka]\ntopic_prefix = \"fromfile\"\npartitions = 9\n").unwrap();
        let c = Config::load(Some(&file), serde_json::json!({"kafka": {"partitions": 2}})).unwrap();
        assert_eq!(c.kafka.topic_prefix, "fromfile");
        assert_eq!(c.kafka.partitions, 2, "flags beat the file");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("sluice-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[kafka]\nbrokerz = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), serde_json::json!({})).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_default_model_repository_is_under_the_home_directory() {
        let cfg = Config::load(None, serde_json::json!({})).unwrap();
        let home = std::env::var_os("HOME").expect("HOME is set");
        assert_eq!(cfg.models.repository, PathBuf::from(home).join(".cache/sluice/models"));
        assert_eq!(expand_home(Path::new("/models")), PathBuf::from("/models"));
        assert_eq!(expand_home(Path::new("models")), PathBuf::from("models"));
    }
}
