-- Row triggers on the hot paths run only when they act.
--
-- `resources_no_revival` refused a terminal status changing again from a BEFORE UPDATE trigger.
-- With a BEFORE row trigger on UPDATE, the server locks the row version before each update of
-- the table (one more WAL record and page change), whatever columns the update names and whether
-- or not the trigger, or its WHEN clause, finds anything to refuse; and it recomputes the stored
-- `token_digest` on every update, since such a trigger could change the token. Every update of a
-- resource paid both: the finalize flip, suspend, resume, deprovision, and a propagation's tier
-- landing, which does not even name `status`. As an AFTER trigger it sees the same old and new
-- row (the version the update replaced, after any concurrent change was rechecked) and raises
-- the same error, which aborts the update exactly as before; its WHEN clause is tested when the
-- row is updated, so an update that revives nothing queues no trigger event at all.
DROP TRIGGER IF EXISTS resources_no_revival ON resources;
CREATE TRIGGER resources_no_revival
    AFTER UPDATE OF status ON resources
    FOR EACH ROW
    WHEN (OLD.status IN ('deleted', 'failed') AND NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION resources_refuse_revival();

-- `recorded_at` defaults to the server's clock; the stamp only has to act when an INSERT or
-- COPY names another value. The row stored is the same either way.
DROP TRIGGER IF EXISTS audit_events_stamp ON audit_events;
CREATE TRIGGER audit_events_stamp
    BEFORE INSERT ON audit_events
    FOR EACH ROW
    WHEN (NEW.recorded_at IS DISTINCT FROM now())
    EXECUTE FUNCTION audit_events_stamp();

-- A propagation row takes its team's epoch only when it names none.
DROP TRIGGER IF EXISTS pending_propagations_tier_epoch ON pending_propagations;
CREATE TRIGGER pending_propagations_tier_epoch
    BEFORE INSERT ON pending_propagations
    FOR EACH ROW
    WHEN (NEW.tier_epoch IS NULL)
    EXECUTE FUNCTION pending_propagations_default_tier_epoch();
