-- Captured request bodies, searchable. The body is capped before storage; original_len and
-- truncated say whether it was cut, and tsv_truncated whether the search vector was bounded.
CREATE TABLE io_log (
    id             bigserial   PRIMARY KEY,
    request_id     text        NOT NULL,
    body           text        NOT NULL,
    body_tsv       tsvector,
    original_len   bigint      NOT NULL CHECK (original_len >= 0),
    truncated      boolean     NOT NULL DEFAULT false,
    tsv_truncated  boolean     NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX io_log_request_id_ix ON io_log (request_id);
CREATE INDEX io_log_body_tsv_ix ON io_log USING gin (body_tsv);
