ALTER TABLE service_upgrades DROP COLUMN IF EXISTS note;
