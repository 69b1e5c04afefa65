-- Jobs finished per model per hour, and how many of them succeeded.
SELECT model,
       date_trunc('hour', finished_at) AS hour,
       count(*) AS jobs,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded
FROM results
GROUP BY model, date_trunc('hour', finished_at)
ORDER BY model, hour;
