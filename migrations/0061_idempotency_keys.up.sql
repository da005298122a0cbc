-- Idempotency keys of `POST /v1/resources`, scoped to the caller (a team, or the operators).
-- A row is claimed `in flight` (no response yet), then holds the outcome to replay until
-- `expires_at`. The stored 201 never holds a password.
CREATE TABLE provision_api.idempotency_keys (
    scope            text        NOT NULL,
    key              text        NOT NULL CONSTRAINT idempotency_keys_key_check CHECK (length(key) BETWEEN 1 AND 255),
    request_sha256   bytea       NOT NULL,
    resource_id      uuid,
    response_status  integer,
    response_body    jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (scope, key),
    CONSTRAINT idempotency_keys_outcome_complete CHECK ((response_status IS NULL) = (response_body IS NULL))
);

CREATE INDEX idempotency_keys_expires_at_ix ON provision_api.idempotency_keys (expires_at);
-- Listing a team's resources newest first, by cursor.
CREATE INDEX resources_team_created_ix ON resources (team_id, created_at DESC, id DESC);
