-- Passwords removed by the up migration are gone for good; only the column comment is undone.
DO $$
BEGIN
    IF to_regclass('resources') IS NOT NULL THEN
        COMMENT ON COLUMN resources.connection_url IS NULL;
    END IF;
END $$;
