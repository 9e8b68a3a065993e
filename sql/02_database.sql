-- Step 2 of 3: the worker's database. Run connected to THAT database (not `postgres`), as a superuser
-- or its owner, before the first `python -m worker migrate`. Idempotent.

DO $database$
BEGIN
    -- Only the worker's roles and the readers connect; nobody gets TEMPORARY by default.
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT, CREATE ON DATABASE %I TO rekognition_migrator', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO rekognition_worker', current_database());
    -- The worker's tables are in schema rekognition (the worker sets this on its own connections):
    -- psql sessions of anyone connecting here find them by their unqualified names too.
    EXECUTE format('ALTER DATABASE %I SET search_path = rekognition, public', current_database());
    -- Members of the reader role connect through it (and can read only what 03_grants.sql gives it).
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO rekognition_reader', current_database());
END
$database$;

-- PostgreSQL < 15 lets every role create objects in schema public; take that away.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO rekognition_migrator;
GRANT USAGE ON SCHEMA public TO rekognition_worker;

-- Whatever the migration role creates from now on is usable by the worker without a grant per
-- migration: the rows of tables in public; read-only access to other schemas (the reporting views).
ALTER DEFAULT PRIVILEGES FOR ROLE rekognition_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO rekognition_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE rekognition_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO rekognition_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE rekognition_migrator
    GRANT USAGE ON SCHEMAS TO rekognition_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE rekognition_migrator
    GRANT SELECT ON TABLES TO rekognition_worker;
