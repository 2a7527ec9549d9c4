-- nolad schema, version 13: a helper that gives a prompt-tuning unit back says why, as shards do
-- (nola.shards.error), and the reason stays visible for the rest of the job's tuning.
--   nola.tuning_workers  gains error: the last reason this worker gave a unit of the job back (its CLIP
--                        does not load there, an image it cannot read, ...). A worker stopping for SIGTERM
--                        gives units back without a reason.
--   nola.job_status      worker_rates, during `tune`, gains "gave_back" per worker: that reason (null when it
--                        gave none back); workers_contributing counts only workers with units done or running.

ALTER TABLE nola.tuning_workers ADD COLUMN error text;

CREATE OR REPLACE VIEW nola.job_status AS
SELECT
    j.id,
    j.collection,
    j.state,
    j.stage,
    round(CASE
        WHEN j.state = 'succeeded' THEN 1
        WHEN j.state = 'running' AND j.stage_count > 0 THEN
            (coalesce(j.stage_index, 0)
             + CASE WHEN j.stage_total > 0 THEN least(j.stage_done::numeric / j.stage_total, 1) ELSE 0 END)
            / j.stage_count
        ELSE 0
    END, 4) AS progress,
    j.stage_done AS images_done,
    j.stage_total AS images_total,
    CASE WHEN j.state = 'running' AND j.stage_done > 0 AND now() > j.stage_started_at
        THEN round((j.stage_done / extract(epoch FROM now() - j.stage_started_at))::numeric, 2)
    END AS rate,
    CASE WHEN j.state = 'running' AND j.stage_done > 0 AND j.stage_total >= j.stage_done AND now() > j.stage_started_at
        THEN (now() - j.stage_started_at) * ((j.stage_total - j.stage_done)::double precision / j.stage_done)
    END AS eta,
    j.worker,
    j.heartbeat_at AS last_heartbeat,
    j.attempt,
    j.attempts_used,
    j.max_attempts,
    j.cancel_requested,
    j.error,
    j.submitted_at,
    j.started_at,
    j.finished_at,
    s.shards_done,
    s.shards_total,
    CASE WHEN j.stage = 'tune' THEN coalesce(t.workers_contributing, 0) ELSE s.workers_contributing END AS workers_contributing,
    CASE WHEN j.stage = 'tune' THEN t.worker_rates ELSE s.worker_rates END AS worker_rates,
    u.tuning_step,
    coalesce(u.tuning_units_done, 0) AS tuning_units_done,
    coalesce(u.tuning_units_total, 0) AS tuning_units_total
FROM nola.jobs j
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE sh.state = 'done') AS shards_done,
           count(*) AS shards_total,
           count(DISTINCT sh.worker) FILTER (WHERE sh.state = 'done' OR (sh.state = 'running' AND sh.lease_expires_at >= now()))
               AS workers_contributing,
           (SELECT jsonb_object_agg(w.worker, jsonb_build_object(
                       'shards_done', w.done, 'images', w.images, 'running', w.running,
                       'images_per_second', CASE WHEN w.busy > 0 THEN round((w.images / w.busy)::numeric, 2) END))
            FROM (SELECT x.worker,
                         count(*) FILTER (WHERE x.state = 'done') AS done,
                         coalesce(sum(cardinality(x.paths)) FILTER (WHERE x.state = 'done'), 0) AS images,
                         coalesce(sum(x.seconds) FILTER (WHERE x.state = 'done'), 0) AS busy,
                         count(*) FILTER (WHERE x.state = 'running' AND x.lease_expires_at >= now()) AS running
                  FROM nola.shards x
                  WHERE x.job_id = j.id AND x.stage = j.stage AND x.worker IS NOT NULL
                  GROUP BY x.worker) w) AS worker_rates
    FROM nola.shards sh
    WHERE sh.job_id = j.id AND sh.stage = j.stage
) s ON true
-- The owner's current optimizer step (only its rows are kept) and who holds its units now.
LEFT JOIN LATERAL (
    SELECT p.step AS tuning_step,
           (SELECT count(*) FROM nola.tuning_units x
            WHERE x.job_id = j.id AND x.attempt = p.attempt AND x.step = p.step AND x.state = 'done') AS tuning_units_done,
           (SELECT count(*) FROM nola.tuning_units x
            WHERE x.job_id = j.id AND x.attempt = p.attempt AND x.step = p.step) AS tuning_units_total
    FROM nola.tuning_parameters p
    WHERE p.job_id = j.id AND p.attempt = j.attempt AND j.state = 'running'
) u ON true
-- Per worker over the attempt's tuning so far: units done (and the views in them) over the seconds they
-- took, the units of the current step it holds under a live lease, and the last reason it gave a unit back.
-- A worker that only gave units back is listed (with its reason) but does not count as contributing.
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE w.units > 0 OR w.running > 0) AS workers_contributing,
           jsonb_object_agg(w.worker, jsonb_build_object(
               'units_done', w.units, 'views', w.views, 'running', w.running,
               'units_per_second', CASE WHEN w.seconds > 0 THEN round((w.units / w.seconds)::numeric, 2) END,
               'views_per_second', CASE WHEN w.seconds > 0 THEN round((w.views / w.seconds)::numeric, 2) END,
               'gave_back', w.error)) AS worker_rates
    FROM (SELECT coalesce(d.worker, r.worker) AS worker, coalesce(d.units, 0) AS units, coalesce(d.views, 0) AS views,
                 coalesce(d.seconds, 0) AS seconds, coalesce(r.running, 0) AS running, d.error
          FROM (SELECT tw.worker, tw.units, tw.views, tw.seconds, tw.error FROM nola.tuning_workers tw
                WHERE tw.job_id = j.id AND tw.attempt = j.attempt) d
          FULL JOIN (SELECT x.worker, count(*) AS running FROM nola.tuning_units x
                     WHERE x.job_id = j.id AND x.attempt = j.attempt AND x.state = 'running' AND x.lease_expires_at >= now()
                     GROUP BY x.worker) r ON r.worker = d.worker) w
    WHERE j.stage = 'tune'
) t ON true;

GRANT SELECT ON nola.job_status TO nola_submitter, nola_worker;
