DROP INDEX IF EXISTS pending_propagations_dead_letter_epoch_ix;
DO $$
BEGIN
    IF to_regclass('pending_propagations') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS pending_propagations_dead_lettered_at_ix
            ON pending_propagations (dead_lettered_at) WHERE status = 'dead_lettered';
    END IF;
END;
$$;
DROP INDEX IF EXISTS pending_propagations_dead_lettered_newest_ix;
