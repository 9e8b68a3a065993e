"""The worker's tables move to their own schema, `rekognition`; deleting a job deletes all its rows.

Every table (with its indexes, constraints, grants and data) and the two enum types the worker owns
move from `public` with ALTER ... SET SCHEMA: nothing is copied, and the reporting views, which refer
to tables by OID, follow them and stay in schema `reporting`. alembic_version stays in `public`.
Every connection the worker opens sets ``search_path = rekognition, public`` (worker/db/engine.py),
and so does the migration connection (migrations/env.py): later migrations create unqualified tables
in `rekognition`. reporting.person_segments is a SQL function whose body is parsed when it runs, with
the caller's search_path: its table names are qualified here, so it works from any session (and stays
inlinable, which a pinned ``SET search_path`` on the function would prevent).

A statement-level trigger on jobs deletes the rows of deleted jobs from every table keyed by job_id
(results, raw pages, job_retries): one DELETE per table per statement, joined to the transition table,
and nothing at all on insert. Foreign keys would check every COPYed landmark row against jobs, and
job_retries rows exist before their job's row does; see worker/db/schema.py.

The worker role (0004, where it exists) gets USAGE on the schema, its tables' DML grants travel with
them, and default privileges in `rekognition` cover tables later migrations create.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SCHEMA = "rekognition"
# Frozen as of 0006 (a migration must not change when the code does).
TABLES = ("jobs", "faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages",
          "rate_limit_buckets", "job_retries")
TYPES = ("face_api", "ingest_state")
# Tables whose rows belong to one job, deleted with it.
JOB_TABLES = ("faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages",
              "job_retries")
# reporting.person_segments: its unqualified table references, and what they become.
FUNCTION = "reporting.person_segments(text, bigint)"
QUALIFY = (("FROM faces f", "FROM rekognition.faces f"), ("JOIN jobs j", "JOIN rekognition.jobs j"))

_CASCADE_FUNCTION = f"""
CREATE FUNCTION {SCHEMA}.delete_job_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
{"".join(f"    DELETE FROM {SCHEMA}.{t} c USING gone WHERE c.job_id = gone.job_id;{chr(10)}" for t in JOB_TABLES)}\
    RETURN NULL;
END
$$
"""
_CASCADE_TRIGGER = f"""
CREATE TRIGGER jobs_delete_job_rows AFTER DELETE ON {SCHEMA}.jobs
REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.delete_job_rows()
"""

_GRANTS = f"""
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        GRANT USAGE ON SCHEMA {SCHEMA} TO rekognition_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO rekognition_worker;
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {SCHEMA} TO rekognition_worker;
        ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA}
            GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO rekognition_worker;
        ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA} GRANT USAGE, SELECT ON SEQUENCES TO rekognition_worker;
    END IF;
END
$grants$
"""
_REVOKE_DEFAULTS = f"""
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'rekognition_worker') THEN
        ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA}
            REVOKE SELECT, INSERT, UPDATE, DELETE ON TABLES FROM rekognition_worker;
        ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA} REVOKE USAGE, SELECT ON SEQUENCES FROM rekognition_worker;
    END IF;
END
$grants$
"""


def _requalify(pairs: tuple[tuple[str, str], ...]) -> None:
    """CREATE OR REPLACE the function with ``old -> new`` applied to its definition (grants, comments stay)."""
    conn = op.get_bind()
    definition = conn.execute(sa.text("SELECT pg_get_functiondef(to_regprocedure(:f))"), {"f": FUNCTION}).scalar()
    if definition is None:
        return  # dropped by its operator: nothing to keep working
    for old, new in pairs:
        if old not in definition:
            raise RuntimeError(f"{FUNCTION} was changed since 0002 (no {old!r} in it): qualify its tables by hand")
        definition = definition.replace(old, new)
    op.execute(definition)


def upgrade() -> None:
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    for table in TABLES:
        op.execute(f"ALTER TABLE public.{table} SET SCHEMA {SCHEMA}")
    for type_ in TYPES:
        op.execute(f"ALTER TYPE public.{type_} SET SCHEMA {SCHEMA}")
    _requalify(QUALIFY)
    op.execute(_CASCADE_FUNCTION)
    op.execute(_CASCADE_TRIGGER)
    op.execute(_GRANTS)


def downgrade() -> None:
    conn = op.get_bind()
    op.execute(f"DROP TRIGGER jobs_delete_job_rows ON {SCHEMA}.jobs")
    op.execute(f"DROP FUNCTION {SCHEMA}.delete_job_rows()")
    _requalify(tuple((new, old) for old, new in QUALIFY))
    op.execute(_REVOKE_DEFAULTS)
    # Whatever is in the schema now goes back (a table a later revision left behind included); sequences
    # owned by a table move with it.
    tables = conn.execute(sa.text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = :s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY c.relname"), {"s": SCHEMA}).scalars()
    for table in list(tables):
        op.execute(f'ALTER TABLE {SCHEMA}."{table}" SET SCHEMA public')
    sequences = conn.execute(sa.text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = :s AND c.relkind = 'S'"), {"s": SCHEMA}).scalars()
    for sequence in list(sequences):
        op.execute(f'ALTER SEQUENCE {SCHEMA}."{sequence}" SET SCHEMA public')
    types = conn.execute(sa.text(
        "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = :s AND t.typtype IN ('e', 'd', 'c') AND t.typrelid = 0"), {"s": SCHEMA}).scalars()
    for type_ in list(types):
        op.execute(f'ALTER TYPE {SCHEMA}."{type_}" SET SCHEMA public')
    # No CASCADE: anything else still in the schema makes this fail instead of losing it.
    op.execute(f"DROP SCHEMA {SCHEMA}")
