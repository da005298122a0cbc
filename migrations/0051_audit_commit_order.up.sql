-- keel-audit readers in commit order (FND-5) and string-only attributes (FND-8).
--
-- `id` order is not commit order: a row gets its id at insert and becomes visible at commit.
-- `txid` is the writing transaction's id; a reader that only takes rows whose transaction is
-- older than every transaction still running (`pg_snapshot_xmin`) and pages by (txid, id)
-- never skips a row that commits late. The application role cannot write this column.
ALTER TABLE audit_events ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX audit_events_commit_order_ix ON audit_events (txid, id);

-- Attribute values are strings (what keel-audit writes); rows stored before stay readable.
ALTER TABLE audit_events
    ADD CONSTRAINT audit_events_attribute_values_are_strings
    CHECK (NOT jsonb_path_exists(attributes, '$.* ? (@.type() != "string")')) NOT VALID;
