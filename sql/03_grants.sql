-- Step 3 of 3: after each `python -m worker migrate`. Run as rekognition_migrator (it owns the objects;
-- no superuser needed), e.g. as the last step of the migration Job. Idempotent. Also brings a database
-- migrated before steps 1-2 existed up to the same grants.

GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO rekognition_worker;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO rekognition_worker;
-- The schema version is the migration role's business: the worker only reads it (readiness probe).
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE public.alembic_version FROM rekognition_worker;
-- Before revision 0007 the tables were in public: the erasure audit stays append-only there too.
DO $audit$
BEGIN
    IF to_regclass('public.erasures') IS NOT NULL THEN
        REVOKE UPDATE, DELETE, TRUNCATE ON TABLE public.erasures FROM rekognition_worker;
    END IF;
END
$audit$;

-- The worker's tables live in schema rekognition (revision 0007 onwards): rows of every table there, now
-- and of tables later migrations create.
DO $rekognition$
BEGIN
    IF EXISTS (SELECT FROM pg_namespace WHERE nspname = 'rekognition') THEN
        GRANT USAGE ON SCHEMA rekognition TO rekognition_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rekognition TO rekognition_worker;
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA rekognition TO rekognition_worker;
        ALTER DEFAULT PRIVILEGES FOR ROLE rekognition_migrator IN SCHEMA rekognition
            GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO rekognition_worker;
        ALTER DEFAULT PRIVILEGES FOR ROLE rekognition_migrator IN SCHEMA rekognition
            GRANT USAGE, SELECT ON SEQUENCES TO rekognition_worker;
        -- The erasure audit (revision 0008) and the erased identifiers every write applies (0013) are
        -- append-only for the worker: the blanket grant above must not hand UPDATE or DELETE on them back,
        -- or a worker could undo an erasure.
        IF to_regclass('rekognition.erasures') IS NOT NULL THEN
            REVOKE UPDATE, DELETE, TRUNCATE ON TABLE rekognition.erasures FROM rekognition_worker;
        END IF;
        IF to_regclass('rekognition.erased_identifiers') IS NOT NULL THEN
            REVOKE UPDATE, DELETE, TRUNCATE ON TABLE rekognition.erased_identifiers FROM rekognition_worker;
        END IF;
    END IF;
END
$rekognition$;

DO $reporting$
BEGIN
    IF EXISTS (SELECT FROM pg_namespace WHERE nspname = 'reporting') THEN
        GRANT USAGE ON SCHEMA reporting TO rekognition_worker;
        GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO rekognition_worker;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA reporting TO rekognition_worker;
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_reader') THEN
            -- The reporting surface and nothing else (revision 0010 does the same when the role exists).
            GRANT USAGE ON SCHEMA reporting TO rekognition_reader;
            GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO rekognition_reader;
            GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA reporting TO rekognition_reader;
            ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT SELECT ON TABLES TO rekognition_reader;
            ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT EXECUTE ON FUNCTIONS TO rekognition_reader;
            REVOKE ALL ON ALL TABLES IN SCHEMA public FROM rekognition_reader;
        END IF;
    END IF;
END
$reporting$;
