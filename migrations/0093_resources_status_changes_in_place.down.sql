DO $$
BEGIN
    IF to_regclass('resources') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS resources_live_token_digest_ix ON resources (token_digest)
            WHERE status IN ('pending', 'active', 'paused', 'suspended');
    END IF;
END
$$;
