-- The row triggers as migrations 0020, 0040 and 0055 made them: called on every row.
DO $$
BEGIN
    IF to_regclass('resources') IS NOT NULL
       AND to_regprocedure('resources_refuse_revival()') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS resources_no_revival ON resources;
        CREATE TRIGGER resources_no_revival
            BEFORE UPDATE OF status ON resources
            FOR EACH ROW EXECUTE FUNCTION resources_refuse_revival();
    END IF;
    IF to_regclass('audit_events') IS NOT NULL
       AND to_regprocedure('audit_events_stamp()') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS audit_events_stamp ON audit_events;
        CREATE TRIGGER audit_events_stamp
            BEFORE INSERT ON audit_events
            FOR EACH ROW EXECUTE FUNCTION audit_events_stamp();
    END IF;
    IF to_regclass('pending_propagations') IS NOT NULL
       AND to_regprocedure('pending_propagations_default_tier_epoch()') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS pending_propagations_tier_epoch ON pending_propagations;
        CREATE TRIGGER pending_propagations_tier_epoch
            BEFORE INSERT ON pending_propagations
            FOR EACH ROW EXECUTE FUNCTION pending_propagations_default_tier_epoch();
    END IF;
END
$$;
