-- A second migration of the service's own, versioned like Keel's second.
ALTER TABLE service_upgrades ADD COLUMN note text;
