-- Back to sightings without a count of failed reclaims: the view as migration 0096 made it, with
-- the SELECT grants it had.
DO $$
DECLARE
    grantees text[];
    grantee text;
BEGIN
    IF to_regclass('orphan_sighting_runs') IS NULL THEN
        RETURN;
    END IF;
    IF to_regclass('orphan_sightings') IS NOT NULL THEN
        SELECT coalesce(array_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                ELSE a.grantee::regrole::text END), '{}')
          INTO grantees
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'orphan_sightings'::regclass
           AND a.grantee <> c.relowner
           AND a.privilege_type = 'SELECT';
        DROP VIEW orphan_sightings;
    ELSE
        grantees := '{}';
    END IF;
    ALTER TABLE orphan_sighting_runs DROP COLUMN IF EXISTS failed_reclaims;
    IF to_regclass('orphan_sweep_recorded') IS NOT NULL THEN
        CREATE VIEW orphan_sightings AS
        SELECT s.inventory,
               s.key,
               s.first_seen,
               r.last_period,
               s.reclaimable_since,
               CASE WHEN s.reclaimable_period IS NULL THEN 0
                    ELSE least(greatest(r.last_period::numeric - s.reclaimable_period + 1, 0),
                               2147483647)
               END::integer AS consecutive,
               s.quarantined
          FROM orphan_sighting_runs s
          JOIN orphan_sweep_recorded r ON r.inventory = s.inventory;
        FOREACH grantee IN ARRAY grantees LOOP
            EXECUTE format('GRANT SELECT ON orphan_sightings TO %s', grantee);
        END LOOP;
    END IF;
END
$$;
