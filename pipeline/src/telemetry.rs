//! Process-wide telemetry: logs through `tracing`, metrics through the
//! `metrics` facade rendered as Prometheus text (all names start `sluice_`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("sluice_jobs_submitted_total", "Jobs accepted by the gateway, by model.");
    describe_counter!("sluice_jobs_completed_total", "Jobs that reached a terminal status, by model and status.");
    describe_counter!("sluice_dead_lettered_total", "Records sent to the dead-letter topic, by error code.");
    describe_histogram!("sluice_queue_time_seconds", Unit::Seconds, "Submission to start of the job's batch.");
    describe_histogram!(
        "sluice_worker_stage_seconds",
        Unit::Seconds,
        "Time a record spends in each worker stage (started, inferred, stored, published, marked), by model."
    );
    describe_histogram!("sluice_inference_seconds", Unit::Seconds, "Tokenisation and forward pass of one batch.");
    describe_histogram!("sluice_batch_size", Unit::Count, "Jobs per batch.");
    describe_gauge!("sluice_worker_in_flight", "Records being processed, by model.");
    describe_gauge!("sluice_paused_partitions", "Partitions paused by flow control, by model.");
    describe_counter!(
        "sluice_partition_pauses_total",
        "Times a worker stopped taking records, by model and reason: in_flight (at worker.max_in_flight; fetched \
         records wait in the consumer's bounded prefetch), stalled (held there for 5 s: partitions paused), breaker \
         (model unhealthy: partitions paused)."
    );
    describe_gauge!("sluice_queue_depth", "Jobs queued in an engine's scheduler, by model version.");
    describe_histogram!("sluice_batch_padding_ratio", "Share of a batch's padded tokens that is padding.");
    describe_histogram!("sluice_batch_tokens", Unit::Count, "Padded tokens per batch (longest input x jobs).");
    describe_gauge!("sluice_breaker_state", "Circuit breaker by model version: 0 closed, 1 half-open, 2 open.");
    describe_counter!(
        "sluice_consumer_offset_resets_total",
        "Times a consumer found its next offset gone from the broker and skipped ahead (records lost to its group)."
    );
    describe_counter!(
        "sluice_consumer_rejoins_total",
        "Times a member holding no partition left and rejoined a group that committed nothing while records waited."
    );
    describe_counter!("sluice_cache_hits_total", "Jobs answered from the inference cache, by model.");
    describe_counter!("sluice_job_retries_total", "Inference retries after a failed batch, by model.");
    describe_counter!("sluice_jobs_dropped_total", "Jobs dropped before inference, by model version and reason.");
    describe_counter!("sluice_jobs_cancelled_total", "Jobs cancelled through the API, by model.");
    describe_counter!("sluice_model_versions_refused_total", "Model versions refused (checksum, config).");
    describe_histogram!(
        "sluice_store_batch_writes",
        Unit::Count,
        "Record writes the Redis store applied in one round trip (its group commit)."
    );
    describe_counter!(
        "sluice_execution_provider_fallback_total",
        "Sessions that fell back to the CPU because the configured provider failed."
    );
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn,ort=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
