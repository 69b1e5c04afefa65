//! Kafka header names used by Sluice.
//!
//! Job records carry [`TENANT`] and [`TRACEPARENT`]; dead-letter records keep
//! the original key and value byte for byte (the Kafka Connect convention) and
//! carry the failure in the `sluice.error.*` and `sluice.source.*` headers.

/// Tenant of the job, duplicated from the body so that brokers and tools can
/// route or filter without parsing JSON.
pub const TENANT: &str = "tenant";
/// W3C trace context of the producer.
pub const TRACEPARENT: &str = "traceparent";
/// On a results-topic record that may repeat one already on the topic (`1`):
/// a job's result published again after a crash between the topic's
/// acknowledgement and the published mark, or a send retried after a
/// timeout. Sinks that cannot refuse a repeated `job_id` themselves (the
/// lake) check such records against what they hold.
pub const MAYBE_REPEATED: &str = "sluice.maybe-repeated";

/// Stable [`crate::ErrorCode`] of a dead-lettered record.
pub const ERROR_CODE: &str = "sluice.error.code";
/// Human-readable reason of a dead-lettered record.
pub const ERROR_MESSAGE: &str = "sluice.error.message";
/// Topic the dead-lettered record was read from.
pub const SOURCE_TOPIC: &str = "sluice.source.topic";
/// Partition the dead-lettered record was read from (decimal).
pub const SOURCE_PARTITION: &str = "sluice.source.partition";
/// Offset the dead-lettered record was read from (decimal).
pub const SOURCE_OFFSET: &str = "sluice.source.offset";
/// Worker that rejected the record.
pub const WORKER_ID: &str = "sluice.worker.id";

/// On a callbacks dead-letter record: the URL that was not delivered to
/// (the code and message are in [`ERROR_CODE`] and [`ERROR_MESSAGE`]:
/// `callback_refused`, `callback_rejected`, `callback_exhausted`,
/// `callback_saturated`).
pub const CALLBACK_URL: &str = "sluice.callback.url";
/// On a callbacks dead-letter record: the delivery's id (`dlv_...`).
pub const CALLBACK_DELIVERY_ID: &str = "sluice.callback.delivery-id";
/// On a callbacks dead-letter record: attempts made (decimal; 0 when none was).
pub const CALLBACK_ATTEMPTS: &str = "sluice.callback.attempts";
