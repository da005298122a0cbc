DO $$
BEGIN
    IF to_regclass('billing_event') IS NOT NULL THEN
        DROP INDEX IF EXISTS billing_event_auth_meter_ix;
        CREATE INDEX billing_event_auth_meter_ix ON billing_event (auth_id, meter, occurred_at);
    END IF;
END
$$;
ALTER TABLE IF EXISTS rated_usage RESET (fillfactor);
