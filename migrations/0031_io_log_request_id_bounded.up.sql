-- keel-rater io_log: the request id is stored sanitized and at most 256 bytes, as
-- keel_rater::sanitize_request_id makes it. NOT VALID: rows stored before stay readable;
-- every new row is checked.
ALTER TABLE io_log
    ADD CONSTRAINT io_log_request_id_bounded CHECK (octet_length(request_id) <= 256) NOT VALID;
