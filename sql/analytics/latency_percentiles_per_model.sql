-- Exact p50/p95/p99 of queue time and inference time per model (succeeded jobs).
SELECT model,
       count(*) AS jobs,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY queued_ms) AS queued_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY queued_ms) AS queued_p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY queued_ms) AS queued_p99,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY inference_ms) AS inference_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY inference_ms) AS inference_p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY inference_ms) AS inference_p99
FROM results
WHERE status = 'succeeded'
GROUP BY model
ORDER BY model;
