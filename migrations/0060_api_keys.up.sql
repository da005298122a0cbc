-- The provisioning API's own tables live in the schema `provision_api`: they are its private
-- state, not contract names other services query.
CREATE SCHEMA provision_api;

-- API keys of the provisioning API. A key is shown once, at creation; only the SHA-256 of its
-- secret part is stored. `id` is the public prefix a presented key is looked up by.
CREATE TABLE provision_api.api_keys (
    id             text        PRIMARY KEY CONSTRAINT api_keys_id_check CHECK (id ~ '^[0-9a-f]{12}$'),
    secret_sha256  bytea       NOT NULL CONSTRAINT api_keys_secret_sha256_check CHECK (length(secret_sha256) = 32),
    -- `team`: the key acts for one team; `operator`: for the platform's operators.
    scope          text        NOT NULL CONSTRAINT api_keys_scope_check CHECK (scope IN ('team', 'operator')),
    team_id        uuid        REFERENCES teams (id),
    label          text        NOT NULL DEFAULT '' CONSTRAINT api_keys_label_check CHECK (length(label) <= 200),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    CONSTRAINT api_keys_team_scope_has_team CHECK ((scope = 'team') = (team_id IS NOT NULL))
);

CREATE INDEX api_keys_team_id_ix ON provision_api.api_keys (team_id);

COMMENT ON TABLE provision_api.api_keys IS
    'Provisioning API keys: id prefix for lookup, SHA-256 of the secret (never the secret), scope.';
