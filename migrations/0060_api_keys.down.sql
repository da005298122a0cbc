DROP TABLE IF EXISTS provision_api.api_keys;
DROP SCHEMA IF EXISTS provision_api;
