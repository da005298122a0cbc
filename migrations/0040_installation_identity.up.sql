-- This installation's identity: one row, created once (on first use), never changed. keel-provision stamps it
-- on every backend object it creates (the database COMMENT's and the namespace's
-- `keel.dev/installation` label), and the orphan sweep and the deprovision chokepoint reclaim an
-- object only when this platform database holds a resources row for its token (any status) and
-- no other installation's stamp is on it. Two installations sharing one Postgres cluster or one
-- Kubernetes cluster (production and staging) therefore never reclaim each other's objects.
CREATE TABLE keel_installation (
    singleton   boolean     PRIMARY KEY DEFAULT true
        CONSTRAINT keel_installation_one_row CHECK (singleton),
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The id is created on first use, not here, so a database copied from a migrated template gets
-- its own id when it first serves an installation (a copy of a database already in use keeps
-- the original's id: restore a backup for another installation only after replacing the row).
CREATE FUNCTION keel_installation_id() RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    found uuid;
BEGIN
    SELECT id INTO found FROM keel_installation;
    IF found IS NULL THEN
        INSERT INTO keel_installation DEFAULT VALUES ON CONFLICT DO NOTHING;
        SELECT id INTO found FROM keel_installation;
    END IF;
    RETURN found;
END;
$$;

COMMENT ON FUNCTION keel_installation_id() IS
    'This installation''s id, created on first use and never changed.';

CREATE FUNCTION keel_installation_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'keel_installation is written once: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER keel_installation_no_change
    BEFORE UPDATE OR DELETE ON keel_installation
    FOR EACH ROW EXECUTE FUNCTION keel_installation_refuse_change();

-- Reclaim protection held by the platform (a customer who owns its database, and so its COMMENT,
-- can neither forge nor remove it). One row protects the backend objects of one token, by digest.
CREATE TABLE reclaim_protections (
    token_digest  text        PRIMARY KEY
        CONSTRAINT reclaim_protections_digest_format CHECK (token_digest ~ '^[0-9a-f]{48}$'),
    reason        text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 200),
    protected_by  text        NOT NULL CHECK (length(protected_by) BETWEEN 1 AND 200),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Every row by digest, whatever its status: ownership ("this installation made it") is proven by
-- any row, live or not.
CREATE INDEX resources_token_digest_ix ON resources (token_digest);

-- A terminal status (deleted, failed) never changes again, so a token found dead by the
-- deprovision chokepoint cannot turn live between its check and its teardown (SWEEP-13).
CREATE FUNCTION resources_refuse_revival() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status IN ('deleted', 'failed') AND NEW.status IS DISTINCT FROM OLD.status THEN
        RAISE EXCEPTION 'a % resource never changes status again (to %)', OLD.status, NEW.status
            USING ERRCODE = 'check_violation',
                  HINT = 'provision a new resource instead';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER resources_no_revival
    BEFORE UPDATE OF status ON resources
    FOR EACH ROW EXECUTE FUNCTION resources_refuse_revival();

-- The orphan reclaim's audit rows by the object's token fingerprint: each kind is written at most
-- once per object, checked under a per-object lock.
CREATE INDEX audit_events_token_fingerprint_ix ON audit_events ((attributes ->> 'token_fingerprint'), kind)
    WHERE attributes ? 'token_fingerprint';
