//! The shard sink's settings: `sinks.shards` (the shards' URLs; none: no
//! shard sink; `sluice up` defaults to two SQLite files under `data/shards`),
//! `sinks.shard_strategy` and `sinks.time_boundaries` (how rows are routed),
//! `sinks.shard_timeout_ms` (bound on one shard statement). Buffering and
//! retries are the `[sinks]` settings every sink shares.

use std::sync::Arc;
use std::time::Duration;

use sluice_sql::{ShardSet, ShardStrategy};

use super::ShardSink;
use crate::config::Config;
use crate::sinks::{Context, SinkError};

impl ShardSink {
    /// The shard sink of this process, when it has shards.
    pub fn from_config(ctx: &Context<'_>) -> Option<ShardSink> {
        ctx.shards.clone().map(ShardSink::new)
    }
}

/// Opens `urls` with the configured strategy; `None` when there are none.
pub fn open_shards(cfg: &Config, urls: &[String]) -> Result<Option<Arc<ShardSet>>, SinkError> {
    if urls.is_empty() {
        return Ok(None);
    }
    let strategy = shard_strategy(cfg).map_err(SinkError::Config)?;
    let timeout = Duration::from_millis(cfg.sinks.shard_timeout_ms.max(1));
    Ok(Some(Arc::new(ShardSet::open(urls, strategy, timeout)?)))
}

/// The shard strategy, checked against the number of configured shards.
pub fn shard_strategy(cfg: &Config) -> Result<ShardStrategy, String> {
    let s = &cfg.sinks;
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
