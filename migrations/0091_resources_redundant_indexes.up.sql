-- Two indexes of `resources` that others already cover, dropped so that every insert and every
-- update that is not heap-only maintains two index entries fewer:
-- - `resources_team_id_ix (team_id)`: `resources_team_created_ix (team_id, created_at, id)`
--   leads with the same column (team listings and the foreign key's checks use it);
-- - `resources_live_token_ix (token) WHERE live`: the unique `resources_token_key (token)`
--   finds the same rows, and liveness lookups go by digest
--   (`resources_live_token_digest_ix`), since customer names carry the digest, not the token.
DROP INDEX resources_team_id_ix;
DROP INDEX resources_live_token_ix;
