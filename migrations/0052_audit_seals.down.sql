-- The seal chain is evidence about the trail: it is never dropped while it holds links.
DO $$
BEGIN
    IF to_regclass('audit_seals') IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM audit_seals) THEN
        RAISE EXCEPTION 'audit_seals holds seals of the audit trail: reverting the schema would erase them'
            USING ERRCODE = 'object_in_use',
                  HINT = 'export the trail and its seals and, as the owner, move both aside before reverting';
    END IF;
END;
$$;
DROP TABLE IF EXISTS audit_checkpoints;
DROP TABLE IF EXISTS audit_seals;
