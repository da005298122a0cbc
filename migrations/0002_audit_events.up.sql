-- Append-only audit trail. Rows are written in the same transaction as the state change they
-- describe; the database itself refuses UPDATE, DELETE and TRUNCATE.
CREATE TABLE audit_events (
    id           bigserial   PRIMARY KEY,
    kind         text        NOT NULL
        CONSTRAINT audit_events_kind_format CHECK (kind ~ '^[a-z][a-z_]*\.[a-z][a-z_]*$'),
    actor        text        NOT NULL,
    team_id      uuid,
    resource_id  uuid,
    request_id   text,
    attributes   jsonb       NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT audit_events_attributes_object CHECK (jsonb_typeof(attributes) = 'object'),
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX audit_events_resource_ix ON audit_events (resource_id, id) WHERE resource_id IS NOT NULL;
CREATE INDEX audit_events_team_ix ON audit_events (team_id, id) WHERE team_id IS NOT NULL;
CREATE INDEX audit_events_kind_ix ON audit_events (kind, occurred_at);

CREATE FUNCTION audit_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'write a new audit event instead of changing an old one';
END;
$$;

CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
