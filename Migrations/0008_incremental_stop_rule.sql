-- nolad schema, version 8: incremental labelling and a label-free stopping rule for prompt tuning.
--   parameters.only_new        with prompts_from_job: label only the images (by SHA-256) that job has not
--                              labelled and copy its label rows for the rest (docs/incremental.md);
--                              refused at INSERT without prompts_from_job
--   parameters.stop_patience   stop prompt tuning after this many stable epochs in a row; 0 = off
--   parameters.stop_tolerance  the change in agreement and mean confidence under which an epoch is stable
--                              (docs/pipeline.md, "Stopping early")
-- Sources/Method/ParameterSchema.swift lists the same rows.

CREATE OR REPLACE VIEW nola.parameter_schema (name, kind, minimum, maximum, exclusive_minimum, exclusive_maximum, nullable) AS
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
    ('stop_patience', 'integer', 0, 10000, false, false, false),
    ('stop_tolerance', 'number', 0, 1, true, false, false),
    ('clip_model', 'folder', NULL, NULL, false, false, false),
    ('dino_model', 'folder', NULL, NULL, false, false, false),
    ('abstain_below', 'number', 0, 1, false, false, false),
    ('abstain_margin_below', 'number', 0, 1, false, false, false),
    ('abstain_unless_agree', 'boolean', NULL, NULL, false, false, false),
    ('prompts_from_job', 'integer', 1, NULL, false, false, false),
    ('only_new', 'boolean', NULL, NULL, false, false, false),
    ('threads', 'integer', 1, 1024, false, false, false);

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
    IF parameters -> 'only_new' = 'true'::jsonb AND coalesce(jsonb_typeof(parameters -> 'prompts_from_job'), 'null') = 'null' THEN
        RAISE EXCEPTION 'parameter "only_new" is true only with prompts_from_job (the earlier job whose labels and tuned prompts it reuses)'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END
$$;
