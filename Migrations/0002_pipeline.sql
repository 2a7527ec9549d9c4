-- nolad schema, version 2: what the NoLA pipeline needs beyond version 1.
--   nola.checkpoints    prompt-tuning state of a running job, so a rescued, released or requeued job resumes
--   nola.feature_cache  image features by (model identity, image SHA-256, view), shared by all jobs
--   the job parameters of the method (NolaParameters in Sources/Method), checked at INSERT by type.

CREATE TABLE nola.checkpoints (
    job_id     bigint PRIMARY KEY REFERENCES nola.jobs (id) ON DELETE CASCADE,
    blob       bytea       NOT NULL,   -- safetensors: trained tensors, AdamW moments, teacher labels
    epoch      integer     NOT NULL,   -- completed epochs
    step       integer     NOT NULL,   -- optimizer steps taken
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE nola.feature_cache (
    model      text    NOT NULL,       -- folder name and SHA-256 of the weights file
    sha256     text    NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    view       text    NOT NULL,       -- e.g. 'weak-224' (the deterministic view the features are of)
    dimension  integer NOT NULL CHECK (dimension > 0),
    features   bytea   NOT NULL,       -- little-endian float32 × dimension
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, sha256, view)
);

CREATE OR REPLACE FUNCTION nola.parameter_type(name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE name
        WHEN 'seed' THEN 'integer'
        WHEN 'templates' THEN 'boolean'
        WHEN 'min_k' THEN 'integer'
        WHEN 'k_fraction' THEN 'number'
        WHEN 'alignment_epochs' THEN 'integer'
        WHEN 'alignment_lr' THEN 'number'
        WHEN 'alignment_batch_size' THEN 'integer'
        WHEN 'alignment_hidden_size' THEN 'integer'
        WHEN 'prompt_epochs' THEN 'integer'
        WHEN 'prompt_lr' THEN 'number'
        WHEN 'prompt_weight_decay' THEN 'number'
        WHEN 'prompt_batch_size' THEN 'integer'
        WHEN 'prompt_micro_batch_size' THEN 'integer'
        WHEN 'prompt_count' THEN 'integer'
        WHEN 'label_smoothing' THEN 'number'
        WHEN 'clip_model' THEN 'string'
        WHEN 'dino_model' THEN 'string'
        WHEN 'prompts_from_job' THEN 'integer'
    END
$$;

CREATE OR REPLACE FUNCTION nola.check_parameters(parameters jsonb) RETURNS boolean
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
            WHEN 'string' THEN jsonb_typeof(value) = 'string'
            ELSE false
        END;
        IF NOT ok THEN
            RAISE EXCEPTION 'parameter "%" must be %, got %', key,
                CASE WHEN expected = 'integer' THEN 'an integer' ELSE 'a ' || expected END,
                value::text USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
    RETURN true;
END
$$;

GRANT SELECT ON nola.checkpoints, nola.feature_cache TO nola_submitter, nola_worker;
GRANT INSERT, UPDATE, DELETE ON nola.checkpoints, nola.feature_cache TO nola_worker;
