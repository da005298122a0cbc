-- Work the propagation runner carries from a decision (e.g. a tier change) to a backend.
CREATE TABLE pending_propagations (
    id                bigserial   PRIMARY KEY,
    kind              text        NOT NULL,
    team_id           uuid        NOT NULL,
    resource_id       uuid        NOT NULL,
    resource_type     text        NOT NULL,
    payload           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status            text        NOT NULL DEFAULT 'pending'
        CONSTRAINT pending_propagations_status_check
        CHECK (status IN ('pending', 'applied', 'dead_lettered')),
    attempts          integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    claimed_by        text,
    lease_expires_at  timestamptz,
    last_error        text,
    applied_at        timestamptz,
    dead_lettered_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pending_propagations_applied_has_applied_at
        CHECK ((status = 'applied') = (applied_at IS NOT NULL)),
    CONSTRAINT pending_propagations_dead_lettered_has_time
        CHECK ((status = 'dead_lettered') = (dead_lettered_at IS NOT NULL))
) WITH (fillfactor = 50); -- room on each page for the claim's in-place (HOT) updates

-- At most one non-terminal propagation per (kind, resource): enqueue coalesces onto it.
CREATE UNIQUE INDEX pending_propagations_one_open_ix
    ON pending_propagations (kind, resource_id) WHERE status = 'pending';
-- Due rows, in claim order (the claim's ORDER BY must match it, or every claim sorts the queue).
CREATE INDEX pending_propagations_due_ix
    ON pending_propagations (next_attempt_at, id) WHERE status = 'pending';
-- Per-resource history, for the reconciler and requeue.
CREATE INDEX pending_propagations_resource_ix
    ON pending_propagations (resource_id, kind, status);
CREATE INDEX pending_propagations_dead_letter_ix
    ON pending_propagations (kind, dead_lettered_at) WHERE status = 'dead_lettered';
