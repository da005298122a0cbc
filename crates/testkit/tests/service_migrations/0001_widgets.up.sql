-- A service's own table, beside Keel's.
CREATE TABLE widgets (
    id      uuid PRIMARY KEY,
    team_id uuid NOT NULL REFERENCES teams (id)
);
