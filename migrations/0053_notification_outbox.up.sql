-- keel-audit customer notifications (keel_audit::notify): the dispatcher's durable cursor over
-- audit_events in commit order, and its outbox of deliveries. A delivery's `event_id` is minted
-- once, when its audit row is taken from the trail, so every retry and every redelivery after a
-- crash carries the same id and receivers deduplicate on it. Neither table holds the webhook URL
-- or the signing key.
CREATE TABLE notification_cursor (
    name       text        PRIMARY KEY CONSTRAINT notification_cursor_name_format CHECK (name ~ '^[a-z0-9_-]{1,64}$'),
    txid       bigint      NOT NULL CONSTRAINT notification_cursor_txid_nonnegative CHECK (txid >= 0),
    audit_id   bigint      NOT NULL CONSTRAINT notification_cursor_id_nonnegative CHECK (audit_id >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notification_deliveries (
    event_id         uuid        PRIMARY KEY,
    seq              bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    audit_id         bigint      NOT NULL UNIQUE,
    recorded_at      timestamptz NOT NULL,
    kind             text        NOT NULL,
    template         text        NOT NULL,
    payload          jsonb       NOT NULL,
    state            text        NOT NULL DEFAULT 'pending'
        CONSTRAINT notification_deliveries_state CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0 CONSTRAINT notification_deliveries_attempts CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_outcome     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    dead_lettered_at timestamptz
);

-- `seq` is the order rows were taken from the trail, which is commit order. The dispatcher's
-- work queue (due pending rows) and the dead-letter list:
CREATE INDEX notification_deliveries_due_ix ON notification_deliveries (seq)
    WHERE state = 'pending';
CREATE INDEX notification_deliveries_dead_ix ON notification_deliveries (dead_lettered_at)
    WHERE state = 'dead';

REVOKE ALL ON notification_cursor, notification_deliveries FROM PUBLIC;
