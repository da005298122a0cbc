-- `keel-audit dead-letters` lists the newest dead letters first and pages back by position
-- (`seq`, the order notifications were taken from the trail). It listed the oldest first with
-- no way past its limit: dead letters nobody resolved (a malformed one comes back dead after each
-- requeue) hid every newer one, and with them the event ids a requeue needs. The index the list
-- reads moves from `dead_lettered_at`, which no statement orders by, to `seq`.
DROP INDEX IF EXISTS notification_deliveries_dead_ix;
CREATE INDEX notification_deliveries_dead_seq_ix ON notification_deliveries (seq)
    WHERE state = 'dead';
