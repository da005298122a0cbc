ALTER TABLE IF EXISTS rated_usage RESET (fillfactor);
