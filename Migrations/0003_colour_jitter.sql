-- Job parameter colour_jitter (boolean): whether prompt tuning's strong view applies its ColorJitters.
-- nola.check_parameters looks the type of every key up here, so only this function changes.
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
        WHEN 'colour_jitter' THEN 'boolean'
        WHEN 'clip_model' THEN 'string'
        WHEN 'dino_model' THEN 'string'
        WHEN 'prompts_from_job' THEN 'integer'
    END
$$;
