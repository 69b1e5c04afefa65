-- The shard's `results` table (PostgreSQL). Columns: schemas::results_table::SHARD_COLUMNS.
-- Timestamps are milliseconds since the Unix epoch, like the SQLite dialect,
-- so that every shard has the same column types.
CREATE TABLE IF NOT EXISTS results (
    job_id          TEXT    NOT NULL PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    model_version   TEXT,
    status          TEXT    NOT NULL,
    error_code      TEXT,
    error_message   TEXT,
    queued_ms       BIGINT,
    inference_ms    BIGINT,
    batch_size      BIGINT,
    input_tokens    BIGINT,
    worker_id       TEXT,
    submitted_at_ms BIGINT,
    finished_at_ms  BIGINT  NOT NULL,
    kafka_offset    BIGINT  NOT NULL
);
CREATE INDEX IF NOT EXISTS results_tenant_finished ON results (tenant, finished_at_ms);
CREATE INDEX IF NOT EXISTS results_model_finished ON results (model, finished_at_ms);
