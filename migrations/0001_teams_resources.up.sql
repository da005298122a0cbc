-- Teams (paying customer accounts) and the resources provisioned for them.
CREATE TABLE teams (
    id          uuid        PRIMARY KEY,
    tier        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE resources (
    id                    uuid        PRIMARY KEY,
    -- The customer token the backend names derive from; never logged unmasked.
    token                 text        NOT NULL UNIQUE,
    team_id               uuid        NOT NULL REFERENCES teams (id),
    resource_type         text        NOT NULL,
    -- The tier currently applied to the backend object (propagation updates it).
    tier                  text        NOT NULL,
    status                text        NOT NULL DEFAULT 'pending'
        CONSTRAINT resources_status_check
        CHECK (status IN ('pending', 'active', 'paused', 'suspended', 'deleted', 'failed')),
    provider_resource_id  text,
    -- Secret: the customer's connection URL. Never copy it into logs, metrics or audit rows.
    connection_url        text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    deleted_at            timestamptz,
    -- An active resource is addressable: it has its backend id and connection URL.
    CONSTRAINT resources_active_is_addressable
        CHECK (status <> 'active' OR (provider_resource_id IS NOT NULL AND connection_url IS NOT NULL)),
    CONSTRAINT resources_deleted_has_deleted_at
        CHECK (status <> 'deleted' OR deleted_at IS NOT NULL)
);

CREATE INDEX resources_team_id_ix ON resources (team_id);
-- Non-terminal rows by token: the orphan sweep's liveness lookup.
CREATE INDEX resources_live_token_ix ON resources (token)
    WHERE status IN ('pending', 'active', 'paused', 'suspended');
