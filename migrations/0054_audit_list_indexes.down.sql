DROP INDEX IF EXISTS audit_events_recorded_ix;
DROP INDEX IF EXISTS audit_events_request_ix;
