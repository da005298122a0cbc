-- keel-audit tamper evidence: the hash chain over audit_events in commit order and its signed
-- checkpoints (keel_audit::seal). Append-only like the trail; the application role may read
-- them and write neither (keel_schema::roles).
CREATE TABLE audit_seals (
    seq        bigint      PRIMARY KEY CONSTRAINT audit_seals_seq_positive CHECK (seq > 0),
    txid       xid8        NOT NULL,
    event_id   bigint      NOT NULL UNIQUE,
    row_hash   bytea       NOT NULL CONSTRAINT audit_seals_hash_length CHECK (octet_length(row_hash) = 32),
    sealed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_checkpoints (
    seq        bigint      PRIMARY KEY REFERENCES audit_seals (seq),
    row_hash   bytea       NOT NULL,
    key_id     text        NOT NULL,
    signature  bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER audit_seals_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_seals
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_seals_no_truncate
    BEFORE TRUNCATE ON audit_seals
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_checkpoints_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate
    BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();

REVOKE ALL ON audit_seals, audit_checkpoints FROM PUBLIC;
