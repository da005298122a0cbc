-- Undoes 0055 without touching a row: a non-empty trail or retention record refuses (FND-2);
-- an empty partitioned trail goes back to the single table of 0054, with its triggers and
-- indexes.
DO $$
BEGIN
    IF to_regclass('audit_events') IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM audit_events) THEN
            RAISE EXCEPTION 'audit_events holds audit rows: reverting the partitioning would erase the audit trail'
                USING ERRCODE = 'object_in_use',
                      HINT = 'export the trail and, as the owner, move it aside before reverting';
        END IF;
    END IF;
    IF to_regclass('audit_retention') IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM audit_retention) THEN
            RAISE EXCEPTION 'audit_retention records exported months: reverting would erase that record'
                USING ERRCODE = 'object_in_use';
        END IF;
    END IF;
END;
$$;
DROP TABLE IF EXISTS audit_retired_links;
DROP TABLE IF EXISTS audit_retention;
DROP FUNCTION IF EXISTS audit_retention_forward_only();

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass('audit_events') AND relkind = 'p') THEN
        RETURN;
    END IF;
    DROP TABLE audit_events;
    CREATE TABLE audit_events (
        id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind         text        NOT NULL
            CONSTRAINT audit_events_kind_format CHECK (kind ~ '^[a-z][a-z_]*\.[a-z][a-z_]*$'),
        actor        text        NOT NULL,
        team_id      uuid,
        resource_id  uuid,
        request_id   text,
        attributes   jsonb       NOT NULL DEFAULT '{}'::jsonb
            CONSTRAINT audit_events_attributes_object CHECK (jsonb_typeof(attributes) = 'object'),
        occurred_at  timestamptz NOT NULL,
        recorded_at  timestamptz NOT NULL DEFAULT now(),
        txid         xid8        NOT NULL DEFAULT pg_current_xact_id()
    );
    ALTER TABLE audit_events
        ADD CONSTRAINT audit_events_attribute_values_are_strings
        CHECK (NOT jsonb_path_exists(attributes, '$.* ? (@.type() != "string")')) NOT VALID;
    CREATE INDEX audit_events_commit_order_ix ON audit_events (txid, id);
    CREATE INDEX audit_events_kind_ix ON audit_events (kind, occurred_at);
    CREATE INDEX audit_events_recorded_ix ON audit_events (recorded_at);
    CREATE INDEX audit_events_request_ix ON audit_events (request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX audit_events_resource_ix ON audit_events (resource_id, id) WHERE resource_id IS NOT NULL;
    CREATE INDEX audit_events_team_ix ON audit_events (team_id, id) WHERE team_id IS NOT NULL;
    CREATE INDEX audit_events_token_fingerprint_ix ON audit_events ((attributes ->> 'token_fingerprint'), kind)
        WHERE attributes ? 'token_fingerprint';
    CREATE TRIGGER audit_events_stamp
        BEFORE INSERT ON audit_events
        FOR EACH ROW EXECUTE FUNCTION audit_events_stamp();
    CREATE TRIGGER audit_events_no_update_delete
        BEFORE UPDATE OR DELETE ON audit_events
        FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
    CREATE TRIGGER audit_events_no_truncate
        BEFORE TRUNCATE ON audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
    REVOKE ALL ON audit_events FROM PUBLIC;
END;
$$;
DROP FUNCTION IF EXISTS audit_events_ensure_partitions(timestamptz, timestamptz);
