-- keel-audit at scale: audit_events becomes RANGE-partitioned by month of `recorded_at` (the
-- database's clock at insert), with a default partition so an insert never fails, a global
-- event UUID per row for idempotent export, and the retention records (keel_audit::retention).
--
-- The conversion keeps every row with its id, commit-order column and content, so the seal
-- chain (which hashes exactly those) still verifies; it keeps the triggers that refuse UPDATE,
-- DELETE and TRUNCATE, the indexes and the grants. It runs in one transaction and refuses to
-- finish when the copy differs from the original.
LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE;
ALTER TABLE audit_events RENAME TO audit_events_unpartitioned;

CREATE TABLE audit_events (
    id           bigint      GENERATED ALWAYS AS IDENTITY,
    kind         text        NOT NULL
        CONSTRAINT audit_events_kind_format CHECK (kind ~ '^[a-z][a-z_]*\.[a-z][a-z_]*$'),
    actor        text        NOT NULL,
    team_id      uuid,
    resource_id  uuid,
    request_id   text,
    attributes   jsonb       NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT audit_events_attributes_object CHECK (jsonb_typeof(attributes) = 'object'),
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    txid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_uuid   uuid        NOT NULL DEFAULT gen_random_uuid()
) PARTITION BY RANGE (recorded_at);

-- Rows whose month has no partition of its own land here: an insert never fails for want of a
-- partition. `audit_events_ensure_partitions` creates the months ahead of time.
CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT;

-- Creates the monthly partitions (UTC months, named audit_events_YYYY_MM) from the month of
-- `first` through the month of `last`, each with the TRUNCATE-refusing trigger (row triggers are
-- inherited from the parent, statement triggers are not). A month whose rows already sit in the
-- default partition is left there (moving them would delete rows): it is skipped with a warning.
-- Returns how many partitions it created. Run by the owner (the sealer, `keel-audit partitions
-- ensure`); the application role cannot create tables.
CREATE FUNCTION audit_events_ensure_partitions(first timestamptz, last timestamptz)
RETURNS integer
LANGUAGE plpgsql
SET timezone = 'UTC'
AS $$
DECLARE
    month   timestamptz := date_trunc('month', first);
    name    text;
    created integer := 0;
BEGIN
    IF last - first > interval '100 years' THEN
        RAISE EXCEPTION 'audit_events_ensure_partitions: a range of more than 100 years is refused';
    END IF;
    WHILE month <= last LOOP
        name := 'audit_events_' || to_char(month, 'YYYY_MM');
        IF to_regclass(quote_ident(name)) IS NULL THEN
            IF EXISTS (SELECT 1 FROM audit_events_default
                       WHERE recorded_at >= month AND recorded_at < month + interval '1 month') THEN
                RAISE WARNING 'audit_events_default holds rows of %: that month stays in the default partition', to_char(month, 'YYYY-MM');
            ELSE
                EXECUTE format('CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                               name, month, month + interval '1 month');
                EXECUTE format('CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON %I '
                               'FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change()', name);
                EXECUTE format('REVOKE ALL ON %I FROM PUBLIC', name);
                created := created + 1;
            END IF;
        END IF;
        month := month + interval '1 month';
    END LOOP;
    RETURN created;
END;
$$;
REVOKE ALL ON FUNCTION audit_events_ensure_partitions(timestamptz, timestamptz) FROM PUBLIC;
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();

-- Every month that holds rows, and the next three.
SELECT audit_events_ensure_partitions(
    coalesce((SELECT min(recorded_at) FROM audit_events_unpartitioned), now()),
    greatest(coalesce((SELECT max(recorded_at) FROM audit_events_unpartitioned), now()), now())
        + interval '3 months');

INSERT INTO audit_events
    (id, kind, actor, team_id, resource_id, request_id, attributes, occurred_at, recorded_at, txid)
OVERRIDING SYSTEM VALUE
SELECT id, kind, actor, team_id, resource_id, request_id, attributes, occurred_at, recorded_at, txid
FROM audit_events_unpartitioned
ORDER BY id;

DO $$
BEGIN
    IF (SELECT count(*) FROM audit_events) <> (SELECT count(*) FROM audit_events_unpartitioned)
       OR EXISTS (SELECT id, kind, actor, team_id, resource_id, request_id, attributes::text,
                         occurred_at, recorded_at, txid FROM audit_events_unpartitioned
                  EXCEPT
                  SELECT id, kind, actor, team_id, resource_id, request_id, attributes::text,
                         occurred_at, recorded_at, txid FROM audit_events) THEN
        RAISE EXCEPTION 'partitioning audit_events: the copy differs from the original; nothing was changed';
    END IF;
END;
$$;

SELECT setval(pg_get_serial_sequence('audit_events', 'id'),
              coalesce((SELECT max(id) FROM audit_events), 0) + 1, false);

-- The grants the old table had (table and column privileges), given to the same roles.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT a.privilege_type, a.grantee
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = 'audit_events_unpartitioned'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON audit_events TO %s', g.privilege_type,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.grantee::regrole::text) END);
    END LOOP;
    FOR g IN
        SELECT a.privilege_type, a.grantee, att.attname
        FROM pg_attribute att, aclexplode(att.attacl) a
        WHERE att.attrelid = 'audit_events_unpartitioned'::regclass AND att.attnum > 0
          AND NOT att.attisdropped
    LOOP
        EXECUTE format('GRANT %s (%I) ON audit_events TO %s', g.privilege_type, g.attname,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.grantee::regrole::text) END);
    END LOOP;
END;
$$;
REVOKE ALL ON audit_events FROM PUBLIC;

DROP TABLE audit_events_unpartitioned;
-- The identity sequence keeps its contract name (it was made while the old one existed).
DO $$
BEGIN
    IF pg_get_serial_sequence('audit_events', 'id') <> 'public.audit_events_id_seq'
       AND to_regclass('audit_events_id_seq') IS NULL THEN
        EXECUTE format('ALTER SEQUENCE %s RENAME TO audit_events_id_seq',
                       pg_get_serial_sequence('audit_events', 'id'));
    END IF;
END;
$$;

ALTER TABLE audit_events ADD CONSTRAINT audit_events_pkey PRIMARY KEY (id, recorded_at);
ALTER TABLE audit_events
    ADD CONSTRAINT audit_events_attribute_values_are_strings
    CHECK (NOT jsonb_path_exists(attributes, '$.* ? (@.type() != "string")')) NOT VALID;
CREATE INDEX audit_events_commit_order_ix ON audit_events (txid, id);
CREATE INDEX audit_events_kind_ix ON audit_events (kind, occurred_at);
CREATE INDEX audit_events_recorded_ix ON audit_events (recorded_at);
CREATE INDEX audit_events_request_ix ON audit_events (request_id) WHERE request_id IS NOT NULL;
-- The documented lookups page in commit order (`keel-audit list`, the console): each filter's
-- index ends in (txid, id), so a page is one ordered range scan per partition, merged.
CREATE INDEX audit_events_resource_ix ON audit_events (resource_id, txid, id) WHERE resource_id IS NOT NULL;
CREATE INDEX audit_events_team_ix ON audit_events (team_id, txid, id) WHERE team_id IS NOT NULL;
CREATE INDEX audit_events_kind_commit_ix ON audit_events (kind, txid, id);
CREATE INDEX audit_events_token_fingerprint_ix ON audit_events ((attributes ->> 'token_fingerprint'), kind)
    WHERE attributes ? 'token_fingerprint';
CREATE INDEX audit_events_event_uuid_ix ON audit_events (event_uuid);
CREATE INDEX audit_events_actor_ix ON audit_events (actor, txid, id);

CREATE TRIGGER audit_events_stamp
    BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_stamp();
CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();

-- Retention (keel_audit::retention): one row per month taken through export -> verify ->
-- detach, each step stamped. Append-only but for the steps' own columns, which only move
-- forward (checked by the trigger below); the application role may read it.
CREATE TABLE audit_retention (
    month        date        PRIMARY KEY
        CONSTRAINT audit_retention_month_first_day CHECK (extract(day FROM month) = 1),
    partition    text        NOT NULL,
    rows         bigint      NOT NULL CONSTRAINT audit_retention_rows CHECK (rows >= 0),
    file_sha256  bytea       NOT NULL CONSTRAINT audit_retention_sha CHECK (octet_length(file_sha256) = 32),
    first_seq    bigint,
    last_seq     bigint,
    exported_at  timestamptz NOT NULL DEFAULT now(),
    exported_by  text        NOT NULL,
    verified_at  timestamptz,
    detached_at  timestamptz
);

CREATE FUNCTION audit_retention_forward_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR NEW.detached_at IS DISTINCT FROM OLD.detached_at AND OLD.detached_at IS NOT NULL
       OR OLD.verified_at IS NOT NULL AND NEW.verified_at IS DISTINCT FROM OLD.verified_at
       OR OLD.detached_at IS NOT NULL
       OR (NEW.month, NEW.partition, NEW.exported_at, NEW.exported_by)
          IS DISTINCT FROM (OLD.month, OLD.partition, OLD.exported_at, OLD.exported_by)
       OR OLD.verified_at IS NOT NULL
          AND (NEW.rows, NEW.file_sha256, NEW.first_seq, NEW.last_seq)
              IS DISTINCT FROM (OLD.rows, OLD.file_sha256, OLD.first_seq, OLD.last_seq) THEN
        RAISE EXCEPTION 'audit_retention only moves forward: % of this change is not allowed', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER audit_retention_forward_only
    BEFORE UPDATE OR DELETE ON audit_retention
    FOR EACH ROW EXECUTE FUNCTION audit_retention_forward_only();
CREATE TRIGGER audit_retention_no_truncate
    BEFORE TRUNCATE ON audit_retention
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();

-- The seal links whose rows left the database with a detached month: `verify` accepts their
-- absence (their rows are in the verified export) and still checks every signed checkpoint.
CREATE TABLE audit_retired_links (
    seq    bigint PRIMARY KEY REFERENCES audit_seals (seq),
    month  date   NOT NULL REFERENCES audit_retention (month)
);
CREATE TRIGGER audit_retired_links_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_retired_links
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_retired_links_no_truncate
    BEFORE TRUNCATE ON audit_retired_links
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();

REVOKE ALL ON audit_retention, audit_retired_links FROM PUBLIC;
