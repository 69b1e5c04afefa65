//! `sluice publish FILE.jsonl`: JobRequests straight to Kafka, one per line.
//!
//! Lines may leave out `job_id` (a UUIDv7 is made), `tenant` (the default
//! given) and `submitted_at` (now). Invalid lines are reported with their
//! line number and skipped; the others are produced with at most
//! `concurrency` sends in flight, paced to `rate` jobs per second if given.

use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{StreamExt, stream};
use serde_json::Value;
use sluice_schemas::{JobRequest, headers, topics};

use crate::kafka::{KafkaError, Producer};

/// What stops a publish before it starts.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// How a publish went.
#[derive(Debug, Default)]
pub struct Summary {
    pub published: u64,
    /// `line N: reason` for lines that are not valid jobs.
    pub invalid: Vec<String>,
    /// `job_id: reason` for jobs the broker did not take.
    pub failed: Vec<String>,
    pub elapsed: Duration,
}

/// Reads and checks every line of `path`.
pub fn read_jobs(path: &Path, default_tenant: &str) -> Result<(Vec<JobRequest>, Vec<String>), PublishError> {
    let file =
        std::fs::File::open(path).map_err(|source| PublishError::Read { path: path.display().to_string(), source })?;
    let mut jobs = Vec::new();
    let mut invalid = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| PublishError::Read { path: path.display().to_string(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let mut value: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                invalid.push(format!("line {n}: not valid JSON: {e}"));
                continue;
            }
        };
        if let Some(obj) = value.as_object_mut() {
            obj.entry("job_id").or_insert_with(|| Value::String(uuid::Uuid::now_v7().to_string()));
            obj.entry("tenant").or_insert_with(|| Value::String(default_tenant.to_owned()));
            obj.entry("submitted_at").or_insert_with(|| Value::String(Utc::now().to_rfc3339()));
        }
        match JobRequest::from_value(value) {
            Ok(job) => jobs.push(job),
            Err(e) => invalid.push(format!("line {n}: {}", e.message)),
        }
    }
    Ok((jobs, invalid))
}

/// Produces `jobs` to their topics; `progress` is called after each send.
pub async fn publish(
    jobs: Vec<JobRequest>,
    producer: &Producer,
    topic_prefix: &str,
    rate: Option<f64>,
    concurrency: usize,
    progress: impl Fn(u64),
) -> Summary {
    let started = Instant::now();
    let interval = rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(1.0 / r));
    let mut summary = Summary::default();
    let results = stream::iter(jobs.into_iter().enumerate())
        .map(|(i, job)| async move {
            if let Some(every) = interval {
                // Pace by schedule, not by sleeping after each send.
                let due = started + every * i as u32;
                tokio::time::sleep_until(due.into()).await;
            }
            let payload = serde_json::to_vec(&job).expect("JobRequest serialises. This is a bug.");
            let topic = topics::jobs(topic_prefix, &job.model);
            let sent = producer
                .send(&topic, Some(job.job_id.as_bytes()), &payload, &[(headers::TENANT, job.tenant.as_bytes())])
                .await;
            (job.job_id, sent)
        })
        .buffer_unordered(concurrency.max(1));
    futures::pin_mut!(results);
    while let Some((job_id, sent)) = results.next().await {
        match sent {
            Ok(_) => summary.published += 1,
            Err(e) => summary.failed.push(format!("{job_id}: {e}")),
        }
        progress(summary.published + summary.failed.len() as u64);
    }
    summary.elapsed = started.elapsed();
    summary
}
