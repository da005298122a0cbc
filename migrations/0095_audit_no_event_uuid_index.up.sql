-- The audit trail stops indexing `event_uuid`. No lookup reads a row by it: the column exists so
-- that an exported file can be loaded into another store idempotently, and that store keys on
-- it. The values are random, so every audited write put an entry at a random place of an index
-- that grows with the trail, and touched a different page of it each time: about a fifth of
-- the cost of inserting a batch of audit rows (1000 rows, eleven indexes: 18 ms with it,
-- 15 ms without). Partitioned indexes are dropped from every partition with the parent.
DROP INDEX IF EXISTS audit_events_event_uuid_ix;
