-- A claimed propagation always carries its lease and its fence token.
--
-- The rescue of abandoned claims finds claimed rows by `lease_expires_at <= now`; the claim,
-- the settling of unreadable rows and the queue gauges look only at unclaimed rows. A row with
-- `claimed_by` set and no lease, written by hand or by another service, was therefore seen by
-- none of them: its tier never landed, nothing counted it, and an enqueue of the same target
-- changed nothing. Keel itself sets the three columns together, and clears them together.
ALTER TABLE pending_propagations
    ADD CONSTRAINT pending_propagations_claim_has_lease
    CHECK (claimed_by IS NULL OR (lease_expires_at IS NOT NULL AND claim_token IS NOT NULL))
    NOT VALID;
DO $$
BEGIN
    ALTER TABLE pending_propagations VALIDATE CONSTRAINT pending_propagations_claim_has_lease;
EXCEPTION WHEN check_violation THEN
    RAISE EXCEPTION 'pending_propagations holds a claimed row without a lease or a fence token'
        USING HINT = 'find the rows with: SELECT id, claimed_by FROM pending_propagations '
            'WHERE claimed_by IS NOT NULL AND (lease_expires_at IS NULL OR claim_token IS NULL); '
            'release them (SET claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL), '
            'then migrate again';
END
$$;
