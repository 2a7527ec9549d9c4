-- Placeholder so this branch's migration 0008 applies: the label-signal columns of issue 16 are
-- migration 0007 on another branch, which replaces this file at merge.
SELECT 1;
