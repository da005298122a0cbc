-- Usage events, effective-dated prices, hourly rated usage and the rater's run ledger.
-- Quantities and money are NUMERIC: exact, never floating point.
CREATE TABLE billing_event (
    id           bigserial   PRIMARY KEY,
    -- Producer-assigned id: the permanent dedupe key.
    event_id     text        NOT NULL CONSTRAINT billing_event_event_id_key UNIQUE,
    auth_id      text        NOT NULL,
    meter        text        NOT NULL,
    quantity     numeric     NOT NULL CHECK (quantity >= 0),
    occurred_at  timestamptz NOT NULL,
    ingested_at  timestamptz NOT NULL DEFAULT now()
);

-- Rating aggregates a window of occurred_at per (auth_id, meter, hour).
CREATE INDEX billing_event_occurred_at_ix ON billing_event (occurred_at, auth_id, meter);
-- The reconcile's anti-join asks "any event left for this (auth_id, meter, hour)?".
CREATE INDEX billing_event_auth_meter_ix ON billing_event (auth_id, meter, occurred_at);

CREATE TABLE prices (
    meter           text        NOT NULL,
    effective_from  timestamptz NOT NULL,
    -- Price of one unit of the meter, in the currency's major unit.
    unit_price      numeric     NOT NULL CHECK (unit_price >= 0),
    currency        text        NOT NULL DEFAULT 'USD',
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter, effective_from)
);

CREATE TABLE rated_usage (
    id            bigserial   PRIMARY KEY,
    auth_id       text        NOT NULL,
    meter         text        NOT NULL,
    window_start  timestamptz NOT NULL
        CONSTRAINT rated_usage_window_start_on_the_hour
        CHECK (extract(epoch FROM window_start) = floor(extract(epoch FROM window_start) / 3600) * 3600),
    quantity      numeric     NOT NULL,
    unit_price    numeric     NOT NULL,
    amount        numeric     NOT NULL,
    currency      text        NOT NULL DEFAULT 'USD',
    event_count   bigint      NOT NULL,
    rated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rated_usage_auth_id_meter_window_start_key UNIQUE (auth_id, meter, window_start)
);

-- The reconcile DELETE filters on window_start alone; every other index leads with auth_id.
CREATE INDEX rated_usage_window_start_ix ON rated_usage (window_start);

CREATE TABLE rater_runs (
    id                bigserial   PRIMARY KEY,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz,
    window_start      timestamptz NOT NULL,
    window_end        timestamptz NOT NULL,
    explicit_window   boolean     NOT NULL,
    dry_run           boolean     NOT NULL DEFAULT false,
    inserted          bigint      NOT NULL DEFAULT 0,
    updated           bigint      NOT NULL DEFAULT 0,
    unchanged         bigint      NOT NULL DEFAULT 0,
    deleted           bigint      NOT NULL DEFAULT 0,
    anomalies         bigint      NOT NULL DEFAULT 0,
    exit_code         smallint,
    error             text,
    CONSTRAINT rater_runs_window_order CHECK (window_start < window_end)
);

CREATE INDEX rater_runs_started_at_ix ON rater_runs (started_at);
