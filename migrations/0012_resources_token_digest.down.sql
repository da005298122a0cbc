DROP INDEX IF EXISTS resources_live_token_digest_ix;
ALTER TABLE IF EXISTS resources DROP COLUMN IF EXISTS token_digest;
DROP FUNCTION IF EXISTS keel_token_digest(text);
