-- Dead letters newest first, ties broken by id, straight from the index: `dead-letters list`
-- reads exactly the rows it shows, however many dead letters are kept.
CREATE INDEX pending_propagations_dead_lettered_newest_ix
    ON pending_propagations (dead_lettered_at, id) WHERE status = 'dead_lettered';
DROP INDEX pending_propagations_dead_lettered_at_ix;

-- The reconciler's question, "has this resource's tier elevation dead-lettered under its
-- team's current tier change, for this tier?", answered from the index alone: a probe per
-- drifted resource instead of a sort or hash of every dead letter ever kept.
CREATE INDEX pending_propagations_dead_letter_epoch_ix
    ON pending_propagations (resource_id, tier_epoch, (payload->>'target_tier'))
    WHERE status = 'dead_lettered' AND kind = 'tier_elevation';
