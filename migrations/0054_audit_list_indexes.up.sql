-- `keel-audit list` (keel_audit::list): the documented lookups by request id and by the time the
-- database recorded a row, which otherwise scan the whole trail.
CREATE INDEX audit_events_request_ix ON audit_events (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX audit_events_recorded_ix ON audit_events (recorded_at);
