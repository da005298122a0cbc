-- Room on every page of `resources` for the row's next version. A tier landing, a status change
-- or a new connection address then writes the new version beside the old one on the same page
-- (a heap-only update, when no indexed column changes) instead of on a new page with an entry
-- in each of the table's indexes. Applies to pages written from now on; existing pages get the
-- room when the table is next rewritten (VACUUM FULL, CLUSTER or pg_repack).
ALTER TABLE resources SET (fillfactor = 90);
