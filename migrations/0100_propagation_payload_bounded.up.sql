-- A propagation's payload is bounded: at most 64 KiB as stored, and a `target_tier` of at most
-- 64 bytes.
--
-- Every payload Keel writes is a few dozen bytes. A `target_tier` of kilobytes, written by hand
-- or by another service, could not enter `pending_propagations_dead_letter_epoch_ix` (an index
-- on `payload->>'target_tier'` over dead letters): the housekeeping pass that dead-letters every
-- row no runner can read is one statement, so that one row failed it, and with it every other
-- unreadable row's dead letter and the retention pass after it, for every tenant. A payload of
-- megabytes was read whole into every claim. Both are now refused on write (SQLSTATE 23514).
-- Rows already stored are checked; one out of bounds fails this migration, naming it.
ALTER TABLE pending_propagations
    ADD CONSTRAINT pending_propagations_payload_bounded
    CHECK (pg_column_size(payload) <= 65536
           AND coalesce(octet_length(payload->>'target_tier'), 0) <= 64) NOT VALID;
DO $$
BEGIN
    ALTER TABLE pending_propagations VALIDATE CONSTRAINT pending_propagations_payload_bounded;
EXCEPTION WHEN check_violation THEN
    RAISE EXCEPTION 'pending_propagations holds a payload over 64 KiB or a target_tier over 64 bytes'
        USING HINT = 'find the rows with: SELECT id, kind, status FROM pending_propagations '
            'WHERE pg_column_size(payload) > 65536 '
            'OR octet_length(payload->>''target_tier'') > 64; correct or delete them, then '
            'migrate again';
END
$$;
