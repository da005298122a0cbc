-- Passwords removed by the up migration are gone for good; only the column comment is undone.
COMMENT ON COLUMN resources.connection_url IS NULL;
