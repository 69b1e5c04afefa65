-- Tenants by jobs, with their token volume and failure count.
SELECT tenant,
       count(*) AS jobs,
       sum(input_tokens) AS input_tokens,
       count(*) FILTER (WHERE status <> 'succeeded') AS not_succeeded
FROM results
GROUP BY tenant
ORDER BY jobs DESC, tenant
LIMIT 10;
