-- nolad schema, version 9: a training budget for prompt tuning.
--   parameters.prompt_view_budget  the most strong views prompt tuning sees (whole optimizer steps; null: no
--                                  cap); a job at the budget ends tuning there with a checkpoint and a
--                                  `budget_reached` event (docs/budget.md). nola.check_parameters reads this view.
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
    ('prompt_view_budget', 'integer', 1, 1000000000000, false, false, true),
    ('clip_model', 'folder', NULL, NULL, false, false, false),
    ('dino_model', 'folder', NULL, NULL, false, false, false),
    ('abstain_below', 'number', 0, 1, false, false, false),
    ('abstain_margin_below', 'number', 0, 1, false, false, false),
    ('abstain_unless_agree', 'boolean', NULL, NULL, false, false, false),
    ('prompts_from_job', 'integer', 1, NULL, false, false, false),
    ('only_new', 'boolean', NULL, NULL, false, false, false),
    ('threads', 'integer', 1, 1024, false, false, false);
