-- nolad schema, version 7: per-image signals beside every label, abstention, and a review queue
-- (docs/labels.md says what each column means).
--   nola.labels.top_labels         the final model's most probable classes, best first (at most 3)
--   nola.labels.top_probabilities  their softmax probabilities, same order
--   nola.labels.margin             top_probabilities[1] - top_probabilities[2] (1 with a single class)
--   nola.labels.teacher_label      the DINO alignment module's class; NULL for inference-only jobs
--   nola.labels.agreement          final = zero-shot (= teacher, when the job has one)
--   nola.labels.abstained          why the image got no class under the job's abstain_* parameters;
--                                  label is NULL then, the signals are kept
-- Parameters abstain_below, abstain_margin_below, abstain_unless_agree (Sources/Method/ParameterSchema.swift
-- lists the same rows).

ALTER TABLE nola.labels
    ADD COLUMN top_labels        text[],
    ADD COLUMN top_probabilities real[],
    ADD COLUMN margin            real CHECK (margin BETWEEN 0 AND 1),
    ADD COLUMN teacher_label     text,
    ADD COLUMN agreement         boolean,
    ADD COLUMN abstained         text,
    DROP CONSTRAINT labelled_or_unreadable,
    -- Exactly one of: a label, an abstention reason, an unreadable reason.
    ADD CONSTRAINT labelled_abstained_or_unreadable CHECK (
        (label IS NOT NULL)::int + (abstained IS NOT NULL)::int + (unreadable IS NOT NULL)::int = 1),
    ADD CONSTRAINT top_lists_match CHECK (
        coalesce(cardinality(top_labels), 0) = coalesce(cardinality(top_probabilities), 0));

COMMENT ON COLUMN nola.labels.top_labels IS 'the final model''s most probable classes, best first (at most 3); NULL when unreadable';
COMMENT ON COLUMN nola.labels.top_probabilities IS 'softmax probabilities of top_labels, same order';
COMMENT ON COLUMN nola.labels.margin IS 'top_probabilities[1] - top_probabilities[2] (1 when the job has one class)';
COMMENT ON COLUMN nola.labels.teacher_label IS 'the DINO alignment module''s class (prompt tuning''s teacher); NULL for inference-only jobs';
COMMENT ON COLUMN nola.labels.agreement IS 'the final class equals the zero-shot class and, when the job has a teacher, the teacher''s class';
COMMENT ON COLUMN nola.labels.abstained IS 'why the image got no class (job parameters abstain_*); label is NULL then';

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
    ('clip_model', 'folder', NULL, NULL, false, false, false),
    ('dino_model', 'folder', NULL, NULL, false, false, false),
    ('abstain_below', 'number', 0, 1, false, false, false),
    ('abstain_margin_below', 'number', 0, 1, false, false, false),
    ('abstain_unless_agree', 'boolean', NULL, NULL, false, false, false),
    ('prompts_from_job', 'integer', 1, NULL, false, false, false),
    ('threads', 'integer', 1, 1024, false, false, false);

-- A job's images most doubtful first: those it abstained on, then by `agreeing` (how many of the
-- zero-shot and teacher classes name the model's class: 0, 1 or 2), then by rising margin (ties: lower
-- confidence, then path). On the demo collection agreement ranks errors best of the signals (docs/labels.md:
-- area under the accuracy-coverage curve 0.669, against 0.575 for margin and 0.575 for confidence).
-- review_rank numbers them 1, 2, ... within the job. Unreadable images are not in it (nola.labels.unreadable
-- says why).
CREATE VIEW nola.review_queue AS
SELECT
    a.job_id,
    row_number() OVER (PARTITION BY a.job_id
                       ORDER BY (a.abstained IS NULL), a.agreeing, a.margin, a.confidence, a.path) AS review_rank,
    a.path, a.label, a.abstained, a.confidence, a.margin, a.agreeing, a.top_labels, a.top_probabilities,
    a.zero_shot_label, a.zero_shot_confidence, a.teacher_label, a.agreement
FROM (
    SELECT l.*,
        ((coalesce(l.label, l.top_labels[1]) = l.zero_shot_label) IS TRUE)::int
        + ((coalesce(l.label, l.top_labels[1]) = l.teacher_label) IS TRUE)::int AS agreeing
    FROM nola.labels l
    WHERE l.unreadable IS NULL
) a;

GRANT SELECT ON nola.review_queue TO nola_submitter, nola_worker;
