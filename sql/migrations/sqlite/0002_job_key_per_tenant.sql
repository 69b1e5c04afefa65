-- Job ids are per tenant: two tenants may use the same one, so a row is
-- unique on (tenant, job_id). SQLite cannot change a primary key in place:
-- the table is copied into one with the new key.
CREATE TABLE results_by_tenant (
    job_id          TEXT    NOT NULL,
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
    kafka_offset    INTEGER NOT NULL,
    PRIMARY KEY (tenant, job_id)
);
INSERT INTO results_by_tenant SELECT * FROM results;
DROP TABLE results;
ALTER TABLE results_by_tenant RENAME TO results;
CREATE INDEX IF NOT EXISTS results_tenant_finished ON results (tenant, finished_at_ms);
CREATE INDEX IF NOT EXISTS results_model_finished ON results (model, finished_at_ms);
