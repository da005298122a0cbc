ALTER TABLE IF EXISTS io_log DROP CONSTRAINT IF EXISTS io_log_request_id_bounded;
