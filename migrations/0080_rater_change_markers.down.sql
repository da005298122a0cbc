DROP TRIGGER IF EXISTS prices_mark_all ON prices;
DROP TRIGGER IF EXISTS billing_event_marks_truncated ON billing_event;
DROP TRIGGER IF EXISTS billing_event_marks_deleted ON billing_event;
DROP TRIGGER IF EXISTS billing_event_marks_updated ON billing_event;
DROP TRIGGER IF EXISTS billing_event_marks_inserted ON billing_event;
DROP FUNCTION IF EXISTS rating_change_mark_all();
DROP FUNCTION IF EXISTS rating_change_mark_groups();
DROP TABLE IF EXISTS rating_change_all;
DROP TABLE IF EXISTS rating_change;
