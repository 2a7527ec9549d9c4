-- nolad schema, version 4: owners for jobs, an operator role, requeue, every refusal in a sentence,
-- and one parameter schema.
--   nola_operator         may cancel and requeue any job (besides everything nola_submitter may do)
--   nola.cancel(id)       only the job's submitter (a member of the role in submitted_by), an operator or a worker
--   nola.requeue(id)      a failed or cancelled job back to queued; its attempts history and checkpoint stay
--   nola.parameter_schema every job parameter's type and bounds (Sources/Method/ParameterSchema.swift lists
--                         the same rows; a database test compares them)

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nola_operator') THEN
        CREATE ROLE nola_operator NOLOGIN;
    END IF;
END
$roles$;
GRANT nola_submitter TO nola_operator;

-- Refusals of the plain CHECKs, stated as sentences with the allowed values.
CREATE FUNCTION nola.check_job_settings(collection text, max_attempts integer, timeout interval) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF collection NOT LIKE '/%' THEN
        RAISE EXCEPTION 'collection must be an absolute path (starting with /), got "%"', collection
            USING ERRCODE = 'check_violation';
    END IF;
    IF max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'max_attempts must be an integer from 1 to 100, got %', max_attempts USING ERRCODE = 'check_violation';
    END IF;
    IF timeout <= interval '0' THEN
        RAISE EXCEPTION 'timeout must be a positive interval such as ''2 hours'', got ''%''', timeout
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END
$$;
ALTER TABLE nola.jobs
    DROP CONSTRAINT collection_must_be_absolute,
    DROP CONSTRAINT max_attempts_in_range,
    DROP CONSTRAINT timeout_must_be_positive,
    ADD CONSTRAINT settings_must_be_valid CHECK (nola.check_job_settings(collection, max_attempts, timeout));

-- One parameter schema (kind: integer, number, boolean or folder; bounds inclusive unless exclusive_*).
CREATE VIEW nola.parameter_schema (name, kind, minimum, maximum, exclusive_minimum, exclusive_maximum, nullable) AS
VALUES
    ('seed', 'integer', 0::numeric, NULL::numeric, false, false, false),
    ('templates', 'boolean', NULL, NULL, false, false, false),
    ('min_k', 'integer', 1, 1000000, false, false, false),
    ('k_fraction', 'number', 0, 1, false, false, false),
    ('alignment_epochs', 'integer', 0, 10000, false, false, false),
    ('alignment_lr', 'number', 0, 1, true, false, false),
    ('alignment_batch_size', 'integer', 1, 1000000, false, false, false),
    ('alignment_hidden_size', 'integer', 1, 65536, false, false, false),
    ('prompt_epochs', 'integer', 0, 10000, false, false, false),
    ('prompt_lr', 'number', 0, 1, true, false, false),
    ('prompt_weight_decay', 'number', 0, 1, false, false, false),
    ('prompt_batch_size', 'integer', 1, 1000000, false, false, false),
    ('prompt_micro_batch_size', 'integer', 1, 1000000, false, false, true),
    ('prompt_count', 'integer', 1, 1024, false, false, false),
    ('label_smoothing', 'number', 0, 1, false, true, false),
    ('colour_jitter', 'boolean', NULL, NULL, false, false, false),
    ('clip_model', 'folder', NULL, NULL, false, false, false),
    ('dino_model', 'folder', NULL, NULL, false, false, false),
    ('prompts_from_job', 'integer', 1, NULL, false, false, false);

-- The allowed values in words, as ParameterSpec.allowed says them.
CREATE FUNCTION nola.parameter_allowed(p nola.parameter_schema) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p.kind = 'boolean' THEN 'true or false'
        WHEN p.kind = 'folder' THEN 'a plain folder name (no ''/'', not starting with ''.'')'
        ELSE (CASE p.kind WHEN 'integer' THEN 'an integer' ELSE 'a number' END)
            || CASE
                WHEN p.minimum IS NOT NULL AND p.maximum IS NOT NULL AND NOT p.exclusive_minimum AND NOT p.exclusive_maximum
                    THEN ' from ' || trim_scale(p.minimum) || ' to ' || trim_scale(p.maximum)
                ELSE coalesce(' ' || nullif(concat_ws(' and ',
                        CASE WHEN p.minimum IS NOT NULL THEN
                            (CASE WHEN p.exclusive_minimum THEN 'greater than ' ELSE 'at least ' END) || trim_scale(p.minimum) END,
                        CASE WHEN p.maximum IS NOT NULL THEN
                            (CASE WHEN p.exclusive_maximum THEN 'below ' ELSE 'at most ' END) || trim_scale(p.maximum) END), ''), '')
            END
    END || CASE WHEN p.nullable THEN ', or null' ELSE '' END
$$;

