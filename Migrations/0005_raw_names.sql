-- nolad schema, version 5: file names that are not valid UTF-8 are labelled too.
--   nola.images.path_bytes  the exact bytes of the path relative to the collection, set only when they
--                           are not valid UTF-8; `path` then holds the text form, each byte outside valid
--                           UTF-8 written as \xNN (uppercase hex). NULL means `path` is the exact name.

ALTER TABLE nola.images ADD COLUMN path_bytes bytea;
ALTER TABLE nola.images ADD CONSTRAINT path_bytes_only_for_names_not_utf8
    CHECK (path_bytes IS NULL OR path LIKE '%\x%');

COMMENT ON COLUMN nola.images.path_bytes IS
    'the exact bytes of the relative path when they are not valid UTF-8 (path then writes each such byte as \xNN); NULL otherwise';
