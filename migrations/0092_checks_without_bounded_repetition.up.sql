-- The text-format CHECKs of migrations 0030, 0040, 0041, 0053 and 0060, restated without bounded
-- regular-expression repetition. PostgreSQL compiles `x{1,128}` into an automaton with one state
-- per repetition, and running it costs microseconds per row: on `billing_event` (four such CHECKs
-- on every ingested event) and `rated_usage` (two on every rated group) they were most of the
-- cost of an insert. Each CHECK keeps its name and accepts exactly the same values: "every
-- character in the class" becomes "no character outside the class" (`!~ '[^…]'`, no repetition)
-- plus a bound on `length`, which counts characters; every accepted character is one byte, so
-- the bound is the same as before. The on-the-hour CHECK compares with `date_bin` instead of
-- numeric epoch arithmetic.
--
-- The new CHECKs are validated against the existing rows (a scan of each table, cheap with the
-- new expressions) inside this migration's transaction.

ALTER TABLE billing_event
    DROP CONSTRAINT billing_event_event_id_printable,
    DROP CONSTRAINT billing_event_auth_id_printable,
    DROP CONSTRAINT billing_event_meter_printable,
    DROP CONSTRAINT billing_event_source_printable,
    ADD CONSTRAINT billing_event_event_id_printable
        CHECK (event_id !~ '[^!-~]' AND length(event_id) BETWEEN 1 AND 128),
    ADD CONSTRAINT billing_event_auth_id_printable
        CHECK (auth_id !~ '[^!-~]' AND length(auth_id) BETWEEN 1 AND 128),
    ADD CONSTRAINT billing_event_meter_printable
        CHECK (meter !~ '[^!-~]' AND length(meter) BETWEEN 1 AND 64),
    ADD CONSTRAINT billing_event_source_printable
        CHECK (source !~ '[^!-~]' AND length(source) BETWEEN 1 AND 64);

ALTER TABLE prices
    DROP CONSTRAINT prices_meter_printable,
    DROP CONSTRAINT prices_currency_iso,
    ADD CONSTRAINT prices_meter_printable
        CHECK (meter !~ '[^!-~]' AND length(meter) BETWEEN 1 AND 64),
    ADD CONSTRAINT prices_currency_iso
        CHECK (currency !~ '[^A-Z]' AND length(currency) = 3);

ALTER TABLE rated_usage
    DROP CONSTRAINT rated_usage_auth_id_printable,
    DROP CONSTRAINT rated_usage_meter_printable,
    DROP CONSTRAINT rated_usage_window_start_on_the_hour,
    ADD CONSTRAINT rated_usage_auth_id_printable
        CHECK (auth_id !~ '[^!-~]' AND length(auth_id) BETWEEN 1 AND 128),
    ADD CONSTRAINT rated_usage_meter_printable
        CHECK (meter !~ '[^!-~]' AND length(meter) BETWEEN 1 AND 64),
    ADD CONSTRAINT rated_usage_window_start_on_the_hour
        CHECK (window_start = date_bin('1 hour', window_start, TIMESTAMPTZ '2000-01-01 00:00:00+00'));

ALTER TABLE reclaim_protections
    DROP CONSTRAINT reclaim_protections_digest_format,
    ADD CONSTRAINT reclaim_protections_digest_format
        CHECK (token_digest !~ '[^0-9a-f]' AND length(token_digest) = 48);

-- `kind:digest`: the unbounded pattern fixes the shape (one colon, since neither class holds
-- one), the length after the colon fixes the digest's 48 digits.
ALTER TABLE orphan_sightings
    DROP CONSTRAINT orphan_sightings_key_check,
    ADD CONSTRAINT orphan_sightings_key_check
        CHECK (key ~ '^[a-z_]+:[0-9a-f]+$' AND length(key) - strpos(key, ':') = 48);

ALTER TABLE notification_cursor
    DROP CONSTRAINT notification_cursor_name_format,
    ADD CONSTRAINT notification_cursor_name_format
        CHECK (name !~ '[^a-z0-9_-]' AND length(name) BETWEEN 1 AND 64);

ALTER TABLE provision_api.api_keys
    DROP CONSTRAINT api_keys_id_check,
    ADD CONSTRAINT api_keys_id_check
        CHECK (id !~ '[^0-9a-f]' AND length(id) = 12);
