-- Job ids are per tenant: two tenants may use the same one, so a row is
-- unique on (tenant, job_id). Existing rows keep their place (rows are
-- routed to a shard by job_id alone).
ALTER TABLE results DROP CONSTRAINT IF EXISTS results_pkey;
ALTER TABLE results ADD PRIMARY KEY (tenant, job_id);
