-- A change marker names a group the rater can rate: a printable auth id and meter of the
-- lengths `billing_event` and `rated_usage` take, and an hour that starts on the hour.
--
-- The routine run turns each marker it consumes into the key of a `rated_usage` row, in one
-- statement for the whole window. A marker written by hand or by another service at 10:05, or
-- with an auth id no event can carry, failed that statement on `rated_usage`'s checks: nothing
-- was rated for any tenant, every marker stayed, and a day later the marker read as late usage
-- whose suggested backfill (`--since …T10:05:00Z`) the rater itself refuses.
--
-- Stored markers are repaired, not refused: one off the hour is moved to the start of its hour
-- (so that hour is rated again, which is what the marker asks for), and one whose auth id or
-- meter no event could carry is removed, since it names no usage.
UPDATE rating_change
SET window_start = date_bin('1 hour', window_start, TIMESTAMPTZ '2000-01-01 00:00:00+00')
WHERE window_start <> date_bin('1 hour', window_start, TIMESTAMPTZ '2000-01-01 00:00:00+00');
DELETE FROM rating_change
WHERE NOT (auth_id !~ '[^!-~]' AND length(auth_id) BETWEEN 1 AND 128)
   OR NOT (meter !~ '[^!-~]' AND length(meter) BETWEEN 1 AND 64);
ALTER TABLE rating_change
    ADD CONSTRAINT rating_change_window_start_on_the_hour
        CHECK (window_start = date_bin('1 hour', window_start, TIMESTAMPTZ '2000-01-01 00:00:00+00')),
    ADD CONSTRAINT rating_change_auth_id_printable
        CHECK (auth_id !~ '[^!-~]' AND length(auth_id) BETWEEN 1 AND 128),
    ADD CONSTRAINT rating_change_meter_printable
        CHECK (meter !~ '[^!-~]' AND length(meter) BETWEEN 1 AND 64);
