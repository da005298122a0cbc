DROP TABLE IF EXISTS provision_api.console_sessions;
