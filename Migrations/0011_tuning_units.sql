-- nolad schema, version 11: data-parallel prompt tuning (docs/scale-out-tuning.md).
--   nola.tuning_parameters  the parameters (prompts, LayerNorms, head; safetensors) a job's owner
--                           published for optimizer step `step`: the version every unit of that step reads
--   nola.tuning_units       the units of a step: consecutive micro-batches of its logical batch. Any
--                           worker with the job's CLIP claims a pending unit (or one whose lease expired)
--                           with FOR UPDATE SKIP LOCKED, computes its gradient from zero at the published
--                           version and writes it once, while its lease holds; the owner sums the
--                           gradients in unit order and takes the AdamW step.
-- Rows belong to one attempt of the job: a new attempt (rescue, requeue) deletes the others' rows.
-- Checkpoints stay in nola.checkpoints as before.

CREATE TABLE nola.tuning_parameters (
    job_id     bigint PRIMARY KEY REFERENCES nola.jobs (id) ON DELETE CASCADE,
    attempt    integer NOT NULL,
    step       integer NOT NULL CHECK (step >= 1),
    blob       bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE nola.tuning_units (
    job_id           bigint NOT NULL REFERENCES nola.jobs (id) ON DELETE CASCADE,
    attempt          integer NOT NULL,
    step             integer NOT NULL CHECK (step >= 1),
    unit             integer NOT NULL CHECK (unit >= 0),
    epoch            integer NOT NULL CHECK (epoch >= 0),
    -- The step's logical batch size (the loss is a mean over it).
    logical_batch    integer NOT NULL CHECK (logical_batch >= 1),
    -- Per image of the unit: its index among the job's readable images (the strong view's seed), its
    -- teacher label and the file's path bytes (the same path on every host).
    images           integer[] NOT NULL,
    targets          integer[] NOT NULL,
    files            bytea[] NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done')),
    worker           text,
    lease_expires_at timestamptz,
    claims           integer NOT NULL DEFAULT 0,
    -- Little-endian: the gradient's floats, then the unit's loss and confidence sums (float64) and its
    -- agreements (int64). Written once.
    result           bytea,
    seconds          double precision,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    PRIMARY KEY (job_id, step, unit),
    CHECK (cardinality(images) >= 1 AND cardinality(images) = cardinality(targets) AND cardinality(images) = cardinality(files)),
    CHECK ((state = 'done') = (result IS NOT NULL))
);

-- Claims look for claimable units of running jobs.
CREATE INDEX tuning_units_claimable ON nola.tuning_units (job_id, step, unit) WHERE state <> 'done';

GRANT SELECT, INSERT, UPDATE, DELETE ON nola.tuning_parameters, nola.tuning_units TO nola_worker;
GRANT SELECT ON nola.tuning_units TO nola_submitter;
