DO $$
BEGIN
    IF to_regclass('resources') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS resources_team_id_ix ON resources (team_id);
        CREATE INDEX IF NOT EXISTS resources_live_token_ix ON resources (token)
            WHERE status IN ('pending', 'active', 'paused', 'suspended');
    END IF;
END
$$;
