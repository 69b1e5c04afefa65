-- The shard's `results` table (SQLite). Columns: schemas::results_table::SHARD_COLUMNS.
-- Timestamps are milliseconds since the Unix epoch (SQLite has no timestamp type).
CREATE TABLE IF NOT EXISTS results (
    job_id          TEXT    NOT NULL PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    model_version   TEXT,
    status          TEXT    NOT NULL,
    error_code      TEXT,
    error_message   TEXT,
    queued_ms       INTEGER,
    inference_ms    INTEGER,
    batch_size      INTEGER,
    input_tokens    INTEGER,
    worker_id       TEXT,
    submitted_at_ms INTEGER,
    finished_at_ms  INTEGER NOT NULL,
    kafka_offset    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS results_tenant_finished ON results (tenant, finished_at_ms);
CREATE INDEX IF NOT EXISTS results_model_finished ON results (model, finished_at_ms);
