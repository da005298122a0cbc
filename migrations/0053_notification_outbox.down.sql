-- Undelivered or dead-lettered notifications are owed to customers: never dropped while any
-- remain. Delivered ones are recorded in audit_events (notification.delivered) as well.
DO $$
BEGIN
    IF to_regclass('notification_deliveries') IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM notification_deliveries WHERE state <> 'delivered') THEN
        RAISE EXCEPTION 'notification_deliveries holds notifications not yet delivered: reverting the schema would lose them'
            USING ERRCODE = 'object_in_use',
                  HINT = 'let the dispatcher deliver them, or export the pending and dead rows, before reverting';
    END IF;
END;
$$;
DROP TABLE IF EXISTS notification_deliveries;
DROP TABLE IF EXISTS notification_cursor;
