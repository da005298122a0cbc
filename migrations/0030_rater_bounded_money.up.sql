-- keel-rater: bounded money, validated contract tables, scoped dedupe, the late-usage watermark
-- and a committed-counts ledger.
--
-- Money model (mirrored by keel_rater::money):
--   quantity    0 <= q < 1e15, at most 6 decimal places
--   unit_price  0 <= p < 1e6,  at most 9 decimal places
--   amount      round(quantity * unit_price, 9), 0 <= a < 1e18 per rated hour
-- Every value these tables accept fits rust_decimal exactly, so no row can fail decoding.

-- Ids and meters: 1..N printable ASCII characters without spaces, as BillingEvent::new requires.
ALTER TABLE billing_event
    ADD COLUMN source text NOT NULL DEFAULT 'default',
    ADD CONSTRAINT billing_event_event_id_printable CHECK (event_id ~ '^[!-~]{1,128}$'),
    ADD CONSTRAINT billing_event_auth_id_printable CHECK (auth_id ~ '^[!-~]{1,128}$'),
    ADD CONSTRAINT billing_event_meter_printable CHECK (meter ~ '^[!-~]{1,64}$'),
    ADD CONSTRAINT billing_event_source_printable CHECK (source ~ '^[!-~]{1,64}$'),
    ADD CONSTRAINT billing_event_quantity_bounded
        CHECK (quantity >= 0 AND quantity < 1e15 AND quantity = round(quantity, 6));

-- Dedupe is scoped by the producing source: two producers may both use id "1".
ALTER TABLE billing_event DROP CONSTRAINT billing_event_event_id_key;
ALTER TABLE billing_event
    ADD CONSTRAINT billing_event_source_event_id_key UNIQUE (source, event_id);

-- The late-usage check looks for events ingested since the last run.
CREATE INDEX billing_event_ingested_at_ix ON billing_event (ingested_at);

ALTER TABLE prices
    ADD CONSTRAINT prices_meter_printable CHECK (meter ~ '^[!-~]{1,64}$'),
    ADD CONSTRAINT prices_unit_price_bounded
        CHECK (unit_price >= 0 AND unit_price < 1e6 AND unit_price = round(unit_price, 9)),
    ADD CONSTRAINT prices_currency_iso CHECK (currency ~ '^[A-Z]{3}$'),
    -- Hours are priced whole: a price starting mid-hour would silently start at the next hour.
    ADD CONSTRAINT prices_effective_from_on_the_hour
        CHECK (extract(epoch FROM effective_from) = floor(extract(epoch FROM effective_from) / 3600) * 3600);

-- Amounts stored before this migration are brought to the declared scale.
UPDATE rated_usage SET amount = round(amount, 9) WHERE amount <> round(amount, 9);

ALTER TABLE rated_usage
    ADD CONSTRAINT rated_usage_auth_id_printable CHECK (auth_id ~ '^[!-~]{1,128}$'),
    ADD CONSTRAINT rated_usage_meter_printable CHECK (meter ~ '^[!-~]{1,64}$'),
    ADD CONSTRAINT rated_usage_quantity_bounded
        CHECK (quantity >= 0 AND quantity < 1e18 AND quantity = round(quantity, 6)),
    ADD CONSTRAINT rated_usage_unit_price_bounded
        CHECK (unit_price >= 0 AND unit_price < 1e6 AND unit_price = round(unit_price, 9)),
    ADD CONSTRAINT rated_usage_amount_bounded
        CHECK (amount >= 0 AND amount < 1e18 AND amount = round(amount, 9)),
    ADD CONSTRAINT rated_usage_event_count_positive CHECK (event_count > 0);

-- The ledger records what committed (per day, as it commits), late events found, and who ran.
ALTER TABLE rater_runs
    ADD COLUMN lowered bigint NOT NULL DEFAULT 0,
    ADD COLUMN late_events bigint NOT NULL DEFAULT 0,
    ADD COLUMN days_committed integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT rater_runs_exit_code_known CHECK (exit_code IS NULL OR exit_code IN (0, 1, 2, 3));

CREATE INDEX rater_runs_finished_at_ix ON rater_runs (finished_at) WHERE exit_code IS NOT NULL;

-- The single-flight fence: every run that takes the lock bumps it; each day's transaction
-- re-reads it under FOR UPDATE and aborts unless it is still the run's own.
CREATE TABLE rater_lease (
    id          boolean     PRIMARY KEY DEFAULT true CHECK (id),
    fence       bigint      NOT NULL DEFAULT 0,
    holder_pid  integer,
    taken_at    timestamptz
);
INSERT INTO rater_lease (id) VALUES (true);
