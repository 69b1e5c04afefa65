-- How full the batches were: jobs by batch-size bucket per model.
SELECT model,
       CASE WHEN batch_size <= 1 THEN '1'
            WHEN batch_size <= 4 THEN '2-4'
            WHEN batch_size <= 8 THEN '5-8'
            WHEN batch_size <= 16 THEN '9-16'
            ELSE '17+' END AS batch_size_bucket,
       count(*) AS jobs
FROM results
WHERE batch_size IS NOT NULL
GROUP BY 1, 2
ORDER BY model, min(batch_size);
