-- Step 1 of 3: the two roles of the Rekognition ingestion worker (see docs/security.md).
-- Run once per PostgreSQL cluster, as a superuser or a role with CREATEROLE, connected to any database.
-- Idempotent.
--
--   rekognition_migrator  owns the schema: runs `python -m worker migrate` (DDL), from the migration
--                         Job only, once per release.
--   rekognition_worker    what `run`, `backfill`, `reprocess` and `report` connect as: reads and writes
--                         rows of the worker's tables, reads the reporting views, nothing else.
--   rekognition_reader    a group role (NOLOGIN) for people and BI tools: reads the reporting views and
--                         calls reporting.person_segments, nothing else (no table, not the raw pages).
--                         Grant it to each login: CREATE ROLE alice LOGIN IN ROLE rekognition_reader;
--
-- No password here: set them afterwards with psql's \password, or from your secret manager.
-- Then create the database owned by the migration role:
--   CREATE DATABASE rekognition OWNER rekognition_migrator;
--
-- Tested by tests/test_security.py::test_worker_role_can_ingest_but_not_change_the_schema and
-- tests/test_reporting_grants.py (the reader).

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_migrator') THEN
        CREATE ROLE rekognition_migrator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        CREATE ROLE rekognition_worker LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_reader') THEN
        CREATE ROLE rekognition_reader NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
END
$roles$;
