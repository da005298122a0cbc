-- Re-rating a few hours costs index reads, not the table's pages.
--
-- Room on every page of `rated_usage` for a new version of its rows. A routine run after late
-- usage re-rates a few hours in place (quantity, amount, event count, rated_at: no indexed
-- column changes); with room on the page, each new version is written beside the old one (a
-- heap-only update) instead of on another page with a new entry in each of the table's three
-- indexes. Ten percent: rated hours change rarely, and a full run writes a tenth more pages.
-- Applies to pages written from now on.
ALTER TABLE rated_usage SET (fillfactor = 90);

-- The events of one (auth id, meter, hour) are summed from the index alone: it carries
-- `quantity`, so a changed group and the late-usage check read its index entries (an index-only
-- scan of the group's range) instead of one table page per event, events of one group being
-- spread over the table in ingest order. Rebuilt under the same name; the build holds off
-- writes to `billing_event` while it runs (seconds per ten million events).
DROP INDEX billing_event_auth_meter_ix;
CREATE INDEX billing_event_auth_meter_ix ON billing_event (auth_id, meter, occurred_at)
    INCLUDE (quantity);
