-- The audit trail is never dropped with rows in it (FND-2): reverting refuses while any audit
-- row exists. To revert anyway, export the trail and move it aside as the owner first.
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
END;
$$;
DROP TABLE IF EXISTS audit_events;
DROP FUNCTION IF EXISTS audit_events_refuse_change();
