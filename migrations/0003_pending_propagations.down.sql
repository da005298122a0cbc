DROP TABLE IF EXISTS pending_propagations;
