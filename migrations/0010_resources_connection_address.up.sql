-- A resource keeps only the address customers connect to: the password is shown once, in the
-- 201, and stored nowhere. Rows written before this change lose the password from their URL.
UPDATE resources
   SET connection_url = regexp_replace(
           connection_url, '^([a-z][a-z0-9+.-]*://[^/?#@:]*):[^/?#@]*@', '\1@')
 WHERE connection_url ~ '^[a-z][a-z0-9+.-]*://[^/?#@:]*:[^/?#@]*@';

COMMENT ON COLUMN resources.connection_url IS
    'The address customers connect to, without a password (the password is shown once, in the 201).';
