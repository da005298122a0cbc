DROP TABLE IF EXISTS orphan_sightings;
DROP TABLE IF EXISTS orphan_sweep_periods;
