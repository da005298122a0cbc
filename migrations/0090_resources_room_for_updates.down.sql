ALTER TABLE IF EXISTS resources RESET (fillfactor);
