-- Room on every page of `resources` for a new version of each of its rows. A team's tier change
-- lands on all of the team's resources at once, and rows created together share pages: with
-- the room, each row's new version is written beside the old one (a heap-only update, as no
-- indexed column changes) instead of on another page with a new entry in each of the table's
-- indexes, and the old versions are pruned in place later. The table takes up to twice the
-- space; it holds one row per customer resource. Applies to pages written from now on; existing
-- pages get the room when the table is next rewritten (VACUUM FULL, CLUSTER or pg_repack).
ALTER TABLE resources SET (fillfactor = 50);
