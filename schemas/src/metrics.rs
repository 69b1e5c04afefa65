//! Every Prometheus metric Sluice exports, declared once: name, kind, unit,
//! labels and help. Like the topic and header names, metric names are an
//! interface (dashboards, alerts, `deploy/`), so they live with the other
//! contracts. Emitters use these constants (`metrics::counter!(JOBS_SUBMITTED.name, …)`),
//! the pipeline's telemetry describes all of [`ALL`], and tests check that
//! no metric is emitted under a name that is not here and that every
//! exported one has its help text.

/// What a metric counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The unit of a metric's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Count,
    /// A ratio or a state with its own documented values.
    None,
}

/// One exported metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    /// Label keys it is emitted with.
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! catalog {
    ($($(#[$doc:meta])* $id:ident = $kind:ident $unit:ident $name:literal [$($label:literal),*] $help:literal;)*) => {
        $(
            $(#[$doc])*
            pub const $id: Metric = Metric {
                name: $name,
                kind: Kind::$kind,
                unit: Unit::$unit,
                labels: &[$($label),*],
                help: $help,
            };
        )*
        /// Every metric, in declaration order.
        pub const ALL: &[Metric] = &[$($id),*];
    };
}

catalog! {
    // Gateway.
    JOBS_SUBMITTED = Counter Count "sluice_jobs_submitted_total" ["model"] "Jobs accepted by the gateway, by model.";
    BATCHES_SUBMITTED = Counter Count "sluice_batches_submitted_total" [] "Batches (JSONL files) accepted by the gateway.";
    JOBS_CANCELLED = Counter Count "sluice_jobs_cancelled_total" ["model"] "Jobs cancelled through the API, by model.";
    RATE_LIMITED = Counter Count "sluice_rate_limited_total" [] "Requests answered 429 because their tenant's rate limit was exceeded.";
    CONSUMER_LAG = Gauge Count "sluice_consumer_lag" ["model"] "Jobs in a model's topic past its worker group's committed offsets, as the gateway last sampled it.";
    SQL_QUERY_SECONDS = Histogram Seconds "sluice_sql_query_seconds" [] "Time to answer one POST /v1/sql query.";
    SEARCHES = Counter Count "sluice_searches_total" ["mode"] "POST /v1/search answers, by mode (approximate through the index, exact through a scan of the lake).";
    SEARCH_INDEX_VECTORS = Gauge Count "sluice_search_index_vectors" [] "Vectors in this process's approximate search indexes (all tenants, models and versions).";
    SEARCH_INDEX_FULL = Gauge Count "sluice_search_index_full" [] "1 when the search index reached search.max_vectors and stopped taking newer results (exact search still sees them).";
    SEARCH_INDEX_REFRESH_ERRORS = Counter Count "sluice_search_index_refresh_errors_total" [] "Failed refreshes or snapshots of the search index (each is logged; the next refresh retries).";
    GATEWAY_RESPONSES = Counter Count "sluice_gateway_responses_total" ["tenant", "code"] "Answers of the REST API under /v1, by the caller's tenant (its API key's; open without keys; unknown for a missing or unknown key) and HTTP status code.";
    // Workers.
    JOBS_COMPLETED = Counter Count "sluice_jobs_completed_total" ["model", "status"] "Jobs that reached a terminal status and were published, by model and status.";
    DEAD_LETTERED = Counter Count "sluice_dead_lettered_total" ["code"] "Records sent to the dead-letter topic, by error code.";
    DEAD_LETTER_FAILURES = Counter Count "sluice_dead_letter_failures_total" [] "Records dropped because the dead-letter topic refused them for good too (each is logged at error level).";
    QUEUE_TIME = Histogram Seconds "sluice_queue_time_seconds" ["model"] "Submission to the start of the job's batch, by model.";
    WORKER_STAGE = Histogram Seconds "sluice_worker_stage_seconds" ["model", "stage"] "Time a record spends in each worker stage (started, inferred, stored, published, marked), by model.";
    WORKER_IN_FLIGHT = Gauge Count "sluice_worker_in_flight" ["model"] "Records being processed, by model.";
    PAUSED_PARTITIONS = Gauge Count "sluice_paused_partitions" ["model"] "Partitions paused by flow control, by model.";
    PARTITION_PAUSES = Counter Count "sluice_partition_pauses_total" ["model", "reason"] "Times a worker stopped taking records, by model and reason: in_flight (at worker.max_in_flight; fetched records wait in the consumer's bounded prefetch), stalled (held there for 5 s: partitions paused), breaker (model unhealthy: partitions paused).";
    CACHE_HITS = Counter Count "sluice_cache_hits_total" ["model"] "Jobs answered from the inference cache, by model.";
    JOB_RETRIES = Counter Count "sluice_job_retries_total" ["model"] "Inference retries after a failed batch, by model.";
    // Kafka consumers.
    OFFSET_RESETS = Counter Count "sluice_consumer_offset_resets_total" [] "Times a consumer found its next offset gone from the broker and skipped ahead (records lost to its group).";
    CONSUMER_REJOINS = Counter Count "sluice_consumer_rejoins_total" [] "Times a member holding no partition left and rejoined a group that committed nothing while records waited.";
    // Results store.
    STORE_BATCH_WRITES = Histogram Count "sluice_store_batch_writes" [] "Record writes the Redis store applied in one round trip (its group commit).";
    // Inference engines.
    QUEUE_DEPTH = Gauge Count "sluice_queue_depth" ["model"] "Jobs queued in an engine's scheduler, by model version.";
    JOBS_DROPPED = Counter Count "sluice_jobs_dropped_total" ["model", "reason"] "Jobs dropped before inference, by model version and reason (expired, cancelled).";
    BATCH_SIZE = Histogram Count "sluice_batch_size" ["model"] "Jobs per batch, by model version.";
    BATCH_TOKENS = Histogram Count "sluice_batch_tokens" ["model"] "Padded tokens per batch (longest input x jobs), by model version.";
    BATCH_PADDING = Histogram None "sluice_batch_padding_ratio" ["model"] "Share of a batch's padded tokens that is padding, by model version.";
    INFERENCE_SECONDS = Histogram Seconds "sluice_inference_seconds" ["model"] "One batch on an inference thread: input tensors built, ONNX Runtime's forward pass, outputs read (tokenisation runs before it, on the preprocessing thread), by model version.";
    BREAKER_STATE = Gauge None "sluice_breaker_state" ["model"] "Circuit breaker by model version: 0 closed, 1 half-open, 2 open.";
    VERSIONS_REFUSED = Counter Count "sluice_model_versions_refused_total" [] "Model versions refused (checksum, config).";
    PROVIDER_FALLBACK = Counter Count "sluice_execution_provider_fallback_total" ["model"] "Sessions that fell back to the CPU because the configured execution provider failed.";
    // Sinks.
    SINK_UNDECODABLE = Counter Count "sluice_sink_undecodable_total" [] "Results-topic records the sinks could not decode (skipped, logged).";
    SINK_BUFFERED_ROWS = Gauge Count "sluice_sink_buffered_rows" ["sink"] "Rows buffered in a sink, waiting for their flush.";
    SINK_REPEATS_SKIPPED = Counter Count "sluice_sink_repeats_skipped_total" [] "Results the lake sink did not land because the lake already held that job's result (published again after a worker crash or a retried send).";
    SINK_REPLAYED_SKIPPED = Counter Count "sluice_sink_replayed_skipped_total" ["sink"] "Records skipped because the lake already holds their offsets (a replay after a crash).";
    SINK_FLUSH_SECONDS = Histogram Seconds "sluice_sink_flush_seconds" ["sink"] "Time of one successful flush, by sink.";
    SINK_ROWS = Counter Count "sluice_sink_rows_total" ["sink"] "Rows made durable, by sink.";
    SINK_FLUSHES = Counter Count "sluice_sink_flushes_total" ["sink"] "Successful flushes, by sink.";
    SINK_FLUSH_FAILURES = Counter Count "sluice_sink_flush_failures_total" ["sink", "retryable"] "Failed flush attempts, by sink and whether retrying can fix them (the batch is kept and tried again either way).";
    SHARD_UP = Gauge None "sluice_sink_shard_up" ["shard"] "Whether the last write to a shard succeeded (1) or failed (0).";
    // Notifier (completion callbacks).
    CALLBACK_DELIVERIES = Counter Count "sluice_callback_deliveries_total" ["outcome"] "Callbacks finished, by outcome: delivered (a 2xx) or dead_lettered (on <prefix>.callbacks.dlq, see sluice_callback_dead_letters_total).";
    CALLBACK_ATTEMPTS = Counter Count "sluice_callback_attempts_total" ["result"] "HTTP attempts, by result: 2xx, retryable (5xx, 408, 429, timeout, connection error) or final (another 4xx, a redirect).";
    CALLBACK_RETRIES = Counter Count "sluice_callback_retries_total" [] "Attempts made again after a retryable failure.";
    CALLBACK_DEAD_LETTERS = Counter Count "sluice_callback_dead_letters_total" ["reason"] "Callbacks dead-lettered, by reason: refused (destination not allowed), rejected (a final answer), exhausted (attempts or time window used up), saturated (too many pending for one destination).";
    CALLBACK_DELIVERY_SECONDS = Histogram Seconds "sluice_callback_delivery_seconds" [] "From a result's arrival at the notifier to its delivery (retries included).";
    CALLBACK_PENDING = Gauge Count "sluice_callback_pending" [] "Callbacks being delivered or waiting to retry (bounded by callbacks.max_pending).";
}

/// Bucket bounds (Prometheus `le`) of a histogram, so that quantiles can
/// be aggregated across processes (`histogram_quantile` over
/// `sum by (le)`); empty for counters and gauges.
pub fn buckets(m: &Metric) -> &'static [f64] {
    const SECONDS: &[f64] =
        &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
    const JOBS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0];
    const TOKENS: &[f64] = &[16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0];
    const WRITES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
    const RATIO: &[f64] = &[0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0];
    match (m.kind, m.unit) {
        (Kind::Counter | Kind::Gauge, _) => &[],
        (Kind::Histogram, Unit::Seconds) => SECONDS,
        (Kind::Histogram, Unit::None) => RATIO,
        (Kind::Histogram, Unit::Count) if m.name == BATCH_TOKENS.name => TOKENS,
        (Kind::Histogram, Unit::Count) if m.name == STORE_BATCH_WRITES.name => WRITES,
        (Kind::Histogram, Unit::Count) => JOBS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prometheus' naming conventions, and one declaration per name.
    #[test]
    fn names_follow_prometheus_conventions_and_are_unique() {
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a metric is declared twice");
        for m in ALL {
            assert!(m.name.starts_with("sluice_"), "{}", m.name);
            assert!(m.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            if m.unit == Unit::Seconds {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
            assert!(m.help.len() > 10 && m.help.ends_with('.'), "{}: help {:?}", m.name, m.help);
        }
    }

    /// Every histogram has increasing buckets; nothing else has any.
    #[test]
    fn histograms_and_only_histograms_have_increasing_buckets() {
        for m in ALL {
            let b = buckets(m);
            assert_eq!(m.kind == Kind::Histogram, !b.is_empty(), "{}", m.name);
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{}: {b:?}", m.name);
        }
        assert_eq!(buckets(&BATCH_SIZE).last(), Some(&256.0));
        assert_eq!(buckets(&BATCH_PADDING).last(), Some(&1.0));
    }
}
