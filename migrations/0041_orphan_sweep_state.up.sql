-- The orphan sweep's durable state (keel-orphan-sweep), in the platform database so a CronJob
-- (--once), restarts and replicas share one burn-in.

-- One claim per inventory and period (whole intervals since the epoch, by this database's clock):
-- the tick of a period runs once however many replicas there are. The newest claim is the fence
-- a running tick checks before each reclaim.
CREATE TABLE orphan_sweep_periods (
    inventory   text        NOT NULL CHECK (inventory IN ('kubernetes', 'postgres')),
    period      bigint      NOT NULL,
    claimed_by  text        NOT NULL CHECK (length(claimed_by) BETWEEN 1 AND 200),
    claimed_at  timestamptz NOT NULL,
    PRIMARY KEY (inventory, period)
);

-- One row per current candidate, keyed by kind and token digest (never by name, which may carry
-- a token): first seen, the last period seen, the run of reclaimable sightings, and a quarantine
-- once the deprovision chokepoint refused it.
CREATE TABLE orphan_sightings (
    inventory          text        NOT NULL CHECK (inventory IN ('kubernetes', 'postgres')),
    key                text        NOT NULL CHECK (key ~ '^[a-z_]+:[0-9a-f]{48}$'),
    first_seen         timestamptz NOT NULL,
    last_period        bigint      NOT NULL,
    reclaimable_since  timestamptz,
    consecutive        integer     NOT NULL CHECK (consecutive >= 0),
    quarantined        text        CHECK (length(quarantined) <= 200),
    PRIMARY KEY (inventory, key)
);
