//! The lake sink's settings: `sinks.lake`, the lake's directory (empty: no
//! lake sink; `sluice up` defaults to `data/lake`). Buffering and retries are
//! the `[sinks]` settings every sink shares ([`super::super::SinkConfig`]).

use sluice_sql::Lake;

use super::LakeSink;
use crate::sinks::{Context, SinkError};

impl LakeSink {
    /// The lake sink of this process, when it has a lake.
    pub fn from_config(ctx: &Context<'_>) -> Result<Option<LakeSink>, SinkError> {
        let Some(dir) = ctx.lake else { return Ok(None) };
        Ok(Some(LakeSink { lake: Lake::open(dir)?, run_suffix: ctx.run_suffix.clone(), flagged: Default::default() }))
    }
}
