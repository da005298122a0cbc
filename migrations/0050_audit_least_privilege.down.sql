-- Undoes 0050 without touching a row: a non-empty trail refuses (FND-2), and the identity
-- column goes back to a bigserial-style default.
DO $$
BEGIN
    IF to_regclass('audit_events') IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM audit_events) THEN
        RAISE EXCEPTION 'audit_events holds audit rows: reverting the schema would erase the audit trail'
            USING ERRCODE = 'object_in_use',
                  HINT = 'export the trail and, as the owner, move it aside (ALTER TABLE audit_events RENAME TO audit_events_archived_<date>) before reverting';
    END IF;
    DROP TRIGGER IF EXISTS audit_events_stamp ON audit_events;
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_name = 'audit_events' AND column_name = 'id' AND is_identity = 'YES'
                 AND table_schema = current_schema()) THEN
        ALTER TABLE audit_events ALTER COLUMN id DROP IDENTITY;
        CREATE SEQUENCE audit_events_id_seq OWNED BY audit_events.id;
        ALTER TABLE audit_events ALTER COLUMN id SET DEFAULT nextval('audit_events_id_seq');
    END IF;
END;
$$;
DROP FUNCTION IF EXISTS audit_events_stamp();
