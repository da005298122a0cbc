-- Customer databases and roles are named `cust_<digest>` (the first 48 hex digits of the token's
-- SHA-256), and rows are found by that digest, so neither a statement nor a bound parameter
-- carries a customer token into the server's log.
CREATE FUNCTION keel_token_digest(token text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT left(encode(sha256(convert_to(token, 'UTF8')), 'hex'), 48) $$;

COMMENT ON FUNCTION keel_token_digest(text) IS
    'The digest naming a customer''s database and role: first 48 hex digits of SHA-256(token).';

ALTER TABLE resources
    ADD COLUMN token_digest text GENERATED ALWAYS AS (keel_token_digest(token)) STORED;

-- Non-terminal rows by digest: the orphan sweep's set-based liveness lookup and the deprovision
-- chokepoint's orphan check.
CREATE INDEX resources_live_token_digest_ix ON resources (token_digest)
    WHERE status IN ('pending', 'active', 'paused', 'suspended');
