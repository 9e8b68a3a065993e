"""`migrate` grants the documented worker role exactly its least privileges (revision 0004)."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import create_database, with_database
from tests.test_cli import run_cli
from tests.test_security import as_role, role_database, roles_sections
from worker.config import Settings
from worker.db.migrate import upgrade_to_head

__all__ = ["role_database"]  # a fixture, shared with tests/test_security.py

ROLE = "rekognition_worker"


def _as(url: str, role: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"{role}@{parts.netloc.rsplit('@', 1)[-1]}", parts.path, parts.query, ""))


async def test_migrate_grants_dml_but_no_ddl_to_the_worker_role(pg_server_url: str) -> None:
    admin = await asyncpg.connect(pg_server_url)
    created = not await admin.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", ROLE)
    if created:
        await admin.execute(f"CREATE ROLE {ROLE} LOGIN")
    name = f"grants_{uuid.uuid4().hex[:8]}"
    await create_database(admin, name)
    url = with_database(pg_server_url, name)
    try:
        result = run_cli("migrate", env={"DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        conn = await asyncpg.connect(_as(url, ROLE))
        try:
            assert await conn.fetchval("SELECT count(*) FROM reporting.job_summary") == 0
            await conn.execute("INSERT INTO jobs (job_id, api, ingest_state) VALUES ('g-1', 'FACE_SEARCH', 'failed')")
            await conn.execute("DELETE FROM jobs WHERE job_id = 'g-1'")
            assert await conn.fetchval("SELECT version_num FROM alembic_version")
            # The tables live in schema rekognition (0007); a table a later migration creates there
            # (unqualified, as the migration connection's search_path puts it there) is writable too.
            assert await conn.fetchval("SELECT to_regclass('rekognition.jobs')::text") == "jobs"
            owner = await asyncpg.connect(url)
            try:
                await owner.execute("CREATE TABLE later_table (x int)")
                assert await owner.fetchval("SELECT to_regclass('rekognition.later_table')::text") == "later_table"
            finally:
                await owner.close()
            await conn.execute("INSERT INTO later_table VALUES (1)")
            # The erasure audit is append-only for the worker.
            await conn.execute("INSERT INTO erasures (selector_kind, selector_hash) VALUES ('face_id', $1)", "0" * 64)
            for change in ("UPDATE erasures SET jobs = 1", "DELETE FROM erasures", "TRUNCATE erasures"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(change)
            for ddl in ("CREATE TABLE sneaky (x int)", "DROP TABLE faces", "TRUNCATE faces",
                        "UPDATE alembic_version SET version_num = '0001'", "ALTER TABLE jobs ADD COLUMN x int"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(ddl)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if created:
            await admin.execute(f"DROP ROLE IF EXISTS {ROLE}")
        await admin.close()


async def test_the_grants_script_after_migrate_keeps_the_erasure_audit_append_only(
    role_database: tuple[str, str, str],
) -> None:
    """sql/03_grants.sql, run after every migrate as the docs say, must not hand UPDATE or DELETE on
    `erasures` back to the worker role (revision 0008 revokes them)."""
    url, migrator, worker = role_database
    _, _, post_migrate = roles_sections(migrator, worker)
    await asyncio.to_thread(upgrade_to_head, Settings(database_url=as_role(url, migrator)))
    owner = await asyncpg.connect(as_role(url, migrator))
    try:
        await owner.execute(post_migrate)
        await owner.execute(post_migrate)  # idempotent, and a second run takes nothing back either
    finally:
        await owner.close()
    conn = await asyncpg.connect(as_role(url, worker))
    try:
        await conn.execute("INSERT INTO erasures (selector_kind, selector_hash) VALUES ('face_id', $1)", "a" * 64)
        assert await conn.fetchval("SELECT count(*) FROM erasures") == 1
        for change in ("UPDATE erasures SET jobs = 1", "DELETE FROM erasures", "TRUNCATE erasures"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(change)
        # Nor can it take an erased identifier back (which would let the next ingest store the person again).
        await conn.execute("INSERT INTO erased_identifiers (selector_kind, selector_hash) VALUES ('face_id', $1)",
                           "b" * 64)
        for change in ("UPDATE erased_identifiers SET erased_at = now()", "DELETE FROM erased_identifiers",
                       "TRUNCATE erased_identifiers"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(change)
        # The rest of the worker's tables stay writable: the revoke is aimed at the audit alone.
        await conn.execute("INSERT INTO jobs (job_id, api, ingest_state) VALUES ('g-2', 'FACE_SEARCH', 'failed')")
        assert await conn.fetchval("UPDATE jobs SET attempts = 2 WHERE job_id = 'g-2' RETURNING attempts") == 2
        await conn.execute("DELETE FROM jobs WHERE job_id = 'g-2'")
        assert await conn.fetchval("SELECT count(*) FROM erasures") == 1
    finally:
        await conn.close()
