-- Markers of any form again, as before migration 0102.
DO $$
BEGIN
    IF to_regclass('rating_change') IS NOT NULL THEN
        ALTER TABLE rating_change
            DROP CONSTRAINT IF EXISTS rating_change_window_start_on_the_hour,
            DROP CONSTRAINT IF EXISTS rating_change_auth_id_printable,
            DROP CONSTRAINT IF EXISTS rating_change_meter_printable;
    END IF;
END
$$;
