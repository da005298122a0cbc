DO $$
BEGIN
    IF to_regclass('audit_events') IS NOT NULL THEN
        CREATE INDEX IF NOT EXISTS audit_events_event_uuid_ix ON audit_events (event_uuid);
    END IF;
END
$$;
