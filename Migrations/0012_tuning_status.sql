-- nolad schema, version 12: helpers of prompt tuning visible (docs/scale-out-tuning.md, "Watching it").
--   nola.tuning_workers  per (job, attempt, worker): the tuning units it computed (written with each unit's
--                        result, by the same guarded write), their strong views and seconds
--   nola.workers         gains helping_jobs: the jobs of other workers this worker held a help unit of
--                        (shard or tuning unit) since its previous heartbeat
--   nola.job_status      during `tune`, workers_contributing and worker_rates describe the tuning units
--                        (they describe the shards in `encode` and `label`, as before); gains tuning_step,
--                        tuning_units_done and tuning_units_total (the owner's current optimizer step)

CREATE TABLE nola.tuning_workers (
    job_id     bigint  NOT NULL REFERENCES nola.jobs (id) ON DELETE CASCADE,
    attempt    integer NOT NULL,
    worker     text    NOT NULL,
    units      bigint  NOT NULL DEFAULT 0,
    views      bigint  NOT NULL DEFAULT 0,            -- strong views (images) of those units
    seconds    double precision NOT NULL DEFAULT 0,   -- computing them (as written on each unit)
    last_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt, worker)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON nola.tuning_workers TO nola_worker;
GRANT SELECT ON nola.tuning_workers TO nola_submitter;

ALTER TABLE nola.workers ADD COLUMN helping_jobs bigint[] NOT NULL DEFAULT '{}';

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
-- took, plus the units of the current step it holds under a live lease.
LEFT JOIN LATERAL (
    SELECT count(*) AS workers_contributing,
           jsonb_object_agg(w.worker, jsonb_build_object(
               'units_done', w.units, 'views', w.views, 'running', w.running,
               'units_per_second', CASE WHEN w.seconds > 0 THEN round((w.units / w.seconds)::numeric, 2) END,
               'views_per_second', CASE WHEN w.seconds > 0 THEN round((w.views / w.seconds)::numeric, 2) END)) AS worker_rates
    FROM (SELECT coalesce(d.worker, r.worker) AS worker, coalesce(d.units, 0) AS units, coalesce(d.views, 0) AS views,
                 coalesce(d.seconds, 0) AS seconds, coalesce(r.running, 0) AS running
          FROM (SELECT tw.worker, tw.units, tw.views, tw.seconds FROM nola.tuning_workers tw
                WHERE tw.job_id = j.id AND tw.attempt = j.attempt) d
          FULL JOIN (SELECT x.worker, count(*) AS running FROM nola.tuning_units x
                     WHERE x.job_id = j.id AND x.attempt = j.attempt AND x.state = 'running' AND x.lease_expires_at >= now()
                     GROUP BY x.worker) r ON r.worker = d.worker) w
    WHERE j.stage = 'tune'
) t ON true;

GRANT SELECT ON nola.job_status TO nola_submitter, nola_worker;
