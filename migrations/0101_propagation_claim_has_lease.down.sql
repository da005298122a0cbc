-- A claim without a lease allowed again, as before migration 0101.
DO $$
BEGIN
    IF to_regclass('pending_propagations') IS NOT NULL THEN
        ALTER TABLE pending_propagations DROP CONSTRAINT IF EXISTS pending_propagations_claim_has_lease;
    END IF;
END
$$;
