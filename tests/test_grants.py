"""`migrate --grant-to ROLE` applies the worker's least privileges as part of the migration step."""

from __future__ import annotations

import asyncpg

from tests.test_cli import run_cli
from tests.test_security import as_role, role_database  # noqa: F401 - the fixture


async def test_migrate_grants_the_worker_role(role_database: tuple[str, str, str]) -> None:  # noqa: F811
    url, migrator, worker = role_database
    result = run_cli("migrate", "--grant-to", worker, env={"DATABASE_URL": as_role(url, migrator)})
    assert result.returncode == 0, result.stderr
    conn = await asyncpg.connect(as_role(url, worker))
    try:
        assert await conn.fetchval("SELECT count(*) FROM reporting.job_summary") == 0
        await conn.execute("INSERT INTO jobs (job_id, api, ingest_state) VALUES ('g-1', 'FACE_SEARCH', 'failed')")
        try:
            await conn.execute("CREATE TABLE sneaky (x int)")
            raise AssertionError("the worker role could create a table")
        except asyncpg.InsufficientPrivilegeError:
            pass
    finally:
        await conn.close()


def test_grant_to_rejects_a_role_that_is_not_a_plain_name(db_url: str) -> None:
    result = run_cli("migrate", "--grant-to", 'x"; DROP TABLE jobs; --', env={"DATABASE_URL": db_url})
    assert result.returncode == 2 and "not a plain lower-case role name" in result.stderr
