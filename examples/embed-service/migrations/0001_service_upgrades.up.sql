-- The service's own table. Version 1 is also a Keel version: each migrator keeps its own
-- bookkeeping (`_sqlx_migrations` here, `_keel_migrations` for Keel), so the numbers never clash.
CREATE TABLE service_upgrades (
    id          bigserial   PRIMARY KEY,
    team_id     uuid        NOT NULL,
    to_tier     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
