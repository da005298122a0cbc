-- The operator console's sign-in sessions: private state of the console, kept beside the
-- provisioning API's keys (an operator signs in with an operator API key). Only the SHA-256 of
-- the session cookie is stored; the CSRF token is per session and is compared, never logged.
CREATE TABLE provision_api.console_sessions (
    id_sha256     bytea       PRIMARY KEY CONSTRAINT console_sessions_id_check CHECK (length(id_sha256) = 32),
    key_id        text        NOT NULL REFERENCES provision_api.api_keys (id),
    csrf_token    text        NOT NULL CONSTRAINT console_sessions_csrf_check CHECK (length(csrf_token) = 43),
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    signed_out_at timestamptz,
    CONSTRAINT console_sessions_expiry_order CHECK (created_at < expires_at)
);

CREATE INDEX console_sessions_expires_at_ix ON provision_api.console_sessions (expires_at);

COMMENT ON TABLE provision_api.console_sessions IS
    'Operator console sessions: SHA-256 of the cookie (never the cookie), the operator key, the CSRF token, expiry.';
