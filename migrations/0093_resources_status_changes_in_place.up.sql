-- Status changes of `resources` in place. `resources_live_token_digest_ix` indexed the digest of
-- non-terminal rows only, so its predicate made `status` an indexed column: every status change
-- (pending -> active at finalize, suspend, resume, deprovision) wrote a new version of the row on
-- another page with a new entry in each of the table's indexes. Every query that used it filters
-- by `token_digest = $1`, which `resources_token_digest_ix` (every row, migration 0040) answers
-- with the same single-row lookup, status checked on the row. Without it no index mentions
-- `status`, so a status change is a heap-only update within the room migration 0090 keeps on
-- every page.
DROP INDEX IF EXISTS resources_live_token_digest_ix;
