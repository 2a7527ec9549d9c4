-- nolad schema, version 1: the SQL interface of DESIGN.md.
-- Applied by `nolad migrate` in one transaction under an advisory lock; the migrator itself creates
-- schema `nola` and the version table `nola.schema_migrations` before running this file.

-- Roles are cluster-wide; create them once, whichever database migrates first.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nola_submitter') THEN
        CREATE ROLE nola_submitter NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nola_worker') THEN
        CREATE ROLE nola_worker NOLOGIN;
    END IF;
END
$roles$;

CREATE TYPE nola.job_state AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled');

-- Validation used by the CHECK constraints of nola.jobs. Each raises check_violation with a message
-- that names the offending value, so a bad INSERT fails with a sentence, not just a constraint name.
CREATE FUNCTION nola.check_classes(classes text[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    name text;
    seen text[] := '{}';
BEGIN
    IF classes IS NULL OR cardinality(classes) = 0 THEN
        RAISE EXCEPTION 'classes must not be empty' USING ERRCODE = 'check_violation';
    END IF;
    IF array_ndims(classes) <> 1 THEN
        RAISE EXCEPTION 'classes must be a one-dimensional list of names' USING ERRCODE = 'check_violation';
    END IF;
    FOREACH name IN ARRAY classes LOOP
        IF name IS NULL OR btrim(name) = '' THEN
            RAISE EXCEPTION 'class names must not be empty' USING ERRCODE = 'check_violation';
        END IF;
        IF lower(btrim(name)) = ANY (seen) THEN
            RAISE EXCEPTION 'duplicate class name "%"', name USING ERRCODE = 'check_violation';
        END IF;
        seen := seen || lower(btrim(name));
    END LOOP;
    RETURN true;
END
$$;

-- Known job parameters and their JSON types. A later migration that adds a parameter replaces this
-- function (CREATE OR REPLACE) and documents the parameter in README.md.
CREATE FUNCTION nola.parameter_type(name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE name
        WHEN 'seed' THEN 'integer'
        WHEN 'top_k' THEN 'integer'
        WHEN 'alignment_epochs' THEN 'integer'
        WHEN 'alignment_learning_rate' THEN 'number'
        WHEN 'prompt_epochs' THEN 'integer'
        WHEN 'prompt_tokens' THEN 'integer'
        WHEN 'prompt_learning_rate' THEN 'number'
        WHEN 'batch_size' THEN 'integer'
        WHEN 'templates' THEN 'array of strings'
        WHEN 'generate_descriptions' THEN 'boolean'
    END
$$;

CREATE FUNCTION nola.check_parameters(parameters jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    key text;
    value jsonb;
    expected text;
    ok boolean;
BEGIN
    IF parameters IS NULL OR jsonb_typeof(parameters) <> 'object' THEN
        RAISE EXCEPTION 'parameters must be a JSON object, not %', coalesce(jsonb_typeof(parameters), 'null')
            USING ERRCODE = 'check_violation';
    END IF;
    FOR key, value IN SELECT * FROM jsonb_each(parameters) LOOP
        expected := nola.parameter_type(key);
        IF expected IS NULL THEN
            RAISE EXCEPTION 'unknown parameter "%"', key USING ERRCODE = 'check_violation';
        END IF;
        ok := CASE expected
            WHEN 'integer' THEN jsonb_typeof(value) = 'number' AND value::text::numeric = trunc(value::text::numeric)
            WHEN 'number' THEN jsonb_typeof(value) = 'number'
            WHEN 'boolean' THEN jsonb_typeof(value) = 'boolean'
            WHEN 'array of strings' THEN jsonb_typeof(value) = 'array'
                AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(value) e WHERE jsonb_typeof(e) <> 'string')
        END;
        IF NOT ok THEN
            RAISE EXCEPTION 'parameter "%" must be %, got %', key,
                CASE WHEN expected = 'integer' THEN 'an integer' WHEN expected = 'array of strings' THEN 'an array of strings'
                     ELSE 'a ' || expected END,
                value::text USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
    RETURN true;
END
$$;

-- Descriptions: {"class name": ["sentence", ...], ...}, the CuPL/NoLA description file format.
CREATE FUNCTION nola.check_descriptions(descriptions jsonb, classes text[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    key text;
    value jsonb;
BEGIN
    IF descriptions IS NULL THEN
        RETURN true;
    END IF;
    IF jsonb_typeof(descriptions) <> 'object' THEN
        RAISE EXCEPTION 'descriptions must be a JSON object {"class": ["sentence", ...]}, not %', jsonb_typeof(descriptions)
            USING ERRCODE = 'check_violation';
    END IF;
    FOR key, value IN SELECT * FROM jsonb_each(descriptions) LOOP
        IF NOT key = ANY (classes) THEN
            RAISE EXCEPTION 'descriptions name class "%", which is not in classes', key USING ERRCODE = 'check_violation';
        END IF;
        IF jsonb_typeof(value) <> 'array'
            OR EXISTS (SELECT 1 FROM jsonb_array_elements(value) e WHERE jsonb_typeof(e) <> 'string') THEN
            RAISE EXCEPTION 'descriptions of class "%" must be an array of strings', key USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
    RETURN true;
END
$$;

-- Jobs: users INSERT the first group of columns; the daemon owns the rest.
CREATE TABLE nola.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    collection       text        NOT NULL,
    classes          text[]      NOT NULL,
    descriptions     jsonb,
    parameters       jsonb       NOT NULL DEFAULT '{}',
    priority         integer     NOT NULL DEFAULT 0,
    run_after        timestamptz NOT NULL DEFAULT now(),
    max_attempts     integer     NOT NULL DEFAULT 3,
    timeout          interval    NOT NULL DEFAULT '24 hours',
    submitted_by     text        NOT NULL DEFAULT current_user,
    submitted_at     timestamptz NOT NULL DEFAULT now(),
    -- daemon columns
    state            nola.job_state NOT NULL DEFAULT 'queued',
    attempt          integer     NOT NULL DEFAULT 0,   -- claims so far (numbers nola.attempts)
    attempts_used    integer     NOT NULL DEFAULT 0,   -- claims that count against max_attempts
    worker           text,
    lease_expires_at timestamptz,
    heartbeat_at     timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    stage            text,
    stage_index      integer,
    stage_count      integer,
    stage_started_at timestamptz,
    stage_done       bigint,
    stage_total      bigint,
    cancel_requested boolean     NOT NULL DEFAULT false,
    error            text,
    CONSTRAINT collection_must_be_absolute CHECK (collection LIKE '/%'),
    CONSTRAINT classes_must_be_valid CHECK (nola.check_classes(classes)),
    CONSTRAINT parameters_must_be_valid CHECK (nola.check_parameters(parameters)),
    CONSTRAINT descriptions_must_be_valid CHECK (nola.check_descriptions(descriptions, classes)),
    CONSTRAINT max_attempts_in_range CHECK (max_attempts BETWEEN 1 AND 100),
    CONSTRAINT timeout_must_be_positive CHECK (timeout > interval '0'),
    CONSTRAINT running_has_worker CHECK (state <> 'running' OR (worker IS NOT NULL AND lease_expires_at IS NOT NULL))
);
CREATE INDEX jobs_claimable ON nola.jobs (priority DESC, run_after, id) WHERE state = 'queued';
CREATE INDEX jobs_running_lease ON nola.jobs (lease_expires_at) WHERE state = 'running';

-- A plain INSERT wakes idle workers: they LISTEN on channel nola_jobs.
CREATE FUNCTION nola.notify_job_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nola_jobs', NEW.id::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON nola.jobs
    FOR EACH ROW EXECUTE FUNCTION nola.notify_job_inserted();

-- One row per claim of a job, with how it ended.
CREATE TABLE nola.attempts (
    job_id      bigint      NOT NULL REFERENCES nola.jobs (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    worker      text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text CHECK (outcome IN ('succeeded', 'failed', 'retry', 'cancelled', 'released', 'lost', 'timed_out')),
    error       text,
    PRIMARY KEY (job_id, attempt)
);

-- Stage transitions and per-stage metrics.
CREATE TABLE nola.events (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  bigint      NOT NULL REFERENCES nola.jobs (id) ON DELETE CASCADE,
    attempt integer     NOT NULL,
    worker  text,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    stage   text,
    kind    text        NOT NULL,
    metrics jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metrics) = 'object')
);
CREATE INDEX events_job ON nola.events (job_id, id);

-- One row per daemon process (id unique per boot).
CREATE TABLE nola.workers (
    id           text PRIMARY KEY,
    name         text        NOT NULL,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    current_jobs bigint[]    NOT NULL DEFAULT '{}'
);

-- Every image file found in a job's collection (path relative to the collection folder).
CREATE TABLE nola.images (
    job_id     bigint NOT NULL REFERENCES nola.jobs (id) ON DELETE CASCADE,
    path       text   NOT NULL,
    size_bytes bigint NOT NULL CHECK (size_bytes >= 0),
    sha256     text   NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    format     text   NOT NULL CHECK (format IN ('jpeg', 'png')),
    PRIMARY KEY (job_id, path)
);

-- Results: one row per image.
CREATE TABLE nola.labels (
    job_id               bigint NOT NULL,
    path                 text   NOT NULL,
    label                text,
    confidence           real CHECK (confidence BETWEEN 0 AND 1),
    zero_shot_label      text,
    zero_shot_confidence real CHECK (zero_shot_confidence BETWEEN 0 AND 1),
    unreadable           text,      -- why the image could not be decoded; labels are NULL then
    PRIMARY KEY (job_id, path),
    FOREIGN KEY (job_id, path) REFERENCES nola.images (job_id, path) ON DELETE CASCADE,
    CONSTRAINT labelled_or_unreadable CHECK ((label IS NULL) <> (unreadable IS NULL))
);

-- Results: the tuned prompts of a job, as a safetensors file Python can load.
CREATE TABLE nola.prompts (
    job_id      bigint PRIMARY KEY REFERENCES nola.jobs (id) ON DELETE CASCADE,
    safetensors bytea       NOT NULL,
    shapes      jsonb       NOT NULL,   -- {"tensor name": [dims...], ...}
    backbone    jsonb       NOT NULL,   -- identity of the CLIP (and DINO) weights the prompts belong to
    parameters  jsonb       NOT NULL,   -- the training parameters actually used
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Cache of generated class descriptions, shared by all jobs.
CREATE TABLE nola.description_cache (
    class_name     text        NOT NULL,
    model          text        NOT NULL,
    prompt_version text        NOT NULL,
    sentences      jsonb       NOT NULL CHECK (jsonb_typeof(sentences) = 'array'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (class_name, model, prompt_version)
);

-- What users and dashboards watch.
CREATE VIEW nola.job_status AS
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
    j.finished_at
FROM nola.jobs j;

-- Cancel a job: a queued job is cancelled at once; a running one is flagged and its worker told
-- through NOTIFY nola_cancel. Returns the job's state afterwards (NULL if there is no such job).
CREATE FUNCTION nola.cancel(job_id bigint) RETURNS nola.job_state
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current nola.job_state;
BEGIN
    SELECT state INTO current FROM nola.jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF current = 'queued' THEN
        UPDATE nola.jobs SET state = 'cancelled', finished_at = now(), cancel_requested = true,
            error = 'cancelled before it started'
        WHERE id = job_id;
        INSERT INTO nola.events (job_id, attempt, kind) SELECT id, attempt, 'cancelled' FROM nola.jobs WHERE id = job_id;
        RETURN 'cancelled';
    ELSIF current = 'running' THEN
        UPDATE nola.jobs SET cancel_requested = true WHERE id = job_id;
        PERFORM pg_notify('nola_cancel', job_id::text);
    END IF;
    RETURN current;
END
$$;

-- Privileges: submitters insert jobs and read everything; only workers change daemon columns.
REVOKE ALL ON FUNCTION nola.cancel(bigint) FROM PUBLIC;
GRANT USAGE ON SCHEMA nola TO nola_submitter, nola_worker;
GRANT SELECT ON ALL TABLES IN SCHEMA nola TO nola_submitter, nola_worker;
GRANT INSERT (collection, classes, descriptions, parameters, priority, run_after, max_attempts, timeout)
    ON nola.jobs TO nola_submitter;
GRANT EXECUTE ON FUNCTION nola.cancel(bigint) TO nola_submitter, nola_worker;
GRANT INSERT, UPDATE, DELETE ON nola.jobs, nola.attempts, nola.events, nola.workers, nola.images,
    nola.labels, nola.prompts, nola.description_cache TO nola_worker;
