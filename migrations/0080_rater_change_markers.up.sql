-- keel-rater: work proportional to change. Every write to the rater's inputs leaves a marker in
-- the same transaction, so a routine run re-rates only the (auth id, meter, hour) groups whose
-- events changed, and a run after a price change (or a TRUNCATE) re-rates its whole window.
--
-- Markers are consumed by DELETE inside the rating transaction that rates them. A DELETE only
-- removes markers visible to its snapshot, and a visible marker's events are visible to that
-- same snapshot (one transaction wrote both): a marker whose writer commits after a rating
-- statement started survives it, so late-committing usage is rated by the next run, never lost.
-- A rating transaction that rolls back restores the markers it consumed.

-- One row per (group, writing statement); duplicates are fine, no index: the table holds only
-- markers not yet consumed (the open hour, and late usage awaiting a backfill).
CREATE TABLE rating_change (
    auth_id       text        NOT NULL,
    meter         text        NOT NULL,
    window_start  timestamptz NOT NULL,
    marked_at     timestamptz NOT NULL DEFAULT now()
);

-- "Re-rate the whole routine window": a price changed, billing_event was truncated, or this
-- migration ran over existing data. Consumed by the routine run that rated every day of its
-- window, by id, so one written after that run started survives it.
CREATE TABLE rating_change_all (
    id         bigserial   PRIMARY KEY,
    reason     text        NOT NULL,
    marked_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION rating_change_mark_groups() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO rating_change (auth_id, meter, window_start)
        SELECT DISTINCT auth_id, meter,
               date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')
          FROM rating_change_new;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO rating_change (auth_id, meter, window_start)
        SELECT DISTINCT auth_id, meter,
               date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')
          FROM rating_change_old;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION rating_change_mark_all() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rating_change_all (reason) VALUES (TG_TABLE_NAME || ' ' || lower(TG_OP));
    RETURN NULL;
END $$;

-- Statement-level with transition tables: one marker per distinct group per statement, and an
-- ON CONFLICT DO NOTHING duplicate (not in the transition table) marks nothing.
CREATE TRIGGER billing_event_marks_inserted AFTER INSERT ON billing_event
    REFERENCING NEW TABLE AS rating_change_new
    FOR EACH STATEMENT EXECUTE FUNCTION rating_change_mark_groups();
CREATE TRIGGER billing_event_marks_updated AFTER UPDATE ON billing_event
    REFERENCING OLD TABLE AS rating_change_old NEW TABLE AS rating_change_new
    FOR EACH STATEMENT EXECUTE FUNCTION rating_change_mark_groups();
CREATE TRIGGER billing_event_marks_deleted AFTER DELETE ON billing_event
    REFERENCING OLD TABLE AS rating_change_old
    FOR EACH STATEMENT EXECUTE FUNCTION rating_change_mark_groups();
CREATE TRIGGER billing_event_marks_truncated AFTER TRUNCATE ON billing_event
    FOR EACH STATEMENT EXECUTE FUNCTION rating_change_mark_all();
CREATE TRIGGER prices_mark_all AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON prices
    FOR EACH STATEMENT EXECUTE FUNCTION rating_change_mark_all();

-- Data written before the markers existed: the next routine run rates its whole window, and
-- events ingested in the last two days are marked so late usage among them is still found.
INSERT INTO rating_change_all (reason) SELECT 'migration 0080' WHERE EXISTS (SELECT 1 FROM billing_event);
INSERT INTO rating_change (auth_id, meter, window_start)
SELECT DISTINCT auth_id, meter, date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')
  FROM billing_event WHERE ingested_at >= now() - interval '49 hours';
