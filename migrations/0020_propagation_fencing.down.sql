DROP INDEX pending_propagations_applied_at_ix;
DROP INDEX pending_propagations_dead_lettered_at_ix;
CREATE INDEX pending_propagations_due_ix
    ON pending_propagations (next_attempt_at, id) WHERE status = 'pending';
DROP INDEX pending_propagations_lease_ix;
DROP INDEX pending_propagations_unclaimed_due_ix;
DROP TRIGGER teams_tier_epoch ON teams;
DROP FUNCTION teams_bump_tier_epoch();
ALTER TABLE teams DROP COLUMN tier_epoch;
ALTER TABLE pending_propagations
    DROP COLUMN deferred_since,
    DROP COLUMN tier_epoch,
    DROP COLUMN payload_version,
    DROP COLUMN target_version,
    DROP COLUMN claim_token;
DROP SEQUENCE pending_propagations_fence_seq;
