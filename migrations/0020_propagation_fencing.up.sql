-- Fencing, routing and deferral for pending_propagations; a tier epoch on teams.

-- One sequence hands out every fencing value: a claim token per claim and a target version per
-- replacing enqueue. Values never repeat, so a completion from an earlier claim can never match
-- a later one (no ABA), whatever happened to attempts or payload in between.
CREATE SEQUENCE pending_propagations_fence_seq;

ALTER TABLE pending_propagations
    -- The token of the claim that holds the row (NULL while unclaimed).
    ADD COLUMN claim_token     bigint,
    -- Bumped by every enqueue that replaces the target; a claim records it, and a completion
    -- whose version is not the row's current one is for a replaced target.
    ADD COLUMN target_version  bigint  NOT NULL DEFAULT nextval('pending_propagations_fence_seq'),
    -- The payload's schema version; a runner claims only versions it knows.
    ADD COLUMN payload_version integer NOT NULL DEFAULT 1 CHECK (payload_version >= 1),
    -- The team's tier epoch the row was enqueued under (NULL for rows not tied to one).
    ADD COLUMN tier_epoch      bigint,
    -- First time a runner found the row unreadable and left it for a newer runner.
    ADD COLUMN deferred_since  timestamptz;

-- Every change of teams.tier bumps tier_epoch, whichever path made it: "the last tier change"
-- is an epoch every suppression rule can name, independent of any clock.
ALTER TABLE teams ADD COLUMN tier_epoch bigint NOT NULL DEFAULT 0;

CREATE FUNCTION teams_bump_tier_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.tier IS DISTINCT FROM OLD.tier THEN
        NEW.tier_epoch := OLD.tier_epoch + 1;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER teams_tier_epoch BEFORE UPDATE OF tier ON teams
    FOR EACH ROW EXECUTE FUNCTION teams_bump_tier_epoch();

-- A row inserted without an epoch (by another service writing the contract table) takes its
-- team's current one, so its dead letter, too, holds the reconciler back only for that change.
CREATE FUNCTION pending_propagations_default_tier_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.tier_epoch IS NULL THEN
        SELECT tier_epoch INTO NEW.tier_epoch FROM teams WHERE id = NEW.team_id;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER pending_propagations_tier_epoch BEFORE INSERT ON pending_propagations
    FOR EACH ROW EXECUTE FUNCTION pending_propagations_default_tier_epoch();

-- Unclaimed due rows, in claim order: leased rows no longer sit at the head of the index.
CREATE INDEX pending_propagations_unclaimed_due_ix
    ON pending_propagations (next_attempt_at, id) WHERE status = 'pending' AND claimed_by IS NULL;
-- Claimed rows by lease expiry, for the rescue of abandoned claims.
CREATE INDEX pending_propagations_lease_ix
    ON pending_propagations (lease_expires_at) WHERE status = 'pending' AND claimed_by IS NOT NULL;
DROP INDEX pending_propagations_due_ix;
-- Dead letters newest first without a kind filter, and retention's scans of finished rows.
CREATE INDEX pending_propagations_dead_lettered_at_ix
    ON pending_propagations (dead_lettered_at) WHERE status = 'dead_lettered';
CREATE INDEX pending_propagations_applied_at_ix
    ON pending_propagations (applied_at) WHERE status = 'applied';
