DROP INDEX IF EXISTS pending_propagations_applied_at_ix;
DROP INDEX IF EXISTS pending_propagations_dead_lettered_at_ix;
DROP INDEX IF EXISTS pending_propagations_lease_ix;
DROP INDEX IF EXISTS pending_propagations_unclaimed_due_ix;
DO $$
BEGIN
    IF to_regclass('pending_propagations') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS pending_propagations_due_ix
            ON pending_propagations (next_attempt_at, id) WHERE status = 'pending';
        DROP TRIGGER IF EXISTS pending_propagations_tier_epoch ON pending_propagations;
    END IF;
    IF to_regclass('teams') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS teams_tier_epoch ON teams;
    END IF;
END;
$$;
DROP FUNCTION IF EXISTS pending_propagations_default_tier_epoch();
DROP FUNCTION IF EXISTS teams_bump_tier_epoch();
ALTER TABLE IF EXISTS teams DROP COLUMN IF EXISTS tier_epoch;
ALTER TABLE IF EXISTS pending_propagations
    DROP COLUMN IF EXISTS deferred_since,
    DROP COLUMN IF EXISTS tier_epoch,
    DROP COLUMN IF EXISTS payload_version,
    DROP COLUMN IF EXISTS target_version,
    DROP COLUMN IF EXISTS claim_token;
DROP SEQUENCE IF EXISTS pending_propagations_fence_seq;
