//! A job's place in a batch (`POST /v1/batches`), and what a batch's
//! `batch.completed` callback delivers when its last line finishes.
//!
//! The gateway stamps every line of a batch with a [`BatchLine`]; the
//! result echoes it. With it the notifier knows, from a result alone, which
//! batch a line belongs to, how many lines the batch has and where its
//! completion is to be delivered: it counts each batch's finished lines
//! (once per line, whatever the replays) and delivers a
//! [`BatchCompleted`] when the count reaches `total`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::callback::validate_url;
use crate::request::check_ident;

/// Most lines a batch can have (the gateway's `max_batch_lines` is at most this).
pub const MAX_LINES: u32 = 1_000_000;
/// Longest batch id, in characters.
pub const ID_CHARS: usize = 64;
/// The `Sluice-Event` of a batch's completion.
pub const COMPLETED_EVENT: &str = "batch.completed";

/// Which batch a job belongs to: set by the gateway on every line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BatchLine {
    /// The batch's id (`batch_` and 32 hex digits from the gateway).
    pub id: String,
    /// This line's place among the batch's jobs: `0..total`.
    pub index: u32,
    /// How many jobs the batch has.
    pub total: u32,
    /// Where to POST the batch's [`BatchCompleted`] once every line has
    /// finished (same rules as a job's `callback.url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

impl BatchLine {
    /// The rules serde types do not express.
    pub fn validate(&self) -> Result<(), String> {
        check_ident("batch.id", &self.id, ID_CHARS, "")?;
        if !(1..=MAX_LINES).contains(&self.total) {
            return Err(format!("batch.total: {} is outside 1..={MAX_LINES}", self.total));
        }
        if self.index >= self.total {
            return Err(format!("batch.index: {} is not below batch.total ({})", self.index, self.total));
        }
        if let Some(url) = &self.callback_url {
            validate_url("batch.callback_url", url)?;
        }
        Ok(())
    }
}

/// The body of a `batch.completed` delivery: the batch once every line has
/// finished, with its lines counted by status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchCompleted {
    /// Always `batch`.
    pub object: String,
    pub id: String,
    pub tenant: String,
    /// Always `completed`.
    pub status: String,
    pub total: u32,
    /// Finished lines by status (`succeeded`, `failed`, `expired`,
    /// `cancelled`; absent when zero). They add up to `total`.
    pub counts: BTreeMap<String, u32>,
    /// When the notifier saw the last line finish.
    pub completed_at: DateTime<Utc>,
    /// Where the lines' results are (`GET`, JSONL).
    pub results_url: String,
}

impl BatchCompleted {
    pub fn new(id: &str, tenant: &str, total: u32, counts: BTreeMap<String, u32>, at: DateTime<Utc>) -> Self {
        BatchCompleted {
            object: "batch".into(),
            id: id.to_owned(),
            tenant: tenant.to_owned(),
            status: "completed".into(),
            total,
            counts,
            completed_at: at,
            results_url: format!("/v1/batches/{id}/results"),
        }
    }
}

/// The id of a batch's `batch.completed` delivery: a batch completes once,
/// so every attempt and every repeat (a replay, a second notifier racing
/// on the last lines) carries the same id.
pub fn completed_delivery_id(tenant: &str, batch_id: &str) -> String {
    let digest = Sha256::digest(format!("{tenant}/{batch_id}\n{COMPLETED_EVENT}"));
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("dlv_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> BatchLine {
        BatchLine { id: "batch_0123abcd".into(), index: 0, total: 3, callback_url: Some("https://h.example/b".into()) }
    }

    #[test]
    fn a_line_is_inside_its_batch_and_its_callback_is_a_url() {
        assert_eq!(line().validate(), Ok(()));
        let past = BatchLine { index: 3, ..line() };
        assert!(past.validate().unwrap_err().contains("batch.index: 3 is not below batch.total (3)"));
        let empty = BatchLine { total: 0, index: 0, ..line() };
        assert!(empty.validate().unwrap_err().contains("batch.total: 0"));
        let bad_id = BatchLine { id: "a/b".into(), ..line() };
        assert!(bad_id.validate().unwrap_err().contains("batch.id"));
        let ftp = BatchLine { callback_url: Some("ftp://h.example/".into()), ..line() };
        assert!(ftp.validate().unwrap_err().contains("batch.callback_url: scheme \"ftp\""));
    }

    #[test]
    fn a_batch_completes_under_one_delivery_id_per_tenant() {
        let a = completed_delivery_id("acme", "batch_1");
        assert_eq!(a, completed_delivery_id("acme", "batch_1"));
        assert_ne!(a, completed_delivery_id("other", "batch_1"));
        assert_ne!(a, completed_delivery_id("acme", "batch_2"));
        assert!(a.starts_with("dlv_") && a.len() == 36);
    }
}
