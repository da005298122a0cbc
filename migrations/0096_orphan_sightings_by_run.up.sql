-- The orphan sweep records a sighting once per run instead of once per tick.
--
-- Every tick advanced every current candidate's `last_period` (and, for a reclaimable one, its
-- `consecutive`), so a tick over 75 000 candidates deleted and re-inserted 75 000 rows even when
-- nothing about them had changed: about half a second of the tick, and as many dead rows. Both
-- values follow from the period of the last recorded tick, which all current sightings share
-- (a sighting the last tick did not see is deleted): `last_period` is that period, and an
-- unbroken reclaimable run that started in period S has lasted `last_period - S + 1` periods.
-- So the period is stored once per inventory (`orphan_sweep_recorded`), each sighting keeps the
-- period its reclaimable run started in (`orphan_sighting_runs.reclaimable_period`), and a tick
-- writes only the sightings that are new, changed or gone.
--
-- `orphan_sightings` stays, as a view with the same columns and values, for the console,
-- operators and anything else that reads it.

CREATE TABLE orphan_sweep_recorded (
    inventory    text   PRIMARY KEY CHECK (inventory IN ('kubernetes', 'postgres')),
    last_period  bigint NOT NULL
);

ALTER TABLE orphan_sightings RENAME TO orphan_sighting_runs;
ALTER TABLE orphan_sighting_runs
    RENAME CONSTRAINT orphan_sightings_key_check TO orphan_sighting_runs_key_check;
ALTER TABLE orphan_sighting_runs
    RENAME CONSTRAINT orphan_sightings_inventory_check TO orphan_sighting_runs_inventory_check;
ALTER TABLE orphan_sighting_runs
    RENAME CONSTRAINT orphan_sightings_quarantined_check TO orphan_sighting_runs_quarantined_check;
ALTER INDEX orphan_sightings_pkey RENAME TO orphan_sighting_runs_pkey;

INSERT INTO orphan_sweep_recorded (inventory, last_period)
SELECT inventory, max(last_period) FROM orphan_sighting_runs GROUP BY inventory;

-- Every tick wrote all of its inventory's sightings with its own period; a row from an earlier
-- period was written by hand. It starts a new run at the next tick (a longer burn-in, never a
-- shorter one).
DELETE FROM orphan_sighting_runs s
 USING orphan_sweep_recorded r
 WHERE r.inventory = s.inventory AND s.last_period < r.last_period;

ALTER TABLE orphan_sighting_runs ADD COLUMN reclaimable_period bigint;
UPDATE orphan_sighting_runs
   SET reclaimable_period = last_period - consecutive + 1
 WHERE reclaimable_since IS NOT NULL;
ALTER TABLE orphan_sighting_runs
    DROP COLUMN last_period,
    DROP COLUMN consecutive,
    ADD CONSTRAINT orphan_sighting_runs_reclaimable_period
        CHECK ((reclaimable_since IS NULL) = (reclaimable_period IS NULL));

CREATE VIEW orphan_sightings AS
SELECT s.inventory,
       s.key,
       s.first_seen,
       r.last_period,
       s.reclaimable_since,
       CASE WHEN s.reclaimable_period IS NULL THEN 0
            ELSE least(greatest(r.last_period::numeric - s.reclaimable_period + 1, 0), 2147483647)
       END::integer AS consecutive,
       s.quarantined
  FROM orphan_sighting_runs s
  JOIN orphan_sweep_recorded r ON r.inventory = s.inventory;

-- Whoever could read the table can read the view, and whoever could write its sightings can
-- write the period they now share: the privileges moved with the renamed table, and the view
-- and the new table start with none.
DO $$
DECLARE
    grant_row record;
BEGIN
    FOR grant_row IN
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,
               a.privilege_type
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'orphan_sighting_runs'::regclass
           AND a.grantee <> c.relowner
           AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE')
    LOOP
        IF grant_row.privilege_type = 'SELECT' THEN
            EXECUTE format('GRANT SELECT ON orphan_sightings TO %s', grant_row.grantee);
        END IF;
        EXECUTE format('GRANT %s ON orphan_sweep_recorded TO %s',
                       grant_row.privilege_type, grant_row.grantee);
    END LOOP;
END
$$;
