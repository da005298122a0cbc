DROP INDEX IF EXISTS audit_events_token_fingerprint_ix;
DROP TRIGGER IF EXISTS resources_no_revival ON resources;
DROP FUNCTION IF EXISTS resources_refuse_revival();
DROP INDEX IF EXISTS resources_token_digest_ix;
DROP TABLE IF EXISTS reclaim_protections;
DROP FUNCTION IF EXISTS keel_installation_id();
DROP TABLE IF EXISTS keel_installation;
DROP FUNCTION IF EXISTS keel_installation_refuse_change();
