-- Back to one row per sighting with its own period and run length, as the view showed them.
DROP VIEW IF EXISTS orphan_sightings;

DO $$
BEGIN
    IF to_regclass('orphan_sighting_runs') IS NOT NULL THEN
        ALTER TABLE orphan_sighting_runs
            DROP CONSTRAINT IF EXISTS orphan_sighting_runs_reclaimable_period,
            ADD COLUMN last_period bigint,
            ADD COLUMN consecutive integer;
        -- A sighting without its inventory's period cannot be shown; it starts a new run.
        DELETE FROM orphan_sighting_runs s
         WHERE NOT EXISTS (SELECT 1 FROM orphan_sweep_recorded r WHERE r.inventory = s.inventory);
        UPDATE orphan_sighting_runs s
           SET last_period = r.last_period,
               consecutive = CASE WHEN s.reclaimable_period IS NULL THEN 0
                                  ELSE least(greatest(r.last_period::numeric
                                                      - s.reclaimable_period + 1, 0),
                                             2147483647)
                             END
          FROM orphan_sweep_recorded r
         WHERE r.inventory = s.inventory;
        ALTER TABLE orphan_sighting_runs
            ALTER COLUMN last_period SET NOT NULL,
            ALTER COLUMN consecutive SET NOT NULL,
            ADD CONSTRAINT orphan_sightings_consecutive_check CHECK (consecutive >= 0),
            DROP COLUMN reclaimable_period;
        ALTER INDEX orphan_sighting_runs_pkey RENAME TO orphan_sightings_pkey;
        ALTER TABLE orphan_sighting_runs
            RENAME CONSTRAINT orphan_sighting_runs_key_check TO orphan_sightings_key_check;
        ALTER TABLE orphan_sighting_runs
            RENAME CONSTRAINT orphan_sighting_runs_inventory_check
                TO orphan_sightings_inventory_check;
        ALTER TABLE orphan_sighting_runs
            RENAME CONSTRAINT orphan_sighting_runs_quarantined_check
                TO orphan_sightings_quarantined_check;
        ALTER TABLE orphan_sighting_runs RENAME TO orphan_sightings;
    END IF;
END
$$;

DROP TABLE IF EXISTS orphan_sweep_recorded;
