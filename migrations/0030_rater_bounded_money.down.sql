DROP TABLE IF EXISTS rater_lease;
DROP INDEX IF EXISTS rater_runs_finished_at_ix;
ALTER TABLE IF EXISTS rater_runs
    DROP CONSTRAINT IF EXISTS rater_runs_exit_code_known,
    DROP COLUMN IF EXISTS days_committed,
    DROP COLUMN IF EXISTS late_events,
    DROP COLUMN IF EXISTS lowered;
ALTER TABLE IF EXISTS rated_usage
    DROP CONSTRAINT IF EXISTS rated_usage_event_count_positive,
    DROP CONSTRAINT IF EXISTS rated_usage_amount_bounded,
    DROP CONSTRAINT IF EXISTS rated_usage_unit_price_bounded,
    DROP CONSTRAINT IF EXISTS rated_usage_quantity_bounded,
    DROP CONSTRAINT IF EXISTS rated_usage_meter_printable,
    DROP CONSTRAINT IF EXISTS rated_usage_auth_id_printable;
ALTER TABLE IF EXISTS prices
    DROP CONSTRAINT IF EXISTS prices_effective_from_on_the_hour,
    DROP CONSTRAINT IF EXISTS prices_currency_iso,
    DROP CONSTRAINT IF EXISTS prices_unit_price_bounded,
    DROP CONSTRAINT IF EXISTS prices_meter_printable;
DROP INDEX IF EXISTS billing_event_ingested_at_ix;
ALTER TABLE IF EXISTS billing_event DROP CONSTRAINT IF EXISTS billing_event_source_event_id_key;
-- Restoring the global id key fails loudly if two sources now share an id.
ALTER TABLE IF EXISTS billing_event ADD CONSTRAINT billing_event_event_id_key UNIQUE (event_id);
ALTER TABLE IF EXISTS billing_event
    DROP CONSTRAINT IF EXISTS billing_event_quantity_bounded,
    DROP CONSTRAINT IF EXISTS billing_event_source_printable,
    DROP CONSTRAINT IF EXISTS billing_event_meter_printable,
    DROP CONSTRAINT IF EXISTS billing_event_auth_id_printable,
    DROP CONSTRAINT IF EXISTS billing_event_event_id_printable,
    DROP COLUMN IF EXISTS source;
