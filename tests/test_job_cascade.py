"""Deleting a jobs row deletes that job's rows in every table (0007's statement-level trigger, by every ingest
key of the job since 0012), and
every connection the worker opens resolves unqualified names in schema rekognition."""

from __future__ import annotations

import ast
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from worker.db import schema
from worker.db.engine import connect

ROOT = Path(__file__).resolve().parents[1]

# One row per job table, minimal: the columns without defaults that must be given. Keyed tables get a row of
# the job's current ingest key and one of an earlier attempt that stopped (its rows are the job's too).
_KEYED = {
    "faces": "(ingest_id, face_seq, timestamp_ms, has_face) VALUES ($1, 0, 0, true)",
    "landmarks": "(ingest_id, face_seq, types, xs, ys) VALUES ($1, 0, '{nose}', '{0.5}', '{0.5}')",
    "emotions": "(ingest_id, face_seq, types, confidences) VALUES ($1, 0, '{CALM}', '{99}')",
    "face_matches": "(ingest_id, face_seq, ordinal, face_id) VALUES ($1, 0, 0, 'f-1')",
    "collection_faces": "(ingest_id, face_id) VALUES ($1, 'f-1')",
    "persons": "(ingest_id, person_index, first_seen_ms, last_seen_ms, detections) VALUES ($1, 0, 0, 0, 1)",
    "raw_pages": "(ingest_id, page_no, encoding, body, body_bytes) VALUES ($1, 0, 'json', '', 0)",
}
_BY_JOB_ID = {"ingests": "(ingest_id, job_id) VALUES ($2, $1)",
              "job_retries": "(job_id, api) VALUES ($1, 'FACE_SEARCH')"}
_ROWS = {**_KEYED, **_BY_JOB_ID}


async def _job(conn: asyncpg.Connection, job_id: str) -> None:
    current, stopped = [await conn.fetchval("SELECT nextval('ingest_ids')") for _ in range(2)]
    await conn.execute("INSERT INTO jobs (job_id, api, ingest_state, ingest_id) "
                       "VALUES ($1, 'FACE_SEARCH', 'ingested', $2)", job_id, current)
    for key in (current, stopped):
        for table, values in _KEYED.items():
            await conn.execute(f"INSERT INTO {table} {values}", key)
        await conn.execute(f"INSERT INTO ingests {_BY_JOB_ID['ingests']}", job_id, key)
    await conn.execute(f"INSERT INTO job_retries {_BY_JOB_ID['job_retries']}", job_id)


async def _counts(conn: asyncpg.Connection, job_id: str) -> dict[str, int]:
    return {t: await conn.fetchval(
        f"SELECT count(*) FROM rekognition.{t} WHERE job_id = $1" if t in ("jobs", *_BY_JOB_ID) else
        f"SELECT count(*) FROM rekognition.{t} t JOIN rekognition.ingests i USING (ingest_id) WHERE i.job_id = $1",
        job_id) for t in ("jobs", *_ROWS)}


def test_every_job_table_is_covered() -> None:
    assert set(_ROWS) == {t.name for t in schema.JOB_TABLES}


async def test_deleting_jobs_deletes_their_rows_everywhere_and_nothing_else(
        db: asyncpg.Connection, db_url: str) -> None:
    for job_id in ("gone-1", "gone-2", "kept-1"):
        await _job(db, job_id)
    # One statement deleting two jobs, from a session that does not know the schema (psql's default).
    other = await asyncpg.connect(db_url, server_settings={"search_path": "public"})
    try:
        assert await other.execute("DELETE FROM rekognition.jobs WHERE job_id LIKE 'gone-%'") == "DELETE 2"
    finally:
        await other.close()
    for job_id in ("gone-1", "gone-2"):
        assert set((await _counts(db, job_id)).values()) == {0}, job_id
    kept = await _counts(db, "kept-1")
    assert kept == {t: 1 if t in ("jobs", "job_retries") else 2 for t in kept}


async def test_the_worker_connection_finds_its_tables_without_the_database_setting(
        pg_server_url: str, db_url: str) -> None:
    # Without the per-database search_path the tests give their databases (what a DBA's database has).
    admin = await asyncpg.connect(pg_server_url)
    name = urlsplit(db_url).path.lstrip("/")
    try:
        await admin.execute(f'ALTER DATABASE "{name}" RESET search_path')
    finally:
        await admin.close()
    plain = await asyncpg.connect(db_url)
    try:
        assert await plain.fetchval("SELECT to_regclass('jobs')") is None
    finally:
        await plain.close()
    conn = await connect(db_url)
    try:
        assert await conn.fetchval("SELECT current_schema()") == "rekognition"
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 0
    finally:
        await conn.close()


def test_no_module_of_the_worker_connects_around_the_helper() -> None:
    # Only worker/db/engine.py calls asyncpg.connect: every other connection gets the search_path from it.
    offenders = []
    for path in (ROOT / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("connect", "create_pool")
                    and isinstance(node.value, ast.Name) and node.value.id == "asyncpg"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert [o.split(":")[0] for o in offenders] == ["worker/db/engine.py"], offenders
