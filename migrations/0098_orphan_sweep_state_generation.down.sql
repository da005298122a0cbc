-- The sweep state without its generation, as migration 0096 made it.
DO $$
BEGIN
    IF to_regclass('orphan_sighting_runs') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS orphan_sighting_runs_inserted ON orphan_sighting_runs;
        DROP TRIGGER IF EXISTS orphan_sighting_runs_updated ON orphan_sighting_runs;
        DROP TRIGGER IF EXISTS orphan_sighting_runs_deleted ON orphan_sighting_runs;
        DROP TRIGGER IF EXISTS orphan_sighting_runs_truncated ON orphan_sighting_runs;
    END IF;
    IF to_regclass('orphan_sweep_recorded') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS orphan_sweep_recorded_stamp ON orphan_sweep_recorded;
        ALTER TABLE orphan_sweep_recorded DROP COLUMN IF EXISTS generation;
    END IF;
END
$$;
DROP FUNCTION IF EXISTS orphan_sighting_runs_changed();
DROP FUNCTION IF EXISTS orphan_sweep_recorded_stamp();
