-- Each sighting counts the reclaims of it that failed in its current run.
--
-- The rate limit (`--max-reclaims` a tick) took the oldest candidates first. A candidate whose
-- reclaim failed every tick (a database the server cannot drop while a prepared transaction or
-- a subscription holds it, a namespace an admission webhook keeps) stayed the oldest, so as many
-- of them as the limit took every slot, tick after tick, and no newer orphan was ever reclaimed.
-- The sweep now takes the candidates with the fewest failed reclaims first, and the oldest among
-- those: one that keeps failing is still tried whenever a slot is free, never ahead of one that
-- has not failed. The count lives with the sighting so a `--once` CronJob, a restart and every
-- replica see it; it starts again with the candidate's run, as a quarantine does.

ALTER TABLE orphan_sighting_runs
    ADD COLUMN failed_reclaims integer NOT NULL DEFAULT 0
        CONSTRAINT orphan_sighting_runs_failed_reclaims CHECK (failed_reclaims >= 0);

-- The view shows it too (a column added at the end keeps the view's grants).
CREATE OR REPLACE VIEW orphan_sightings AS
SELECT s.inventory,
       s.key,
       s.first_seen,
       r.last_period,
       s.reclaimable_since,
       CASE WHEN s.reclaimable_period IS NULL THEN 0
            ELSE least(greatest(r.last_period::numeric - s.reclaimable_period + 1, 0), 2147483647)
       END::integer AS consecutive,
       s.quarantined,
       s.failed_reclaims
  FROM orphan_sighting_runs s
  JOIN orphan_sweep_recorded r ON r.inventory = s.inventory;
