//! Configuration: `config/default.toml` (every setting and its default), an
//! optional file, `SLUICE__SECTION__KEY` environment variables, then
//! command-line flags — later sources win.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use sluice_workers::{BreakerConfig, EngineConfig, ExecutionProvider, ProviderFallback, SessionConfig};

use sluice_schemas::SEARCH_QUERY_MARK as QUERY_MARK;
use sluice_sql::{IndexConfig, QueryLimits};

use crate::store::StoreConfig;

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
    pub search: SearchSection,
    pub callbacks: CallbacksSection,
    pub ops: OpsSection,
}

/// Completion callbacks (the notifier, and the gateway's check at
/// submission). Documented in `config/default.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbacksSection {
    pub signing_key: String,
    pub allow_hosts: Vec<String>,
    pub allow_networks: Vec<String>,
    pub consumer_group: String,
    pub max_attempts: u32,
    pub max_elapsed_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub connect_timeout_ms: u64,
    pub timeout_ms: u64,
    pub max_response_bytes: usize,
    pub per_host_concurrency: usize,
    pub per_host_pending: usize,
    pub slow_after_ms: u64,
    pub max_pending: usize,
    pub max_pending_bytes: usize,
    pub session_timeout_ms: u64,
    pub max_poll_interval_ms: u64,
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
pub struct SearchSection {
    pub index: bool,
    pub index_dir: String,
    pub refresh_interval_ms: u64,
    pub max_vectors: usize,
    pub connectivity: usize,
    pub expansion_add: usize,
    pub expansion_search: usize,
    pub persist_every_vectors: usize,
    pub persist_interval_ms: u64,
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

/// One configured API key (`[[gateway.api_keys]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The tenant the key acts as.
    pub tenant: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Jobs per second this tenant may submit (the default when absent).
    #[serde(default)]
    pub rate_per_second: Option<u32>,
    /// Jobs this tenant may submit at once above its rate.
    #[serde(default)]
    pub rate_burst: Option<u32>,
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

    pub fn query_limits(&self) -> QueryLimits {
        QueryLimits {
            max_query_memory_bytes: self.sql.max_query_memory_bytes,
            max_total_memory_bytes: self.sql.max_total_memory_bytes,
            max_expression_bytes: self.sql.max_expression_bytes,
            ..QueryLimits::new(self.sql.max_rows.max(1), Duration::from_millis(self.sql.timeout_ms.max(1)))
        }
    }

    /// The approximate search indexes' settings; `None` when they are off.
    pub fn index_config(&self) -> Option<IndexConfig> {
        let s = &self.search;
        s.index.then(|| IndexConfig {
            dir: (!s.index_dir.is_empty()).then(|| PathBuf::from(&s.index_dir)),
            max_vectors: s.max_vectors,
            connectivity: s.connectivity.clamp(2, 128),
            expansion_add: s.expansion_add.max(1),
            expansion_search: s.expansion_search.max(1),
            persist_every_vectors: s.persist_every_vectors.max(1),
            persist_every: Duration::from_millis(s.persist_interval_ms),
            skip_marked: Some((QUERY_MARK.0.to_owned(), QUERY_MARK.1.to_owned())),
        })
    }

    pub fn index_refresh_interval(&self) -> Duration {
        Duration::from_millis(self.search.refresh_interval_ms.max(10))
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
