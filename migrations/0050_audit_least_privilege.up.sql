-- keel-audit least privilege (FND-1, FND-12). Role grants are not made here: the application
-- role's name is chosen per installation and granted by `migrate --app-role` (keel_schema::roles).
--
-- `id` becomes an identity column the writer cannot set (GENERATED ALWAYS) and whose sequence
-- needs no privilege to draw from, so the application role holds no right on the sequence and
-- cannot `setval` it to wedge every later insert.
ALTER TABLE audit_events ALTER COLUMN id DROP DEFAULT;
DROP SEQUENCE IF EXISTS audit_events_id_seq;
ALTER TABLE audit_events ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY;
SELECT setval(pg_get_serial_sequence('audit_events', 'id'), coalesce(max(id), 0) + 1, false)
FROM audit_events;

-- `recorded_at` is the database's clock at insert, whatever an INSERT or COPY names.
CREATE FUNCTION audit_events_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.recorded_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_events_stamp
    BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_stamp();

-- Nothing is granted to PUBLIC on the trail.
REVOKE ALL ON audit_events FROM PUBLIC;
