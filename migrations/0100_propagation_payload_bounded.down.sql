-- Payloads of any size again, as before migration 0100.
DO $$
BEGIN
    IF to_regclass('pending_propagations') IS NOT NULL THEN
        ALTER TABLE pending_propagations DROP CONSTRAINT IF EXISTS pending_propagations_payload_bounded;
    END IF;
END
$$;
