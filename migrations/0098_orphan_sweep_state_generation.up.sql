-- Each inventory's sweep state carries a generation: the transaction that last changed it.
--
-- A running sweeper read all of its inventory's sightings at every tick (75 000 rows for an
-- inventory of 100 000 objects, a quarter of its tick), although in most ticks it had written
-- them itself at the tick before and nobody else had touched them since. With a generation the
-- state store can keep what it recorded and, at the next tick, read one row to learn whether
-- that is still what the tables hold.
--
-- `orphan_sweep_recorded.generation` is the id of the last transaction that changed the
-- inventory's state: its own row (any INSERT or UPDATE of it, however written) or any of its
-- sighting runs (INSERT, UPDATE, DELETE, TRUNCATE). Transaction ids are never handed out twice,
-- so a generation that is unchanged means nothing changed, whoever wrote, and however: the
-- sweep, another replica, an older binary during a rolling deploy, the console or an operator's
-- `psql`.

ALTER TABLE orphan_sweep_recorded
    ADD COLUMN generation bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);

COMMENT ON COLUMN orphan_sweep_recorded.generation IS
    'The id of the last transaction that changed this inventory''s sweep state (this row or its '
    'orphan_sighting_runs); set by triggers, whatever the statement names.';

-- Any write of the row stamps it with the writing transaction, whatever the statement named.
CREATE FUNCTION orphan_sweep_recorded_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.generation := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END
$$;

CREATE TRIGGER orphan_sweep_recorded_stamp
    BEFORE INSERT OR UPDATE ON orphan_sweep_recorded
    FOR EACH ROW EXECUTE FUNCTION orphan_sweep_recorded_stamp();

-- Any write of the runs stamps the inventories whose runs it wrote (all of them for TRUNCATE),
-- once per statement.
CREATE FUNCTION orphan_sighting_runs_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE orphan_sweep_recorded SET generation = 0;
    ELSIF TG_OP = 'INSERT' THEN
        UPDATE orphan_sweep_recorded SET generation = 0
         WHERE inventory IN (SELECT inventory FROM runs_new);
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE orphan_sweep_recorded SET generation = 0
         WHERE inventory IN (SELECT inventory FROM runs_old);
    ELSE
        UPDATE orphan_sweep_recorded SET generation = 0
         WHERE inventory IN (SELECT inventory FROM runs_old
                             UNION SELECT inventory FROM runs_new);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER orphan_sighting_runs_inserted
    AFTER INSERT ON orphan_sighting_runs
    REFERENCING NEW TABLE AS runs_new
    FOR EACH STATEMENT EXECUTE FUNCTION orphan_sighting_runs_changed();

CREATE TRIGGER orphan_sighting_runs_updated
    AFTER UPDATE ON orphan_sighting_runs
    REFERENCING OLD TABLE AS runs_old NEW TABLE AS runs_new
    FOR EACH STATEMENT EXECUTE FUNCTION orphan_sighting_runs_changed();

CREATE TRIGGER orphan_sighting_runs_deleted
    AFTER DELETE ON orphan_sighting_runs
    REFERENCING OLD TABLE AS runs_old
    FOR EACH STATEMENT EXECUTE FUNCTION orphan_sighting_runs_changed();

CREATE TRIGGER orphan_sighting_runs_truncated
    AFTER TRUNCATE ON orphan_sighting_runs
    FOR EACH STATEMENT EXECUTE FUNCTION orphan_sighting_runs_changed();
