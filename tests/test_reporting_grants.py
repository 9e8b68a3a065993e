"""The reporting surface for people and BI tools (revision 0010): the group role `rekognition_reader` reads
every reporting view and calls reporting.person_segments, and reads nothing else; every reporting view and
column carries a comment (the data dictionary BI tools show)."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import with_database
from worker.config import Settings
from worker.db.engine import connect as worker_connect
from worker.db.migrate import upgrade_to_head

READER = "rekognition_reader"
TABLES = ("jobs", "faces", "landmarks", "emotions", "face_matches", "collection_faces", "persons", "raw_pages",
          "job_retries", "rate_limit_buckets", "alembic_version")

# Every relation of schema reporting (views, and anything else a later revision puts there) and every one of
# its columns, without a comment.
UNDOCUMENTED = """
SELECT c.relname AS relation, NULL AS column_name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'reporting' AND c.relkind IN ('v', 'm', 'r', 'p', 'f') AND obj_description(c.oid, 'pg_class') IS NULL
UNION ALL
SELECT c.relname, a.attname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = 'reporting' AND c.relkind IN ('v', 'm', 'r', 'p', 'f') AND col_description(c.oid, a.attnum) IS NULL
ORDER BY 1, 2
"""


class _Undo(Exception):
    """Raised to roll a test transaction back."""


def _as(url: str, role: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"{role}@{parts.netloc.rsplit('@', 1)[-1]}", parts.path, parts.query, ""))


async def test_reader_reads_every_reporting_view_and_no_table(pg_server_url: str) -> None:
    admin = await asyncpg.connect(pg_server_url)
    created = not await admin.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", READER)
    if created:
        await admin.execute(f"CREATE ROLE {READER} NOLOGIN")
    member = f"bi_{uuid.uuid4().hex[:8]}"  # a person or a BI tool: logs in, reads through the group role
    await admin.execute(f"CREATE ROLE {member} LOGIN IN ROLE {READER}")
    name = f"readers_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(pg_server_url, name)
    try:
        async with asyncio.timeout(120):
            await asyncio.to_thread(upgrade_to_head, Settings(database_url=url))
            owner = await worker_connect(url)
            try:
                await owner.execute(
                    "INSERT INTO jobs (job_id, api, ingest_state, ingest_id) "
                    "VALUES ('r-1', 'FACE_DETECTION', 'ingested', 1);"
                    "INSERT INTO ingests (ingest_id, job_id) VALUES (1, 'r-1');"
                    "INSERT INTO faces (ingest_id, face_seq, timestamp_ms, has_face) VALUES (1, 0, 0, true), "
                    "(1, 1, 400, true);"
                    "INSERT INTO jobs (job_id, api, ingest_state, completed_at) "
                    "VALUES ('r-2', 'FACE_SEARCH', 'pending', now() - interval '1 day')")
                views = [r[0] for r in await owner.fetch(
                    "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'reporting' AND c.relkind = 'v' "
                    "ORDER BY 1")]
                # Tables: wherever a revision put them (the migration's search_path), found by name.
                tables = [r[0] for r in await owner.fetch(
                    "SELECT (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(t)) "
                    "FROM unnest($1::text[]) t", list(TABLES))]
            finally:
                await owner.close()
            assert "reporting.pending_jobs" in views and "reporting.job_summary" in views and None not in tables

            conn = await worker_connect(_as(url, member))
            try:
                for view in views:
                    await conn.fetch(f"SELECT * FROM {view} LIMIT 1")  # no error: readable
                assert await conn.fetchval("SELECT count(*) FROM reporting.face_observations") == 2
                assert await conn.fetchval("SELECT job_id FROM reporting.pending_jobs") == "r-2"
                assert [tuple(r) for r in await conn.fetch(
                    "SELECT segment_no, start_ms, end_ms FROM reporting.person_segments('r-1')")] == [(1, 0, 400)]
                for table in tables:
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.fetch(f"SELECT * FROM {table} LIMIT 1")
                for statement in ("DELETE FROM reporting.job_summary", "CREATE VIEW reporting.mine AS SELECT 1",
                                  "CREATE TABLE mine (x int)",
                                  "INSERT INTO rekognition.jobs (job_id, api, ingest_state) "
                                  "VALUES ('x', 'FACE_SEARCH', 'failed')"):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.execute(statement)
            finally:
                await conn.close()

            # A reporting view a later revision adds (as the migration role) is readable without a new grant.
            owner = await worker_connect(url)
            try:
                await owner.execute("CREATE VIEW reporting.later AS SELECT job_id FROM jobs")
            finally:
                await owner.close()
            conn = await worker_connect(_as(url, member))
            try:
                assert await conn.fetchval("SELECT count(*) FROM reporting.later") == 2
            finally:
                await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f"DROP ROLE IF EXISTS {member}")
        if created:
            await admin.execute(f"DROP ROLE IF EXISTS {READER}")
        await admin.close()


async def test_every_reporting_view_and_column_has_a_comment(db: asyncpg.Connection) -> None:
    async with asyncio.timeout(20):
        assert [tuple(r) for r in await db.fetch(UNDOCUMENTED)] == []
        # The check sees what a future view without comments would lack (rolled back: nothing of it stays).
        with pytest.raises(_Undo):
            async with db.transaction():
                await db.execute("CREATE VIEW reporting.undocumented AS SELECT 1 AS x")
                await db.execute("COMMENT ON VIEW reporting.undocumented IS 'a view'")
                assert [tuple(r) for r in await db.fetch(UNDOCUMENTED)] == [("undocumented", "x")]
                raise _Undo
