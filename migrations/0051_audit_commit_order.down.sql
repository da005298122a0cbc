-- Drops only what 0051 added; no audit row is removed.
ALTER TABLE IF EXISTS audit_events DROP CONSTRAINT IF EXISTS audit_events_attribute_values_are_strings;
DROP INDEX IF EXISTS audit_events_commit_order_ix;
ALTER TABLE IF EXISTS audit_events DROP COLUMN IF EXISTS txid;
