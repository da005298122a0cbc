-- Back to the dead-letter index on `dead_lettered_at`.
DROP INDEX IF EXISTS notification_deliveries_dead_seq_ix;
DO $$
BEGIN
    IF to_regclass('notification_deliveries') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS notification_deliveries_dead_ix
            ON notification_deliveries (dead_lettered_at) WHERE state = 'dead';
    END IF;
END
$$;
