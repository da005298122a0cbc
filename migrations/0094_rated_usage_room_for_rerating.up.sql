-- Room on every page of `rated_usage` for a new version of its rows. A routine run after late
-- usage re-rates a few hours in place (quantity, amount, event count, rated_at: no indexed
-- column changes); with room on the page, each new version is written beside the old one (a
-- heap-only update) instead of on another page with a new entry in each of the table's three
-- indexes. Ten percent: rated hours change rarely, and a full run writes a tenth more pages.
-- Applies to pages written from now on.
ALTER TABLE rated_usage SET (fillfactor = 90);
