DROP TABLE IF EXISTS service_upgrades;