CREATE OR REPLACE FUNCTION nola.parameter_type(name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT kind FROM nola.parameter_schema s WHERE s.name = parameter_type.name
$$;

CREATE OR REPLACE FUNCTION nola.check_parameters(parameters jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    key text;
    value jsonb;
    spec nola.parameter_schema;
    x numeric;
    ok boolean;
BEGIN
    IF parameters IS NULL OR jsonb_typeof(parameters) <> 'object' THEN
        RAISE EXCEPTION 'parameters must be a JSON object, got %', coalesce(parameters::text, 'null')
            USING ERRCODE = 'check_violation';
    END IF;
    FOR key, value IN SELECT * FROM jsonb_each(parameters) LOOP
        SELECT * INTO spec FROM nola.parameter_schema s WHERE s.name = key;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown parameter "%" (known: %)', key,
                (SELECT string_agg(s.name, ', ') FROM nola.parameter_schema s) USING ERRCODE = 'check_violation';
        END IF;
        IF jsonb_typeof(value) = 'null' THEN
            ok := spec.nullable;
        ELSIF spec.kind = 'boolean' THEN
            ok := jsonb_typeof(value) = 'boolean';
        ELSIF spec.kind = 'folder' THEN
            ok := jsonb_typeof(value) = 'string' AND length(value #>> '{}') BETWEEN 1 AND 200
                AND strpos(value #>> '{}', '/') = 0 AND left(value #>> '{}', 1) <> '.';
        ELSIF jsonb_typeof(value) <> 'number' THEN
            ok := false;
        ELSE
            x := value::text::numeric;
            ok := (spec.kind = 'number' OR x = trunc(x))
                AND (spec.minimum IS NULL OR (CASE WHEN spec.exclusive_minimum THEN x > spec.minimum ELSE x >= spec.minimum END))
                AND (spec.maximum IS NULL OR (CASE WHEN spec.exclusive_maximum THEN x < spec.maximum ELSE x <= spec.maximum END));
        END IF;
        IF NOT ok THEN
            RAISE EXCEPTION 'parameter "%" must be %, got %', key, nola.parameter_allowed(spec), value::text
                USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
    RETURN true;
END
$$;

-- May the session act on this job? Its submitter (any member of the role recorded in submitted_by,
-- i.e. current_user at INSERT), an operator, or a worker (which may update jobs directly anyway).
-- session_user, because inside these SECURITY DEFINER functions current_user is their owner.
CREATE FUNCTION nola.may_manage(submitted_by text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = submitted_by) AND pg_has_role(session_user, submitted_by, 'MEMBER'))
        OR pg_has_role(session_user, 'nola_operator', 'MEMBER')
        OR pg_has_role(session_user, 'nola_worker', 'MEMBER')
$$;

-- Locks job `job_id` for `verb` ('cancel' or 'requeue') by the session and returns its state (NULL: no
-- such job); refuses with a sentence when the session may not manage it.
CREATE FUNCTION nola.lock_to_manage(job_id bigint, verb text) RETURNS nola.job_state
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current nola.job_state;
    owner text;
BEGIN
    SELECT state, submitted_by INTO current, owner FROM nola.jobs WHERE id = job_id FOR UPDATE;
    IF FOUND AND NOT nola.may_manage(owner) THEN
        RAISE EXCEPTION 'job % was submitted by %; only its submitter or a member of nola_operator may % it', job_id, owner, verb
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN current;
END
$$;
REVOKE ALL ON FUNCTION nola.lock_to_manage(bigint, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION nola.cancel(job_id bigint) RETURNS nola.job_state
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current nola.job_state := nola.lock_to_manage(job_id, 'cancel');
BEGIN
    IF current IS NULL THEN
        RETURN NULL;
    END IF;
    IF current = 'queued' THEN
        UPDATE nola.jobs SET state = 'cancelled', finished_at = now(), cancel_requested = true,
            error = 'cancelled before it started'
        WHERE id = job_id;
        INSERT INTO nola.events (job_id, attempt, kind, metrics)
            SELECT id, attempt, 'cancelled', jsonb_build_object('by', session_user::text) FROM nola.jobs WHERE id = job_id;
        RETURN 'cancelled';
    ELSIF current = 'running' THEN
        UPDATE nola.jobs SET cancel_requested = true WHERE id = job_id;
        -- Only a wake-up: the daemon reads cancel_requested itself and never trusts a payload.
        PERFORM pg_notify('nola_cancel', job_id::text);
    END IF;
    RETURN current;
END
$$;

-- Requeue a failed or cancelled job: queued again at once, with attempts_used back to 0 so it gets its
-- max_attempts afresh. Its nola.attempts history stays, attempt numbers go on, and a kept checkpoint
-- (prompt-tuning state) lets it resume where it stopped. Returns the new state (NULL: no such job).
CREATE FUNCTION nola.requeue(job_id bigint) RETURNS nola.job_state
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current nola.job_state := nola.lock_to_manage(job_id, 'requeue');
BEGIN
    IF current IS NULL THEN
        RETURN NULL;
    END IF;
    IF current NOT IN ('failed', 'cancelled') THEN
        RAISE EXCEPTION 'job % is %; only a failed or cancelled job can be requeued', job_id, current
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE nola.jobs SET state = 'queued', attempts_used = 0, cancel_requested = false, error = NULL,
        worker = NULL, lease_expires_at = NULL, heartbeat_at = NULL, finished_at = NULL, run_after = now(),
        stage = NULL, stage_index = NULL, stage_count = NULL, stage_started_at = NULL, stage_done = NULL, stage_total = NULL
    WHERE id = job_id;
    INSERT INTO nola.events (job_id, attempt, kind, metrics)
        SELECT id, attempt, 'requeued', jsonb_build_object('by', session_user::text, 'was', current::text,
            'checkpoint', EXISTS (SELECT 1 FROM nola.checkpoints c WHERE c.job_id = requeue.job_id))
        FROM nola.jobs WHERE id = job_id;
    PERFORM pg_notify('nola_jobs', job_id::text);
    RETURN 'queued';
END
$$;

REVOKE ALL ON FUNCTION nola.requeue(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nola.requeue(bigint) TO nola_submitter, nola_worker;
GRANT SELECT ON nola.parameter_schema TO nola_submitter, nola_worker;
GRANT USAGE ON SCHEMA nola TO nola_operator;
