use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sluice_schemas::{ErrorCode, JobResult};
use sluice_sql::{ShardSet, ShardStrategy};

use super::ShardSink;
use crate::kafka::Record;
use crate::sinks::tests::record;
use crate::sinks::{Batch, Destination, decode};

/// A flush lands each result in the shard its strategy routes it to, once:
/// a replay of the same records writes nothing, and two tenants' jobs of
/// one id are two rows.
#[tokio::test]
async fn a_flush_lands_every_result_in_its_shard_once() {
    let dir = std::env::temp_dir().join(format!("sluice-sink-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let urls: Vec<String> = (0..2).map(|i| format!("sqlite:{}/shard-{i}.db", dir.display())).collect();
    let set = Arc::new(ShardSet::open(&urls, ShardStrategy::Jump, Duration::from_secs(3)).expect("shards"));
    let mut sink = ShardSink::new(set.clone());
    let records: Vec<Record> = (0..40)
        .map(|i| {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            let r = JobResult::failed(
                format!("j-{}", i / 2),
                tenant.into(),
                "m".into(),
                ErrorCode::Internal,
                "x".into(),
                Utc::now(),
            );
            Record { offset: i, ..record(&r) }
        })
        .collect();
    let mut batch = Batch::default();
    for r in &records {
        batch.push(r, decode(r));
    }
    sink.flush(&batch).await.expect("first flush");
    sink.flush(&batch).await.expect("a replay");
    let mut total = 0;
    for shard in 0..set.len() {
        let (rows, ids) = set.count(shard).await.expect("count");
        total += rows;
        assert_eq!(rows, 2 * ids, "shard {shard}: both tenants' job of each id");
        for row in batch.runs.values().flat_map(|run| &run.rows) {
            let here = set.job_ids(shard).await.expect("ids").contains(&row.job_id);
            assert_eq!(here, set.route(row) == shard, "{} routed to shard {}", row.job_id, set.route(row));
        }
    }
    assert_eq!(total, 40, "every result once");
    let _ = std::fs::remove_dir_all(&dir);
}
