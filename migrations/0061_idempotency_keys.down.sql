DROP INDEX IF EXISTS resources_team_created_ix;
DROP TABLE IF EXISTS provision_api.idempotency_keys;
