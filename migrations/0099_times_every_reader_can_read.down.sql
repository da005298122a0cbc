-- Times of any value again, as before migration 0099.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT con.conrelid::regclass AS rel, con.conname
        FROM pg_constraint con
        JOIN pg_class r ON r.oid = con.conrelid
        WHERE con.contype = 'c' AND con.conname LIKE '%\_in\_range'
          AND NOT r.relispartition
          AND r.relnamespace IN (SELECT oid FROM pg_namespace
                                 WHERE nspname IN (current_schema(), 'provision_api'))
          AND pg_get_constraintdef(con.oid) LIKE '%0001-01-01 00:00:00+00%9999-12-31 23:59:59.999999+00%'
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', c.rel, c.conname);
    END LOOP;
END
$$;
