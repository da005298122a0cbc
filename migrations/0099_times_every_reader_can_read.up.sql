-- Every time Keel stores lies between year 1 and year 9999 (UTC).
--
-- PostgreSQL accepts `infinity`, `-infinity`, years before Christ and years up to 294276. None
-- of those can be read back by Keel's processes: decoding a time past year 9999 or an infinity
-- fails inside the client library by panicking, and a year before 1 cannot be written as
-- RFC 3339. A single such value, written into a shared table by another service (or by hand),
-- therefore stopped work for every tenant: the notification dispatcher restarted on the same
-- audit row for ever, a dead-letter listing crashed, the propagation runner's housekeeping
-- failed on `now() - '-infinity'`. Each column of a timestamp type in Keel's tables now refuses
-- such a value when it is written, so the writer gets the error instead of every reader.
--
-- The append-only logs (`audit_events`, `billing_event`, `io_log`) are not scanned: their rows
-- cannot be changed, and scanning them would hold this migration's lock for as long as they
-- are large. Every other table is checked now; a row outside the range fails this migration
-- with the table and column named, to be corrected before it is run again.
DO $$
DECLARE
    tables text[] := ARRAY[
        'teams', 'resources', 'audit_events', 'pending_propagations', 'billing_event', 'prices',
        'rated_usage', 'rater_runs', 'rater_lease', 'rating_change', 'rating_change_all',
        'io_log', 'keel_installation', 'reclaim_protections', 'orphan_sweep_periods',
        'orphan_sighting_runs', 'audit_seals', 'audit_checkpoints',
        'notification_cursor', 'notification_deliveries', 'audit_retention',
        'provision_api.api_keys', 'provision_api.idempotency_keys',
        'provision_api.console_sessions'];
    unscanned text[] := ARRAY['audit_events', 'billing_event', 'io_log'];
    t text;
    col name;
    rel regclass;
    constraint_name text;
BEGIN
    FOREACH t IN ARRAY tables LOOP
        rel := to_regclass(t);
        CONTINUE WHEN rel IS NULL;
        FOR col IN
            SELECT a.attname FROM pg_attribute a
            WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
              AND a.atttypid = 'timestamptz'::regtype
            ORDER BY a.attnum
        LOOP
            constraint_name := (SELECT relname FROM pg_class WHERE oid = rel) || '_' || col
                || '_in_range';
            EXECUTE format(
                'ALTER TABLE %s ADD CONSTRAINT %I CHECK (%I BETWEEN '
                || '''0001-01-01 00:00:00+00''::timestamptz AND '
                || '''9999-12-31 23:59:59.999999+00''::timestamptz) NOT VALID',
                rel, constraint_name, col);
            CONTINUE WHEN t = ANY (unscanned);
            BEGIN
                EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', rel, constraint_name);
            EXCEPTION WHEN check_violation THEN
                RAISE EXCEPTION '%.% holds a time outside year 1 to 9999', rel, col
                    USING HINT = format(
                        'find the rows with: SELECT * FROM %s WHERE NOT (%I BETWEEN '
                        '''0001-01-01 00:00:00+00'' AND ''9999-12-31 23:59:59.999999+00''); '
                        'correct them, then migrate again', rel, col);
            END;
        END LOOP;
    END LOOP;
END
$$;
