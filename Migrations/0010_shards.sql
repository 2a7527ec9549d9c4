-- nolad schema, version 10: a job's per-image stages (encode, label) split into shards that any worker
-- may claim (docs/scale-out.md).
--   nola.shard_inputs  per (job, stage): what the shards depend on (model folders, the tuned prompts for the
--                      label stage) and a key over it; shards made for another key are made again
--   nola.shards        one row per shard: its images, state, the worker holding it under a lease, its result
--   nola.job_status    gains shards_done, shards_total, workers_contributing and worker_rates (current stage)

CREATE TABLE nola.shard_inputs (
    job_id     bigint      NOT NULL REFERENCES nola.jobs (id) ON DELETE CASCADE,
    stage      text        NOT NULL CHECK (stage IN ('encode', 'label')),
    key        text        NOT NULL,   -- SHA-256 over everything below and the shards' image lists
    clip_model text        NOT NULL,   -- model folders: the same path on every host
    dino_model text,
    model_keys text[]      NOT NULL,   -- identities (folder name @ weights SHA-256) the shards must be computed with
    blob       bytea,                  -- label stage: the tuned prompts, LayerNorms and head (safetensors)
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, stage)
);

CREATE TABLE nola.shards (
    job_id           bigint      NOT NULL,
    stage            text        NOT NULL,
    index            integer     NOT NULL CHECK (index >= 0),
    paths            text[]      NOT NULL,   -- the shard's images (nola.images paths), in the job's order
    state            text        NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done')),
    worker           text,                   -- holding it (running) or having done it (done)
    claims           integer     NOT NULL DEFAULT 0,  -- numbers the claims: every write is guarded by it
    lease_expires_at timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    seconds          double precision,       -- of the claim that completed it
    result           bytea,                  -- label stage: probabilities, float32 little-endian, image × class
    unreadable       jsonb,                  -- encode stage: {"path": "why it could not be decoded"}
    error            text,                   -- the last reason a helper gave it back
    PRIMARY KEY (job_id, stage, index),
    FOREIGN KEY (job_id, stage) REFERENCES nola.shard_inputs (job_id, stage) ON DELETE CASCADE,
    CONSTRAINT running_shard_has_lease CHECK (state <> 'running' OR (worker IS NOT NULL AND lease_expires_at IS NOT NULL))
);
CREATE INDEX shards_claimable ON nola.shards (job_id, stage, index) WHERE state <> 'done';

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
    s.workers_contributing,
    s.worker_rates
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
) s ON true;

GRANT SELECT ON nola.shard_inputs, nola.shards TO nola_submitter, nola_worker;
GRANT INSERT, UPDATE, DELETE ON nola.shard_inputs, nola.shards TO nola_worker;
GRANT SELECT ON nola.job_status TO nola_submitter, nola_worker;
