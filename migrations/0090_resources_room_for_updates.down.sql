ALTER TABLE resources RESET (fillfactor);
