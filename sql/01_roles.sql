-- Step 1 of 3: the two roles of the Rekognition ingestion worker (see docs/security.md).
-- Run once per PostgreSQL cluster, as a superuser or a role with CREATEROLE, connected to any database.
-- Idempotent.
--
--   rekognition_migrator  owns the schema: runs `python -m worker migrate` (DDL), from the migration
--                         Job only, once per release.
--   rekognition_worker    what `run`, `backfill`, `reprocess` and `report` connect as: reads and writes
--                         rows of the worker's tables, reads the reporting views, nothing else.
--
-- No password here: set them afterwards with psql's \password, or from your secret manager.
-- Then create the database owned by the migration role:
--   CREATE DATABASE rekognition OWNER rekognition_migrator;
--
-- Tested by tests/test_security.py::test_worker_role_can_ingest_but_not_change_the_schema.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_migrator') THEN
        CREATE ROLE rekognition_migrator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        CREATE ROLE rekognition_worker LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
END
$roles$;
