-- Restores the regular-expression forms of migrations 0030, 0040, 0041, 0053 and 0060 (they
-- accept the same values).
ALTER TABLE IF EXISTS provision_api.api_keys
    DROP CONSTRAINT IF EXISTS api_keys_id_check,
    ADD CONSTRAINT api_keys_id_check CHECK (id ~ '^[0-9a-f]{12}$');

ALTER TABLE IF EXISTS notification_cursor
    DROP CONSTRAINT IF EXISTS notification_cursor_name_format,
    ADD CONSTRAINT notification_cursor_name_format CHECK (name ~ '^[a-z0-9_-]{1,64}$');

ALTER TABLE IF EXISTS orphan_sightings
    DROP CONSTRAINT IF EXISTS orphan_sightings_key_check,
    ADD CONSTRAINT orphan_sightings_key_check CHECK (key ~ '^[a-z_]+:[0-9a-f]{48}$');

ALTER TABLE IF EXISTS reclaim_protections
    DROP CONSTRAINT IF EXISTS reclaim_protections_digest_format,
    ADD CONSTRAINT reclaim_protections_digest_format CHECK (token_digest ~ '^[0-9a-f]{48}$');

ALTER TABLE IF EXISTS rated_usage
    DROP CONSTRAINT IF EXISTS rated_usage_auth_id_printable,
    DROP CONSTRAINT IF EXISTS rated_usage_meter_printable,
    DROP CONSTRAINT IF EXISTS rated_usage_window_start_on_the_hour,
    ADD CONSTRAINT rated_usage_auth_id_printable CHECK (auth_id ~ '^[!-~]{1,128}$'),
    ADD CONSTRAINT rated_usage_meter_printable CHECK (meter ~ '^[!-~]{1,64}$'),
    ADD CONSTRAINT rated_usage_window_start_on_the_hour
        CHECK (extract(epoch FROM window_start) = floor(extract(epoch FROM window_start) / 3600) * 3600);

ALTER TABLE IF EXISTS prices
    DROP CONSTRAINT IF EXISTS prices_meter_printable,
    DROP CONSTRAINT IF EXISTS prices_currency_iso,
    ADD CONSTRAINT prices_meter_printable CHECK (meter ~ '^[!-~]{1,64}$'),
    ADD CONSTRAINT prices_currency_iso CHECK (currency ~ '^[A-Z]{3}$');

ALTER TABLE IF EXISTS billing_event
    DROP CONSTRAINT IF EXISTS billing_event_event_id_printable,
    DROP CONSTRAINT IF EXISTS billing_event_auth_id_printable,
    DROP CONSTRAINT IF EXISTS billing_event_meter_printable,
    DROP CONSTRAINT IF EXISTS billing_event_source_printable,
    ADD CONSTRAINT billing_event_event_id_printable CHECK (event_id ~ '^[!-~]{1,128}$'),
    ADD CONSTRAINT billing_event_auth_id_printable CHECK (auth_id ~ '^[!-~]{1,128}$'),
    ADD CONSTRAINT billing_event_meter_printable CHECK (meter ~ '^[!-~]{1,64}$'),
    ADD CONSTRAINT billing_event_source_printable CHECK (source ~ '^[!-~]{1,64}$');
