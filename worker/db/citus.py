"""Citus: which tables are distributed, and the idempotent step that distributes them after the migrations.

On a database where the ``citus`` extension exists, the bulk tables (schema.KEYED_TABLES: every table whose
rows belong to one ingest key) become distributed tables, hash-partitioned on ``ingest_id`` and co-located
with ``faces``: a job's rows of every bulk table sit on the same worker, so the per-key reads, deletes,
``INSERT ... SELECT`` (persons) and joins of the reporting views run on one shard. Every other table
(jobs, ingests, job_retries, submissions, erasures, rate_limit_buckets and any job-level table added later)
stays a plain table on the coordinator, where its triggers, sequences, identity columns, ``ON CONFLICT``
upserts, ``FOR UPDATE SKIP LOCKED`` and advisory locks behave exactly as on one PostgreSQL
(docs/citus.md says why not reference tables).

The step runs after every alembic upgrade that reaches head (migrations/env.py), so a later migration that
adds a bulk table to schema.KEYED_TABLES gets it distributed by the next ``migrate``; on plain PostgreSQL
it does nothing.
"""

from __future__ import annotations

import sqlalchemy as sa

from worker.db import schema

DISTRIBUTION_COLUMN = "ingest_id"
# The co-location anchor: the first bulk table distributed; the others join its colocation group.
ANCHOR = schema.faces.name
DISTRIBUTED_TABLES: tuple[str, ...] = tuple(t.name for t in schema.KEYED_TABLES)

_HAS_CITUS = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')"
# citus_tables lists distributed, reference and Citus-local tables; only a hash-distributed one counts here.
_DISTRIBUTED = """
SELECT p.logicalrelid::regclass::text FROM pg_dist_partition p
WHERE p.logicalrelid = to_regclass(:name) AND p.partmethod = 'h'
"""
_HAS_KEY = """
SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(:name) AND attname = :column
               AND NOT attisdropped)
"""


def has_citus(conn: sa.Connection) -> bool:
    return bool(conn.execute(sa.text(_HAS_CITUS)).scalar())


def is_distributed(conn: sa.Connection, table: str) -> bool:
    return conn.execute(sa.text(_DISTRIBUTED), {"name": f"{schema.SCHEMA}.{table}"}).first() is not None


SCHEMA = schema.SCHEMA
_TYPE_CARRIER = f"{SCHEMA}.citus_type_carrier"
# Make the workers know the schema's enum types (face_api, ingest_state) that no Citus node knows yet: types
# created before the extension (a database converted in place). Citus ships rows of coordinator tables
# (jobs) to the workers when it joins them with the bulk tables, with the columns' types named; types
# created after the extension are propagated by Citus itself, older ones are not. Citus exposes no call for
# that: a reference table with a column of each type makes it create them on every node (and on nodes added
# later), and is dropped at once. The column list is built by the server from the catalog (format %I).
_PROPAGATE_TYPES = f"""
DO $propagate$
DECLARE
    cols text;
BEGIN
    SELECT string_agg(format('c%s %I.%I', x.n, x.nspname, x.typname), ', ' ORDER BY x.n) INTO cols
    FROM (SELECT row_number() OVER (ORDER BY t.typname) AS n, n.nspname, t.typname
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
          WHERE n.nspname = '{SCHEMA}' AND t.typtype = 'e'
            AND NOT EXISTS (SELECT 1 FROM pg_dist_object o
                            WHERE o.classid = 'pg_type'::regclass AND o.objid = t.oid)) x;
    IF cols IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TABLE {_TYPE_CARRIER} (%s)', cols);
    PERFORM create_reference_table('{_TYPE_CARRIER}');
    DROP TABLE {_TYPE_CARRIER};
END
$propagate$
"""


def distribute(conn: sa.Connection) -> list[str]:
    """Distribute every bulk table not distributed yet, co-located on ``ingest_id``; returns those it did.

    Without the citus extension nothing happens. Rows already in a table move to its shards (the table's
    local copy is emptied), so a database migrated before Citus was added converts in place.
    """
    if not has_citus(conn):
        return []
    conn.execute(sa.text(_PROPAGATE_TYPES))
    done: list[str] = []
    for table in DISTRIBUTED_TABLES:
        name = f"{SCHEMA}.{table}"
        # A table of an older or newer schema without the key (a downgrade, a renamed table) is left alone.
        if not conn.execute(sa.text(_HAS_KEY), {"name": name, "column": DISTRIBUTION_COLUMN}).scalar():
            continue
        if is_distributed(conn, table):
            continue
        anchor = f"{schema.SCHEMA}.{ANCHOR}"
        colocate = anchor if table != ANCHOR and is_distributed(conn, ANCHOR) else "none"
        had_rows = conn.execute(sa.text(f"SELECT EXISTS (SELECT 1 FROM {SCHEMA}.{table})")).scalar()
        conn.execute(sa.text("SELECT create_distributed_table(:name, :column, colocate_with => :colocate)"),
                     {"name": name, "column": DISTRIBUTION_COLUMN, "colocate": colocate})
        if had_rows:
            # The rows were copied to the shards; the coordinator's own copy is dead weight.
            conn.execute(sa.text("SELECT truncate_local_data_after_distributing_table(:name)"), {"name": name})
        done.append(table)
    return done
