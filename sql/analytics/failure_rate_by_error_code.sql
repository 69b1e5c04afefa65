-- Failures by model and error code, as a share of that model's jobs.
WITH per_model AS (SELECT model, count(*) AS jobs FROM results GROUP BY model)
SELECT r.model,
       r.error_code,
       count(*) AS failures,
       round(100.0 * count(*) / p.jobs, 2) AS pct_of_jobs
FROM results r JOIN per_model p ON r.model = p.model
WHERE r.status = 'failed'
GROUP BY r.model, r.error_code, p.jobs
ORDER BY r.model, failures DESC, r.error_code;
